#!/usr/bin/env python3
"""Regenerate the leaderboard table in records/README.md from the record folders.

Every folder records/track_*/YYYY-MM-DD_ShortName/ is one record. Its
record.json gives the date, the claimed time, a description and the
contributors; the mean final val loss and mean time are computed from the run
logs in the same folder (with compare.py's functions), so the table cannot
drift from the evidence; the p-value tests the track's own target. A record
that breaks the rules of records/README.md (check_submission.py's rule
functions: track, copies, p-value, hardware, data, compiler options) is
refused: one line per refused record, nothing is rewritten, and the exit
status is 1. The table lives between the marker comments
<!-- leaderboard:start --> and <!-- leaderboard:end --> and is never edited by
hand: adding a record is one folder plus one run of this script.

Examples:
  python records/leaderboard.py            # rewrite the table in records/README.md
  python records/leaderboard.py --check    # exit 1 if the table is out of date (CI)
"""

import argparse
import os
import re
import sys

if __package__:
    from . import check_submission, compare
else:  # run as `python records/leaderboard.py`: this folder is sys.path[0]
    import check_submission
    import compare

START_MARKER = "<!-- leaderboard:start -->"
END_MARKER = "<!-- leaderboard:end -->"
METADATA_FILE = check_submission.METADATA_FILE
RECORDS_DIR = os.path.dirname(os.path.abspath(__file__))
FOLDER_RE = check_submission.FOLDER_RE
LEADERBOARD_RULES = check_submission.LEADERBOARD_RULES
TRACK_RE = re.compile(r"^track_[A-Za-z0-9_]+$")


class LeaderboardError(Exception):
    """Bad record folder or README; reported as one line naming the culprit."""


# ----------------------------------------------------------------------------- reading records

def track_dirs(root):
    """The track folders (track_*) under root, sorted by name."""
    if not os.path.isdir(root):
        raise LeaderboardError(f"{root}: no such folder")
    return [os.path.join(root, name) for name in sorted(os.listdir(root))
            if TRACK_RE.match(name) and os.path.isdir(os.path.join(root, name))]


def record_dirs(track):
    """The record folders of one track (every subfolder is a record)."""
    return [os.path.join(track, name) for name in sorted(os.listdir(track))
            if os.path.isdir(os.path.join(track, name)) and not name.startswith(".")]


def _require(condition, folder, message):
    """Raise a LeaderboardError naming the folder unless condition holds."""
    if not condition:
        raise LeaderboardError(f"{folder}: {message}")


def read_metadata(folder):
    """Load and validate record.json with check_submission's rules (one place for them)."""
    try:
        meta, _ = check_submission.read_record_json(folder)
    except check_submission.SubmissionError as error:
        raise LeaderboardError(f"{folder}: {error}") from None
    return meta


def track_target(folder):
    """The val loss the record's track must reach (check_submission.TRACKS; compare's for a track it does not know)."""
    name = os.path.basename(os.path.dirname(os.path.abspath(folder)))
    track = check_submission.TRACKS.get(name)
    return track.target if track else compare.track_target(name)


def read_record(folder):
    """One leaderboard entry: metadata plus the group statistics of the folder's logs, against its track's target."""
    meta = read_metadata(folder)
    sub = check_submission.load_submission(folder)
    _require(sub.logs, folder, "no run logs (.txt/.log files with step lines)")
    runs = [log.run for log in sub.logs]
    target = track_target(folder)
    summary = compare.group_summary(folder, runs, target)
    _require(summary["n"] > 0, folder, "no complete run (no log has a validation line at step T/T)")
    # the rules of records/README.md: track, copies, p, hardware, data, code
    refused = [f"{name}: {figure}" for name, ok, figure in check_submission.check(sub, LEADERBOARD_RULES) if not ok]
    entry = {"folder": folder, "meta": meta, "stats": summary, "refused": refused,
             "notes": compare.skipped_notes(folder, sub.skipped)}
    if "steps" in meta:  # a steps track: the evidence is every run's val loss at the claimed step
        entry["steps"] = compare.steps_summary(folder, runs, target, at_step=meta["steps"])
    return entry


def read_tracks(root):
    """{track name: [entries sorted by date, then time, then folder]} for every track with records."""
    tracks = {}
    for track in track_dirs(root):
        entries = [read_record(folder) for folder in record_dirs(track)]
        if entries:
            entries.sort(key=lambda e: (e["meta"]["date"], claimed_score(e["meta"]), os.path.basename(e["folder"])))
            tracks[os.path.basename(track)] = entries
    return tracks


def claimed_score(meta):
    """What a record claims: time_s on a time track, steps on a steps track (fewer is better on both)."""
    return meta["steps"] if "steps" in meta else meta["time_s"]


# ----------------------------------------------------------------------------- rendering

def _cell(text):
    """Make text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def time_scores(entry):
    """A time track's score cells: the claimed time, the loss with the t-test's p, the logs' mean time."""
    meta, s = entry["meta"], entry["stats"]
    return [f"{meta['time_s']:.2f} s", f"{s['mean_val_loss']:.4f} (n={s['n']}, p={compare.fmt_p(s['p_value'])})",
            f"{s['mean_train_time_s']:.2f} s"]


def steps_scores(entry):
    """A steps track's score cells (the optimizer benchmark): the claimed steps and the z-rule evidence at them."""
    s = entry["steps"]
    return [str(entry["meta"]["steps"]), f"{s['mean_val_loss']:.4f} (n={s['n']}, z={s['z']:.4f})"]


# (header, right-aligned) of the score columns of each kind of track
TIME_COLUMNS = [("Time", True), ("Mean val loss (complete runs)", False), ("Mean time in logs", True)]
STEPS_COLUMNS = [("Steps", True), ("Evidence: mean val loss at that step", False)]


def table_head(columns):
    """A Markdown table's header and separator lines; right-aligned columns end their separator in ':'."""
    return ["| " + " | ".join(name for name, _ in columns) + " |",
            "|" + "|".join("-" * (len(name) + 1) + ":" if right else "-" * (len(name) + 2) for name, right in columns) + "|"]


def no_records(track):
    """What a track without records shows under its header."""
    return f"No records yet: the first folder under `records/{track}/` will appear here."


def render_track(track, entries, base):
    """One track's section: its header, what races (check_submission.TRACKS) and the Markdown table of its records
    (or a line saying there are none); links are relative to base (the README's folder)."""
    known = check_submission.TRACKS.get(track)
    lines = [f"### {track}", ""] + ([known.race, ""] if known else [])
    if not entries:
        return "\n".join(lines + [no_records(track)])
    score_columns, scores = (STEPS_COLUMNS, steps_scores) if "steps" in entries[0] else (TIME_COLUMNS, time_scores)
    columns = [("#", True), ("Date", False), *score_columns, ("Description", False), ("Contributors", False), ("Record", False)]
    lines += table_head(columns)
    for number, entry in enumerate(entries, 1):
        meta = entry["meta"]
        rel = os.path.relpath(os.path.abspath(entry["folder"]), base).replace(os.sep, "/")
        lines.append("| " + " | ".join([
            str(number), meta["date"], *scores(entry), _cell(meta["description"]),
            _cell(", ".join(meta["contributors"])), f"[{os.path.basename(entry['folder'])}]({rel}/)",
        ]) + " |")
    return "\n".join(lines)


def render_leaderboard(tracks, base):
    """Everything between the markers (without the markers): a section for every track check_submission knows, with
    or without records, in name order; base as in render_track."""
    names = sorted(set(check_submission.TRACKS) | set(tracks))
    return "\n\n".join(render_track(name, tracks.get(name, []), base) for name in names)


def splice(readme_text, body, readme_path):
    """Put body between the markers of the README text; the rest is left untouched."""
    start = readme_text.find(START_MARKER)
    end = readme_text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise LeaderboardError(f"{readme_path}: needs the markers {START_MARKER} and {END_MARKER}, in that order")
    return readme_text[:start + len(START_MARKER)] + "\n" + body + "\n" + readme_text[end:]


# ----------------------------------------------------------------------------- command line

def build_parser():
    """Command-line options (see the module docstring for the examples)."""
    parser = argparse.ArgumentParser(
        prog="leaderboard.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=RECORDS_DIR,
                        help="folder holding the track_* folders (default: the folder of this script)")
    parser.add_argument("--readme", help="README holding the markers (default: ROOT/README.md)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the README table is out of date")
    return parser


def main(argv=None):
    """Entry point; returns 0 (up to date / rewritten), 1 (a record breaks the rules, or --check: stale) or 2 (error)."""
    args = build_parser().parse_args(argv)
    readme = os.path.relpath(args.readme or os.path.join(args.root, "README.md"))
    try:
        with open(readme, encoding="utf-8") as handle:
            old = handle.read()
        tracks = read_tracks(args.root)
        for note in (note for entries in tracks.values() for e in entries for note in e["notes"]):
            print(f"note: {note}", file=sys.stderr)
        refused = [e for entries in tracks.values() for e in entries if e["refused"]]
        if refused:
            for entry in refused:
                print(f"refused: {entry['folder']}: {'; '.join(entry['refused'])}", file=sys.stderr)
            print(f"{readme}: not rewritten: {len(refused)} record folder(s) break the rules "
                  f"(python records/check_submission.py FOLDER shows every rule)", file=sys.stderr)
            return 1
        new = splice(old, render_leaderboard(tracks, os.path.dirname(os.path.abspath(readme))), readme)
    except (LeaderboardError, compare.CompareError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {readme}: {error.strerror}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"{readme}: leaderboard is out of date; run python records/leaderboard.py", file=sys.stderr)
            return 1
        print(f"{readme}: leaderboard is up to date")
        return 0
    if new != old:
        with open(readme, "w", encoding="utf-8") as handle:
            handle.write(new)
        print(f"{readme}: leaderboard rewritten ({sum(len(e) for e in tracks.values())} record folders)")
    else:
        print(f"{readme}: leaderboard already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
