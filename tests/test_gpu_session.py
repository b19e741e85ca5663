"""records/gpu_session.sh: the prepared GPU checks, one device call per part. What can be checked without a GPU:
its refusals, and the trainer commands each part runs (the benchmark's --dry-run)."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "records" / "gpu_session.sh"


def session(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_an_unknown_part_prints_the_parts_and_exits_2(tmp_path):
    done = session("bogus", OUT=str(tmp_path / "out"))
    assert done.returncode == 2
    assert "unknown part 'bogus': choose prepare, smoke, r28, r2026, glue or kernels" in done.stderr
    assert "gpu_session.sh prepare " in done.stderr
    for part in ("smoke", "r28", "r2026", "glue", "kernels"):
        assert f"\n  {part} " in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused call


def test_a_part_without_the_carried_corpus_says_how_to_get_it(tmp_path):
    if (REPO / ".gpu" / "docs.jsonl.xz").exists():
        return  # prepared here: the check below needs its absence (a fresh clone, as CI, has none)
    done = session("smoke", OUT=str(tmp_path / "out"))
    assert done.returncode == 2
    assert ".gpu/docs.jsonl.xz is missing: run 'bash records/gpu_session.sh prepare'" in done.stderr


def trainer_commands(part, tmp_path):
    done = session(part, DRY_RUN="1", OUT=str(tmp_path))
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if "train_gpt.py" in line]


def test_each_part_runs_the_trainer_commands_it_names(tmp_path):
    smoke = trainer_commands("smoke", tmp_path)
    assert len(smoke) == 1 and "--preset r2026" in smoke[0] and "--train-steps 20" in smoke[0]
    assert "--stage-steps 0,6,13,19" in smoke[0]  # the whole staged schedule, compressed
    r28 = trainer_commands("r28", tmp_path)
    assert len(r28) == 1 and "--preset r28" in r28[0] and "--train-steps 120" in r28[0]
    glue = trainer_commands("glue", tmp_path)
    assert len(glue) == 2 and "--compile-glue" not in glue[0] and glue[1].count("--compile-glue") == 1
    kernels = trainer_commands("kernels", tmp_path)
    assert len(kernels) == 2 and "--triton-kernels ce,symmetric,mlp" in kernels[1]
    for command in smoke + r28 + glue + kernels:
        assert f"--log-dir {tmp_path}/runs" in command  # the trainer logs come back with the device call's files
