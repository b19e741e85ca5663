#!/usr/bin/env bash
# Launch the speedrun: the record configuration on every GPU of this machine.
#
#   ./run.sh                          # 8 GPUs (the record setting)
#   NPROC=4 ./run.sh                  # 4 GPUs, same math (2 gradient-accumulation steps)
#   ./run.sh --seed 1 --run-id try1   # any train_gpt.py flag is passed through
#
# NPROC (default 8) is the number of processes, one per GPU. The global batch is fixed, so
# NPROC must divide 8; run.sh checks that, and that the GPUs are there, before torchrun starts.
set -euo pipefail

# Run from the repository root so the default data paths (data/fineweb10B/...) and logs/ resolve.
cd "$(dirname "${BASH_SOURCE[0]}")"

nproc="${NPROC:-8}"
python=$(command -v python || command -v python3 || echo python)

if ! command -v torchrun >/dev/null 2>&1; then
    echo "run.sh: error: torchrun is not on the PATH; install the requirements first: pip install -r requirements.txt" >&2
    exit 1
fi

# --help: train_gpt.py's help once, not once per process
for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec "$python" train_gpt.py --help
    fi
done

# Check the launch in one process before torchrun starts NPROC of them: a missing GPU or a world
# size that does not fit is then the first and only line of output, not a line inside torchrun's
# failure report. The flags are parsed by train_gpt.py itself, so --device cpu or another
# --stage-seq-len is taken into account.
"$python" - "$nproc" "$@" <<'PY'
import os
import shlex
import sys

nproc_text, argv = sys.argv[1], sys.argv[2:]


def fail(message):
    print(f"run.sh: error: {message}", file=sys.stderr)
    sys.exit(2)


CPU_HINT = ("to try the trainer on CPU run: python train_gpt.py --preset tiny --device cpu "
            "(or on 2 processes: NPROC=2 ./run.sh --preset tiny --device cpu)")

if not nproc_text.isdigit() or int(nproc_text) < 1:
    fail(f"NPROC={nproc_text!r} is not a number of processes; set it to the number of GPUs to use, e.g. NPROC=4 ./run.sh")
nproc = int(nproc_text)
try:
    import torch
    import train_gpt
except ImportError as error:
    fail(f"cannot import {error.name}; install the requirements first: pip install -r requirements.txt")

cfg = train_gpt.parse_config(argv)  # a bad flag exits here with train_gpt.py's one-line usage error


def fits(world_size):
    """True when train_gpt.py accepts this world size for the given flags."""
    try:
        train_gpt.check_config(cfg, world_size)
    except train_gpt.ConfigError:
        return False
    return True


def rerun(n):
    """The command to run instead: the same flags with NPROC=n."""
    return " ".join([f"NPROC={n}", "./run.sh", *map(shlex.quote, argv)])


def usable_sizes(limit):
    """The world sizes 1..limit that train_gpt.py accepts for these flags."""
    return [n for n in range(1, limit + 1) if fits(n)]


def one_of(sizes):
    """[1, 2, 4, 8] -> '1, 2, 4 or 8'."""
    return " or ".join([", ".join(map(str, sizes[:-1])), str(sizes[-1])]) if len(sizes) > 1 else str(sizes[0])


gpus = None
if cfg.device == "cuda":
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        fail(f"CUDA is not available on this machine (PyTorch {torch.__version__} sees no GPU); {CPU_HINT}")
    if nproc > gpus:
        usable = usable_sizes(gpus)
        advice = f"run {rerun(usable[-1])}" if usable else "use a machine with more GPUs"
        fail(f"NPROC={nproc} needs {nproc} GPUs but this machine has {gpus}; {advice} "
             f"(the global batch is fixed, so fewer GPUs give the same math)")
try:
    train_gpt.check_config(cfg, nproc)
except train_gpt.ConfigError as error:
    usable = usable_sizes(gpus if gpus is not None else max(nproc, os.cpu_count() or 1))
    fail(f"NPROC={nproc}: {error}" + (f"; here NPROC can be {one_of(usable)}, e.g. {rerun(usable[-1])}" if usable else ""))
PY

# torchrun under a small supervisor. Why: SIGTERM (a batch scheduler, kill) or Ctrl-C to ./run.sh must end
# as train_gpt.py documents: its stopping: line, the checkpoint kept, exit 143 or 130. torchrun alone stops the
# trainers cleanly but then prints a SignalException traceback (~30 lines) and exits 1. So the supervisor
# starts torchrun in its own session (a terminal's Ctrl-C then reaches it once, from here), forwards the
# signal, passes on only train_gpt.py's own lines of the stderr that follows, and exits 128 + the signal.
supervisor=$(cat <<'PY'
import signal
import subprocess
import sys
import threading

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
received, launcher = [], None


def forward(signum, frame):
    received.append(signum)
    if launcher is not None:
        launcher.send_signal(signum)


def pass_on(stream):
    for line in stream:
        if not received or line.startswith(b"train_gpt.py:"):  # after a signal: the trainer's line, not torchrun's
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()


for signum in FORWARDED:  # before torchrun starts, so no signal can leave it running on its own
    signal.signal(signum, forward)
launcher = subprocess.Popen(["torchrun", "--standalone", f"--nproc_per_node={sys.argv[1]}", "train_gpt.py",
                             *sys.argv[2:]], stderr=subprocess.PIPE, start_new_session=True)
if received:
    launcher.send_signal(received[0])
reader = threading.Thread(target=pass_on, args=(launcher.stderr,), daemon=True)
reader.start()
status = launcher.wait()
reader.join(timeout=5)  # the trainers' last lines; a process left holding the pipe must not keep run.sh alive
sys.exit(128 + received[0] if received else status if status >= 0 else 128 - status)
PY
)
exec "$python" -c "$supervisor" "$nproc" "$@"
