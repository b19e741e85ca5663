"""Tests of run.sh's checks before torchrun: no GPU, more processes than GPUs, a world size
that does not divide the batch. Each must be the first line of output, with a non-zero exit,
and torchrun must not start.

The GPU count is faked by a sitecustomize module that patches torch.cuda in the check's
Python process; torchrun is replaced by a script that records its arguments.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_HINT = ("to try the trainer on CPU run: python train_gpt.py --preset tiny --device cpu "
            "(or on 2 processes: NPROC=2 ./run.sh --preset tiny --device cpu)")


def run_sh(tmp_path, *args, gpus, nproc=None):
    """Run ./run.sh with `gpus` fake CUDA devices; returns (completed process, torchrun args or None)."""
    fake_bin, site = tmp_path / "bin", tmp_path / "site"
    fake_bin.mkdir(exist_ok=True)
    site.mkdir(exist_ok=True)
    called = tmp_path / "torchrun_args"
    torchrun = fake_bin / "torchrun"
    torchrun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{called}"\n')
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
        "that divides 8, or a shorter --stage-seq-len); here NPROC can be 1, 2, 4 or 8, e.g. NPROC=8 ./run.sh"]


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
