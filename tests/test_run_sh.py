"""Tests of run.sh's checks before torchrun: no GPU, more processes than GPUs, a world size
that does not divide the batch. Each must be the first line of output, with a non-zero exit,
and torchrun must not start.

The GPU count is faked by a sitecustomize module that patches torch.cuda in the check's
Python process; torchrun is replaced by a script that records its arguments.
"""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_HINT = ("to try the trainer on CPU run: python train_gpt.py --preset tiny --device cpu "
            "(or on 2 processes: NPROC=2 ./run.sh --preset tiny --device cpu)")


def fake_environment(tmp_path, torchrun_script, gpus, nproc=None):
    """The environment of ./run.sh with `gpus` fake CUDA devices and torchrun replaced by torchrun_script."""
    fake_bin, site = tmp_path / "bin", tmp_path / "site"
    fake_bin.mkdir(exist_ok=True)
    site.mkdir(exist_ok=True)
    torchrun = fake_bin / "torchrun"
    torchrun.write_text(torchrun_script)
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    python = fake_bin / "python"
    if not python.exists():
        python.symlink_to(sys.executable)  # run.sh's `python` is the interpreter running the tests
    (site / "sitecustomize.py").write_text(
        "import torch\n"
        f"torch.cuda.is_available = lambda: {gpus} > 0\n"
        f"torch.cuda.device_count = lambda: {gpus}\n")
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(site))
    env.pop("NPROC", None)
    if nproc is not None:
        env["NPROC"] = str(nproc)
    return env


def run_sh(tmp_path, *args, gpus, nproc=None):
    """Run ./run.sh with `gpus` fake CUDA devices; returns (completed process, torchrun args or None)."""
    called = tmp_path / "torchrun_args"
    env = fake_environment(tmp_path, f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{called}"\n', gpus, nproc)
    result = subprocess.run(["bash", str(REPO / "run.sh"), *args], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    return result, called.read_text().splitlines() if called.exists() else None


def test_no_cuda_is_the_first_line_with_the_cpu_hint(tmp_path):
    result, torchrun = run_sh(tmp_path, gpus=0)
    assert result.returncode == 2 and torchrun is None and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("run.sh: error: CUDA is not available on this machine (PyTorch ")
    assert line.endswith(f"sees no GPU); {CPU_HINT}")


def test_more_processes_than_gpus_names_the_count_that_works(tmp_path):
    result, torchrun = run_sh(tmp_path, "--seed", "1", gpus=4)  # NPROC defaults to 8
    assert result.returncode == 2 and torchrun is None
    assert result.stderr.splitlines() == [
        "run.sh: error: NPROC=8 needs 8 GPUs but this machine has 4; run NPROC=4 ./run.sh --seed 1 "
        "(the global batch is fixed, so fewer GPUs give the same math)"]


def test_world_size_that_does_not_divide_the_batch(tmp_path):
    result, torchrun = run_sh(tmp_path, gpus=8, nproc=3)
    assert result.returncode == 2 and torchrun is None
    assert result.stderr.splitlines() == [
        "run.sh: error: NPROC=3: stage 0: world size 3 x --stage-seq-len 16384 = 49152 tokens does not divide its "
        "--stage-batch-tokens 131072: each step must be whole sequences on every process (use a world size "
        "that divides its 8 sequences, or shorter --stage-seq-len); here NPROC can be 1, 2, 4 or 8, e.g. NPROC=8 ./run.sh"]


@pytest.mark.parametrize("gpus,nproc,args", [(4, 4, ["--seed", "1"]), (0, 2, ["--preset", "tiny", "--device", "cpu"])],
                         ids=["4-gpus", "cpu"])
def test_a_launch_that_fits_reaches_torchrun(tmp_path, gpus, nproc, args):
    result, torchrun = run_sh(tmp_path, *args, gpus=gpus, nproc=nproc)
    assert result.returncode == 0, result.stderr
    assert torchrun == ["--standalone", f"--nproc_per_node={nproc}", "train_gpt.py", *args]


def test_help_is_printed_once_without_torchrun(tmp_path):
    result, torchrun = run_sh(tmp_path, "--seed", "1", "--help", gpus=0)
    assert result.returncode == 0 and torchrun is None
    assert result.stdout.startswith("usage: train_gpt.py") and result.stdout.count("usage:") == 1


# A torchrun that answers a signal as the real one does: the trainer's own line (its processes stop cleanly),
# then torchrun's SignalException traceback, exit 1. It notes each signal it gets in FOLDER, to count deliveries
# (run.sh starts it in the repository root).
SIGNALLED_TORCHRUN = """#!/usr/bin/env bash
cd "FOLDER"
echo "W1202 torch/distributed/run.py:874] Setting OMP_NUM_THREADS environment variable for each process" >&2
stop() {
    kill "$sleeper"
    echo "$1" >> got_signals
    echo "train_gpt.py: error: stopped by $1 at step 3; resume with --resume checkpoints/x.pt" >&2
    echo "Traceback (most recent call last):" >&2
    echo "torch.distributed.elastic.multiprocessing.api.SignalException: Process 1 got signal: 15" >&2
    exit 1
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
touch started
sleep 60 &
sleeper=$!
wait "$sleeper"
"""


def wait_for(path, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, status, to_group", [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, False),
                                                      (signal.SIGINT, 130, True)],
                         ids=["SIGTERM", "SIGINT", "Ctrl-C-to-the-terminal-group"])
def test_a_signal_reaches_torchrun_once_and_the_trainers_line_is_the_last(tmp_path, signum, status, to_group):
    """kill -TERM / -INT to ./run.sh, or Ctrl-C (SIGINT to its whole process group): torchrun gets the signal once,
    its traceback never reaches the user, and run.sh exits 128 + the signal, as README says (130, 143)."""
    env = fake_environment(tmp_path, SIGNALLED_TORCHRUN.replace("FOLDER", str(tmp_path)), gpus=0, nproc=2)
    launched = subprocess.Popen(["bash", str(REPO / "run.sh"), "--preset", "tiny", "--device", "cpu"], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=to_group)
    wait_for(tmp_path / "started")
    if to_group:
        os.killpg(launched.pid, signum)
    else:
        launched.send_signal(signum)
    out, err = launched.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert launched.returncode == status
    assert err.splitlines() == [
        "W1202 torch/distributed/run.py:874] Setting OMP_NUM_THREADS environment variable for each process",
        f"train_gpt.py: error: stopped by {name} at step 3; resume with --resume checkpoints/x.pt"]
    assert (tmp_path / "got_signals").read_text().split() == [name]


def test_sigterm_to_a_two_process_cpu_run_ends_with_the_trainers_line_and_143(tmp_path):
    """The real thing: torchrun and 2 trainer processes on CPU, SIGTERM to ./run.sh after step 1. (No checkpoints:
    a SIGTERM that lands inside a checkpoint's gather is the trainer's case, tested with the trainer.)"""
    env = dict(os.environ, NPROC="2")
    launched = subprocess.Popen(["bash", str(REPO / "run.sh"), "--preset", "tiny", "--device", "cpu",
                                 "--run-id", "term", "--log-dir", str(tmp_path / "logs")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in launched.stdout:
        if line.startswith("step:1/"):
            launched.send_signal(signal.SIGTERM)
            break
    out, err = launched.communicate(timeout=120)
    assert launched.returncode == 143, err
    assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err
    last = err.splitlines()[-1]
    assert last.startswith("train_gpt.py: error: stopped by SIGTERM at step ")
    assert last.endswith("; no checkpoint was written (--save-every N keeps one)")
    assert out.splitlines()[-2:] == [f"stopping: {last.split('stopped by ')[1].split(';')[0]}",
                                     f"log: {tmp_path / 'logs' / 'term.txt'}"]
