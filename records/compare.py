#!/usr/bin/env python3
"""Compare groups of speedrun training logs: final val loss, time and the record tests.

Each PATH is a log file (a group of one run) or a folder of logs (one group of
repeated runs, named by the folder). For every run it reports the final val
loss, official train time, steps, step_avg, world size, GPU, torch version and
the source hash. For every group: n, mean and sample std of the final val loss,
the one-sided t-test p-value that the mean is below --target, and the mean
train time with a 95% t-interval. With exactly two groups it adds the time and
loss differences (group 2 - group 1) with Welch-test p-values.

Each run belongs to a track: the one its log's `track:` line names, or
track_1_short for the repository's train_gpt.py, which writes none. A group's
p-value tests its track's target (3.28; 2.92 for track_2_medium) unless
--target is given, and a folder mixing the logs of two tracks is refused: they
are different races.

Incomplete runs (no validation line at step T/T: crashed or stopped, or a log
cut inside that line) are listed with the last step reached and left out of the
group statistics. A log without a single step line (a run refused before its
first step) and a .txt/.log file that is no log (e.g. a log cut inside its
embedded source) are skipped, and a copy of a run (the same text or run id) is
counted once; a warning line names each. A group whose runs differ in
configuration (the `config:` line, apart from seed, run id and such) or in
source hash gets a warning on stderr naming what differs: its statistics pool
runs that are not repeats.

--plot draws one colour per run (legend: run names) and one line style per
group, on axes fitted to the data; the target line is drawn when it falls in
the plotted loss range.

Logs of the optimizer benchmark (records/track_3_optimization, a `track:` line)
also get that track's figures: per group the scored step (--at-step, default
the last), n, the mean val loss there and the z-rule (3.28 - mean) * sqrt(n)
>= 0.004; for two groups (previous result first) the pairwise rule
(loss_diff + step_diff / 100 * 0.0045) / sqrt(1/n1 + 1/n2) >= 0.004.

Examples:
  python records/compare.py logs/baseline logs/new_idea
  python records/compare.py records/track_1_short/2026-11-24_X --json
  python records/compare.py logs/a logs/b --plot curves.png
  python records/compare.py logs/previous_optimizer logs/my_optimizer --at-step 3200
"""

import argparse
import dataclasses
import json
import math
import os
import sys

if __package__:
    from . import runlog, stats
else:  # run as `python records/compare.py`: this folder is sys.path[0]
    import runlog
    import stats

DEFAULT_TARGET = 3.28
CONFIDENCE = 0.95
LOG_SUFFIXES = (".txt", ".log")

# The tracks and the val loss each must reach (records/README.md). The repository's train_gpt.py writes no `track:`
# line, so a log without one is MAIN_TRACK's; a track's own trainer (records/<track>/train_gpt.py) names its track.
MAIN_TRACK = "track_1_short"
TRACK_TARGETS = {"track_1_short": 3.28, "track_2_medium": 2.92, "track_3_optimization": 3.28}


def run_track(run):
    """The track a run belongs to: its log's `track:` line, else the main trainer's track."""
    return run.track or MAIN_TRACK


def track_target(track):
    """The val loss a track's record must reach (DEFAULT_TARGET for a track the tools do not know)."""
    return TRACK_TARGETS.get(track, DEFAULT_TARGET)


class CompareError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit."""


# ----------------------------------------------------------------------------- loading

def find_logs(folder):
    """The run logs directly in a folder, sorted by name (scan_folder's logs)."""
    return scan_folder(folder).logs


@dataclasses.dataclass
class Scan:
    """The .txt/.log files directly in a folder, sorted by name, in three lists."""
    logs: list = dataclasses.field(default_factory=list)       # run logs: counted
    stepless: list = dataclasses.field(default_factory=list)   # logs without a step line: named in a note
    not_logs: list = dataclasses.field(default_factory=list)   # neither separator nor step line: named in a note

    def __iadd__(self, other):
        self.logs += other.logs
        self.stepless += other.stepless
        self.not_logs += other.not_logs
        return self


def scan_folder(folder):
    """Sort the .txt/.log files directly in a folder into a Scan.

    A log is a file that has a 100-'=' separator or a step line. A log without a
    single step line is a run that stopped before training (runlog.has_step). A
    file with neither is no log: a log cut inside its embedded source (the
    separator follows the source) or a note. Both are kept apart, to be named in
    a note, and counted nowhere: nothing is left out unsaid. Subfolders are not
    searched, so a record folder can keep e.g. re-timed baseline logs in
    baseline/ without mixing them into the record's group.
    """
    scan = Scan()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (name.endswith(LOG_SUFFIXES) and os.path.isfile(path)):
            continue
        text = runlog.read_text(path)
        if not runlog.looks_like_log(text):
            scan.not_logs.append(path)
        else:
            (scan.logs if runlog.has_step(text) else scan.stepless).append(path)
    return scan


STEPLESS_WHY = ("a run that stops before its first step (a config or data error: see its stopping: line) "
                "has nothing to count")
NOT_LOG_WHY = ("no line of 100 '=' and no step line: a log cut inside its embedded source (use the whole log, "
               "or move a crashed run's log to crashed/), or a file that is no log")


def skipped_notes(folder, scan):
    """One line per kind of file of folder left out (logs without a step line, files that are no log), and why."""
    def names(paths):
        return ", ".join(os.path.relpath(path, folder) for path in paths)
    notes = []
    if scan.stepless:
        notes.append(f"{folder}: skipped {len(scan.stepless)} log(s) without a step line ({names(scan.stepless)}): "
                     f"{STEPLESS_WHY}")
    if scan.not_logs:
        notes.append(f"{folder}: skipped {len(scan.not_logs)} .txt/.log file(s) that are not logs "
                     f"({names(scan.not_logs)}): {NOT_LOG_WHY}")
    return notes


def group_name(path):
    """Name a group by the path the user gave, without a trailing slash."""
    trimmed = path.rstrip("/\\")
    return trimmed or path


def describe_tracks(runs):
    """'track_1_short: a.txt; track_3_optimization: b.txt, c.txt': which runs belong to which track."""
    tracks = sorted({run_track(run) for run in runs})
    return "; ".join(f"{track}: {', '.join(os.path.basename(r.path) for r in runs if run_track(r) == track)}"
                     for track in tracks)


def load_group(path, notes=None):
    """Parse the runs of one PATH argument into a (name, [RunLog]) pair.

    Files left out (logs without a step line, files that are no log) and copies of a run (runlog.duplicates,
    counted once) each append one line to notes (when given) saying so. A group of two tracks' runs is an error.
    """
    if not os.path.exists(path):
        raise CompareError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        scan = scan_folder(path)
        if not scan.logs and not scan.stepless:
            why = f": {skipped_notes(group_name(path), scan)[0]}" if scan.not_logs else ""
            raise CompareError(f"{path}: folder has no logs (.txt/.log files with step lines){why}")
    else:
        text = runlog.read_text(path)
        if not runlog.looks_like_log(text):
            raise CompareError(f"{path}: not a training log ({NOT_LOG_WHY})")
        if not runlog.has_step(text):
            raise CompareError(f"{path}: no step line: {STEPLESS_WHY}")
        scan = Scan(logs=[path])
    if not scan.logs:
        raise CompareError(f"{'; '.join(skipped_notes(group_name(path), scan))}; no other logs to compare")
    runs = [runlog.parse_log_file(f) for f in scan.logs]
    if len({run_track(run) for run in runs}) > 1:
        raise CompareError(f"{group_name(path)}: mixes the logs of {len({run_track(r) for r in runs})} tracks "
                           f"({describe_tracks(runs)}): each track has its own target and rules, so their runs "
                           f"make no one group: put each track's logs in its own folder")
    copies = runlog.duplicates(runs)
    if notes is not None:
        notes += skipped_notes(group_name(path), scan)
    if notes is not None and copies:
        notes.append(f"{group_name(path)}: {runlog.describe_duplicates(copies)}: each run is counted once")
    copied = {id(copy) for copy, _, _ in copies}
    return group_name(path), [run for run in runs if id(run) not in copied]


def load_groups(paths, notes=None):
    """Parse every PATH argument; order is kept (group 1 is the first PATH). notes: as load_group, and a line
    for a run that two groups share (a copy) or groups of different tracks."""
    groups = [load_group(path, notes) for path in paths]
    if notes is not None and len(groups) > 1:
        shared = runlog.duplicates([run for _, runs in groups for run in runs])
        if shared:
            notes.append(f"{runlog.describe_duplicates(shared)} across groups: the groups share these runs")
        tracks = [(name, run_track(runs[0])) for name, runs in groups]
        if len({track for _, track in tracks}) > 1:
            notes.append("the groups come from different tracks (" + "; ".join(f"{name}: {track}" for name, track in tracks)
                         + "): the comparison sets different races side by side")
    return groups


# ----------------------------------------------------------------------------- figures

def run_summary(run, group):
    """The per-run figures, as a JSON-ready dict (None where unknown)."""
    return {
        "group": group,
        "path": run.path,
        "complete": run.complete,
        "final_val_loss": run.final_val_loss,
        "train_time_s": run.train_time_s,
        "steps": run.steps_total,
        "last_step": run.last_step,
        "step_avg_ms": run.step_avg_ms,
        "world_size": run.world_size,
        "grad_accum_steps": run.grad_accum_steps,
        "gpu": run.gpu,
        "torch": run.torch,
        "python": run.python,
        "triton": run.triton,
        "source_hash": run.source_hash,
        "launch_to_first_step_s": run.launch_to_first_step_s,
        "peak_memory_mib": run.peak_memory_mib,
        "reserved_memory_mib": run.reserved_memory_mib,
        "mfu_percent": run.mfu_percent,
        "stopping": run.stopping,
        "incomplete_reason": run.incomplete_reason,
        "last_val_loss": run.val_points[-1].val_loss if run.val_points else None,
        "val_curve": [[p.step, None if p.train_time_ms is None else p.train_time_ms / 1000.0, p.val_loss]
                      for p in run.val_points],
    }


# Config fields that name or file a run but do not change what is trained or timed, so runs that
# differ only in these are repeats of one configuration. Every other field counts.
RUN_ONLY_FIELDS = frozenset({"seed", "run_id", "log_dir", "save_model", "gpu_peak_tflops"})
MAX_SHOWN_VALUES = 3


def config_differences(runs):
    """{field: sorted distinct values} over the runs' `config:` lines, run-only fields excluded.

    world_size counts as a field too: it is not in the config line but changes the time. Runs
    without a config line (public logs) cannot be compared and are left out.
    """
    configs = []
    for run in runs:
        if run.config is not None:
            configs.append({**run.config, "world_size": run.world_size})
    differences = {}
    for key in sorted({k for config in configs for k in config} - RUN_ONLY_FIELDS):
        values = {json.dumps(config.get(key), sort_keys=True) for config in configs}
        if len(values) > 1:
            differences[key] = sorted(values)
    return differences


def describe_differences(differences):
    """'train_steps: 10, 12; val_every: 4, 5': the fields and values, a few of each."""
    parts = []
    for key, values in differences.items():
        shown = ", ".join(values[:MAX_SHOWN_VALUES]) + (", ..." if len(values) > MAX_SHOWN_VALUES else "")
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def group_warnings(name, runs, differences, hashes):
    """One line per surprise in a group: a log cut inside its final line (left out of the
    statistics), and runs pooled that are not repeats of one another.

    Why warn: the t-test and the time interval assume repeats of one configuration; pooling
    different ones gives intervals such as [-261.8 s, 610.0 s] that look like noise.
    """
    warnings = [f"{run.path}: {run.incomplete_reason}; left out of the statistics: use the whole, unedited log"
                for run in runs if run.incomplete_reason]
    if differences:
        warnings.append(f"{name}: its runs have different configurations ({describe_differences(differences)}); "
                        f"the statistics pool them: put each configuration in its own folder")
    if len(hashes) > 1:
        warnings.append(f"{name}: its runs come from {len(hashes)} different sources (hashes {', '.join(hashes)}); "
                        f"the statistics pool them: put each version of the code in its own folder")
    return warnings


def group_track(runs):
    """The one track of a group's runs (load_group refuses a group of two); MAIN_TRACK for no runs."""
    return run_track(runs[0]) if runs else MAIN_TRACK


def group_summary(name, runs, target=None, confidence=CONFIDENCE):
    """Statistics of one group over its complete runs (JSON-ready dict); target None: the group's track's.

    Why only complete runs: a crashed run has no final loss or official time;
    counting it would bias both, so it is counted in n_incomplete instead.
    """
    track = group_track(runs)
    target = track_target(track) if target is None else target
    complete = [r for r in runs if r.complete]
    losses = [r.final_val_loss for r in complete]
    times = [r.train_time_s for r in complete]
    interval = stats.t_interval(times, confidence)
    hashes = sorted({r.source_hash for r in runs if r.source_hash is not None})
    differences = config_differences(runs)
    return {
        "name": name,
        "track": track,
        "n": len(complete),
        "n_incomplete": len(runs) - len(complete),
        "mean_val_loss": stats.mean(losses),
        "std_val_loss": stats.sample_std(losses),
        "target": target,
        "p_value": stats.one_sided_p_below(losses, target),
        "mean_train_time_s": stats.mean(times),
        "std_train_time_s": stats.sample_std(times),
        "train_time_ci_low_s": None if interval is None else interval[0],
        "train_time_ci_high_s": None if interval is None else interval[1],
        "confidence": confidence,
        "source_hashes": hashes,
        "single_source": len(hashes) == 1 and all(r.source_hash is not None for r in runs),
        "config_differences": differences,
        "warnings": group_warnings(name, runs, differences, hashes),
    }


def compare_two(first, second, runs_first, runs_second):
    """Group 2 minus group 1: time and loss differences with Welch two-sided p-values."""
    times1 = [r.train_time_s for r in runs_first if r.complete]
    times2 = [r.train_time_s for r in runs_second if r.complete]
    losses1 = [r.final_val_loss for r in runs_first if r.complete]
    losses2 = [r.final_val_loss for r in runs_second if r.complete]
    time_test = stats.welch_test(times1, times2)
    loss_test = stats.welch_test(losses1, losses2)
    base = first["mean_train_time_s"]
    time_pct = None
    if time_test["diff"] is not None and base:
        time_pct = 100.0 * time_test["diff"] / base
    return {
        "first": first["name"],
        "second": second["name"],
        "time_diff_s": time_test["diff"],
        "time_diff_percent": time_pct,
        "time_t": time_test["t"],
        "time_welch_df": time_test["df"],
        "time_p_value": time_test["p_two_sided"],
        "loss_diff": loss_test["diff"],
        "loss_welch_df": loss_test["df"],
        "loss_p_value": loss_test["p_two_sided"],
        "first_single_source": first["single_source"],
        "second_single_source": second["single_source"],
        "same_source": (first["single_source"] and second["single_source"]
                        and first["source_hashes"] == second["source_hashes"]),
    }


def analyse(groups, target=None):
    """All figures for the loaded groups: {'runs': [...], 'groups': [...], 'comparison'?}; target None: each
    group's track's target."""
    result = {
        "runs": [run_summary(run, name) for name, runs in groups for run in runs],
        "groups": [group_summary(name, runs, target) for name, runs in groups],
    }
    if len(groups) == 2:
        result["comparison"] = compare_two(result["groups"][0], result["groups"][1],
                                           groups[0][1], groups[1][1])
    return result


def json_ready(value):
    """Replace non-finite floats with None so the JSON is strict (NaN is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the optimizer track: steps, not time

# records/track_3_optimization (see its README): the score is a step count, the evidence a z-rule with a fixed
# sigma instead of a t-test, and two results compare through a loss-per-step exchange rate.
STEPS_TRACK = "track_3_optimization"
Z_MARGIN = 0.004             # 3.09 sigma (p < .001, one-sided) of a run-to-run sigma of 0.0013
LOSS_PER_100_STEPS = 0.0045  # result #12 shortened by 200 steps lost 0.0091 of val loss
ROUNDING = 1e-12             # so that a mean exactly on the line passes, as the rules' >= says


def z_evidence(mean_loss, n, target=DEFAULT_TARGET):
    """(target - mean loss) * sqrt(n): at least Z_MARGIN is evidence that the mean is below the target."""
    return (target - mean_loss) * math.sqrt(n)


def z_rule_holds(mean_loss, n, target=DEFAULT_TARGET):
    return z_evidence(mean_loss, n, target) >= Z_MARGIN - ROUNDING


def pairwise_evidence(mean_old, steps_old, n_old, mean_new, steps_new, n_new):
    """(loss_diff + step_diff / 100 * 0.0045) / sqrt(1/n1 + 1/n2), both differences old minus new: the new result's
    lower loss plus the loss its saved steps are worth. At least Z_MARGIN: the new result is better."""
    step_worth = (steps_old - steps_new) / 100 * LOSS_PER_100_STEPS
    return ((mean_old - mean_new) + step_worth) / math.sqrt(1 / n_old + 1 / n_new)


def is_steps_track(runs):
    return bool(runs) and all(run.track == STEPS_TRACK for run in runs)


def loss_at_step(run, step):
    """The run's val loss at step (None when it has no val line there)."""
    return next((p.val_loss for p in run.val_points if p.step == step), None)


def steps_summary(name, runs, target=None, at_step=None):
    """A steps-track group scored at one step for every run: at_step, or the runs' common last step. Runs trained
    for different numbers of steps, or without a val loss at that step, are named in `problems`."""
    target = track_target(STEPS_TRACK) if target is None else target
    lengths = sorted({run.steps_total for run in runs if run.steps_total is not None})
    step = at_step if at_step is not None else (lengths[0] if len(lengths) == 1 else None)
    problems = [] if len(lengths) <= 1 else [f"{name}: its runs trained for different numbers of steps "
                                             f"({', '.join(map(str, lengths))}): score them at one step with --at-step"]
    losses = [loss_at_step(run, step) for run in runs] if step is not None else []
    problems += [f"{run.path}: no val loss at step {step}" for run, loss in zip(runs, losses) if loss is None]
    losses = [loss for loss in losses if loss is not None]
    mean = stats.mean(losses)
    z = None if mean is None else z_evidence(mean, len(losses), target)
    return {"name": name, "step": step, "n": len(losses), "mean_val_loss": mean, "z": z,
            "z_holds": z is not None and z_rule_holds(mean, len(losses), target), "problems": problems}


def steps_comparison(old, new):
    """The pairwise rule, group 1 the previous result and group 2 the new one."""
    if not (old["n"] and new["n"] and old["step"] is not None and new["step"] is not None):
        return {"first": old["name"], "second": new["name"], "value": None, "holds": False}
    value = pairwise_evidence(old["mean_val_loss"], old["step"], old["n"], new["mean_val_loss"], new["step"], new["n"])
    return {"first": old["name"], "second": new["name"], "step_diff": old["step"] - new["step"],
            "loss_diff": old["mean_val_loss"] - new["mean_val_loss"], "value": value, "holds": value >= Z_MARGIN - ROUNDING}


def add_steps_track(result, groups, target=None, at_step=None):
    """Add the steps-track figures to an analyse() result when every group's runs come from that track."""
    if not all(is_steps_track(runs) for _, runs in groups):
        return result
    result["steps"] = [steps_summary(name, runs, target, at_step) for name, runs in groups]
    if len(groups) == 2:
        result["steps_comparison"] = steps_comparison(*result["steps"])
    return result


def steps_lines(result):
    """The steps-track figures as text: one line per group, then the pairwise rule."""
    lines = [f"Steps track ({STEPS_TRACK}): z = (target - mean loss) * sqrt(n), evidence needs z >= {Z_MARGIN}"]
    for g in result["steps"]:
        lines.append(f"  {g['name']}: step {fmt(g['step'], 'd')}, n = {g['n']}, mean val loss {fmt(g['mean_val_loss'], '.5f')}, "
                     f"z = {fmt(g['z'], '.5f')} ({'holds' if g['z_holds'] else 'does not hold'})")
    c = result.get("steps_comparison")
    if c and c["value"] is not None:
        lines.append(f"  pairwise, {c['second']} against {c['first']}: (loss diff {c['loss_diff']:+.5f} + step diff "
                     f"{c['step_diff']:+d} / 100 * {LOSS_PER_100_STEPS}) / sqrt(1/n1 + 1/n2) = {c['value']:.5f} "
                     f"({'holds' if c['holds'] else 'does not hold'}: needs >= {Z_MARGIN})")
    return lines


# ----------------------------------------------------------------------------- text output

def fmt(value, spec, unit="", missing="n/a"):
    """Format a number with a unit, or 'n/a' when it is undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:{spec}}{unit}"


def fmt_p(p):
    """p-values: fixed point when readable, scientific when tiny."""
    if p is None:
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.2e}"


def table(headers, rows):
    """Left-aligned plain-text table; why: stays readable in a terminal and in CI logs."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_rows(runs):
    """One table row per run; incomplete runs show the last step reached."""
    rows = []
    for r in runs:
        status = "complete"
        if not r["complete"]:
            reached = f"{r['last_step']}/{r['steps']}" if r["steps"] is not None else "none"
            status = f"INCOMPLETE (last step {reached})"
            if r["incomplete_reason"]:
                status = f"INCOMPLETE ({r['incomplete_reason']})"
        rows.append([
            r["group"], os.path.basename(r["path"]), status,
            fmt(r["final_val_loss"], ".4f"), fmt(r["train_time_s"], ".3f", " s"),
            fmt(r["steps"], "d"), fmt(r["step_avg_ms"], ".2f", " ms"), fmt(r["world_size"], "d"),
            r["gpu"] or "n/a", r["torch"] or "n/a", r["source_hash"] or "n/a",
        ])
    return rows


def stopping_lines(runs):
    """Why stopped runs stopped (the `stopping:` line), one line each, below the run table."""
    return [f"  {r['path']}: stopping: {r['stopping']}" for r in runs if r["stopping"]]


def group_rows(groups):
    """One table row per group."""
    rows = []
    for g in groups:
        ci = "n/a"
        if g["train_time_ci_low_s"] is not None:
            ci = f"[{g['train_time_ci_low_s']:.3f} s, {g['train_time_ci_high_s']:.3f} s]"
        rows.append([
            g["name"], g["track"], f"{g['target']:g}", str(g["n"]), str(g["n_incomplete"]), fmt(g["mean_val_loss"], ".4f"),
            fmt(g["std_val_loss"], ".4f"), fmt_p(g["p_value"]), fmt(g["mean_train_time_s"], ".3f", " s"),
            ci, "yes" if g["single_source"] else f"no ({len(g['source_hashes'])} hashes)",
        ])
    return rows


def comparison_lines(c):
    """The two-group comparison as readable sentences."""
    def yes_no(flag):
        return "yes" if flag else "no"
    df = fmt(c["time_welch_df"], ".2f")
    loss_df = fmt(c["loss_welch_df"], ".2f")
    return [
        f"Comparison: {c['second']} minus {c['first']}",
        f"  train time: {fmt(c['time_diff_s'], '+.3f', ' s')} ({fmt(c['time_diff_percent'], '+.2f', '%')}),"
        f" Welch two-sided p = {fmt_p(c['time_p_value'])} (df = {df})",
        f"  val loss:   {fmt(c['loss_diff'], '+.4f')}, Welch two-sided p = {fmt_p(c['loss_p_value'])} (df = {loss_df})",
        f"  one source hash per group: {c['first']}: {yes_no(c['first_single_source'])},"
        f" {c['second']}: {yes_no(c['second_single_source'])}; same source in both: {yes_no(c['same_source'])}",
    ]


def render_text(result):
    """The whole human-readable report."""
    out = ["Runs", table(["group", "run", "status", "val loss", "train time", "steps", "step avg",
                          "world", "gpu", "torch", "source"], run_rows(result["runs"]))]
    notes = stopping_lines(result["runs"])
    if notes:
        out += ["Stopped runs:"] + notes
    out.append("")
    out += [f"Groups (statistics over complete runs; p = one-sided t-test of mean val loss <= the target, the "
            f"group's track's unless --target; {int(result['groups'][0]['confidence'] * 100)}% t-interval of the mean time)",
            table(["group", "track", "target", "n", "incomplete", "mean loss", "std loss", "p", "mean time",
                   "95% CI time", "one source"], group_rows(result["groups"]))]
    if "comparison" in result:
        out += [""] + comparison_lines(result["comparison"])
    if "steps" in result:
        out += [""] + steps_lines(result)
    return "\n".join(out)


def warning_lines(result):
    """Every group's warnings, as 'warning: ...' lines (printed to stderr, after the report)."""
    lines = [f"warning: {w}" for g in result["groups"] for w in g["warnings"]]
    return lines + [f"warning: {problem}" for g in result.get("steps", []) for problem in g["problems"]]


# ----------------------------------------------------------------------------- plot

def require_matplotlib():
    """Import matplotlib with the file-only Agg backend, or fail with an install hint."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


GROUP_STYLES = ["-", "--", ":", "-."]
Y_MARGIN = 0.05  # of the loss range, above and below the data


def run_label(run):
    """A run's name in the legend: the log's file name without extension (train_gpt.py names logs by run id)."""
    return os.path.splitext(os.path.basename(run["path"]))[0]


def run_colours(n, plt):
    """n distinct colours: the default cycle (10), then tab20, then evenly spaced hues."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if n <= len(cycle):
        return cycle[:n]
    cmap = plt.get_cmap("tab20" if n <= 20 else "hsv")
    return [cmap(i / (n if n > 20 else 20)) for i in range(n)]


def loss_limits(losses):
    """y range: the data with a small margin; the target line only widens it when it lies inside.

    Why from the data: CPU runs end near 7 and GPU runs near 3.3, so no fixed range fits both.
    """
    low, high = min(losses), max(losses)
    pad = Y_MARGIN * (high - low) if high > low else 0.05 * max(abs(high), 1.0)
    return low - pad, high + pad


def draw_curves(result, plt):
    """The val-loss-against-train-time figure: one colour per run, one line style per group.

    Returns the figure so tests can read its axes. Two legends: the runs by name, and the
    groups (line styles) with the target line.
    """
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    curves = []
    for index, group in enumerate(result["groups"]):
        for run in (r for r in result["runs"] if r["group"] == group["name"]):
            points = [(t, loss) for _, t, loss in run["val_curve"] if t is not None]
            if points:
                curves.append((index, run, points))
    colours = run_colours(len(curves), plt)
    run_lines = []
    for colour, (index, run, points) in zip(colours, curves):
        xs, ys = zip(*points)
        label = run_label(run) + ("" if run["complete"] else " (incomplete)")
        line, = ax.plot(xs, ys, color=colour, linestyle=GROUP_STYLES[index % len(GROUP_STYLES)],
                        marker="o", markersize=3, linewidth=1.5, label=label)
        run_lines.append(line)
    targets = sorted({g["target"] for g in result["groups"]})
    losses = [loss for _, _, points in curves for _, loss in points]
    key_lines = [ax.plot([], [], color="black", linestyle=GROUP_STYLES[i % len(GROUP_STYLES)],
                         label=f"{g['name']} (n={g['n']})")[0] for i, g in enumerate(result["groups"])]
    if losses:
        low, high = loss_limits(losses)
        ax.set_ylim(low, high)
        outside = [target for target in targets if not low <= target <= high]
        for target in (t for t in targets if t not in outside):
            key_lines.append(ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}"))
        if outside:
            ax.set_title(f"target {', '.join(map(str, outside))} is outside the plotted loss range", fontsize=9, color="grey")
    ax.set_xlabel("train time (s)")
    ax.set_ylabel("val loss")
    ax.grid(True, alpha=0.3)
    # Both legends right of the axes: inside they would cover curves, and a folder of runs is a long list.
    groups_legend = ax.legend(handles=key_lines, title="group", loc="lower left", bbox_to_anchor=(1.01, 0.0),
                              fontsize=8, title_fontsize=8)
    ax.add_artist(groups_legend)
    if run_lines:
        ax.legend(handles=run_lines, title="run", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(result, out_path, plt):
    """Draw the curves (see draw_curves) into a PNG file."""
    fig = draw_curves(result, plt)
    try:
        # "tight" widens the image to the legends right of the axes; the group legend is an extra artist
        fig.savefig(out_path, format="png", bbox_inches="tight", bbox_extra_artists=list(fig.axes[0].artists))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- command line

class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like train_gpt.py and check_submission.py."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_step(text):
    """--at-step: a step number, 1 or more (a val loss is scored at a step the runs reached)."""
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps, got {text!r}") from None
    if step < 1:
        raise argparse.ArgumentTypeError(f"must be a step number of 1 or more, got {step}")
    return step


def loss_target(text):
    """--target: a finite, positive val loss."""
    try:
        target = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a val loss such as 3.28, got {text!r}") from None
    if not (math.isfinite(target) and target > 0):
        raise argparse.ArgumentTypeError(f"must be a finite val loss above 0, got {text}")
    return target


def build_parser():
    """Command-line options (see the module docstring for the examples)."""
    parser = OneLineArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a log file (group of one) or a folder of logs (one group)")
    parser.add_argument("--target", type=loss_target, default=None,
                        help="val loss a record must beat on average (default: each group's track's, "
                             + ", ".join(f"{track} {target}" for track, target in TRACK_TARGETS.items()) + ")")
    parser.add_argument("--at-step", type=positive_step, metavar="S",
                        help=f"{STEPS_TRACK} logs: score every run at its val loss of step S (default: the last step)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw val loss against train time (needs matplotlib)")
    return parser


def main(argv=None):
    """Entry point; returns the exit status (errors: one line on stderr, status 2)."""
    args = build_parser().parse_args(argv)
    notes = []  # logs left out or counted once: said on stderr with the warnings
    try:
        plt = require_matplotlib() if args.plot else None
        groups = load_groups(args.paths, notes)
        result = add_steps_track(analyse(groups, target=args.target), groups, args.target, args.at_step)
        if args.at_step is not None and "steps" not in result:
            notes.append(f"--at-step {args.at_step} ignored: it scores {STEPS_TRACK} logs, and not every group is "
                         f"of that track ({'; '.join(f'{name}: {group_track(runs)}' for name, runs in groups)})")
        if args.plot:
            plot_curves(result, args.plot, plt)
    except (CompareError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
    else:
        print(render_text(result))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    # stderr, last: seen under the table and also next to --json output
    for line in [f"warning: {note}" for note in notes] + warning_lines(result):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
