"""Tests of data/hub_shards.py and the cached_*.py scripts, with no network.

Only huggingface_hub.hf_hub_download is replaced, by FakeHub below, which
writes small shards and can fail on demand; sleeps are recorded, not slept.
"""

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from data_modules import load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"


hs = load("hub_shards")


def shard_bytes(filename, magic=20240520, version=1, n_tokens=None, truncate=0):
    """A small shard whose tokens depend on its name, optionally broken."""
    seed = sum(map(ord, filename))
    n = 50 + seed % 17
    tokens = (np.arange(n) * 7 + seed) % 50257
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, n if n_tokens is None else n_tokens
    data = header.tobytes() + tokens.astype("<u2").tobytes()
    return data[:len(data) - truncate] if truncate else data


def http_error(status):
    return HfHubHTTPError(f"{status} error", response=SimpleNamespace(status_code=status, headers={}, request=None))


class FakeHub:
    """Stands in for hf_hub_download: records calls, raises queued errors, writes shards.

    failures: {filename: [errors raised by its next calls]}, or {"*": [error]} for every call.
    """

    def __init__(self, failures=None, corrupt_once=()):
        self.calls = []
        self.kwargs = []
        self.failures = {k: list(v) for k, v in (failures or {}).items()}
        self.corrupt_once = set(corrupt_once)

    def __call__(self, repo_id, filename, *, repo_type=None, local_dir=None, force_download=False, **kw):
        self.calls.append(filename)
        self.kwargs.append(dict(repo_id=repo_id, repo_type=repo_type, local_dir=local_dir, force_download=force_download))
        if "*" in self.failures:  # every call fails the same way
            raise self.failures["*"][0]
        if self.failures.get(filename):  # the next queued error for this file
            raise self.failures[filename].pop(0)
        os.makedirs(local_dir, exist_ok=True)
        path = os.path.join(local_dir, filename)
        data = shard_bytes(filename)
        if filename in self.corrupt_once:
            self.corrupt_once.discard(filename)
            data = data[:-10]
        with open(path, "wb") as f:
            f.write(data)
        return path


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Offline mode off unless a test turns it on: the shell running the tests may have set it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def hub(monkeypatch):
    """Install a FakeHub as huggingface_hub.hf_hub_download; tests may configure it."""
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


@pytest.fixture
def sleeps():
    return []


def run_main(tmp_path, *args, key="fineweb10B", sleeps=None):
    argv = [*map(str, args), "--local-dir", str(tmp_path)]
    return hs.main(key, argv, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def names(n, prefix="fineweb"):
    return [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, n + 1)]


def assert_complete(folder, filenames):
    for name in filenames:
        assert (Path(folder) / name).read_bytes() == shard_bytes(name), name


# --------------------------------------------------------------------------
def test_fresh_download(tmp_path, hub, capsys):
    assert run_main(tmp_path, 2) == 0
    assert sorted(hub.calls) == sorted(names(2))
    assert {k["repo_id"] for k in hub.kwargs} == {"kjj0/fineweb10B-gpt2"}
    assert {k["repo_type"] for k in hub.kwargs} == {"dataset"}
    assert_complete(tmp_path, names(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names(2))  # staging folder cleaned up
    out = capsys.readouterr().out
    assert "3 fetched" in out and "0 skipped" in out
    assert f"{sum(len(shard_bytes(n)) for n in names(2)):,} bytes" in out


def test_existing_complete_files_are_skipped(tmp_path, hub, capsys):
    for name in names(1):
        (tmp_path / name).write_bytes(shard_bytes(name))
    assert run_main(tmp_path, 2) == 0
    assert hub.calls == ["fineweb_train_000002.bin"]
    assert "1 fetched" in capsys.readouterr().out


@pytest.mark.parametrize("damage", [dict(magic=12345), dict(version=2), dict(truncate=6), dict(n_tokens=10**8)])
def test_corrupt_file_is_fetched_again(tmp_path, hub, capsys, damage):
    bad = "fineweb_train_000001.bin"
    for name in names(2):
        (tmp_path / name).write_bytes(shard_bytes(name, **damage) if name == bad else shard_bytes(name))
    assert run_main(tmp_path, 2) == 0
    assert hub.calls == [bad]
    assert_complete(tmp_path, names(2))
    captured = capsys.readouterr()
    assert "1 re-fetched" in captured.out and "2 skipped" in captured.out
    assert bad in captured.err


def test_resume_after_interrupted_run(tmp_path, monkeypatch):
    # first run: the third file fails for good (404 is not retried) -> exit 1, the others are in place
    first = FakeHub(failures={"fineweb_train_000002.bin": [http_error(404)]})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", first)
    sleeps = []
    assert run_main(tmp_path, 2, sleeps=sleeps) == 1
    assert sleeps == []
    assert not (tmp_path / "fineweb_train_000002.bin").exists()
    assert_complete(tmp_path, names(1))
    # debris of the interruption: a half-written staged copy and a truncated final file
    staging = tmp_path / hs.STAGING
    staging.mkdir(exist_ok=True)
    (staging / "fineweb_train_000002.bin").write_bytes(shard_bytes("fineweb_train_000002.bin")[:100])
    (tmp_path / "fineweb_train_000001.bin").write_bytes(shard_bytes("fineweb_train_000001.bin")[:-2])
    second = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", second)
    assert run_main(tmp_path, 2) == 0
    assert sorted(second.calls) == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert_complete(tmp_path, names(2))
    assert not staging.exists()


def test_leftover_staged_file_is_never_promoted(tmp_path, monkeypatch):
    staging = tmp_path / hs.STAGING
    staging.mkdir()
    (staging / "fineweb_val_000000.bin").write_bytes(b"garbage" * 10)
    hub = FakeHub(failures={"fineweb_val_000000.bin": [http_error(403)]})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert run_main(tmp_path, 0) == 1
    assert not (tmp_path / "fineweb_val_000000.bin").exists()
    assert not (staging / "fineweb_val_000000.bin").exists()


@pytest.mark.parametrize("error", [
    lambda: http_error(429), lambda: http_error(500), lambda: http_error(503),
    lambda: ConnectionResetError("connection reset by peer"), lambda: TimeoutError("read timed out"),
], ids=["429", "500", "503", "reset", "timeout"])
def test_transient_errors_are_retried_with_backoff(tmp_path, monkeypatch, capsys, error):
    hub = FakeHub(failures={"fineweb_train_000001.bin": [error(), error()]})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    sleeps = []
    assert run_main(tmp_path, 1, sleeps=sleeps) == 0
    assert hub.calls.count("fineweb_train_000001.bin") == 3
    assert sleeps == [2.0, 4.0]
    assert_complete(tmp_path, names(1))
    assert "2 retries" in capsys.readouterr().out


def test_persistent_server_error_gives_up(tmp_path, monkeypatch, capsys):
    hub = FakeHub(failures={"fineweb_val_000000.bin": [http_error(503)] * 10})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    sleeps = []
    assert run_main(tmp_path, 0, "--retries", 3, sleeps=sleeps) == 1
    assert hub.calls == ["fineweb_val_000000.bin"] * 4
    assert sleeps == [2.0, 4.0, 8.0]
    assert "HTTP 503" in capsys.readouterr().out


def test_corrupt_download_is_retried_with_force(tmp_path, monkeypatch):
    hub = FakeHub(corrupt_once={"fineweb_val_000000.bin"})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert run_main(tmp_path, 0) == 0
    assert [k["force_download"] for k in hub.kwargs] == [False, True]
    assert_complete(tmp_path, names(0))


@pytest.mark.parametrize("error", [
    lambda: LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
    lambda: _chained(ConnectionError("dns"), socket.gaierror(-2, "Name or service not known")),
], ids=["hub-gave-up", "dns"])
def test_offline_is_one_line_naming_hf_endpoint(tmp_path, monkeypatch, capsys, error):
    hub = FakeHub(failures={"*": [error()]})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    sleeps = []
    assert run_main(tmp_path, 9, "--workers", 1, sleeps=sleeps) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "HF_ENDPOINT" in lines[0] and "tokenize_corpus.py" in lines[0]
    assert len(hub.calls) == 1 and sleeps == []  # gave up at once, without trying the other files


def _chained(outer, cause):
    outer.__cause__ = cause
    return outer


OFFLINE_LINE = ("cached_fineweb10B.py: error: huggingface_hub offline mode is on (HF_HUB_OFFLINE=1), so the 3 "
                "missing file(s) of kjj0/fineweb10B-gpt2 cannot be downloaded; turn it off for this command "
                "(HF_HUB_OFFLINE=0 python data/cached_fineweb10B.py ...) or run `unset HF_HUB_OFFLINE`")


def test_offline_cli_real_hub_code(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run([sys.executable, str(DATA_DIR / "cached_fineweb10B.py"), "2", "--local-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [OFFLINE_LINE]  # not "check the connection"
    assert list(tmp_path.iterdir()) == []  # no shards, no .download/ with huggingface_hub's lock files


def test_offline_mode_is_named_and_tries_nothing(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "new"
    assert run_main(target, 2) == 1
    assert hub.calls == [] and not target.exists()
    assert capsys.readouterr().err.strip().splitlines() == [OFFLINE_LINE]


def test_offline_mode_with_every_file_present_is_fine(tmp_path, hub, monkeypatch, capsys):
    for name in names(1):
        (tmp_path / name).write_bytes(shard_bytes(name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_main(tmp_path, 1) == 0 and hub.calls == []
    assert "2 skipped" in capsys.readouterr().out


def test_summary_counts_the_retries_of_failed_files(tmp_path, monkeypatch, capsys):
    hub = FakeHub(failures={"fineweb_val_000000.bin": [http_error(503)] * 9,
                            "fineweb_train_000001.bin": [http_error(503)] * 9})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert run_main(tmp_path, 1, "--retries", 2, "--workers", 1) == 1
    assert len(hub.calls) == 6
    captured = capsys.readouterr()
    assert "2 failed; 6 download request(s), 4 retries" in captured.out  # was "0 retries" after 6 requests
    assert captured.err.strip().splitlines() == [
        "cached_fineweb10B.py: error: 2 of 2 download(s) failed (FAILED lines above); complete files are kept, "
        "rerun the same command to fetch only what is missing"]


def test_server_error_behind_huggingface_hubs_wrapper_is_not_called_unreachable(tmp_path, monkeypatch, capsys):
    # huggingface_hub retries a 503 on the metadata request itself, then raises LocalEntryNotFoundError from it
    hub = FakeHub(failures={"*": [_chained(LocalEntryNotFoundError("An error happened while trying to locate the file"),
                                           http_error(503))]})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    sleeps = []
    assert run_main(tmp_path, 0, "--retries", 1, sleeps=sleeps) == 1
    assert len(hub.calls) == 2 and sleeps == [2.0]  # retried: a server error may pass
    captured = capsys.readouterr()
    assert "could not reach" not in captured.err
    assert "FAILED fineweb_val_000000.bin: HTTP 503: 503 error (gave up after 1 retry)" in captured.out
    assert captured.err.strip().splitlines() == [
        "cached_fineweb10B.py: error: 1 of 1 download(s) failed (FAILED lines above); complete files are kept, "
        "rerun the same command to fetch only what is missing"]


class RetryingHub(FakeHub):
    """Like huggingface_hub with a failing server: retries inside the call (and logs each retry), then raises."""

    def __call__(self, repo_id, filename, **kw):
        http_log = logging.getLogger("huggingface_hub.utils._http")
        for attempt in range(1, 6):
            http_log.warning(f"Retrying in 1s [Retry {attempt}/5].")
        return super().__call__(repo_id, filename, **kw)


def test_summary_counts_retries_inside_huggingface_hub(tmp_path, monkeypatch, capsys):
    hub = RetryingHub(failures={"fineweb_val_000000.bin": [http_error(503)] * 9})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert run_main(tmp_path, 0, "--retries", 1) == 1
    captured = capsys.readouterr()
    assert "1 failed; 2 download request(s), 1 retry (and 10 more inside huggingface_hub)" in captured.out
    assert "Retrying" not in captured.err  # counted, not printed


def read_timeout():
    httpx2 = pytest.importorskip("httpx2")  # the HTTP client of huggingface_hub >= 1.0
    return httpx2.ReadTimeout("The read operation timed out")


STALL_LINE = ("cached_fineweb10B.py: error: the hub at https://huggingface.co answered but 1 download(s) of "
              "kjj0/fineweb10B-gpt2 stalled or broke off{kept}; rerun the same command to continue (complete files "
              "are kept), raise HF_HUB_DOWNLOAD_TIMEOUT (now 10 s) on a slow link, or set HF_ENDPOINT to a mirror")


@pytest.mark.parametrize("error", [
    read_timeout,  # the body stopped coming: huggingface_hub's http_get gives up with the client's error
    lambda: _chained(LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
                     read_timeout()),  # the metadata request was accepted, then never answered
], ids=["body", "metadata"])
def test_server_that_answers_then_stalls_is_not_called_unreachable(tmp_path, monkeypatch, capsys, error):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    hub = FakeHub(failures={"*": [error()]})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    sleeps = []
    assert run_main(tmp_path, 9, "--workers", 1, "--retries", 2, sleeps=sleeps) == 1
    assert sleeps == [2.0, 4.0] and len(hub.calls) == 3  # retried, then the other files are not started
    captured = capsys.readouterr()
    assert "could not reach" not in captured.err
    assert captured.err.strip().splitlines() == [STALL_LINE.format(kept="")]
    assert "1 failed; 3 download request(s), 2 retries" in captured.out
    assert "FAILED fineweb_val_000000.bin: ReadTimeout: The read operation timed out (gave up after 2 retries)" \
        in captured.out  # the cause, not huggingface_hub's "check your connection" wrapper


class DebrisHub(FakeHub):
    """Like huggingface_hub on a failure: leaves its lock, metadata and partial files, then raises."""

    def __init__(self, error, partial_bytes=0):
        super().__init__(failures={"*": [error]})
        self.partial_bytes = partial_bytes

    def __call__(self, repo_id, filename, *, local_dir=None, **kw):
        meta = Path(local_dir) / ".cache" / "huggingface"
        (meta / "download").mkdir(parents=True, exist_ok=True)
        (meta / ".gitignore").write_text("*")
        (meta / "download" / f"{filename}.lock").write_bytes(b"")
        (meta / "download" / f"{filename}.metadata").write_text("abc\n")
        (meta / "download" / f"x.{filename}.incomplete").write_bytes(b"\0" * self.partial_bytes)
        return super().__call__(repo_id, filename, local_dir=local_dir, **kw)


def test_failed_attempt_leaves_no_lock_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", DebrisHub(LocalEntryNotFoundError("no connection")))
    assert run_main(tmp_path, 2, "--workers", 1) == 1
    assert list(tmp_path.iterdir()) == []  # no .download/ with .lock, .metadata or empty .incomplete files


def test_stalled_partial_download_is_kept_to_resume_and_locks_are_not(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", DebrisHub(read_timeout(), partial_bytes=100))
    assert run_main(tmp_path, 0, "--retries", 0) == 1
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [".download/.cache/huggingface/download/x.fineweb_val_000000.bin.incomplete"]
    kept = f"; 1 partial download(s) kept in {tmp_path / hs.STAGING} to resume"
    assert capsys.readouterr().err.strip().splitlines() == [STALL_LINE.format(kept=kept)]


# --------------------------------------------------------------------------
def test_shard_count_argument(tmp_path, hub, capsys):
    assert hs.shard_filenames(hs.DATASETS["fineweb10B"], 2) == names(2)
    assert len(hs.shard_filenames(hs.DATASETS["fineweb10B"], None)) == 104
    assert hs.shard_filenames(hs.DATASETS["finewebedu10B"], None)[-1] == "finewebedu_train_000099.bin"
    assert len(hs.shard_filenames(hs.DATASETS["fineweb100B"], None)) == 1031
    assert run_main(tmp_path, 104) == 2
    assert hub.calls == []
    assert "103" in capsys.readouterr().err
    assert run_main(tmp_path, 100, key="finewebedu10B") == 2
    assert run_main(tmp_path, 2, key="finewebedu10B") == 0
    assert sorted(hub.calls) == sorted(names(2, "finewebedu"))
    assert {k["repo_id"] for k in hub.kwargs} == {"kjj0/finewebedu10B-gpt2"}


def test_default_folder_is_next_to_the_scripts():
    assert hs.DATASETS["fineweb10B"].default_dir() == str(DATA_DIR / "fineweb10B")
    assert hs.DATASETS["finewebedu10B"].default_dir() == str(DATA_DIR / "finewebedu10B")
    assert hs.DATASETS["fineweb100B"].default_dir() == str(DATA_DIR / "fineweb100B")


@pytest.mark.parametrize("script,repo,count", [("cached_fineweb10B.py", "kjj0/fineweb10B-gpt2", 103),
                                               ("cached_finewebedu10B.py", "kjj0/finewebedu10B-gpt2", 99),
                                               ("cached_fineweb100B.py", "kjj0/fineweb100B-gpt2", 1030)])
def test_scripts_help(script, repo, count, tmp_path):
    result = subprocess.run([sys.executable, str(DATA_DIR / script), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert repo in text and f"0..{count}" in text and "--workers" in text and "--local-dir" in text
