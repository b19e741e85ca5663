#!/usr/bin/env python3
"""Check a record folder against the rules of a record (records/README.md) before a person reads it.

Prints one line per rule, PASS or FAIL with the figure it was judged on, then a
summary line. Exit status: 0 when every rule passes, 1 when any rule fails,
2 on a usage error (no such folder).

Each rule is one function taking a Submission and returning (ok, figure text),
so leaderboard.py can apply the same rules to the records it publishes.

Examples:
  python records/check_submission.py records/track_1_short/2026-11-24_MyChange
"""

import argparse
import ast
import dataclasses
import datetime
import decimal
import json
import os
import re
import subprocess
import sys
import tempfile

if __package__:
    from . import compare, runlog, stats
else:  # run as `python records/check_submission.py`: this folder is sys.path[0]
    import compare
    import runlog
    import stats

METADATA_FILE = "record.json"
SCRIPT_NAME = "train_gpt.py"
BASELINE_DIR = "baseline"
CRASHED_DIR = "crashed"
FOLDER_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_P = 0.01  # the record test must reject "mean >= target" at this level (strict <)
HELP_TIMEOUT_S = 180  # importing the real trainer loads torch; a cold CI runner can take a while
MAX_TIME_DECIMALS = 3  # the logs give train_time in whole milliseconds


@dataclasses.dataclass(frozen=True)
class Track:
    """What a track fixes: hardware, target and data. One entry per records/track_* folder."""
    name: str
    gpu_model: str          # substring of the logged GPU name, e.g. "H100 80GB" in "NVIDIA H100 80GB HBM3"
    world_size: int
    target: float = compare.DEFAULT_TARGET  # the val loss a record must reach (compare.TRACK_TARGETS)
    train_files_name: str = "fineweb_train_*.bin"  # last component of --train-files: every FineWeb train shard, in order
    val_files_name: str = "fineweb_val_*.bin"
    val_tokens: int = 10_485_760
    val_seq_len: int = 262_144  # record #28's; longer sequences cut fewer documents, so the length is fixed
    # A steps track (the optimizer benchmark) scores steps, not time: any of world_sizes x one of gpu_models, the
    # same GPU in every log, and the config values in fixed_config (model and batch) in every log.
    score: str = "time"
    world_sizes: tuple = ()
    gpu_models: tuple = ()
    fixed_config: tuple = ()
    # Compiler config settings this track allows besides dynamo's recompile limit (rule 5), as dotted names.
    allowed_compiler_settings: tuple = ()
    model: str = ""  # what races, and its trainer (the leaderboard's line under the track's header)

    @property
    def race(self):
        """One line for the leaderboard: the model, the target, the hardware and the score."""
        score = ("the fewest steps (the z-rule at one step for every run)" if self.score == "steps"
                 else f"the fastest mean time (with a one-sided t-test p < {MAX_P})")
        return f"{self.model} to a val loss of {self.target} on {self.hardware}; the record is {score}."

    @property
    def hardware(self):
        if self.score == "steps":
            sizes = ", ".join(map(str, self.world_sizes[:-1])) + f" or {self.world_sizes[-1]}"
            return f"{sizes} x one GPU model, an {' or an '.join(self.gpu_models)}"
        return f"{self.world_size} x {self.gpu_model}"


TRACKS = {
    "track_1_short": Track("track_1_short", gpu_model="H100 80GB", world_size=8, target=compare.TRACK_TARGETS["track_1_short"],
                           model="GPT-2 small (`train_gpt.py`)"),
    # GPT-2 medium to 2.92 (records/track_2_medium/train_gpt.py): track 1's rules with its own target, and the one
    # inductor option the public track allows since its record 6.
    "track_2_medium": Track("track_2_medium", gpu_model="H100 80GB", world_size=8, target=compare.TRACK_TARGETS["track_2_medium"],
                            allowed_compiler_settings=("torch._inductor.config.coordinate_descent_tuning",),
                            model="GPT-2 medium (`records/track_2_medium/train_gpt.py`)"),
    "track_3_optimization": Track(
        "track_3_optimization", gpu_model="", world_size=0, target=compare.TRACK_TARGETS["track_3_optimization"],
        val_seq_len=1024, score="steps", world_sizes=(1, 2, 4, 8),
        gpu_models=("A100", "H100"), fixed_config=(("num_layers", 12), ("model_dim", 768), ("head_dim", 128),
                                                   ("vocab_size", 50304), ("batch_seqs", 512), ("train_seq_len", 1024)),
        model="The optimizer benchmark's fixed GPT-2 small and batch (`records/track_3_optimization/train_gpt.py`)"),
}


class SubmissionError(Exception):
    """A record.json or folder problem, as one line (leaderboard.py prefixes the folder)."""


@dataclasses.dataclass
class Log:
    """One log file of a submission: its path, name, text and the parsed run."""
    path: str
    text: str
    run: runlog.RunLog

    @property
    def name(self):
        return os.path.basename(self.path)

    @property
    def source(self):
        return runlog.split_source(self.text)[0]


@dataclasses.dataclass
class Submission:
    """Everything the rules look at, read once from a record folder (logs, baseline/ and crashed/ each by name)."""
    folder: str
    track: Track = None
    meta: dict = None
    meta_error: str = None
    time_text: str = None  # record.json's time_s as written, e.g. "168.75"
    logs: list = dataclasses.field(default_factory=list)
    baseline: list = dataclasses.field(default_factory=list)
    crashed: list = dataclasses.field(default_factory=list)
    script: str = None  # the train_gpt.py in the folder, if any
    skipped: compare.Scan = dataclasses.field(default_factory=compare.Scan)  # files left out (.stepless, .not_logs)

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.folder))

    @property
    def track_name(self):
        return os.path.basename(os.path.dirname(os.path.abspath(self.folder)))

    @property
    def complete(self):
        return [log for log in self.logs if log.run.complete]

    @property
    def copies(self):
        """runlog.duplicates over every log of the folder (its own, crashed/ and baseline/ together): a run is one
        run wherever its copy lies; the first of each set is kept."""
        return runlog.duplicates([log.run for log in self.logs + self.crashed + self.baseline])

    def counted(self, logs):
        """The complete logs of logs, each run once: what the statistics, the claimed time and the speed count."""
        copied = {id(run) for run, _, _ in self.copies}
        return [log for log in logs if log.run.complete and id(log.run) not in copied]


# ----------------------------------------------------------------------------- reading

def parse_record_json(folder):
    """Load record.json and check its fields; returns (meta, time_s as written). Raises SubmissionError.

    Why strict: a typo should fail CI, not publish. time_s is read as written ("168.70" keeps its
    two decimals) because the claimed-time rule compares to that precision; meta["time_s"] is a float.
    """
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        raise SubmissionError(f"missing {METADATA_FILE}")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.loads(handle.read(), parse_float=decimal.Decimal)
    except ValueError as error:
        raise SubmissionError(f"{METADATA_FILE} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise SubmissionError(f"{METADATA_FILE} must hold a JSON object")
    date = meta.get("date")
    if not (isinstance(date, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date)):
        raise SubmissionError(f"{METADATA_FILE}: 'date' must be a string YYYY-MM-DD")
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise SubmissionError(f"{METADATA_FILE}: 'date' {date} is not a calendar date") from None
    time_s = meta.get("time_s")
    if scores_steps(folder):
        check_claimed_steps(meta)
    elif not (isinstance(time_s, (int, decimal.Decimal)) and not isinstance(time_s, bool) and time_s > 0):
        raise SubmissionError(f"{METADATA_FILE}: 'time_s' must be a positive number of seconds")
    if not (isinstance(meta.get("description"), str) and meta["description"].strip()):
        raise SubmissionError(f"{METADATA_FILE}: 'description' must be a non-empty string")
    people = meta.get("contributors")
    if not (isinstance(people, list) and people and all(isinstance(p, str) and p.strip() for p in people)):
        raise SubmissionError(f"{METADATA_FILE}: 'contributors' must be a non-empty list of names")
    if not (meta.get("commit") is None or isinstance(meta["commit"], str)):
        raise SubmissionError(f"{METADATA_FILE}: 'commit' must be a string when given")
    if scores_steps(folder):
        return meta, None
    time_text = str(time_s)
    meta["time_s"] = float(time_s)
    return meta, time_text


def scores_steps(folder):
    """Whether the folder is in a steps track (record.json claims `steps`, not `time_s`)."""
    track = TRACKS.get(os.path.basename(os.path.dirname(os.path.abspath(folder))))
    return track is not None and track.score == "steps"


def check_claimed_steps(meta):
    """A steps track's record.json claims `steps`: the step, the same for every run, whose val losses are the evidence."""
    steps = meta.get("steps")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        raise SubmissionError(f"{METADATA_FILE}: 'steps' must be a positive whole number of steps")


def folder_date_problem(folder, meta):
    """Why the folder name's date disagrees with record.json's date, or None (also None without a dated name)."""
    match = FOLDER_RE.match(os.path.basename(os.path.normpath(folder)))
    if match and match.group(1) != meta["date"]:
        return f"folder date differs from {METADATA_FILE} date {meta['date']} (folder name: {match.group(1)})"
    return None


def read_record_json(folder):
    """parse_record_json plus the folder name (YYYY-MM-DD_ShortName, same date); what leaderboard.py reads."""
    meta, time_text = parse_record_json(folder)
    if not FOLDER_RE.match(os.path.basename(os.path.normpath(folder))):
        raise SubmissionError("folder name must be YYYY-MM-DD_ShortName")
    problem = folder_date_problem(folder, meta)
    if problem:
        raise SubmissionError(problem)
    return meta, time_text


def read_logs(folder, skipped=None):
    """The logs directly in folder (compare.py's notion of a log), parsed; [] if no such folder.
    Logs without a step line and files that are no log are not read; they are added to skipped (a compare.Scan) when given."""
    if not os.path.isdir(folder):
        return []
    scan = compare.scan_folder(folder)
    if skipped is not None:
        skipped += compare.Scan(stepless=scan.stepless, not_logs=scan.not_logs)
    logs = []
    for path in scan.logs:
        text = runlog.read_text(path)
        logs.append(Log(path, text, runlog.parse_log_text(text, path)))
    return logs


def claimed_time_text(folder):
    """record.json's time_s as written, even when another field is bad (so the time rule still runs); else None."""
    try:
        with open(os.path.join(folder, METADATA_FILE), encoding="utf-8") as handle:
            time_s = json.loads(handle.read(), parse_float=decimal.Decimal).get("time_s")
    except (OSError, ValueError, AttributeError):
        return None
    valid = isinstance(time_s, (int, decimal.Decimal)) and not isinstance(time_s, bool) and time_s > 0
    return str(time_s) if valid else None


def load_submission(folder):
    """Read a record folder once: record.json, the logs, baseline/ and crashed/ logs, train_gpt.py."""
    sub = Submission(folder=folder)
    sub.track = TRACKS.get(sub.track_name)
    try:
        sub.meta, sub.time_text = parse_record_json(folder)
        sub.meta_error = folder_date_problem(folder, sub.meta)
    except SubmissionError as error:
        sub.meta_error = str(error)
        sub.time_text = claimed_time_text(folder)
    sub.logs = read_logs(folder, sub.skipped)
    sub.baseline = read_logs(os.path.join(folder, BASELINE_DIR), sub.skipped)
    sub.crashed = read_logs(os.path.join(folder, CRASHED_DIR), sub.skipped)
    script = os.path.join(folder, SCRIPT_NAME)
    if os.path.isfile(script):
        sub.script = runlog.read_text(script)
    return sub


# ----------------------------------------------------------------------------- helpers

def _names(logs, limit=3):
    """'a.txt, b.txt' (and 'and N more'): which logs a figure is about."""
    names = [log.name for log in logs]
    text = ", ".join(names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _distinct(values):
    """Distinct values in first-seen order."""
    seen = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _hardware_text(run):
    return f"{run.world_size if run.world_size is not None else '?'} x {run.gpu or 'unknown GPU'}"


def _need_track(sub):
    """(False, figure) when the folder is not in a known track, else None."""
    if sub.track is None:
        return False, f"unknown track {sub.track_name!r} (known: {', '.join(sorted(TRACKS))})"
    return None


def _need_logs(sub):
    if not sub.logs:
        return False, "no logs in the folder"
    return None


def _config_values(sub, key):
    """[(log, value)] of one config key in every record log; value None when the log has no config/key."""
    return [(log, None if log.run.config is None else log.run.config.get(key)) for log in sub.logs]


# ----------------------------------------------------------------------------- rules: folder and metadata

def rule_folder(sub):
    """The folder is records/<known track>/YYYY-MM-DD_ShortName."""
    problems = []
    if not FOLDER_RE.match(sub.name):
        problems.append(f"name {sub.name!r} is not YYYY-MM-DD_ShortName")
    if sub.track is None:
        problems.append(f"parent {sub.track_name!r} is not a track ({', '.join(sorted(TRACKS))})")
    if problems:
        return False, "; ".join(problems)
    return True, f"{sub.track_name}/{sub.name}"


def rule_metadata(sub):
    """record.json has every field, with the right types, and its date is the folder's date."""
    if sub.meta_error:
        return False, sub.meta_error
    meta = sub.meta
    same = " (= folder name)" if FOLDER_RE.match(sub.name) else ""
    claim = f"steps {meta['steps']}" if "steps" in meta and sub.time_text is None else f"time_s {sub.time_text}"
    return True, (f"date {meta['date']}{same}, {claim}, "
                  f"{len(meta['contributors'])} contributor(s), description {meta['description']!r}")


# ----------------------------------------------------------------------------- rules: logs and source

def log_problem(log):
    """Why a log is not usable evidence, or None. A stopped run (stopping: line) is kept but not counted."""
    run = log.run
    missing = [name for name, value in (("source", log.source), ("world_size", run.world_size),
                                         ("gpu", run.gpu), ("config", run.config), ("step lines", run.steps_total))
               if value is None]
    if missing:
        return f"{log.name}: not parsed (no {', '.join(missing)})"
    if not run.complete and run.stopping is None:
        return (f"{log.name}: incomplete (last step {run.last_step}/{run.steps_total}) without a stopping: line;"
                f" move a crashed run's log to {CRASHED_DIR}/")
    return None


def rule_logs(sub):
    """Every log parses (source, header lines, steps) and is complete or was stopped by the trainer."""
    missing = _need_logs(sub)
    if missing:
        return missing
    problems = [p for p in map(log_problem, sub.logs) if p]
    if problems:
        return False, "; ".join(problems)
    stopped = len(sub.logs) - len(sub.complete)
    figure = f"{len(sub.logs)} logs parsed, {len(sub.complete)} complete"
    if stopped:
        figure += f", {stopped} stopped (listed, not counted)"
    if sub.crashed:
        figure += f", {len(sub.crashed)} in {CRASHED_DIR}/ (not counted)"
    return True, figure


def _where(sub, log):
    """A log's name as the folder holds it: 'run1.txt', 'baseline/base0.txt', 'crashed/run4.txt'."""
    folder = BASELINE_DIR if any(log is l for l in sub.baseline) else CRASHED_DIR if any(log is l for l in sub.crashed) else ""
    return os.path.join(folder, log.name) if folder else log.name


def rule_track(sub):
    """Every log (crashed/ and baseline/ too) comes from the folder's track's trainer: its `track:` line names the
    track (track_1_short: the repository's train_gpt.py, which writes none)."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    everything = sub.logs + sub.crashed + sub.baseline
    wrong = [log for log in everything if compare.run_track(log.run) != sub.track.name]
    if wrong:
        found = "; ".join(f"{_where(sub, log)}: {compare.run_track(log.run)}" for log in wrong[:4])
        more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        return False, f"{found}{more}: logs of another track's trainer ({sub.track.name} needs its own trainer's logs)"
    return True, f"{len(everything)} logs of {sub.track.name}'s trainer"


def rule_distinct_runs(sub):
    """Each run counts once: no log of the folder (its own, crashed/, baseline/) repeats another, by the same text
    or the same run id on its config: line. The statistics, the claimed time and the speed count each run once."""
    missing = _need_logs(sub)
    if missing:
        return missing
    found = sub.copies
    if found:
        everything = sub.logs + sub.crashed + sub.baseline
        where = {id(log.run): _where(sub, log) for log in everything}
        text = "; ".join(f"{where[id(run)]} repeats {where[id(earlier)]} (same {what})" for run, earlier, what in found)
        return False, f"{text}: a run counts once: remove the copies"
    total = len(sub.logs) + len(sub.crashed) + len(sub.baseline)
    return True, f"{total} logs (with {CRASHED_DIR}/ and {BASELINE_DIR}/), no two with the same text or run id"


def _same_script(a, b):
    """The logger adds a newline after the file's text, so trailing newlines do not count."""
    return a.rstrip("\r\n") == b.rstrip("\r\n")


def rule_one_source(sub):
    """Every log embeds the same source (one hash), and it is the folder's train_gpt.py."""
    missing = _need_logs(sub)
    if missing:
        return missing
    hashes = _distinct(log.run.source_hash for log in sub.logs + sub.crashed)
    if None in hashes:
        return False, f"no embedded source in {_names([l for l in sub.logs + sub.crashed if l.run.source_hash is None])}"
    if len(hashes) > 1:
        groups = [f"{h}: {_names([l for l in sub.logs + sub.crashed if l.run.source_hash == h])}" for h in hashes]
        return False, f"{len(hashes)} different sources ({'; '.join(groups)})"
    if sub.script is None:
        return False, f"one source {hashes[0]}, but the folder has no {SCRIPT_NAME} (the script you claim)"
    if not _same_script(sub.script, sub.logs[0].source):
        return False, (f"the logs' source {hashes[0]} differs from the folder's {SCRIPT_NAME} "
                       f"{runlog.source_hash(sub.script)}")
    return True, f"{hashes[0]} in {len(sub.logs) + len(sub.crashed)} logs, equal to the folder's {SCRIPT_NAME}"


def source_help(source, timeout=HELP_TIMEOUT_S):
    """Write source to a temporary train_gpt.py and run `python train_gpt.py --help`; returns (ok, figure).

    Why: a log must come from a script that exists and runs; --help imports it without training.
    """
    with tempfile.TemporaryDirectory(prefix="check_submission_") as tmp:
        path = os.path.join(tmp, SCRIPT_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(source)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            done = subprocess.run([sys.executable, path, "--help"], cwd=tmp, env=env, capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"`{SCRIPT_NAME} --help` did not finish in {timeout} s"
    usage = next((line.strip() for line in done.stdout.splitlines() if line.strip()), "")
    if done.returncode != 0:
        last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        return False, f"`{SCRIPT_NAME} --help` exits {done.returncode}: {last}"
    if not usage.lower().startswith("usage:"):
        return False, f"`{SCRIPT_NAME} --help` prints no usage line (got {usage[:60]!r})"
    return True, f"`{SCRIPT_NAME} --help` exits 0 ({usage[:70]})"


def rule_source_runs(sub):
    """The embedded source is a train_gpt.py that imports and whose --help works."""
    sources = _distinct(log.source for log in sub.logs if log.source is not None)
    if not sources:
        return False, "no embedded source to run"
    results = [source_help(source) for source in sources]
    bad = [figure for ok, figure in results if not ok]
    if bad:
        return False, "; ".join(bad)
    return True, results[0][1]


# ----------------------------------------------------------------------------- rules: data

def rule_data_shards(sub):
    """--train-files and --val-files name every FineWeb shard: fineweb_train_*.bin / fineweb_val_*.bin."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    track = sub.track
    bad = []
    for (log, train), (_, val) in zip(_config_values(sub, "train_files"), _config_values(sub, "val_files")):
        if not isinstance(train, str) or os.path.basename(train) != track.train_files_name:
            bad.append(f"{log.name}: train_files {train!r}")
        if not isinstance(val, str) or os.path.basename(val) != track.val_files_name:
            bad.append(f"{log.name}: val_files {val!r}")
    needs = f"{track.name} needs .../{track.train_files_name} and .../{track.val_files_name}"
    if bad:
        return False, f"{'; '.join(bad[:4])} ({needs})"
    return True, f"{track.train_files_name}, {track.val_files_name} in {len(sub.logs)} logs ({needs})"


def rule_val_tokens(sub):
    """Validation scores exactly the first 10,485,760 tokens of the val shards."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    need = sub.track.val_tokens
    values = _config_values(sub, "val_tokens")
    bad = [f"{log.name}: {value}" for log, value in values if value != need]
    if bad:
        return False, f"val_tokens {'; '.join(bad[:4])} ({sub.track.name} needs {need:,})"
    return True, f"val_tokens {need:,} in {len(values)} logs ({sub.track.name} needs {need:,})"


def rule_val_sequences(sub):
    """Validation sequences are the track's length and the val tokens are a whole number of them (the trainer
    deals them round-robin to the GPUs, so every world size scores the same sequences)."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    track = sub.track
    bad, figures = [], []
    for log, seq_len in _config_values(sub, "val_seq_len"):
        tokens = (log.run.config or {}).get("val_tokens")
        if seq_len != track.val_seq_len:
            bad.append(f"{log.name}: val_seq_len {seq_len}")
        elif not isinstance(tokens, int) or tokens % seq_len:
            bad.append(f"{log.name}: {tokens} val tokens are not whole {seq_len}-token sequences")
        else:
            figures.append(f"{tokens // seq_len} sequences of {seq_len:,}")
    needs = f"{track.name} needs val_seq_len {track.val_seq_len:,} and whole sequences"
    if bad:
        return False, f"{'; '.join(bad[:4])} ({needs})"
    return True, f"{', '.join(_distinct(figures))} in {len(sub.logs)} logs ({needs})"


# ----------------------------------------------------------------------------- rules: hardware

def rule_hardware(sub):
    """Every log ran on the track's hardware (8 x H100 80GB for track_1_short)."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    track = sub.track
    found = _distinct(_hardware_text(log.run) for log in sub.logs)
    ok = all(log.run.world_size == track.world_size and track.gpu_model in (log.run.gpu or "") for log in sub.logs)
    return ok, f"{', '.join(found)} ({track.name} needs {track.hardware})"


def rule_baseline_hardware(sub):
    """baseline/ holds complete logs of the previous record, on the same GPU model and world size."""
    missing = _need_logs(sub)
    if missing:
        return missing
    complete = [log for log in sub.baseline if log.run.complete]
    if not complete:
        return False, f"no complete baseline logs in {BASELINE_DIR}/ (re-time the previous record on your machine)"
    mine = _distinct(_hardware_text(log.run) for log in sub.logs)
    theirs = _distinct(_hardware_text(log.run) for log in sub.baseline)
    ok = len(mine) == 1 and theirs == mine
    return ok, (f"{len(complete)} baseline logs on {', '.join(theirs)}; record logs on {', '.join(mine)}"
                + ("" if ok else " (must be the same GPU model and world size)"))


# ----------------------------------------------------------------------------- rules: statistics and time

def rule_statistics(sub):
    """Mean final val loss <= target, and the one-sided t-test gives p < 0.01."""
    missing = _need_track(sub)
    if missing:
        return missing
    target = sub.track.target
    losses = [log.run.final_val_loss for log in sub.counted(sub.logs)]
    need = f"needs mean <= {target} and p < {MAX_P}"
    if len(losses) < 2:
        return False, f"{len(losses)} complete run(s): the t-test needs at least 2 ({need})"
    mean, p = stats.mean(losses), stats.one_sided_p_below(losses, target)
    ok = mean <= target and p is not None and p < MAX_P
    return ok, f"mean val loss {mean:.4f} over n={len(losses)}, p={compare.fmt_p(p)} ({need})"


def claimed_time_matches(time_text, mean_s):
    """Whether record.json's time (as written) is the mean official time rounded to its written decimals.

    "168.75" claims the mean is in [168.745, 168.755]. 1 to 3 decimals must be written.
    """
    claimed = decimal.Decimal(time_text)
    decimals = -claimed.as_tuple().exponent
    if not 1 <= decimals <= MAX_TIME_DECIMALS:
        return False, decimals
    half = decimal.Decimal(5).scaleb(-decimals - 1)  # half a unit of the last written decimal
    return abs(decimal.Decimal(repr(mean_s)) - claimed) <= half, decimals


def rule_claimed_time(sub):
    """record.json's time_s is the mean official time of the complete logs, within its written rounding."""
    if sub.time_text is None:
        return False, f"no claimed time ({sub.meta_error})"
    times = [log.run.train_time_s for log in sub.counted(sub.logs)]
    if not times:
        return False, "no complete logs to time"
    mean_s = stats.mean(times)
    ok, decimals = claimed_time_matches(sub.time_text, mean_s)
    if not 1 <= decimals <= MAX_TIME_DECIMALS:
        return False, f"time_s {sub.time_text}: write 1 to {MAX_TIME_DECIMALS} decimals (mean of the logs {mean_s:.3f} s)"
    relation = "=" if ok else "!="
    return ok, f"claimed {sub.time_text} s {relation} mean official time {mean_s:.{decimals + 1}f} s of {len(times)} logs, rounded to {decimals} decimal(s)"


def rule_speed(sub):
    """The new mean time is below the baseline logs' mean (Welch two-sided p reported)."""
    mine = [log.run.train_time_s for log in sub.counted(sub.logs)]
    theirs = [log.run.train_time_s for log in sub.counted(sub.baseline)]
    if not mine or not theirs:
        return False, f"needs complete record logs ({len(mine)}) and baseline logs ({len(theirs)})"
    welch = stats.welch_test(theirs, mine)
    new, old = stats.mean(mine), stats.mean(theirs)
    ok = new < old
    return ok, (f"mean {new:.3f} s vs baseline {old:.3f} s: {new - old:+.3f} s ({100 * (new - old) / old:+.2f}%), "
                f"Welch p={compare.fmt_p(welch['p_two_sided'])}" + ("" if ok else " (must be faster)"))


# ----------------------------------------------------------------------------- rules: code

# What compiles a function or module. The function forms take the module first (torch.compile(model, ...),
# torch.nn.Module.compile(model, ...)); the method form model.compile(...) passes its arguments on to torch.compile.
COMPILE_FUNCTIONS = {"torch.compile", "torch.compiler.compile", "torch.nn.Module.compile",
                     "torch.nn.modules.module.Module.compile"}
# Keywords a compile call may pass: the two that describe the code (shapes, one graph), and dynamo's recompile limit,
# the one setting every track allows (below). Everything else (mode=, options=, backend=, ...) is a compiler option.
ALLOWED_COMPILE_KEYWORDS = {"dynamic", "fullgraph", "recompile_limit"}
COMPILER_CONFIG_MODULES = ("torch._inductor.config", "torch._dynamo.config", "torch._functorch.config",
                           "torch.compiler.config")
# Functions that change how everything is compiled: the default backend, the stance, the old dynamo entry points.
COMPILER_SETTERS = {"torch.compiler.set_stance", "torch.compiler.set_default_backend",
                    "torch.compiler.set_enable_guard_collectives", "torch._dynamo.optimize", "torch._dynamo.optimize_assert",
                    "torch._dynamo.set_stance"}
# Methods of a config module that only read it; every other method call (patch, load_config, ...) may set it.
READ_ONLY_CONFIG_METHODS = {"get_config_copy", "get_hash", "get_serializable_config_copy", "get_type", "codegen_config",
                            "save_config", "save_config_portable", "shallow_copy_dict", "to_dict"}
COMPILER_ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE_")
# The one compiler setting every track allows: dynamo's recompile limit caps how many graph variants of a function
# are kept (past it, dynamo silently runs the function eagerly); it changes no generated code. A track may allow
# more (Track.allowed_compiler_settings).
ALLOWED_CONFIG_SETTINGS = {"torch._dynamo.config.recompile_limit", "torch._dynamo.config.cache_size_limit"}


@dataclasses.dataclass(frozen=True)
class CompilerSetting:
    """One place in a source that sets a compiler option: its line, what it does, and the config setting it
    changes (a dotted name, e.g. torch._inductor.config.max_autotune) where it is one, else None."""
    line: int
    text: str
    setting: str = None


def _dotted(node):
    """'torch._inductor.config.x' for an attribute chain of names, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _assigned_names(target):
    """Dotted names an assignment target writes to: `a.b.c = `, `a.b, c.d = `, `a.b[k] = ` (a.b)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _assigned_names(element)]
    if isinstance(target, ast.Starred):
        return _assigned_names(target.value)
    if isinstance(target, ast.Subscript):
        return _assigned_names(target.value)
    name = _dotted(target) if isinstance(target, ast.Attribute) else None
    return [name] if name else []


def _string(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Names:
    """What the names of a source stand for: every import (`import torch as t`, `from torch import compile`,
    `import torch._inductor.config as c`, `import re`) and every plain alias of a torch name (`c = torch._dynamo.config`,
    `compile_fn = torch.compile`, `c = importlib.import_module("torch._inductor.config")`)."""

    def __init__(self, tree):
        self.imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    self.imported[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        self.aliases = {}
        for _ in range(2):  # an alias of an alias
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    value = self.resolve(_dotted(node.value)) if not isinstance(node.value, ast.Call) else self._imported_module(node.value)
                    if value and value.split(".")[0] == "torch":
                        self.aliases[node.targets[0].id] = value

    def _imported_module(self, call):
        """importlib.import_module("torch._inductor.config") as a dotted name, else None."""
        if self.resolve(_dotted(call.func)) in ("importlib.import_module", "import_module") and call.args:
            return _string(call.args[0])
        return None

    def resolve(self, name):
        """Expand a name's head to what it stands for; None stays None."""
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = self.aliases.get(head) or self.imported.get(head)
        return (full + ("." + rest if rest else "")) if full else name

    def is_module(self, name):
        """Whether a dotted name starts with an imported module (re.compile: yes; model.compile: no)."""
        return name is not None and name.partition(".")[0] in self.imported


def _is_config_name(name):
    return name is not None and any(name == m or name.startswith(m + ".") for m in COMPILER_CONFIG_MODULES)


def _env_setting(variable):
    """The inductor config setting an environment variable sets (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING:
    torch._inductor.config.coordinate_descent_tuning), else None: inductor reads TORCHINDUCTOR_<NAME> into <name>."""
    prefix = "TORCHINDUCTOR_"
    return "torch._inductor.config." + variable[len(prefix):].lower() if variable.startswith(prefix) else None


def _compile_call(node, names):
    """(shown name, number of positional arguments it may take) when the call compiles, else None."""
    shown = _dotted(node.func) or "(...).compile"
    full = names.resolve(_dotted(node.func))
    if full in COMPILE_FUNCTIONS:
        return shown, 1
    if isinstance(node.func, ast.Attribute) and node.func.attr == "compile":
        base = _dotted(node.func.value)
        if not names.is_module(base):  # model.compile(...), self.model.compile(...): nn.Module.compile
            return shown, 0
    return None


def _compile_arguments(node, shown, positional, found, template="{shown}(... {extra})"):
    """A compile call's keywords other than the allowed ones, and positional arguments past the module."""
    extra = [k.arg or "**" for k in node.keywords if k.arg not in ALLOWED_COMPILE_KEYWORDS]
    if len(node.args) > positional:
        extra.append("positional options")
    if extra:
        found.append(CompilerSetting(node.lineno, template.format(shown=shown, extra=", ".join(extra))))


def _config_call(node, obj, method, found):
    """A method of a config module called: patch(...) sets its keys; a reading method sets nothing; any other may set anything."""
    if method in READ_ONLY_CONFIG_METHODS:
        return
    if method != "patch":
        found.append(CompilerSetting(node.lineno, f"calls {obj}.{method}(...)"))
        return
    keys = [k.arg for k in node.keywords]
    if node.args:
        first = node.args[0]
        if _string(first) is not None:
            keys.append(_string(first))
        elif isinstance(first, ast.Dict):
            keys += [_string(key) for key in first.keys]
        else:
            keys.append(None)
    for key in keys:
        setting = f"{obj}.{key}" if key else None
        found.append(CompilerSetting(node.lineno, f"sets {setting or obj + '.?'} (patch)", setting))


def scan_compiler_use(source):
    """(every CompilerSetting in the source, the number of compile calls), or a SyntaxError's line as the one finding.

    Found: compile calls (torch.compile, Module.compile in both forms, also through an import alias or
    functools.partial) with keywords other than dynamic/fullgraph/recompile_limit or extra positional arguments;
    assignments, setattr, patch(...) and other setting methods of torch._inductor.config, torch._dynamo.config,
    torch._functorch.config and torch.compiler.config, however they are named; the setters of the default backend and
    the stance; and the environment variables TORCHINDUCTOR_* / TORCHDYNAMO_* / TORCH_COMPILE_* named as a string or a
    keyword (os.environ.update(TORCHINDUCTOR_X="1")).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return [CompilerSetting(error.lineno or 0, f"the source does not parse ({error.msg})")], 0
    names = _Names(tree)
    found, calls = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            full = names.resolve(_dotted(node.func))
            compiled = _compile_call(node, names)
            if compiled:
                calls += 1
                _compile_arguments(node, *compiled, found)
            elif full in ("functools.partial", "partial") and node.args and _compile_call(
                    ast.Call(func=node.args[0], args=[], keywords=[]), names):
                calls += 1
                _compile_arguments(node, _dotted(node.args[0]), 1, found, "partial({shown}, ... {extra})")
            elif full == "setattr" and node.args and _is_config_name(names.resolve(_dotted(node.args[0]))):
                key = _string(node.args[1]) if len(node.args) > 1 else None
                obj = names.resolve(_dotted(node.args[0]))
                setting = f"{obj}.{key}" if key else None
                found.append(CompilerSetting(node.lineno, f"sets {setting or obj + '.?'} (setattr)", setting))
            elif isinstance(node.func, ast.Attribute) and _is_config_name(names.resolve(_dotted(node.func.value))):
                _config_call(node, names.resolve(_dotted(node.func.value)), node.func.attr, found)
            elif full in COMPILER_SETTERS:
                found.append(CompilerSetting(node.lineno, f"calls {full}(...)"))
            for keyword in node.keywords:
                if keyword.arg and keyword.arg.startswith(COMPILER_ENV_PREFIXES):
                    found.append(CompilerSetting(node.lineno, f"names the compiler variable {keyword.arg!r}",
                                                 _env_setting(keyword.arg)))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in map(names.resolve, _assigned_names(target)):
                    if _is_config_name(name):
                        found.append(CompilerSetting(node.lineno, f"sets {name}", name))
        elif _string(node) is not None and node.value.startswith(COMPILER_ENV_PREFIXES):
            variable = node.value.split("=")[0]
            found.append(CompilerSetting(node.lineno, f"names the compiler variable {variable!r}", _env_setting(variable)))
    return sorted(set(found), key=lambda f: (f.line, f.text)), calls


def _allowed_elsewhere(setting):
    """The tracks that allow a setting this one does not (for the message), e.g. ['track_2_medium']."""
    return sorted(track.name for track in TRACKS.values() if setting in track.allowed_compiler_settings)


def compiler_option_violations(source, allowed=()):
    """Lines of the source that set compiler options (README rule 5), as 'line N: what'.

    allowed: the config settings the track allows besides dynamo's recompile limit (ALLOWED_CONFIG_SETTINGS).
    See scan_compiler_use for what is found.
    """
    allowed = ALLOWED_CONFIG_SETTINGS | set(allowed)
    found = []
    for use in scan_compiler_use(source)[0]:
        if use.setting in allowed:
            continue
        elsewhere = _allowed_elsewhere(use.setting) if use.setting else []
        found.append(f"line {use.line}: {use.text}" + (f" (allowed on {', '.join(elsewhere)} only)" if elsewhere else ""))
    return found


def rule_compiler_options(sub):
    """README rule 5: no extra compiler options or compiler config in the logged source (but the track's allowed ones)."""
    sources = _distinct(log.source for log in sub.logs if log.source is not None)
    if not sources:
        return False, "no embedded source to read"
    allowed = sub.track.allowed_compiler_settings if sub.track else ()
    found = [v for source in sources for v in compiler_option_violations(source, allowed)]
    if found:
        return False, "; ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    scans = [scan_compiler_use(source) for source in sources]
    calls = sum(count for _, count in scans)
    used = _distinct(f"line {use.line} {use.text}" for uses, _ in scans for use in uses)
    figure = f"no compiler options or config in the source ({calls} compile call(s), keywords only {', '.join(sorted(ALLOWED_COMPILE_KEYWORDS))})"
    return True, figure + (f"; allowed: {'; '.join(used)}" if used else "")


# ----------------------------------------------------------------------------- rules: a steps track

def rule_one_gpu_kind(sub):
    """Steps track: every log on 1, 2, 4 or 8 GPUs of one model, an A100 or an H100 (steps do not depend on speed)."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    track = sub.track
    gpus = _distinct(log.run.gpu for log in sub.logs)
    ok = (len(gpus) == 1 and any(model in (gpus[0] or "") for model in track.gpu_models)
          and all(log.run.world_size in track.world_sizes for log in sub.logs))
    return ok, f"{', '.join(_distinct(_hardware_text(log.run) for log in sub.logs))} ({track.name} needs {track.hardware})"


def rule_fixed_model(sub):
    """Steps track: the baseline's model, vocabulary, batch and sequence length in every log's config line."""
    missing = _need_track(sub) or _need_logs(sub)
    if missing:
        return missing
    fixed = sub.track.fixed_config
    bad = [f"{log.name}: {key} {(log.run.config or {}).get(key)!r}" for log in sub.logs for key, need in fixed
           if (log.run.config or {}).get(key) != need]
    needs = f"{sub.track.name} needs {', '.join(f'{key} {need}' for key, need in fixed)}"
    if bad:
        return False, f"{'; '.join(bad[:4])} ({needs})"
    return True, f"the fixed model and batch in {len(sub.logs)} logs ({needs})"


def rule_stopping_step(sub):
    """Steps track: every run trained the same number of steps and none ended on its own (a run may not stop on its
    val loss); each has a val loss at the claimed step (record.json `steps`), one step for all runs."""
    missing = _need_logs(sub)
    if missing:
        return missing
    claimed = (sub.meta or {}).get("steps")
    if claimed is None:
        return False, f"no claimed steps ({sub.meta_error or 'record.json has no steps'})"
    lengths = _distinct(log.run.steps_total for log in sub.logs)
    if len(lengths) > 1:
        groups = "; ".join(f"{n} steps: {_names([l for l in sub.logs if l.run.steps_total == n])}" for n in lengths)
        return False, f"runs stopped at different steps ({groups}): every run trains to the same step"
    stopped = [log for log in sub.logs if not log.run.complete]
    if stopped:
        ends = "; ".join(f"{log.name} ended at step {log.run.last_step}/{log.run.steps_total} ({log.run.stopping})" for log in stopped[:3])
        return False, f"{ends}: a run may not stop on its own (e.g. on its val loss): every run counts, to the same step"
    unscored = [log for log in sub.logs if compare.loss_at_step(log.run, claimed) is None]
    if unscored:
        return False, f"claimed step {claimed}: no val loss there in {_names(unscored)} (runs of {lengths[0]} steps)"
    earlier = " (an earlier step, the same for every run)" if claimed < lengths[0] else ""
    return True, f"every run trained {lengths[0]} steps and is scored at step {claimed}{earlier}"


def rule_z_statistics(sub):
    """Steps track: the val losses at the claimed step pass (target - mean) * sqrt(n) >= 0.004."""
    missing = _need_track(sub)
    if missing:
        return missing
    claimed = (sub.meta or {}).get("steps")
    summary = compare.steps_summary(sub.name, [log.run for log in sub.counted(sub.logs)], sub.track.target, claimed)
    need = f"needs (target {sub.track.target} - mean) * sqrt(n) >= {compare.Z_MARGIN}"
    if claimed is None or not summary["n"]:
        return False, f"no val losses at the claimed step {claimed} ({need})"
    return summary["z_holds"], (f"mean val loss {summary['mean_val_loss']:.5f} at step {claimed} over n={summary['n']}: "
                                f"z = {summary['z']:.5f} ({need})")


# ----------------------------------------------------------------------------- running the rules

RULES = [
    ("folder", rule_folder),
    ("record.json", rule_metadata),
    ("logs", rule_logs),
    ("track", rule_track),
    ("distinct runs", rule_distinct_runs),
    ("one source", rule_one_source),
    ("source runs", rule_source_runs),
    ("data shards", rule_data_shards),
    ("val tokens", rule_val_tokens),
    ("val sequences", rule_val_sequences),
    ("hardware", rule_hardware),
    ("baseline hardware", rule_baseline_hardware),
    ("statistics", rule_statistics),
    ("claimed time", rule_claimed_time),
    ("compiler options", rule_compiler_options),
    ("speed", rule_speed),
]
# A steps track keeps these rules with the time rules dropped and hardware and statistics swapped for their steps
# versions; the fixed model and the stopping step come before the statistics.
TIME_ONLY_RULES = ("baseline hardware", "claimed time", "speed")
STEPS_VERSIONS = {"hardware": rule_one_gpu_kind, "statistics": rule_z_statistics}


def steps_track_rules(rules):
    steps_rules = []
    for name, function in rules:
        if name == "statistics":
            steps_rules += [("fixed model", rule_fixed_model), ("stopping step", rule_stopping_step)]
        if name not in TIME_ONLY_RULES:
            steps_rules.append((name, STEPS_VERSIONS.get(name, function)))
    return steps_rules


STEPS_TRACK_RULES = steps_track_rules(RULES)
RULE_FUNCTIONS = dict(STEPS_TRACK_RULES + RULES)  # every rule name; the time track's function where both have one


def rules_of(track):
    return STEPS_TRACK_RULES if track is not None and track.score == "steps" else RULES


# The rules leaderboard.py applies to every published record: static, no subprocess, no baseline history.
LEADERBOARD_RULES = ["track", "distinct runs", "hardware", "data shards", "val tokens", "val sequences", "fixed model",
                     "stopping step", "statistics", "compiler options"]


def apply_rule(function, sub):
    """Run one rule; an unexpected error is that rule's FAIL, never a traceback."""
    try:
        ok, figure = function(sub)
    except Exception as error:  # noqa: BLE001 - one broken input must not hide the other rules
        return False, f"could not check ({type(error).__name__}: {error})"
    return bool(ok), figure


def check(sub, names=None):
    """[(rule name, ok, figure)] for the named rules (default: all) of the folder's track, in their order."""
    chosen = [(name, fn) for name, fn in rules_of(sub.track) if names is None or name in names]
    return [(name, *apply_rule(fn, sub)) for name, fn in chosen]


def format_result(name, ok, figure):
    return f"{'PASS' if ok else 'FAIL'}  {name}: {figure}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like train_gpt.py."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = OneLineArgumentParser(
        prog="check_submission.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="record folder, e.g. records/track_1_short/YYYY-MM-DD_ShortName")
    return parser


def main(argv=None):
    """Entry point: 0 all rules pass, 1 a rule fails, 2 usage error."""
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.folder):
        why = "not a folder" if os.path.exists(args.folder) else "no such folder"
        print(f"check_submission.py: error: {args.folder}: {why}", file=sys.stderr)
        return 2
    sub = load_submission(args.folder)
    print(f"checking {os.path.normpath(args.folder)} (track {sub.track_name})")
    for note in compare.skipped_notes(os.path.normpath(args.folder), sub.skipped):
        print(f"note: {note}")
    results = check(sub)
    for result in results:
        print(format_result(*result))
    failed = [name for name, ok, _ in results if not ok]
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} rules ({', '.join(failed)})")
        return 1
    print(f"OK: all {len(results)} rules pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
