"""Parse one training log (logs/<run_id>.txt) into a RunLog.

Why a separate module: compare.py, leaderboard.py and the tests all need the
same reading of a log, and the format has years of variants (public speedrun
logs, older step-line layouts, our extra header lines). Parsing is tolerant:
any line it does not recognise is ignored.

Layout of a log: the training script's source, a line of 100 '=', version
lines and the nvidia-smi table, another line of 100 '=', then header lines and
step lines. Only text after the first separator is parsed, because the source
itself may contain strings such as "step:".
"""

import dataclasses
import hashlib
import json
import math
import os
import re

SEPARATOR = "=" * 100
SOURCE_HASH_CHARS = 12
CONTENT_HASH_CHARS = 16

_STEP_RE = re.compile(r"^step:(\d+)/(\d+)(?=\s|$)")
_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(\S+)$")
_NUMBER_UNIT_RE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)([A-Za-z%]*)$",
                             re.IGNORECASE)
_PYTHON_RE = re.compile(r"^Running Python (\S+)")
_TORCH_RE = re.compile(r"^Running PyTorch (\S+)", re.IGNORECASE)
_TRITON_RE = re.compile(r"^Running Triton version (\S+)", re.IGNORECASE)
# A GPU row of the nvidia-smi table: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |".
_SMI_GPU_RE = re.compile(r"^\|\s*(\d+)\s+(.+?)\s+(?:On|Off)\s*\|\s*[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d")
_HEADER_RE = re.compile(r"^(track|world_size|grad_accum_steps|gpu|config|launch_to_first_step|compile_and_warmup|mfu):\s*(.*?)\s*$")
_MEMORY_RE = re.compile(r"^peak memory allocated:\s*(\d+(?:\.\d+)?)\s*MiB(?:\s+reserved:\s*(\d+(?:\.\d+)?)\s*MiB)?")

# Units a train_time / step_avg value may carry, as factors to milliseconds. A bare number is not
# accepted: every log writes a unit, so a number without one is a line cut short (370958ms cut
# after "3709" would otherwise read as 3.7 s and pass as a complete run).
_TIME_UNITS_MS = {"ms": 1.0, "s": 1000.0}


@dataclasses.dataclass
class ValPoint:
    """One validation measurement: where in training, and the loss."""
    step: int
    train_time_ms: float
    val_loss: float


@dataclasses.dataclass
class RunLog:
    """Everything compare.py reports about one run.

    complete is True only when the log holds a validation line at step T/T;
    the official time and final loss come from that line.
    """
    path: str
    source_hash: str = None
    content_hash: str = None  # of the whole text: two files with the same hash are one run copied
    track: str = None  # the `track:` line of a track's own trainer (track_2_medium, track_3_optimization); None for train_gpt.py
    python: str = None
    torch: str = None
    triton: str = None
    gpu: str = None
    world_size: int = None
    grad_accum_steps: int = None
    config: dict = None
    launch_to_first_step_s: float = None
    compile_and_warmup_s: float = None
    steps_total: int = None
    last_step: int = None
    final_val_loss: float = None
    train_time_ms: float = None
    step_avg_ms: float = None
    peak_memory_mib: float = None
    reserved_memory_mib: float = None
    mfu_percent: float = None
    stopping: str = None
    # Why a log that reached its final validation line still is not complete (e.g. cut inside it).
    incomplete_reason: str = None
    val_points: list = dataclasses.field(default_factory=list)

    @property
    def complete(self):
        return self.final_val_loss is not None

    @property
    def run_id(self):
        """The trainer's --run-id from the config: line (a uuid unless given), or None."""
        run_id = (self.config or {}).get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None

    @property
    def train_time_s(self):
        return None if self.train_time_ms is None else self.train_time_ms / 1000.0


def split_source(text):
    """Split a log into (source text or None, output lines).

    The source is everything before the first line made of exactly 100 '='
    (its final newline included). Without a separator the whole file counts as
    output and there is no source to hash.
    """
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.rstrip("\r\n") == SEPARATOR:
            return "".join(lines[:index]), [l.rstrip("\r\n") for l in lines[index + 1:]]
    return None, [l.rstrip("\r\n") for l in lines]


def source_hash(source):
    """First 12 hex characters of the sha256 of the source text (UTF-8)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:SOURCE_HASH_CHARS]


def parse_number(token):
    """Split '12345ms' / '4.3121' / 'nanms' into (float, unit); None if not numeric."""
    match = _NUMBER_UNIT_RE.match(token)
    if not match:
        return None
    return float(match.group(1)), match.group(2).lower()


def parse_time_ms(token):
    """A duration token in milliseconds ('12345ms', '12.3s'); None if unitless, unusable or non-finite."""
    parsed = parse_number(token)
    if parsed is None or parsed[1] not in _TIME_UNITS_MS or not math.isfinite(parsed[0]):
        return None
    return parsed[0] * _TIME_UNITS_MS[parsed[1]]


def parse_step_line(line):
    """Parse one step line into a dict, or None when it is not one.

    Accepts every layout seen so far: fields in any order after 'step:S/T',
    with or without step_avg, with extra fields such as train_loss.
    """
    line = line.strip()
    match = _STEP_RE.match(line)
    if not match:
        return None
    fields = {"step": int(match.group(1)), "total": int(match.group(2))}
    for token in line[match.end():].split():
        field = _FIELD_RE.match(token)
        if not field:
            continue
        key, value = field.groups()
        if key in ("train_time", "step_avg"):
            fields[key] = parse_time_ms(value)
        else:
            number = parse_number(value)
            if number is not None and number[1] == "":
                fields[key] = number[0]
    return fields


def _apply_header(run, key, value):
    """Store one of our own header lines (world_size:, gpu:, config:, ...) on the run."""
    if key == "track" and value:
        run.track = value
    elif key == "world_size" and value.isdigit():
        run.world_size = int(value)
    elif key == "grad_accum_steps" and value.isdigit():
        run.grad_accum_steps = int(value)
    elif key == "gpu" and value:
        run.gpu = value
    elif key == "config":
        try:
            config = json.loads(value)
        except ValueError:
            return
        if isinstance(config, dict):
            run.config = config
    elif key in ("launch_to_first_step", "compile_and_warmup"):
        # e.g. "48.2s" or "41.3s (10 steps, then reset)": the first word carries the figure
        number = parse_number(value.split()[0]) if value else None
        if number is not None and math.isfinite(number[0]) and number[1] in ("s", "", "ms"):
            setattr(run, key + "_s", number[0] / (1000.0 if number[1] == "ms" else 1.0))
    elif key == "mfu":
        number = parse_number(value.split()[0]) if value else None  # "40.1% (321 TFLOP/s per GPU of 800 peak)"
        if number is not None and number[1] in ("%", "") and math.isfinite(number[0]):
            run.mfu_percent = number[0]


def parse_log_text(text, path="<text>"):
    """Turn the text of one log into a RunLog (see the module docstring for the layout)."""
    source, lines = split_source(text)
    run = RunLog(path=path, source_hash=None if source is None else source_hash(source),
                 content_hash=hashlib.sha256(text.encode("utf-8")).hexdigest()[:CONTENT_HASH_CHARS])
    smi_gpus = {}
    final = None
    for line in lines:
        stripped = line.strip()
        step = parse_step_line(stripped)
        if step is not None:
            run.steps_total = step["total"]
            run.last_step = step["step"] if run.last_step is None else max(run.last_step, step["step"])
            loss = step.get("val_loss")
            if loss is not None and math.isfinite(loss):
                run.val_points.append(ValPoint(step["step"], step.get("train_time"), loss))
                if step["step"] == step["total"]:
                    final = step
            continue
        if stripped.startswith("stopping:"):
            run.stopping = stripped[len("stopping:"):].strip() or "stopped"
            continue
        for regex, attr in ((_PYTHON_RE, "python"), (_TORCH_RE, "torch"), (_TRITON_RE, "triton")):
            match = regex.match(stripped)
            if match and getattr(run, attr) is None:
                setattr(run, attr, match.group(1))
        smi = _SMI_GPU_RE.match(stripped)
        if smi:
            smi_gpus.setdefault(int(smi.group(1)), smi.group(2).strip())
            continue
        header = _HEADER_RE.match(stripped)
        if header:
            _apply_header(run, *header.groups())
            continue
        memory = _MEMORY_RE.match(stripped)
        if memory:
            run.peak_memory_mib = float(memory.group(1))
            if memory.group(2) is not None:
                run.reserved_memory_mib = float(memory.group(2))
    if run.gpu is None and smi_gpus:
        run.gpu = smi_gpus[min(smi_gpus)]
    if run.world_size is None and smi_gpus:
        run.world_size = len(smi_gpus)
    if final is not None and final["total"] == run.steps_total and final.get("train_time") is None:
        run.incomplete_reason = "final validation line has no train_time in ms: log cut short?"
    elif final is not None and final["total"] == run.steps_total:
        run.final_val_loss = final["val_loss"]
        run.train_time_ms = final["train_time"]
        run.step_avg_ms = final.get("step_avg")
        if run.step_avg_ms is None and final["step"] > 0:
            run.step_avg_ms = run.train_time_ms / final["step"]
    return run


def looks_like_log(text):
    """True when a file has a 100-'=' separator or a step line: how folders pick out logs."""
    source, lines = split_source(text)
    return source is not None or any(parse_step_line(line) for line in lines)


def has_step(text):
    """True when the log holds at least one step line. A log without one is a run that stopped before its
    first step (refused for a config or data error, say): nothing trained, so no tool counts it as a run."""
    return any(parse_step_line(line) for line in split_source(text)[1])


def duplicates(runs):
    """[(run, the earlier run it repeats, what they share)] for every run that is another's copy.

    Why: a folder holding one log twice (copied, or the same run id under two names) would count one run
    twice: n = 2, std 0, a p-value of nothing. A copy is the same text, or the same run id (the trainer
    never writes two logs with one run id). The first run of each set is the one kept.
    """
    seen, found = {}, []
    for run in runs:
        keys = [("content", run.content_hash)] + ([("run id", run.run_id)] if run.run_id else [])
        shared = next((key for key in keys if key in seen), None)
        if shared:
            found.append((run, seen[shared], "content" if shared[0] == "content" else f"run id {shared[1]}"))
        else:
            seen.update((key, run) for key in keys)
    return found


def describe_duplicates(found):
    """'b.txt repeats a.txt (same content)', joined by '; ': which files are copies, for a warning or a rule."""
    return "; ".join(f"{os.path.basename(run.path)} repeats {os.path.basename(earlier.path)} (same {what})"
                     for run, earlier, what in found)


def read_text(path):
    """Read a log as UTF-8, replacing undecodable bytes (a log is never worth crashing over)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def parse_log_file(path):
    """Parse the log file at path."""
    return parse_log_text(read_text(path), path=str(path))
