"""records/gpu_session.sh: the prepared GPU checks, one device call per part. What can be checked without a GPU:
its refusals, and the trainer commands each part runs (the benchmark's --dry-run)."""

import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "records" / "gpu_session.sh"


def session(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_an_unknown_part_prints_the_parts_and_exits_2(tmp_path):
    done = session("r28", OUT=str(tmp_path / "out"))  # record #28's part is gone with its recipe
    assert done.returncode == 2
    assert "unknown part 'r28': choose prepare, smoke, record, glue or kernels" in done.stderr
    assert "gpu_session.sh prepare " in done.stderr
    for part in ("smoke", "record", "glue", "kernels"):
        assert f"\n  {part} " in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused call


def test_prepare_without_the_proxy_corpus_says_where_it_looked(tmp_path):
    done = session("prepare", PROXY_CORPUS=str(tmp_path / "none.jsonl.xz"))
    assert done.returncode == 2
    assert f"{tmp_path}/none.jsonl.xz not found" in done.stderr and "PROXY_CORPUS=PATH" in done.stderr


def test_a_part_without_the_carried_corpus_says_how_to_get_it(tmp_path):
    if (REPO / ".gpu" / "docs.jsonl.xz").exists():
        return  # prepared here: the check below needs its absence (a fresh clone, as CI, has none)
    done = session("smoke", OUT=str(tmp_path / "out"))
    assert done.returncode == 2
    assert ".gpu/docs.jsonl.xz is missing: run 'bash records/gpu_session.sh prepare'" in done.stderr


def dry_run(part, tmp_path):
    """The benchmark calls a part makes ('== records/benchmark.py ...' lines) and the trainer commands they print."""
    done = session(part, DRY_RUN="1", OUT=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    calls = [line.split("--budget ", 1)[1].split(" ", 1)[-1] for line in lines if line.startswith("== records/benchmark.py")]
    return calls, [shlex.split(line) for line in lines if "train_gpt.py" in line]


def flag(command, name):
    return command[command.index(name) + 1]


def test_each_part_runs_the_trainer_commands_it_names(tmp_path):
    """Every part runs the record (--preset record) on the proxy data and the reference's validation: the smoke
    its schedule compressed to 20 steps (stages 0, 7, 13, 19: 423, 847, 1270 x 20/1285 rounded, the last below 20), the others
    to 120 (0, 40, 79, 119), both on a cold compile cache; the A/Bs two runs on the same schedule."""
    calls, smoke = dry_run("smoke", tmp_path)
    assert calls == ["--train-steps 20 --val-every 10 --fresh-compile-cache"] and len(smoke) == 1
    assert (flag(smoke[0], "--train-steps"), flag(smoke[0], "--stage-steps")) == ("20", "0,7,13,19")
    assert (flag(smoke[0], "--extension-steps"), flag(smoke[0], "--val-every")) == ("1", "10")
    calls, record = dry_run("record", tmp_path)
    assert calls == ["--fresh-compile-cache"] and len(record) == 1
    assert (flag(record[0], "--train-steps"), flag(record[0], "--stage-steps")) == ("120", "0,40,79,119")
    calls, glue = dry_run("glue", tmp_path)
    assert calls == ["--variant base= --variant glue=--compile-glue"]  # one warm cache for both runs
    assert len(glue) == 2 and "--compile-glue" not in glue[0] and glue[1].count("--compile-glue") == 1
    calls, kernels = dry_run("kernels", tmp_path)
    assert len(kernels) == 2 and flag(kernels[1], "--triton-kernels") == "ce,symmetric,mlp"
    assert "--triton-kernels" not in kernels[0]
    for command in smoke + record + glue + kernels:
        assert (flag(command, "--preset"), flag(command, "--device")) == ("record", "cuda")
        assert (flag(command, "--val-tokens"), flag(command, "--val-seq-len")) == ("1966080", "49152")
        assert flag(command, "--train-files").endswith("data/proxy/proxy_train_*.bin")
        assert flag(command, "--log-dir") == f"{tmp_path}/runs"  # the trainer logs come back with the call's files
    for command in glue + kernels:
        assert flag(command, "--stage-steps") == "0,40,79,119"
