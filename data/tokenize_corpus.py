#!/usr/bin/env python3
"""Turn a text corpus into GPT-2-tokenized .bin shards in the FineWeb format.

The shards are what train_gpt.py reads (the format of modded-nanogpt and llm.c):

    header  256 little-endian int32: [0] = 20240520 (magic), [1] = 1 (version),
            [2] = number of tokens, the rest zero
    body    the tokens, little-endian uint16

Every document is encoded with tiktoken's "gpt2" encoding (encode_ordinary, so
text that looks like a special token stays text) and preceded by
<|endoftext|> (50256). The token stream is cut into shards of an exact size, so
a document may run on into the next shard:

    OUT/NAME_val_000000.bin     the first --val-tokens + 1 tokens of the stream
    OUT/NAME_train_000001.bin   then --shard-tokens tokens per train shard ...

A val shard made with --val-tokens N serves train_gpt.py --val-tokens N: it
holds N + 1 tokens, because the trainer scores N predictions and the last one's
target is the token after them. train_gpt.py also needs N to be a whole number
of --val-seq-len sequences, so pick N as a multiple of it.

The output does not depend on --workers: documents are encoded in parallel
but always written in input order. Shards are first written as *.tmp and only
renamed into place when the whole run succeeded; shards of an earlier run with
the same NAME that this run did not rewrite are removed then.

Inputs (files or folders, read in the order given, folders in sorted order):
  .txt .txt.gz .txt.xz                one document per file
  .jsonl .jsonl.gz .jsonl.xz          one JSON object per line, text in --text-field
  .parquet                            a column named --text-field (needs pyarrow)
--include-source / --exclude-source filter records on their "source" field
(a .txt document's source is its path).

The GPT-2 BPE files ship in data/tiktoken_cache/, so this works offline.

Examples:
  python data/tokenize_corpus.py my_books/ --out-dir data/books --name books --val-tokens 1048576
  python data/tokenize_corpus.py docs.jsonl.xz --out-dir /tmp/p --name proxy --val-tokens 2097152
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import json
import lzma
import multiprocessing as mp
import os
import re
import sys
import time

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # GPT-2 <|endoftext|>
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 10_485_760  # modded-nanogpt's val_tokens
BUNDLED_TIKTOKEN_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiktoken_cache")

TXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

# Documents handed to a worker at once: big enough to amortise the pickling,
# small enough to keep both cores busy and the progress bar moving.
BATCH_DOCS = 256
BATCH_CHARS = 1 << 20


class CorpusError(Exception):
    """A problem with the user's input or settings, reported as one line."""


# What to do when the output folder cannot take the shards, by errno; anything else: check the folder.
OUTPUT_ADVICE = {
    errno.ENOSPC: "free some space or pick another --out-dir",
    errno.EDQUOT: "free some of your quota or pick another --out-dir",
    errno.EROFS: "pick a writable --out-dir",
    errno.EACCES: "pick a folder you may write to as --out-dir",
    errno.EPERM: "pick a folder you may write to as --out-dir",
}


@contextlib.contextmanager
def output_errors(path: str):
    """Turn a failed write, rename or delete under --out-dir into a one-line CorpusError naming path."""
    try:
        yield
    except OSError as e:
        advice = OUTPUT_ADVICE.get(e.errno, "check --out-dir")
        raise CorpusError(f"cannot write {path}: {e.strerror or e}: {advice}") from None


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------
def use_bundled_tiktoken_cache() -> str:
    """Point tiktoken at data/tiktoken_cache/ unless TIKTOKEN_CACHE_DIR is set.

    tiktoken downloads the GPT-2 BPE files on first use; the repository ships
    them under tiktoken's cache names so a fresh clone tokenizes offline.
    """
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        os.environ["TIKTOKEN_CACHE_DIR"] = BUNDLED_TIKTOKEN_CACHE
    return os.environ["TIKTOKEN_CACHE_DIR"]


def get_encoder():
    """tiktoken's "gpt2" encoding, or a CorpusError saying why it cannot load."""
    use_bundled_tiktoken_cache()
    try:
        import tiktoken
    except ImportError:
        raise CorpusError("tiktoken is not installed: pip install tiktoken") from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken tries the network when the cache misses
        first = (str(e).splitlines() or [""])[0][:200]
        raise CorpusError(
            f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}: {first}); "
            f"TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR')} should hold the GPT-2 BPE "
            f"files (the repository ships them in {BUNDLED_TIKTOKEN_CACHE})") from None


_ENCODER = None  # one per worker process


def _init_worker() -> None:
    """Load the encoder once per process instead of once per batch."""
    global _ENCODER
    _ENCODER = get_encoder()


def encode_batch(texts: list[str]) -> np.ndarray:
    """[EOT] + encode_ordinary(text) for each text, concatenated, as uint16."""
    if _ENCODER is None:
        _init_worker()
    ids: list[int] = []
    for text in texts:
        ids.append(EOT)
        ids.extend(_ENCODER.encode_ordinary(text))
    return to_uint16(np.array(ids, dtype=np.int64))


# --------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------
def to_uint16(tokens) -> np.ndarray:
    """The tokens as uint16, refusing ids the shard format cannot store.

    A silent cast would wrap an id like 70000 to 4464 and corrupt training
    data, so anything outside 0..65535 is an error.
    """
    arr = np.asarray(tokens)
    if arr.dtype == np.uint16:
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise CorpusError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 0xFFFF:
            bad = hi if hi > 0xFFFF else lo
            raise CorpusError(f"token id {bad} does not fit in uint16 (0..65535), "
                              f"which is all the .bin shard format can store")
    return arr.astype(np.uint16)


def shard_header(n_tokens: int) -> bytes:
    """The 1024-byte shard header for n_tokens tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def write_shard(path: str, tokens) -> int:
    """Write one shard file; checks the ids before creating anything.

    Writes straight to `path`; callers that need the file to appear whole
    write to a temporary name and rename (see ShardWriter, save_shard).
    """
    toks = to_uint16(tokens)
    if toks.size >= 2 ** 31:
        raise CorpusError(f"{toks.size} tokens do not fit one shard's int32 header")
    try:
        with output_errors(path), open(path, "wb") as f:
            f.write(shard_header(int(toks.size)))
            f.write(toks.astype("<u2", copy=False).tobytes())
    except BaseException:
        remove_partial(path)  # a full disk or Ctrl-C mid-write: no cut-off file stays behind
        raise
    return int(toks.size)


def remove_partial(path: str) -> None:
    """Delete a file that failed to be written whole, if it was created at all."""
    with contextlib.suppress(OSError):
        os.remove(path)


def save_shard(path: str, tokens) -> int:
    """write_shard to PATH.tmp, then rename, so PATH is never half-written."""
    tmp = path + ".tmp"
    try:
        n = write_shard(tmp, tokens)
        os.replace(tmp, path)
    finally:
        remove_partial(tmp)
    return n


def read_shard(path: str) -> np.ndarray:
    """The tokens of a shard (uint16), after checking magic, version and size."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        if header.size != HEADER_INTS or header[0] != MAGIC:
            raise CorpusError(f"{path}: bad magic number, not a .bin shard")
        if header[1] != VERSION:
            raise CorpusError(f"{path}: unsupported shard version {header[1]}")
        tokens = np.frombuffer(f.read(), dtype="<u2")
    if tokens.size != int(header[2]):
        raise CorpusError(f"{path}: header says {int(header[2])} tokens, file holds {tokens.size}")
    return tokens


def shard_path(out_dir: str, name: str, index: int) -> str:
    """OUT/NAME_val_000000.bin for index 0, OUT/NAME_train_%06d.bin after."""
    split = "val" if index == 0 else "train"
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


def val_shard_tokens(val_tokens: int) -> int:
    """Tokens in a val shard that serves train_gpt.py --val-tokens val_tokens.

    One more than the flag: the trainer's inputs are tokens 0..N-1 and their
    next-token targets 1..N, so a shard of exactly N tokens would be refused.
    """
    return val_tokens + 1


class ShardWriter:
    """Cuts a stream of token arrays into exact-size shards.

    Shard 0 (val) holds val_shard_tokens(val_tokens) tokens, every later shard
    shard_tokens, the last one whatever is left. With val_tokens=None the
    served val size is 10,485,760 if the stream has at least twice that, else
    a tenth of it; tokens are held back until that is known.
    """

    def __init__(self, out_dir: str, name: str, val_tokens: int | None, shard_tokens: int):
        self.out_dir, self.name = out_dir, name
        self.val_tokens, self.shard_tokens = val_tokens, shard_tokens
        self.total = 0
        self.written: list[tuple[str, int]] = []  # (final path, tokens), staged as .tmp
        self._held: list[np.ndarray] = []  # only while the val size is undecided
        self._held_n = 0
        self._buf: np.ndarray | None = None
        self._fill = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens to the stream, writing each shard as soon as it is full."""
        tokens = to_uint16(tokens)
        self.total += tokens.size
        if self.val_tokens is None:
            self._held.append(tokens)
            self._held_n += tokens.size
            if self._held_n >= 2 * DEFAULT_VAL_TOKENS:
                self._decide_val(DEFAULT_VAL_TOKENS)
            return
        self._append(tokens)

    def _decide_val(self, val_tokens: int) -> None:
        """Fix the val size and replay the tokens held back until now."""
        self.val_tokens = val_tokens
        held, self._held, self._held_n = self._held, [], 0
        for arr in held:
            self._append(arr)

    def _capacity(self) -> int:
        return val_shard_tokens(self.val_tokens) if not self.written else self.shard_tokens

    def _append(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            if self._buf is None:
                self._buf = np.empty(self._capacity(), dtype=np.uint16)
                self._fill = 0
            take = min(self._buf.size - self._fill, tokens.size - pos)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self._buf.size:
                self._flush()

    def _flush(self) -> None:
        """Write the current buffer as the next shard (under a .tmp name)."""
        path = shard_path(self.out_dir, self.name, len(self.written))
        write_shard(path + ".tmp", self._buf[:self._fill])
        self.written.append((path, self._fill))
        self._buf, self._fill = None, 0

    def finish(self) -> list[tuple[str, int]]:
        """Write the last shard, move all shards into place, drop stale ones."""
        if self.total == 0:
            raise CorpusError("the input holds no documents (empty files, or all filtered out)")
        if self.val_tokens is None:
            self._decide_val(self.total // 10)
            if self.val_tokens == 0:
                raise CorpusError(f"only {self.total} tokens: too few to split into val and train")
        if self.total <= val_shard_tokens(self.val_tokens):
            raise CorpusError(f"--val-tokens {self.val_tokens:,} takes {val_shard_tokens(self.val_tokens):,} tokens "
                              f"for the val shard and leaves no training tokens (the stream has {self.total:,}): "
                              f"lower --val-tokens")
        if self._fill:
            self._flush()
        with output_errors(self.out_dir):
            for path, _ in self.written:
                os.replace(path + ".tmp", path)
            self._remove_stale_shards()
        return self.written

    def _remove_stale_shards(self) -> None:
        """Delete NAME_* shards from an earlier, longer run: they are not part of this stream."""
        keep = {os.path.basename(p) for p, _ in self.written}
        pattern = re.compile(re.escape(self.name) + r"_(val|train)_\d{6}\.bin")
        for entry in os.listdir(self.out_dir):
            if pattern.fullmatch(entry) and entry not in keep:
                os.remove(os.path.join(self.out_dir, entry))

    def abort(self) -> None:
        """Remove the .tmp files of a failed run; finished shards of older runs stay."""
        for path, _ in self.written:
            remove_partial(path + ".tmp")
        self.written = []


# --------------------------------------------------------------------------
# reading inputs
# --------------------------------------------------------------------------
def expand_inputs(paths: list[str]) -> list[str]:
    """Input files in order: files as given, folders expanded in sorted order."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names) if n.endswith(SUPPORTED_SUFFIXES)]
            if not found:
                raise CorpusError(f"{p}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files")
            files += found
        elif not os.path.exists(p):
            raise CorpusError(f"input not found: {p}")
        elif not p.endswith(SUPPORTED_SUFFIXES):
            raise CorpusError(f"{p}: unsupported input type (use {', '.join(SUPPORTED_SUFFIXES)})")
        else:
            files.append(p)
    return files


def _open_text(path: str, newline=None):
    """Open a plain, .gz or .xz file as UTF-8 text."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, "rt", encoding="utf-8", newline=newline)


def _iter_txt(path: str):
    """The whole file as one document; newline='' keeps the text byte-exact. Empty files are skipped."""
    with _open_text(path, newline="") as f:
        text = f.read()
    if text:
        yield text, path


def _iter_jsonl(path: str, text_field: str):
    """(text, source) per non-blank line, with file:line in every error."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}:{lineno}: bad JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise CorpusError(f"{path}:{lineno}: no '{text_field}' field (choose one with --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: '{text_field}' is {type(text).__name__}, not a string")
            yield text, str(record.get("source", ""))


def _iter_parquet(path: str, text_field: str):
    """(text, source) per row of a parquet file; pyarrow is optional."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no '{text_field}' column (columns: {', '.join(names)}; "
                          f"choose one with --text-field)")
    columns = [text_field] + (["source"] if "source" in names and text_field != "source" else [])
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        texts = batch.column(text_field).to_pylist()
        sources = batch.column("source").to_pylist() if "source" in columns else [""] * len(texts)
        for text, source in zip(texts, sources):
            if not isinstance(text, str):
                raise CorpusError(f"{path}: row {row}: '{text_field}' is {type(text).__name__}, not a string")
            yield text, "" if source is None else str(source)
            row += 1


def iter_file_documents(path: str, text_field: str = "text"):
    """(text, source) pairs of one input file, decompression errors made readable."""
    try:
        if path.endswith(TXT_SUFFIXES):
            yield from _iter_txt(path)
        elif path.endswith(JSONL_SUFFIXES):
            yield from _iter_jsonl(path, text_field)
        else:
            yield from _iter_parquet(path, text_field)
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (lzma.LZMAError, EOFError, gzip.BadGzipFile) as e:
        raise CorpusError(f"{path}: corrupt or truncated compressed file ({e or type(e).__name__})") from None


def compile_filter(pattern: str | None, flag: str):
    """A compiled regex, or a CorpusError naming the flag."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise CorpusError(f"{flag}: bad regular expression ({e})") from None


def iter_texts(paths: list[str], text_field: str = "text", include_source: str | None = None,
               exclude_source: str | None = None):
    """Document texts of all inputs in order, after the source filters."""
    inc = compile_filter(include_source, "--include-source")
    exc = compile_filter(exclude_source, "--exclude-source")
    for path in expand_inputs(paths):
        for text, source in iter_file_documents(path, text_field):
            if inc is not None and not inc.search(source):
                continue
            if exc is not None and exc.search(source):
                continue
            yield text


# --------------------------------------------------------------------------
# tokenizing
# --------------------------------------------------------------------------
def batched(texts, max_docs: int | None = None, max_chars: int | None = None):
    """Group texts into lists of at most max_docs documents / about max_chars characters."""
    max_docs = max_docs or BATCH_DOCS  # read at call time so tests can force many small batches
    max_chars = max_chars or BATCH_CHARS
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _pool_context():
    """fork where it exists (fast start, the encoder loads once per worker), else spawn."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def token_stream(texts, workers: int = 1):
    """uint16 token arrays in document order, encoded by `workers` processes.

    imap keeps the input order, which is what makes the output independent of
    the worker count.
    """
    get_encoder()  # fail here, with one clear message, rather than in every worker
    if workers <= 1:
        for batch in batched(texts):
            yield encode_batch(batch)
        return
    with _pool_context().Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(encode_batch, batched(texts), chunksize=1)


def truncate_stream(stream, max_tokens: int | None):
    """Pass arrays through until max_tokens tokens have gone by, cutting the last one."""
    if max_tokens is None:
        yield from stream
        return
    left = max_tokens
    for arr in stream:
        if arr.size >= left:
            yield arr[:left]
            return
        left -= arr.size
        yield arr


def _progress_bar(total: int | None):
    """A tqdm bar in tokens (silent when stderr is not a terminal); a no-op without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", unit_scale=True, desc="tokenizing", disable=None, file=sys.stderr)


def tokenize_texts(texts, out_dir: str, name: str, val_tokens: int | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1,
                   max_tokens: int | None = None, progress: bool = True) -> dict:
    """Tokenize an iterable of texts into NAME_* shards in out_dir; returns a summary.

    The one tokenizer path: tokenize_corpus's CLI and data/fineweb.py both come here.
    val_tokens is what the val shard serves (train_gpt.py --val-tokens); it holds one token more.
    """
    check_sizes(val_tokens, shard_tokens, max_tokens)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
        raise CorpusError(f"--name {name!r}: use letters, digits, '.' and '-' (it becomes NAME_val_000000.bin)")
    with output_errors(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, name, val_tokens, shard_tokens)
    bar = _progress_bar(max_tokens) if progress else None
    t0 = time.perf_counter()
    docs = 0
    try:
        for arr in truncate_stream(token_stream(texts, workers), max_tokens):
            docs += int(np.count_nonzero(arr == EOT))
            writer.add(arr)
            if bar is not None:
                bar.update(arr.size)
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {"docs": docs, "tokens": writer.total, "val_tokens": writer.val_tokens,
            "shards": [(os.path.basename(p), n) for p, n in shards], "out_dir": out_dir,
            "seconds": seconds, "tokens_per_second": writer.total / max(seconds, 1e-9)}


def check_sizes(val_tokens, shard_tokens, max_tokens) -> None:
    """Reject sizes that cannot give a val shard plus at least one train token."""
    if val_tokens is not None and val_tokens <= 0:
        raise CorpusError("--val-tokens must be positive")
    if shard_tokens <= 0:
        raise CorpusError("--shard-tokens must be positive")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise CorpusError("--max-tokens must be positive")
        if val_tokens is not None and max_tokens <= val_shard_tokens(val_tokens):
            raise CorpusError(f"--max-tokens {max_tokens:,} leaves no training tokens after the "
                              f"{val_shard_tokens(val_tokens):,}-token val shard of --val-tokens {val_tokens:,}: "
                              f"raise --max-tokens above {val_shard_tokens(val_tokens):,}")


def format_summary(info: dict) -> str:
    """Human-readable summary: every shard, then docs, tokens, time and rate."""
    lines = [f"wrote {len(info['shards'])} shard(s) to {info['out_dir']}:"]
    lines += [f"  {name}  {n:,} tokens" for name, n in info["shards"]]
    lines.append(f"docs {info['docs']:,} | tokens {info['tokens']:,} | {info['seconds']:.1f} s | "
                 f"{info['tokens_per_second']:,.0f} tokens/s")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokenize_corpus.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders, read in this order")
    ap.add_argument("--out-dir", required=True, help="folder for the shards (created if missing)")
    ap.add_argument("--name", required=True, help="shard file prefix: NAME_val_000000.bin, NAME_train_000001.bin, ...")
    ap.add_argument("--val-tokens", type=int, default=None, metavar="N",
                    help="validation tokens the val shard serves (train_gpt.py --val-tokens N, a multiple "
                         "of its --val-seq-len): the shard holds the first N + 1 tokens of the stream, "
                         "the last one the target of the N-th (default: 10,485,760 if the stream holds "
                         "twice that, else 10%%)")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                    help="tokens per train shard; the last one holds the rest (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=None, metavar="N",
                    help="stop after the first N tokens of the stream (val included)")
    ap.add_argument("--text-field", default="text", help="JSON field / parquet column with the text (default: %(default)s)")
    ap.add_argument("--include-source", default=None, metavar="REGEX",
                    help="keep only records whose 'source' matches REGEX (re.search)")
    ap.add_argument("--exclude-source", default=None, metavar="REGEX",
                    help="drop records whose 'source' matches REGEX, e.g. 'dict-|wordnet'")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                    help="tokenizer processes; the output is the same for any N (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # report a missing file or a bad regex before any worker starts
        expand_inputs(args.inputs)
        compile_filter(args.include_source, "--include-source")
        compile_filter(args.exclude_source, "--exclude-source")
        texts = iter_texts(args.inputs, args.text_field, args.include_source, args.exclude_source)
        info = tokenize_texts(texts, args.out_dir, args.name, val_tokens=args.val_tokens,
                              shard_tokens=args.shard_tokens, workers=max(1, args.workers),
                              max_tokens=args.max_tokens, progress=not args.no_progress)
    except CorpusError as e:
        print(f"tokenize_corpus.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenize_corpus.py: interrupted; no shard was replaced", file=sys.stderr)
        return 130
    print(format_summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
