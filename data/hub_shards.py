"""Download pre-tokenized FineWeb shards from the Hugging Face hub.

Shared by data/cached_fineweb10B.py, data/cached_finewebedu10B.py and
data/cached_fineweb100B.py, which only name the dataset. Each dataset is a
hub dataset repo of .bin shards (see data/README.md for the format):
PREFIX_val_000000.bin, then PREFIX_train_000001.bin ... PREFIX_train_<count>.bin.

How a run behaves, and why:
- A file already in the target folder is checked (magic, version, token
  count against file size) and skipped when complete, so a rerun only fetches
  what is missing; a corrupt one is fetched again.
- huggingface_hub writes into a staging folder (TARGET/.download/, the same
  file system); a file is verified there and only then renamed to its final
  name, so a final name never holds half a download.
- HTTP 429/5xx, timeouts and dropped connections are retried with
  exponential back-off. When the hub cannot be reached at all, when it
  answers but the transfer keeps stalling, or when offline mode is on, the
  run stops with one line saying which of these it is and what to try.
- A failed run leaves no lock or metadata files of huggingface_hub behind;
  only a partial download it can resume is kept in the staging folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

MAGIC = 20240520
VERSION = 1
HEADER_BYTES = 256 * 4
FULL_SHARD_TOKENS = 100_000_000
FULL_SHARD_BYTES = HEADER_BYTES + 2 * FULL_SHARD_TOKENS  # 200,001,024
DATA_DIR = os.path.dirname(os.path.abspath(__file__))
STAGING = ".download"


@dataclass(frozen=True)
class HubDataset:
    """One pre-tokenized dataset on the hub and where it goes locally."""
    key: str  # also the default folder under data/
    repo_id: str
    prefix: str
    train_shards: int

    def default_dir(self) -> str:
        return os.path.join(DATA_DIR, self.key)


DATASETS = {
    "fineweb10B": HubDataset("fineweb10B", "kjj0/fineweb10B-gpt2", "fineweb", 103),
    "finewebedu10B": HubDataset("finewebedu10B", "kjj0/finewebedu10B-gpt2", "finewebedu", 99),
    "fineweb100B": HubDataset("fineweb100B", "kjj0/fineweb100B-gpt2", "fineweb", 1030),
}


class FetchError(Exception):
    """A failure reported to the user as one line; kind says which advice fits.

    kind: 'fatal', 'usage', 'unreachable' (no connection), 'stalled' (the hub answered, the
    transfer did not finish), 'offline' (HF_HUB_OFFLINE), 'cancelled'. retries: how many
    retries were spent before giving up, so the summary can count them.
    """

    def __init__(self, message: str, kind: str = "fatal", retries: int = 0):
        super().__init__(message)
        self.kind = kind
        self.retries = retries


# --------------------------------------------------------------------------
# which files, and are they complete
# --------------------------------------------------------------------------
def shard_filenames(ds: HubDataset, n_train: int | None) -> list[str]:
    """The val shard and the first n_train train shards (all of them for None)."""
    if n_train is None:
        n_train = ds.train_shards
    if n_train < 0 or n_train > ds.train_shards:
        raise FetchError(f"{ds.key} has {ds.train_shards} train shards; N must be between 0 and "
                         f"{ds.train_shards}, got {n_train}", kind="usage")
    return [f"{ds.prefix}_val_{0:06d}.bin"] + [f"{ds.prefix}_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def shard_problem(path: str) -> str | None:
    """None when path is a complete shard, else why it is not.

    A download cut short keeps a valid header, so the token count in the
    header is checked against the file size.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if len(head) < 12 or size < HEADER_BYTES:
        return f"truncated ({size} bytes, shorter than the header)"
    magic, version, n_tokens = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (0, 4, 8))
    if magic != MAGIC:
        return f"bad magic number {magic} (expected {MAGIC})"
    if version != VERSION:
        return f"unsupported version {version}"
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        return f"wrong size: header says {n_tokens} tokens = {expected} bytes, file has {size}"
    return None


# --------------------------------------------------------------------------
# errors from the hub
# --------------------------------------------------------------------------
_TRANSIENT_NAMES = {
    "TimeoutException", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "Timeout",
    "NetworkError", "ConnectError", "ReadError", "WriteError", "RemoteProtocolError", "ProtocolError",
    "TransportError", "ChunkedEncodingError", "IncompleteRead", "ConnectionError",
}
# Errors raised before any byte came back: no route to the hub.
_CONNECT_NAMES = {"ConnectTimeout", "ConnectError", "NewConnectionError", "NameResolutionError", "PoolTimeout"}
# Errors raised after the hub accepted the connection: it answered, then stopped or broke off.
_STALL_NAMES = {"ReadTimeout", "ReadError", "RemoteProtocolError", "ChunkedEncodingError", "IncompleteRead",
                "ProtocolError", "WriteTimeout", "WriteError"}
_TRUE_VALUES = {"1", "on", "yes", "true"}  # how huggingface_hub reads HF_HUB_OFFLINE


def _chain(exc: BaseException):
    """exc and the exceptions it was raised from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error raised for a response (requests, httpx or huggingface_hub).

    The chain is searched: huggingface_hub wraps a failed metadata request (e.g. HTTP 503
    after its own retries) in LocalEntryNotFoundError, and the hub did answer then.
    """
    for e in _chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _root_cause(exc: BaseException) -> BaseException:
    """The error in exc's chain that says what happened: the one with the HTTP answer, else
    the network error (a timeout, a refused connection), else exc itself.

    Why: huggingface_hub's wrapper says "check your connection" for a server that answered.
    """
    chain = list(_chain(exc))
    answered = [e for e in chain if isinstance(getattr(getattr(e, "response", None), "status_code", None), int)]
    network = [e for e in chain if {c.__name__ for c in type(e).__mro__} & (_CONNECT_NAMES | _STALL_NAMES)
               or isinstance(e, (TimeoutError, ConnectionError, socket.gaierror))]
    return (answered or network or [exc])[0]


def _names(exc: BaseException) -> set[str]:
    """The class names of exc and of everything in its chain, base classes included."""
    return {c.__name__ for e in _chain(exc) for c in type(e).__mro__}


def offline_mode() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) turns huggingface_hub's network off."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE_VALUES


def stalled(exc: BaseException) -> bool:
    """True when the hub answered and the transfer then timed out or broke off.

    huggingface_hub wraps a failed metadata request in LocalEntryNotFoundError, so
    the whole chain is searched; a connect-phase error anywhere means no answer.
    """
    names = _names(exc)
    if names & _CONNECT_NAMES or any(isinstance(e, (socket.gaierror, ConnectionRefusedError)) for e in _chain(exc)):
        return False
    return bool(names & _STALL_NAMES) or any(isinstance(e, (TimeoutError, ConnectionResetError)) for e in _chain(exc))


def classify_error(exc: BaseException) -> str:
    """'offline', 'unreachable', 'transient' (worth retrying) or 'fatal'.

    huggingface_hub already retries a failing connection itself and then
    raises LocalEntryNotFoundError ("cannot find the requested files in the
    local cache"); unless the cause shows the hub answered (an HTTP status, or
    a stall, both judged as such), that and DNS failures mean the hub cannot be
    reached, and retrying more only makes the user wait.
    """
    if "OfflineModeIsEnabled" in _names(exc):
        return "offline"
    status = http_status(exc)
    if status is not None:  # the hub answered, with an error
        return "transient" if status == 429 or status >= 500 else "fatal"
    if stalled(exc):
        return "transient"
    for e in _chain(exc):
        if "LocalEntryNotFoundError" in {c.__name__ for c in type(e).__mro__} or isinstance(e, socket.gaierror):
            return "unreachable"
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, (ConnectionError, TimeoutError)) or names & _TRANSIENT_NAMES:
            return "transient"
    return "fatal"


def describe_error(exc: BaseException) -> str:
    """Short text for an error: the HTTP status if any, and the first line of the message."""
    status = http_status(exc)
    exc = _root_cause(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    what = f"HTTP {status}" if status is not None else type(exc).__name__
    return f"{what}: {first}" if first else what


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def unreachable_message(ds: HubDataset) -> str:
    """The one line printed when there is no way to the hub."""
    return (f"could not reach the Hugging Face hub at {hub_endpoint()} to download {ds.repo_id}; "
            f"check the connection, set HF_ENDPOINT to a mirror (e.g. HF_ENDPOINT=https://hf-mirror.com), "
            f"or build shards from your own text with data/tokenize_corpus.py")


def offline_message(ds: HubDataset, missing: int) -> str:
    """The one line printed when offline mode forbids the download (no connection was tried)."""
    var = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return (f"huggingface_hub offline mode is on ({var}={os.environ.get(var)}), so the {missing} missing "
            f"file(s) of {ds.repo_id} cannot be downloaded; turn it off for this command "
            f"({var}=0 python data/cached_{ds.key}.py ...) or run `unset {var}`")


def stalled_message(ds: HubDataset, summary: "FetchSummary", local_dir: str) -> str:
    """The one line printed when the hub answered but downloads kept stalling or breaking off."""
    timeout = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    kept = (f"; {summary.partial_kept} partial download(s) kept in {os.path.join(local_dir, STAGING)} to resume"
            if summary.partial_kept else "")
    return (f"the hub at {hub_endpoint()} answered but {len(summary.failed)} download(s) of {ds.repo_id} stalled "
            f"or broke off{kept}; rerun the same command to continue "
            f"(complete files are kept), raise HF_HUB_DOWNLOAD_TIMEOUT (now {timeout} s) on a slow link, "
            f"or set HF_ENDPOINT to a mirror")


# --------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------
def hub_download(**kwargs) -> str:
    """The one network call: huggingface_hub.hf_hub_download (tests replace it)."""
    try:
        import huggingface_hub
    except ImportError:
        raise FetchError("huggingface_hub is not installed: pip install huggingface_hub") from None
    return huggingface_hub.hf_hub_download(**kwargs)


@dataclass
class FetchSummary:
    """What a run did, for the final report and for tests."""
    fetched: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    requests: int = 0  # our calls of hf_hub_download, first tries and retries
    retries: int = 0
    hub_retries: int = 0  # retries inside huggingface_hub, counted from its log (CLI only)
    partial_kept: int = 0  # resumable partial downloads left in the staging folder
    bytes_downloaded: int = 0
    bytes_present: int = 0
    seconds: float = 0.0
    unreachable: bool = False
    kinds: set[str] = field(default_factory=set)  # FetchError kinds of the failures

    def text(self, ds: HubDataset, local_dir: str) -> str:
        total = len(self.fetched) + len(self.refetched) + len(self.skipped) + len(self.failed)
        rate = self.bytes_downloaded / max(self.seconds, 1e-9) / 1e6
        hub = f" (and {self.hub_retries} more inside huggingface_hub)" if self.hub_retries else ""
        retries_word = "retry" if self.retries == 1 else "retries"
        lines = [
            f"{ds.repo_id} -> {local_dir}: {total} file(s): {len(self.fetched)} fetched, "
            f"{len(self.refetched)} re-fetched (corrupt), {len(self.skipped)} skipped (already complete), "
            f"{len(self.failed)} failed; {self.requests} download request(s), {self.retries} {retries_word}{hub}",
            f"downloaded {self.bytes_downloaded:,} bytes ({self.bytes_downloaded / 1e9:.2f} GB) in "
            f"{self.seconds:.1f} s ({rate:.1f} MB/s); {self.bytes_present:,} bytes of shards on disk",
        ]
        lines += [f"FAILED {name}: {why}" for name, why in self.failed]
        return "\n".join(lines)


def backoff_delay(attempt: int, base: float, cap: float = 60.0) -> float:
    """Seconds to wait before retry number attempt+1: base, 2*base, 4*base, ... up to cap."""
    return min(cap, base * (2 ** attempt))


def download_one(ds: HubDataset, filename: str, local_dir: str, *, download=hub_download,
                 sleep=time.sleep, retries: int = 5, base_delay: float = 2.0,
                 stop: threading.Event | None = None) -> int:
    """Fetch one shard into local_dir, verified, under its final name; returns retries used.

    The file lands in the staging folder first and is renamed only once it
    checks out, so an interrupted run leaves at most a staged file, which the
    next run discards.
    """
    staging = os.path.join(local_dir, STAGING)
    staged = os.path.join(staging, filename)
    if os.path.exists(staged):
        os.remove(staged)  # from an interrupted run; never trusted
    force = False
    for attempt in range(retries + 1):
        if stop is not None and stop.is_set():
            raise FetchError("cancelled", kind="cancelled")
        try:
            path = download(repo_id=ds.repo_id, filename=filename, repo_type="dataset",
                            local_dir=staging, force_download=force)
        except FetchError as e:
            e.retries = attempt
            raise
        except Exception as e:
            kind = classify_error(e)
            if kind == "transient" and attempt < retries:
                sleep(backoff_delay(attempt, base_delay))
                continue
            message = describe_error(e)
            if kind == "transient":  # out of retries
                kind = give_up_kind(e)
                message += f" (gave up after {retries} {'retry' if retries == 1 else 'retries'})"
            if kind in STOP_ALL_KINDS and stop is not None:
                stop.set()  # tell the other downloads at once, before they start
            raise FetchError(message, kind=kind, retries=attempt) from e
        problem = shard_problem(path)
        if problem is None:
            os.replace(path, os.path.join(local_dir, filename))
            return attempt
        if os.path.exists(path):
            os.remove(path)
        force = True  # the hub cache metadata may claim the bad file is current
        if attempt < retries:
            sleep(backoff_delay(attempt, base_delay))
    raise FetchError(f"downloaded file is not a valid shard ({problem}) after {retries + 1} tries", retries=retries)


# Failures that would hit every other file the same way: the run stops starting new downloads.
STOP_ALL_KINDS = ("unreachable", "stalled", "offline")


def give_up_kind(exc: BaseException) -> str:
    """What a transient error that outlasted the retries means for the user.

    An HTTP status (429/5xx) is the server's own answer; a stall or a dropped
    transfer means it answered and then stopped; anything else never got through.
    """
    if http_status(exc) is not None:
        return "fatal"
    return "stalled" if stalled(exc) else "unreachable"


def plan(ds: HubDataset, names: list[str], local_dir: str):
    """Split names into complete files (skip), corrupt ones (re-fetch) and missing ones."""
    skip, corrupt, missing = [], [], []
    for name in names:
        problem = shard_problem(os.path.join(local_dir, name))
        if problem is None:
            skip.append(name)
        elif problem == "missing":
            missing.append(name)
        else:
            corrupt.append((name, problem))
    return skip, corrupt, missing


def cleanup_staging(staging: str, everything: bool) -> int:
    """Drop the staging folder after a clean run; after a failed one keep only the
    partial downloads huggingface_hub can resume (non-empty *.incomplete files).

    Why delete the rest: the .lock and .metadata files and empty folders that
    huggingface_hub leaves after a failure resume nothing, and stale locks look
    like a download still running. Returns the number of partial files kept.
    """
    if everything:
        shutil.rmtree(staging, ignore_errors=True)
        return 0
    kept = 0
    for root, _, files in sorted(os.walk(staging), key=lambda w: -len(w[0])):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".incomplete") and os.path.getsize(path) > 0:
                kept += 1
                continue
            try:
                os.remove(path)
            except OSError:
                pass
        try:
            os.rmdir(root)  # only succeeds when empty
        except OSError:
            pass
    return kept


def _progress(total: int):
    """A tqdm bar in files, silent when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, unit="file", desc="downloading", disable=None, file=sys.stderr)


def fetch_shards(ds: HubDataset, n_train: int | None, local_dir: str | None = None, *, workers: int = 4,
                 download=hub_download, sleep=time.sleep, retries: int = 5, base_delay: float = 2.0,
                 log=None) -> FetchSummary:
    """Make local_dir hold the val shard and the first n_train train shards, complete.

    download and sleep are parameters so tests can run without network or waiting.
    """
    local_dir = local_dir or ds.default_dir()
    names = shard_filenames(ds, n_train)
    t0 = time.perf_counter()
    summary = FetchSummary()
    skip, corrupt, missing = plan(ds, names, local_dir)
    if (corrupt or missing) and offline_mode():
        # huggingface_hub would refuse every file anyway, after leaving lock files behind
        raise FetchError(offline_message(ds, len(corrupt) + len(missing)), kind="offline")
    os.makedirs(local_dir, exist_ok=True)
    summary.skipped = skip
    if log is not None:
        for name, problem in corrupt:
            log(f"{name}: {problem}; fetching it again")
    corrupt_names = {name for name, _ in corrupt}
    todo = [n for n in names if n not in set(skip)]
    stop = threading.Event()
    bar = _progress(len(todo)) if todo else None
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(download_one, ds, name, local_dir, download=download, sleep=sleep,
                                   retries=retries, base_delay=base_delay, stop=stop): name for name in todo}
            for fut in as_completed(futures):
                name = futures[fut]
                if fut.cancelled():  # never started: the hub was found unreachable
                    continue
                try:
                    used = fut.result()
                    summary.retries += used
                    summary.requests += used + 1
                except FetchError as e:
                    if e.kind == "cancelled":
                        continue
                    summary.retries += e.retries
                    summary.requests += e.retries + 1
                    summary.failed.append((name, str(e)))
                    summary.kinds.add(e.kind)
                    if e.kind in STOP_ALL_KINDS:
                        summary.unreachable = summary.unreachable or e.kind == "unreachable"
                        stop.set()  # no point starting the other downloads
                        for other in futures:
                            other.cancel()
                    continue
                (summary.refetched if name in corrupt_names else summary.fetched).append(name)
                summary.bytes_downloaded += os.path.getsize(os.path.join(local_dir, name))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{summary.bytes_downloaded / 1e9:.2f} GB")
    finally:
        if bar is not None:
            bar.close()
    summary.partial_kept = cleanup_staging(os.path.join(local_dir, STAGING), everything=not summary.failed)
    summary.bytes_present = sum(os.path.getsize(os.path.join(local_dir, n)) for n in names
                                if os.path.exists(os.path.join(local_dir, n)))
    summary.seconds = time.perf_counter() - t0
    return summary


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def build_parser(ds: HubDataset, prog: str) -> argparse.ArgumentParser:
    n_full_gb = ds.train_shards * FULL_SHARD_BYTES / 1e9
    ap = argparse.ArgumentParser(
        prog=prog,
        description=(f"Download the GPT-2-tokenized {ds.key} shards from the Hugging Face hub "
                     f"(dataset repo {ds.repo_id}): {ds.prefix}_val_000000.bin and the first N of "
                     f"{ds.train_shards} train shards, 100M tokens = {FULL_SHARD_BYTES:,} bytes each "
                     f"(all of them: about {n_full_gb:.0f} GB). Complete files are kept, corrupt ones "
                     f"fetched again."),
        epilog=("Without access to huggingface.co set HF_ENDPOINT to a mirror, or build shards from your own "
                "text with data/tokenize_corpus.py. Example: python data/cached_fineweb10B.py 9"))
    ap.add_argument("n", nargs="?", type=int, default=None, metavar="N",
                    help=f"number of train shards, 0..{ds.train_shards} (default: all {ds.train_shards})")
    ap.add_argument("--local-dir", default=None,
                    help=f"target folder (default: data/{ds.key}/ next to this script, whatever the cwd)")
    ap.add_argument("--workers", type=int, default=4, help="parallel downloads (default: %(default)s)")
    ap.add_argument("--retries", type=int, default=5,
                    help="retries per file on HTTP 429/5xx, timeouts and dropped connections (default: %(default)s)")
    return ap


class HubRetryCounter(logging.Handler):
    """Counts the retries huggingface_hub makes inside hf_hub_download, from the warning it logs for each.

    Why: those are requests too. Without them a run that failed after a dozen
    requests reported "0 retries".
    """
    MARKERS = ("[Retry ", "Trying to resume download")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if any(marker in record.getMessage() for marker in self.MARKERS):
            self.count += 1  # handle() holds the handler's lock: safe across download threads


def _quiet_hub_logging() -> HubRetryCounter:
    """Keep huggingface_hub's own warnings and per-file bars out of the output, but count its retries."""
    try:
        # first: importing huggingface_hub's logging module adds its stderr handler, replaced below
        import huggingface_hub.utils.logging  # noqa: F401
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    counter = HubRetryCounter()
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)  # the summary and the error line report what matters
    hub_logger.addHandler(counter)
    hub_logger.setLevel(logging.WARNING)
    hub_logger.propagate = False
    return counter


def main(ds_key: str, argv=None, *, download=hub_download, sleep=time.sleep) -> int:
    """CLI of the cached_*.py scripts: 0 when every file is there, 1 on failure, 2 on bad usage."""
    ds = DATASETS[ds_key]
    prog = os.path.basename(sys.argv[0]) if argv is None else f"cached_{ds.key}.py"
    args = build_parser(ds, prog).parse_args(argv)
    try:
        shard_filenames(ds, args.n)
    except FetchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.retries < 0 or args.workers < 1:
        print(f"{prog}: error: --retries must be >= 0 and --workers >= 1", file=sys.stderr)
        return 2
    if download is hub_download:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            print(f"{prog}: error: huggingface_hub is not installed: pip install huggingface_hub", file=sys.stderr)
            return 1
    hub_retries = _quiet_hub_logging()
    local_dir = os.path.abspath(args.local_dir or ds.default_dir())
    try:
        summary = fetch_shards(ds, args.n, local_dir, workers=args.workers, download=download, sleep=sleep,
                               retries=args.retries, log=lambda m: print(m, file=sys.stderr))
    except FetchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; complete files are kept, rerun to fetch the rest", file=sys.stderr)
        return 130
    summary.hub_retries = hub_retries.count
    if "offline" in summary.kinds:  # offline mode switched on inside huggingface_hub, not by env
        print(f"{prog}: error: huggingface_hub offline mode is on, so nothing can be downloaded; "
              f"unset HF_HUB_OFFLINE and run again", file=sys.stderr)
        return 1
    if summary.unreachable:
        print(f"{prog}: error: {unreachable_message(ds)}", file=sys.stderr)
        return 1
    print(summary.text(ds, local_dir))
    if "stalled" in summary.kinds:
        print(f"{prog}: error: {stalled_message(ds, summary, local_dir)}", file=sys.stderr)
    elif summary.failed:
        tried = len(summary.failed) + len(summary.fetched) + len(summary.refetched)
        print(f"{prog}: error: {len(summary.failed)} of {tried} download(s) failed (FAILED lines above); "
              f"complete files are kept, rerun the same command to fetch only what is missing", file=sys.stderr)
    return 1 if summary.failed else 0
