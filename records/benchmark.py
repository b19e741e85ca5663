#!/usr/bin/env python3
"""GPU speed benchmark: the record configuration on the proxy corpus, measured against REFERENCE.md's targets.

On the GPU machine (one H100), from the repository root, one device call:

    python records/benchmark.py --corpus ../shared/data/proxy_corpus/docs.jsonl.xz --fresh-compile-cache \\
        --json logs/benchmark/record.json

What one call does:
  1. Tokenizes the proxy corpus with data/tokenize_corpus.py into --data-dir (default data/proxy/,
     git-ignored) with 2,097,152 validation tokens, exactly the split of
     ../shared/data/proxy_corpus/REFERENCE.md (about 5 s on 16 cores; skipped when
     proxy_val_000000.bin and proxy_train_000001.bin already exist with the right sizes).
  2. Runs train_gpt.py once per variant (and --repeat round), in turn, on the same data: the record
     configuration (trainer --preset record) with its whole staged schedule compressed to --train-steps
     (default 120 of its 1285): the stage starts (0, 40, 79, 119), the extension (the last step, its
     own stage), Muon's momentum warm-up (28) and cool-down (5) scale by 120/1285; the batches, sequence
     lengths and windows of each stage, the LR cooldown fraction and the split stage stay (the embedding
     parts from the head at step 79). That is 31.6M training tokens (the reference's run: 47.2M). The
     validation is the reference's: --val-tokens 1966080 --val-seq-len 49152 (its 40 sequences of 49,152),
     off the training clock, --val-every 10 so the time to the target loss can be read off. With no
     --variant the one run is named 'record'; `--variant base="" --variant glue="--compile-glue"` is an
     A/B of two runs. Flags after `--` go to every run; a variant's own flags come after them and win.
  3. Prints one row per run as it finishes, then one table with the reference row and the targets row:
     ms/step, tokens/s (each stage's steps counted with that stage's batch), MFU, launch-to-first-step,
     compile+warmup, peak memory, final PROXY val loss, the training time at which the val loss first
     reached 3.2302 (interpolated between the two val points around the crossing) and its ratio to the
     reference's 91.2 s. Then REFERENCE.md's targets for every run, each met / NOT MET / unknown, with
     the figure beside the target:
       - proxy val loss 3.2302 within 45.6 s of training (0.5 x the reference's 91.2 s);
       - the first timed step within 60 s of launch on a cold compile cache (met only with
         --fresh-compile-cache: with a warm cache a figure over 60 s is NOT MET, one under it unknown);
       - ms/step, tokens/s and MFU printed (unknown for a run that did not finish).
     The targets are for one H100: on another GPU or with --nproc > 1 they are still judged, and the
     GPU and process count are printed beside them.

How long it takes: the reference script needed ~526 s from launch to end for ONE run on a cold compile
cache (~430 s of compilation, warm-up and validation compile, then 91 s of training); the record's staged
warm-up compiles three sequence lengths (16K, 32K, 48K). A device call is limited to 600 s, so --budget
(default 570 s) bounds the whole call: each run gets at most --timeout (default 540 s) and at most what is
left of the budget, and a run that would start with less than 120 s left is skipped and reported. A later
run in the same call reuses the warm inductor cache unless --fresh-compile-cache is given, so an A/B of two
variants fits in one call once launch-to-first-step is a minute or two. A run cut off is reported as
TIMEOUT with the val points it reached; --val-every 20 saves time. --dry-run prints each run's trainer
command and exits, without tokenizing or training.

On a CPU, the same code path in a minute or two (the trainer's tiny preset, the record's architecture at
CPU size with its own staged schedule, compressed the same way, on data/sample/; no targets judged):

    python records/benchmark.py --shards data/sample --preset tiny --device cpu --train-steps 20

Everything lands in --out-dir (default logs/benchmark/, git-ignored): the trainer's log
<run_id>.txt (read by records/compare.py) and the run's full stdout+stderr <run_id>.out.
Exit status: 0 when every run finished, 1 when one failed, timed out or was skipped, 2 on a
usage or data error; a target not met does not change it. Loss figures on the proxy corpus are
proxy figures: never report one as a FineWeb validation loss.
"""

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

if __package__:
    from . import runlog
else:  # run as `python records/benchmark.py`: this folder is sys.path[0]
    import runlog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = os.path.join(REPO, "train_gpt.py")
TOKENIZER = os.path.join(REPO, "data", "tokenize_corpus.py")
DEFAULT_CORPUS = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "proxy_corpus", "docs.jsonl.xz"))
DEFAULT_DATA_DIR = os.path.join(REPO, "data", "proxy")
DEFAULT_SAMPLE_DIR = os.path.join(REPO, "data", "sample")
DEFAULT_OUT_DIR = os.path.join(REPO, "logs", "benchmark")

PROXY_NAME = "proxy"
PROXY_SPLIT_VAL_TOKENS = 2_097_152       # REFERENCE.md: tokenize_proxy.py --val-tokens 2097152
PROXY_TRAIN_TOKENS = 45_367_447          # REFERENCE.md: the size of proxy_train_000001.bin
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4

TAIL_LINES = 20             # lines of a failed run's output printed to the console
MIN_RUN_SECONDS = 120       # a run that would start with less budget left is skipped
REPORT_RESERVE_SECONDS = 25  # budget kept back for stopping a run (SIGINT grace, SIGKILL) and the table
STOP_GRACE_SECONDS = 15     # after SIGINT, how long a run gets to log "stopping:" before SIGKILL
VARIANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The reference run on one H100 (../shared/data/proxy_corpus/REFERENCE.md), in the table's units.
REFERENCE_ROW = {
    "name": "reference", "status": "REFERENCE.md", "steps": 120, "ms_per_step": 760.3,
    "tokens_per_s": 393_216 / 0.7603, "mfu_percent": None, "launch_to_first_step_s": None,
    "compile_s": 430.0, "peak_memory_mib": 32_336.0, "reserved_memory_mib": 32_760.0,
    "final_val_loss": 3.2302, "time_to_target_s": 91.2, "target_ratio": 1.0, "wall_s": 526.0,
}

# REFERENCE.md's targets: the reference's loss in at most this fraction of its time, and the first timed
# step at most this many seconds after launch on a cold compile cache.
TARGET_TIME_RATIO = 0.5
TARGET_LAUNCH_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Preset:
    """Defaults of one benchmark setting; every number has a command-line override.

    The trainer preset is staged: --train-steps compresses its whole schedule (compressed_schedule_flags).
    """
    trainer_preset: str
    device: str
    train_steps: int
    val_tokens: int
    val_seq_len: int
    val_every: int
    target_loss: float
    judged: bool  # REFERENCE.md's targets apply (the proxy data and validation, a GPU)


PRESETS = {
    # The record (trainer --preset record) on REFERENCE.md's data, validation and target loss, its staged
    # schedule compressed to 120 steps.
    "record": Preset("record", "cuda", 120, 1_966_080, 49_152, 10, 3.2302, judged=True),
    # A CPU check of the same code path: the trainer's tiny preset on data/sample/, compressed the same way.
    "tiny": Preset("tiny", "cpu", 20, 8192, 512, 5, 7.0, judged=False),
}


class BenchmarkError(Exception):
    """A problem with the input (data, flags), reported as one line and exit status 2."""


@dataclasses.dataclass
class Variant:
    """One trainer configuration under test: a name and its extra trainer flags."""
    name: str
    args: list


@dataclasses.dataclass
class RunResult:
    """What happened to one trainer run and the figures read from its log."""
    name: str
    variant: str
    run_id: str
    command: list
    status: str = "skipped"        # ok | failed | timeout | skipped
    returncode: int = None
    wall_s: float = None
    log_path: str = None
    output_path: str = None
    metrics: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- arguments

def parse_variant(text):
    """Turn 'NAME=--flag value ...' into a Variant; the flags are split like a shell would."""
    name, sep, flags = text.partition("=")
    if not sep or not VARIANT_NAME_RE.match(name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=\"--flag value ...\" with NAME made of letters, digits, '_', '.', '-'")
    try:
        return Variant(name, shlex.split(flags))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}")


def build_parser():
    """The command line; preset-dependent options default to None and are filled in by resolve_options."""
    ap = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Time short runs of the record configuration (train_gpt.py --preset record, its staged\n"
                    "schedule compressed to --train-steps) on the proxy corpus against the targets of\n"
                    "../shared/data/proxy_corpus/REFERENCE.md: proxy val loss 3.2302 in <= 45.6 s of training\n"
                    "(0.5 x the 1xH100 reference's 91.2 s), the first timed step <= 60 s after launch on a\n"
                    "cold compile cache, ms/step, tokens/s and MFU printed. Loss figures are proxy figures.",
        epilog="Trainer flags after `--` are passed to every run, e.g. `-- --no-fp8-head`.\n\n"
               "examples:\n"
               "  python records/benchmark.py --fresh-compile-cache --json logs/benchmark/record.json\n"
               "  python records/benchmark.py --variant base=\"\" --variant glue=\"--compile-glue\"\n"
               "  python records/benchmark.py --dry-run     # print the trainer command only\n"
               "  python records/benchmark.py --shards data/sample --preset tiny --device cpu --train-steps 20",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ap.add_argument_group("data (one of; default: --corpus for record, --shards data/sample for tiny)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--corpus", metavar="PATH",
                        help="text corpus to tokenize with data/tokenize_corpus.py "
                             "(record default: ../shared/data/proxy_corpus/docs.jsonl.xz)")
    source.add_argument("--shards", metavar="DIR",
                        help="folder of existing NAME_val_*.bin and NAME_train_*.bin shards (one NAME)")
    data.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                      help="where --corpus is tokenized to, as proxy_*.bin (default: data/proxy)")
    data.add_argument("--split-val-tokens", type=int, default=PROXY_SPLIT_VAL_TOKENS, metavar="N",
                      help="tokens in the tokenized val shard (default: %(default)s, the reference split)")
    data.add_argument("--expect-train-tokens", type=int, default=PROXY_TRAIN_TOKENS, metavar="N",
                      help="expected train tokens of the tokenized corpus, to reuse existing shards "
                           "(default: %(default)s, the proxy corpus; 0: any)")

    run = ap.add_argument_group("runs")
    run.add_argument("--preset", choices=sorted(PRESETS), default="record",
                     help="'record': the record configuration on the proxy data and REFERENCE.md's validation, "
                          "judged against its targets (run 'record'); 'tiny': the trainer's tiny preset on "
                          "data/sample, a CPU check of the same code path, not judged (run 'tiny'); both with "
                          "the trainer preset's staged schedule compressed to --train-steps (default: %(default)s)")
    run.add_argument("--variant", type=parse_variant, action="append", default=[], metavar='NAME="FLAGS"',
                     help="a named set of extra trainer flags; repeat for an A/B (default: one run named after "
                          "the preset, 'record' or 'tiny')")
    run.add_argument("--repeat", type=int, default=1, metavar="K",
                     help="run every variant K times, in rounds A B A B ... (default: %(default)s)")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="processes (GPUs); N > 1 launches torchrun --standalone (default: %(default)s)")
    run.add_argument("--device", default=None, help="trainer --device (record: cuda, tiny: cpu)")
    run.add_argument("--train-steps", type=int, default=None, metavar="N",
                     help="the trainer preset's whole staged schedule scaled to N steps: stage starts, "
                          "extension, Muon momentum warm-up and cool-down (record: 120 of 1285, tiny: 20)")
    run.add_argument("--val-tokens", type=int, default=None, metavar="N",
                     help="trainer --val-tokens (record: 1966080, the reference's)")
    run.add_argument("--val-seq-len", type=int, default=None, metavar="N",
                     help="trainer --val-seq-len (record: 49152, the reference's)")
    run.add_argument("--val-every", type=int, default=None, metavar="N",
                     help="trainer --val-every (record: 10, tiny: 5)")
    run.add_argument("--timeout", type=float, default=540.0, metavar="SECONDS",
                     help="wall-clock limit of one run (default: %(default)s)")
    run.add_argument("--budget", type=float, default=570.0, metavar="SECONDS",
                     help="wall-clock limit of the whole call, data preparation included; runs are cut to "
                          "fit and skipped when less than %d s is left (0: none; default: %%(default)s)"
                          % MIN_RUN_SECONDS)
    run.add_argument("--fresh-compile-cache", action="store_true",
                     help="give every run an empty inductor/Triton cache, so each compiles cold (the "
                          "launch target is judged met only with it)")
    run.add_argument("--verbose", action="store_true", help="echo every trainer line, not only val lines")
    run.add_argument("--dry-run", action="store_true",
                     help="print each run's trainer command, one per line, and exit: no tokenizing, no training")

    report = ap.add_argument_group("report")
    report.add_argument("--target-loss", type=float, default=None, metavar="LOSS",
                        help="proxy val loss whose time is reported (record: 3.2302, the reference's final; "
                             "tiny: 7.0)")
    report.add_argument("--reference-seconds", type=float, default=91.2, metavar="S",
                        help="reference training time to the target loss, for the ratio; the time target is "
                             "%g x this (default: %%(default)s)" % TARGET_TIME_RATIO)
    report.add_argument("--out-dir", default=DEFAULT_OUT_DIR, metavar="DIR",
                        help="trainer logs and run outputs (default: logs/benchmark)")
    report.add_argument("--json", metavar="FILE", help="also write the table's numbers and the targets as JSON")
    return ap


def split_passthrough(argv):
    """Split argv at the first '--': (benchmark args, trainer args passed to every run)."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def resolve_options(args):
    """Fill preset-dependent defaults in place and check the numbers; returns args."""
    preset = PRESETS[args.preset]
    for field in ("device", "train_steps", "val_tokens", "val_seq_len", "val_every", "target_loss"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(preset, field))
    args.trainer_preset = preset.trainer_preset
    if args.corpus is None and args.shards is None:
        if args.preset == "tiny":
            args.shards = DEFAULT_SAMPLE_DIR
        else:
            args.corpus = DEFAULT_CORPUS
    for name in ("repeat", "nproc", "train_steps"):
        if getattr(args, name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout <= 0 or args.budget < 0:
        raise BenchmarkError("--timeout must be positive and --budget not negative")
    if args.reference_seconds <= 0:
        raise BenchmarkError("--reference-seconds must be positive")
    names = [v.name for v in args.variant]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchmarkError(f"--variant names must differ: {', '.join(duplicates)} given twice")
    if not args.variant:
        args.variant = [Variant(args.preset, [])]
    args.judged = preset.judged
    args.schedule_flags = compressed_schedule_flags(args.trainer_preset, args.train_steps)
    return args


# ----------------------------------------------------------------------------- data

def shard_token_count(path):
    """Tokens in a .bin shard according to its header; None unless the file is a whole, valid shard."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header = handle.read(SHARD_HEADER_BYTES)
    except OSError:
        return None
    if len(header) < SHARD_HEADER_BYTES:
        return None
    magic, version, tokens = struct.unpack("<3i", header[:12])
    if magic != SHARD_MAGIC or version != SHARD_VERSION or size != SHARD_HEADER_BYTES + 2 * tokens:
        return None
    return tokens


def find_shards(folder):
    """(val glob, train glob) of the one NAME_val_*/NAME_train_* shard set in a folder."""
    if not os.path.isdir(folder):
        raise BenchmarkError(f"--shards {folder}: no such folder")
    names = sorted({os.path.basename(p).split("_val_")[0] for p in glob.glob(os.path.join(folder, "*_val_*.bin"))})
    names = [n for n in names if glob.glob(os.path.join(folder, glob.escape(n) + "_train_*.bin"))]
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        raise BenchmarkError(f"--shards {folder}: need exactly one NAME with both NAME_val_*.bin and "
                             f"NAME_train_*.bin shards, found {found}")
    prefix = os.path.join(folder, glob.escape(names[0]))
    return prefix + "_val_*.bin", prefix + "_train_*.bin"


def corpus_shards_ready(data_dir, val_tokens, expect_train_tokens, name=PROXY_NAME):
    """True when data_dir holds the split we would make: a val shard of val_tokens and the train shard(s).

    Why: tokenizing costs device time; an earlier call's shards are reused only when they are
    exactly the reference split (val size, and the train size when one is expected).
    """
    if shard_token_count(os.path.join(data_dir, f"{name}_val_000000.bin")) != val_tokens:
        return False
    train = sorted(glob.glob(os.path.join(data_dir, f"{name}_train_*.bin")))
    counts = [shard_token_count(p) for p in train]
    if not train or None in counts:
        return False
    return expect_train_tokens == 0 or sum(counts) == expect_train_tokens


def prepare_corpus(corpus, data_dir, val_tokens, expect_train_tokens, name=PROXY_NAME):
    """Tokenize the corpus with data/tokenize_corpus.py unless the shards are there; returns the two globs."""
    globs = (os.path.join(data_dir, f"{name}_val_*.bin"), os.path.join(data_dir, f"{name}_train_*.bin"))
    if corpus_shards_ready(data_dir, val_tokens, expect_train_tokens, name):
        print(f"data: reusing {data_dir}/{name}_*.bin (val {val_tokens:,} tokens)", flush=True)
        return globs
    if not os.path.isfile(corpus):
        raise BenchmarkError(f"--corpus {corpus}: no such file")
    # tokenize_corpus.py --val-tokens N writes N + 1 tokens (N scored, one more as the last target)
    command = [sys.executable, TOKENIZER, corpus, "--out-dir", data_dir, "--name", name,
               "--val-tokens", str(val_tokens - 1), "--no-progress"]
    print(f"data: tokenizing: {shlex.join(command)}", flush=True)
    started = time.time()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    print(done.stdout.rstrip(), flush=True)
    if done.returncode != 0:
        raise BenchmarkError(f"tokenize_corpus.py failed with exit status {done.returncode}")
    if not corpus_shards_ready(data_dir, val_tokens, 0, name):
        raise BenchmarkError(f"tokenize_corpus.py did not leave a {val_tokens:,}-token val shard in {data_dir}")
    if not corpus_shards_ready(data_dir, val_tokens, expect_train_tokens, name):
        print(f"data: WARNING: train tokens differ from the expected {expect_train_tokens:,}: "
              "not the reference split", flush=True)
    print(f"data: tokenized in {time.time() - started:.1f}s", flush=True)
    return globs


def data_globs_without_preparing(args):
    """The (val glob, train glob) the runs would get, without tokenizing anything (--dry-run)."""
    if args.shards is not None:
        return find_shards(args.shards)
    return (os.path.join(args.data_dir, f"{PROXY_NAME}_val_*.bin"), os.path.join(args.data_dir, f"{PROXY_NAME}_train_*.bin"))


def prepare_data(args):
    """(val glob, train glob) for the trainer, from --shards or by tokenizing --corpus."""
    if args.shards is not None:
        return find_shards(args.shards)
    return prepare_corpus(args.corpus, args.data_dir, args.split_val_tokens, args.expect_train_tokens)


# ----------------------------------------------------------------------------- runs

def launcher(nproc):
    """The command that starts the trainer: plain python for one process, torchrun beyond."""
    if nproc == 1:
        return [sys.executable, TRAINER]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAINER]


def import_trainer():
    """train_gpt as a module, imported on first use (it imports torch): only the schedule's compression needs it."""
    if REPO not in sys.path:  # run as `python records/benchmark.py`, only records/ is on the path
        sys.path.insert(0, REPO)
    import train_gpt
    return train_gpt


def scaled_steps(steps, scale):
    """A step count of the full schedule in the compressed one (nearest step)."""
    return int(round(steps * scale))


def compressed_schedule_flags(trainer_preset, train_steps):
    """Trainer flags that shrink a staged preset's whole schedule to train_steps, keeping its shape.

    Every step-counted setting is scaled by train_steps / the preset's train_steps: the stage starts, the
    extension (the steps after the LR cooldown ends, which form the last stage), and Muon's momentum warm-up
    and cool-down. Fractions (the LR cooldown), the per-stage batches, sequence lengths and windows, and the
    split stage are kept.
    Why from the trainer's own preset: the benchmark follows the recipe when the preset changes.
    """
    train_gpt = import_trainer()
    full = train_gpt.parse_config(["--preset", trainer_preset])
    if not full.stage_steps:
        raise BenchmarkError(f"--preset {trainer_preset} of train_gpt.py has no staged schedule to compress")
    scale = train_steps / full.train_steps
    stage_steps = [scaled_steps(start, scale) for start in full.stage_steps]
    # The extension ends the run: what is left after the scaled end of the scheduled steps, at least one step
    # if the preset has one (so no stage disappears), and its stage starts where it does.
    scheduled_end = train_gpt.scheduled_steps(full)
    extension = train_steps - scaled_steps(scheduled_end, scale)
    if full.extension_steps:
        extension = max(1, extension)
        if full.stage_steps[-1] == scheduled_end:
            stage_steps[-1] = train_steps - extension
    if any(b <= a for a, b in zip(stage_steps, stage_steps[1:])) or stage_steps[-1] >= train_steps:
        raise BenchmarkError(f"--train-steps {train_steps} is too few for the {len(stage_steps)} stages of "
                             f"--preset {trainer_preset}: stages would start at {stage_steps}")
    return ["--train-steps", str(train_steps), "--extension-steps", str(extension),
            "--stage-steps", ",".join(map(str, stage_steps)),
            "--muon-momentum-warmup-steps", str(scaled_steps(full.muon_momentum_warmup_steps, scale)),
            "--muon-momentum-cooldown-steps", str(scaled_steps(full.muon_momentum_cooldown_steps, scale))]


def trainer_command(args, data_globs, passthrough, variant, run_id):
    """Full trainer command of one run.

    Order matters (the trainer keeps the last value of a flag): the benchmark schedule, then the
    `--` flags, then the variant's flags, and last the run id and log folder, which the benchmark
    needs to find the log.
    """
    val_glob, train_glob = data_globs
    schedule = ["--preset", args.trainer_preset, "--device", args.device, *args.schedule_flags,
                "--val-tokens", str(args.val_tokens), "--val-seq-len", str(args.val_seq_len),
                "--val-every", str(args.val_every), "--train-files", train_glob, "--val-files", val_glob]
    return launcher(args.nproc) + schedule + list(passthrough) + list(variant.args) + [
        "--log-dir", args.out_dir, "--run-id", run_id]


def plan_runs(args, data_globs, passthrough, stamp):
    """Every run of the call in order: rounds of all variants (A B A B), so drift hits both alike."""
    runs = []
    for round_index in range(1, args.repeat + 1):
        for variant in args.variant:
            name = variant.name if args.repeat == 1 else f"{variant.name}#{round_index}"
            run_id = f"bench-{stamp}-{variant.name}" + ("" if args.repeat == 1 else f"-r{round_index}")
            runs.append(RunResult(name=name, variant=variant.name, run_id=run_id,
                                  command=trainer_command(args, data_globs, passthrough, variant, run_id),
                                  log_path=os.path.join(args.out_dir, f"{run_id}.txt"),
                                  output_path=os.path.join(args.out_dir, f"{run_id}.out")))
    return runs


def should_echo(line, verbose):
    """Echo val lines and anything unusual, not the per-step lines or the long config JSON.

    Why: the device call returns only the last 12,000 characters of output, which should hold
    the table rather than hundreds of step lines.
    """
    if verbose:
        return True
    if line.startswith("config:"):
        return False
    step = runlog.parse_step_line(line)
    return step is None or "val_loss" in step


def _pump_output(stream, output_path, prefix, verbose):
    """Copy the child's output to its .out file line by line, echoing the interesting lines."""
    with open(output_path, "w", encoding="utf-8") as out:
        for line in stream:
            out.write(line)
            out.flush()
            text = line.rstrip("\n")
            if should_echo(text, verbose):
                print(f"{prefix}{text}", flush=True)


def stop_process_group(process):
    """Stop a run and everything it started: SIGINT (the trainer logs 'stopping: interrupted'), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, STOP_GRACE_SECONDS), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGINT:  # the leader is gone: clear stragglers (compile workers, torchrun ranks)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def execute(command, output_path, timeout, prefix, verbose=False, env=None):
    """Run a command in its own process group with a wall-clock limit.

    Returns (returncode or None when it timed out, wall seconds). The group lets a timeout
    stop torchrun's ranks and the compile workers too.
    """
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", bufsize=1, start_new_session=True, env=env)
    pump = threading.Thread(target=_pump_output, args=(process.stdout, output_path, prefix, verbose), daemon=True)
    pump.start()
    returncode = None
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(process)
    except BaseException:
        stop_process_group(process)
        raise
    finally:
        pump.join(timeout=10)
    return returncode, time.time() - started


def run_environment(fresh_cache_dir):
    """The trainer's environment: unbuffered output, and optionally empty compile caches."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if fresh_cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(fresh_cache_dir, "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(fresh_cache_dir, "triton")
    return env


def tail(path, lines=TAIL_LINES):
    """The last lines of a text file ('' if it cannot be read)."""
    try:
        return "\n".join(runlog.read_text(path).splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- figures

def time_to_target(points, target):
    """Seconds of training at which the val loss first reached target, or None if it never did.

    points: (train seconds, val loss) in step order. Between the last point above the target
    and the first at or below it, the time is interpolated linearly in the loss; a curve that
    starts at or below the target reaches it at its first point.
    """
    previous = None
    for seconds, loss in points:
        if loss <= target:
            if previous is None:
                return seconds
            before_s, before_loss = previous
            return before_s + (before_loss - target) / (before_loss - loss) * (seconds - before_s)
        previous = (seconds, loss)
    return None


def target_ratio(seconds, reference_seconds):
    """Time to target as a multiple of the reference's (0.5 = twice as fast); None if not reached."""
    return None if seconds is None else seconds / reference_seconds


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trained_tokens(config, steps):
    """Training tokens of the first `steps` steps, from the log's config; None when it does not say.

    Every run is staged: stage i trains stage_batch_tokens[i] per step, from stage_steps[i] to the next
    stage's start. Why each stage's own batch: the record's first stages take a third and two thirds of
    the last ones' batch, so steps x the last batch would overstate its tokens/s (by 1.5x at 120 steps).
    """
    starts, batches = config.get("stage_steps") or [], config.get("stage_batch_tokens") or []
    if not starts or len(batches) != len(starts) or not all(map(is_number, [*starts, *batches])):
        return None
    ends = [*starts[1:], steps]
    return sum(max(0, min(end, steps) - start) * batch for start, end, batch in zip(starts, ends, batches))


def run_metrics(text, target, reference_seconds):
    """The table's figures for one log text (complete or cut short): a dict, None where unknown.

    ms/step and tokens/s come from the last val line after step 0 (its train_time is exact;
    the per-step lines are approximate), tokens/s with the batch of each step from the config line.
    """
    run = runlog.parse_log_text(text)
    timed = [p for p in run.val_points if p.train_time_ms is not None]
    last = timed[-1] if timed else None
    steps = last.step if last else None
    train_s = last.train_time_ms / 1000.0 if last else None
    ms_per_step = last.train_time_ms / last.step if last and last.step > 0 else None
    tokens = trained_tokens(run.config or {}, last.step) if last else None
    tokens_per_s = tokens / train_s if tokens and train_s else None
    reached = time_to_target([(p.train_time_ms / 1000.0, p.val_loss) for p in timed], target)
    return {
        "steps": steps, "steps_total": run.steps_total, "complete": run.complete, "train_time_s": train_s,
        "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s, "trained_tokens": tokens,
        "mfu_percent": run.mfu_percent,
        "launch_to_first_step_s": run.launch_to_first_step_s,
        "compile_s": run.compile_and_warmup_s, "peak_memory_mib": run.peak_memory_mib,
        "reserved_memory_mib": run.reserved_memory_mib,
        "final_val_loss": last.val_loss if last else None,
        "val_curve": [[p.step, p.train_time_ms / 1000.0, p.val_loss] for p in timed],
        "time_to_target_s": reached, "target_ratio": target_ratio(reached, reference_seconds),
        "gpu": run.gpu, "world_size": run.world_size, "torch": run.torch, "source_hash": run.source_hash,
        "stopping": run.stopping,
    }


def read_metrics(result, target, reference_seconds):
    """Parse a run's log into result.metrics (empty when the trainer wrote no log)."""
    if result.log_path and os.path.isfile(result.log_path):
        result.metrics = run_metrics(runlog.read_text(result.log_path), target, reference_seconds)
    else:
        result.metrics = {}


def classify(returncode, metrics):
    """ok only for exit status 0 and a final validation line; None means it was stopped at the timeout."""
    if returncode is None:
        return "timeout"
    return "ok" if returncode == 0 and metrics.get("complete") else "failed"


# ----------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Limits:
    """REFERENCE.md's targets in numbers: the loss, the training seconds to reach it, the launch seconds."""
    loss: float
    time_s: float
    ratio: float
    launch_s: float
    cold_cache: bool  # every run compiled on an empty cache (--fresh-compile-cache)


def target_limits(args):
    """The targets of this call: 0.5 x --reference-seconds to --target-loss, 60 s to the first timed step."""
    return Limits(args.target_loss, TARGET_TIME_RATIO * args.reference_seconds, TARGET_TIME_RATIO,
                  TARGET_LAUNCH_SECONDS, args.fresh_compile_cache)


def time_target_met(metrics, limit_s):
    """The loss target: True when the run reached the loss within limit_s of training; False when it reached
    it later, finished without reaching it, or trained past limit_s without reaching it; None when it stopped
    earlier, or has no val point."""
    reached = metrics.get("time_to_target_s")
    if reached is not None:
        return reached <= limit_s
    trained = metrics.get("train_time_s")
    if metrics.get("complete") or (trained is not None and trained >= limit_s):
        return False
    return None


def launch_target_met(metrics, limit_s, cold_cache):
    """The launch target: only a cold compile cache can show it met; a figure over the limit fails it even
    on a warm cache (a cold one is slower still). None when unmeasured or warm and under the limit."""
    seconds = metrics.get("launch_to_first_step_s")
    if seconds is None:
        return None
    if seconds > limit_s:
        return False
    return True if cold_cache else None


FIGURES = ("ms_per_step", "tokens_per_s", "mfu_percent")


def figures_target_met(metrics):
    """The figures target: ms/step, tokens/s and MFU all known; a finished run without one of them fails it,
    a run stopped early (no summary lines yet) is unknown."""
    if all(metrics.get(name) is not None for name in FIGURES):
        return True
    return False if metrics.get("complete") else None


def judge_targets(record, limits):
    """REFERENCE.md's three targets for one run, each as a JSON-ready dict: what it needs, the figure
    (the number and its text) and met (True, False, or None when the run cannot tell)."""
    reached, trained = record.get("time_to_target_s"), record.get("train_time_s")
    if reached is not None:
        time_figure = f"{reached:.1f} s ({record['target_ratio']:.3f} x ref)"
    elif trained is not None:
        time_figure = f"not reached in {trained:.1f} s"
    else:
        time_figure = "-"
    launch = record.get("launch_to_first_step_s")
    cache = "cold" if limits.cold_cache else "warm"
    figures = {name: record.get(name) for name in FIGURES}
    return [
        {"target": "time_to_loss", "what": f"proxy val loss {limits.loss:g}",
         "needs": f"<= {limits.time_s:g} s of training", "limit": limits.time_s, "value": reached,
         "figure": time_figure, "met": time_target_met(record, limits.time_s)},
        {"target": "launch_to_first_step", "what": "first timed step after launch",
         "needs": f"<= {limits.launch_s:g} s, cold cache", "limit": limits.launch_s, "value": launch,
         "cold_cache": limits.cold_cache,
         "figure": "-" if launch is None else f"{launch:.1f} s ({cache} cache)",
         "met": launch_target_met(record, limits.launch_s, limits.cold_cache)},
        {"target": "figures", "what": "ms/step, tokens/s, MFU", "needs": "all three printed", "limit": None,
         "value": figures,
         "figure": f"{_number(figures['ms_per_step'], '.1f')} ms/step, "
                   f"{_number(figures['tokens_per_s'], ',.0f')} tok/s, MFU {_number(figures['mfu_percent'], '.1f', '%')}",
         "met": figures_target_met(record)},
    ]


def verdict_text(met):
    return {True: "met", False: "NOT MET", None: "unknown"}[met]


def format_targets(records, limits, nproc):
    """The targets block: one line per run and target, the figure beside what the target needs."""
    gpus = sorted({r["gpu"] for r in records if r.get("gpu")}) or ["gpu unknown"]
    title = (f"Targets (REFERENCE.md, for one H100 and a cold compile cache; this call: {', '.join(gpus)}, "
             f"{nproc} process{'es' if nproc > 1 else ''}, {'cold' if limits.cold_cache else 'warm'} cache):")
    headers = ["run", "target", "needs", "figure", "verdict"]
    cells = [[r["name"], t["what"], t["needs"], t["figure"], verdict_text(t["met"])]
             for r in records for t in r.get("targets") or []]
    return title + "\n" + columns(headers, cells, left=5)


# ----------------------------------------------------------------------------- report

def _number(value, spec, suffix=""):
    """Format a number, '-' when unknown."""
    return "-" if value is None else format(value, spec) + suffix


def status_text(result):
    """Short status cell: ok, FAILED rc=N, TIMEOUT, skipped."""
    if result["status"] == "failed":
        return f"FAILED rc={result.get('returncode')}"
    return result["status"].upper() if result["status"] == "timeout" else result["status"]


def target_text(row):
    """Time-to-target cell: seconds, 'not reached' when the run has val losses, '-' when it has none."""
    reached = row.get("time_to_target_s")
    if reached is not None:
        return f"{reached:.1f}"
    return "not reached" if row.get("final_val_loss") is not None else "-"


def row_cells(row):
    """The table cells of one row (a run's JSON record or REFERENCE_ROW)."""
    target_cell = target_text(row)
    return [row["name"], row["status"] if row["name"] == "reference" else status_text(row),
            _number(row.get("steps"), "d"), _number(row.get("ms_per_step"), ".1f"),
            _number(row.get("tokens_per_s"), ",.0f"), _number(row.get("mfu_percent"), ".1f", "%"),
            _number(row.get("launch_to_first_step_s"), ".1f"), _number(row.get("compile_s"), ".1f"),
            _number(row.get("peak_memory_mib"), ",.0f"), _number(row.get("reserved_memory_mib"), ",.0f"),
            _number(row.get("final_val_loss"), ".4f"), target_cell, _number(row.get("target_ratio"), ".3f"),
            _number(row.get("wall_s"), ".0f")]


def limit_cells(limits):
    """The table's targets row: REFERENCE.md's limits in the columns they bound."""
    return ["target", "REFERENCE.md", "-", "-", "-", "-", f"<={limits.launch_s:g}", "-", "-", "-",
            f"<={limits.loss:g}", f"<={limits.time_s:g}", f"<={limits.ratio:.3f}", "-"]


def columns(headers, cells, left):
    """Text columns under headers: the first `left` left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    def line(values):
        return "  ".join(v.ljust(w) if i < left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def format_table(rows, target, limits=None):
    """The comparison table as text: one line per run, then the reference, then the targets (if judged)."""
    headers = ["run", "status", "steps", "ms/step", "tok/s", "MFU", "launch>1st s", "compile s",
               "peak alloc MiB", "peak resv MiB", "proxy val loss", f"t@{target:g} s", "x ref", "wall s"]
    cells = [row_cells(row) for row in rows] + [row_cells(REFERENCE_ROW)]
    if limits is not None:
        cells.append(limit_cells(limits))
    return columns(headers, cells, left=2)


def result_record(result):
    """One run as a flat JSON-ready dict (the same numbers as its table row)."""
    record = {"name": result.name, "variant": result.variant, "run_id": result.run_id, "status": result.status,
              "returncode": result.returncode, "wall_s": result.wall_s, "log": result.log_path,
              "output": result.output_path, "command": shlex.join(result.command)}
    record.update(result.metrics)
    return record


def report_json(args, records):
    """The --json document: settings, the reference row, the targets' limits and every run (its verdicts in
    its "targets"; null when not judged)."""
    limits = dataclasses.asdict(target_limits(args)) if args.judged else None
    return {"preset": args.preset, "target_loss": args.target_loss, "reference_seconds": args.reference_seconds,
            "loss_note": "proxy-corpus val losses, not FineWeb",
            "settings": {"device": args.device, "nproc": args.nproc, "train_steps": args.train_steps,
                         "val_tokens": args.val_tokens, "val_seq_len": args.val_seq_len,
                         "val_every": args.val_every, "fresh_compile_cache": args.fresh_compile_cache,
                         "schedule_flags": args.schedule_flags},
            "reference": dict(REFERENCE_ROW), "target_limits": limits, "runs": records}


def write_json(path, document):
    """Write JSON through a temporary file, so a killed call never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.write("\n")
    os.replace(temporary, path)


def one_line_summary(record, target):
    """Printed as soon as a run ends, so a call cut off later still shows the finished runs."""
    reached = target_text(record)
    verdicts = ", ".join(f"{t['target']} {verdict_text(t['met'])}" for t in record.get("targets") or [])
    return (f"result {record['name']}: {status_text(record)}, steps {_number(record.get('steps'), 'd')}, "
            f"{_number(record.get('ms_per_step'), '.1f')} ms/step, "
            f"{_number(record.get('tokens_per_s'), ',.0f')} tok/s, "
            f"proxy val loss {_number(record.get('final_val_loss'), '.4f')}, "
            f"t@{target:g} {reached if reached in ('-', 'not reached') else reached + 's'}, "
            f"wall {_number(record.get('wall_s'), '.0f')}s, gpu {record.get('gpu') or '-'}"
            + (f"; targets: {verdicts}" if verdicts else ""))


# ----------------------------------------------------------------------------- main

def run_one(result, args, deadline):
    """Run (or skip, when the budget is spent) one planned run and fill in its result."""
    timeout = args.timeout
    if deadline is not None:
        left = deadline - time.time() - REPORT_RESERVE_SECONDS
        if left < MIN_RUN_SECONDS:
            print(f"[{result.name}] skipped: {max(left, 0):.0f}s of --budget left, "
                  f"need {MIN_RUN_SECONDS}s", flush=True)
            result.status = "skipped"
            return result
        timeout = min(timeout, left)
    print(f"[{result.name}] {shlex.join(result.command)}  (limit {timeout:.0f}s)", flush=True)
    cache = tempfile.mkdtemp(prefix="bench-cache-") if args.fresh_compile_cache else None
    try:
        result.returncode, result.wall_s = execute(result.command, result.output_path, timeout,
                                                   f"[{result.name}] ", args.verbose, run_environment(cache))
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    read_metrics(result, args.target_loss, args.reference_seconds)
    result.status = classify(result.returncode, result.metrics)
    if result.status != "ok":
        reason = f"timed out after {timeout:.0f}s" if result.status == "timeout" else \
            f"failed (exit status {result.returncode})"
        print(f"[{result.name}] {reason}; last {TAIL_LINES} lines of {result.output_path}:", flush=True)
        print(tail(result.output_path), flush=True)
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, passthrough = split_passthrough(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    started = time.time()
    deadline = started + args.budget if args.budget else None
    try:
        resolve_options(args)
        for name in ("corpus", "shards", "data_dir", "out_dir", "json"):
            if getattr(args, name):
                setattr(args, name, os.path.abspath(getattr(args, name)))
        data_globs = data_globs_without_preparing(args) if args.dry_run else prepare_data(args)
    except BenchmarkError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for result in plan_runs(args, data_globs, passthrough, "dry-run"):
            print(shlex.join(result.command))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    runs = plan_runs(args, data_globs, passthrough, time.strftime("%Y%m%d-%H%M%S"))
    print(f"benchmark: preset {args.preset}, {len(runs)} run(s), {args.train_steps} steps, "
          f"target proxy val loss {args.target_loss:g}, outputs in {args.out_dir}", flush=True)
    limits = target_limits(args) if args.judged else None
    records = []
    for result in runs:
        run_one(result, args, deadline)
        records.append(result_record(result))
        records[-1]["targets"] = judge_targets(records[-1], limits) if limits else None
        print(one_line_summary(records[-1], args.target_loss), flush=True)
        if args.json:
            write_json(args.json, report_json(args, records))
    print()
    print(f"Benchmark ({args.preset}; val losses are PROXY-corpus figures, not FineWeb; "
          f"time to proxy val loss {args.target_loss:g}, ratio to the reference's {args.reference_seconds:g}s):")
    print(format_table(records, args.target_loss, limits))
    print("reference: ../shared/data/proxy_corpus/REFERENCE.md, public record #28's script on 1xH100, torch 2.11, "
          "120 steps (val every 40; compile ~430 s of its 526 s launch-to-end)")
    print()
    if limits:
        print(format_targets(records, limits, args.nproc))
    else:
        print(f"targets: not judged for --preset {args.preset} (REFERENCE.md's targets are the record's on the "
              "proxy data, one H100)")
    if args.json:
        print(f"json: {args.json}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
