#!/usr/bin/env python3
"""Rebuild the FineWeb .bin shards from raw text, to check the pre-tokenized ones.

Streams HuggingFaceFW/fineweb (sample-10BT, or sample-100BT with --version
100B) and tokenizes it with exactly the code of data/tokenize_corpus.py
(GPT-2 via tiktoken, <|endoftext|> before each document, shards filled to
100,000,000 tokens, the first shard is val):

    data/fineweb10B/fineweb_val_000000.bin, fineweb_train_000001.bin, ...

Most people should download the pre-tokenized shards instead
(python data/cached_fineweb10B.py), which is much faster.

Extra dependency (optional, only for this script): pip install datasets
The raw sample is large (sample-10BT is tens of GB of parquet; it is streamed).
Shards of an earlier run in the output folder with the same prefix are
replaced when the run succeeds.

Examples:
  python data/fineweb.py                      # sample-10BT -> data/fineweb10B/
  python data/fineweb.py --version 100B --workers 16
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from . import tokenize_corpus as tc  # imported as part of a package (data.fineweb)
except ImportError:
    import tokenize_corpus as tc  # run as a script: data/ is on sys.path

HF_REPO = "HuggingFaceFW/fineweb"
VERSIONS = {"10B": ("sample-10BT", "fineweb10B"), "100B": ("sample-100BT", "fineweb100B")}
SHARD_TOKENS = 100_000_000


def load_documents(remote_name: str):
    """The raw FineWeb sample as an iterable of {"text": ...} records (streamed).

    The one place that needs the `datasets` package, imported here so the
    rest of the repository never depends on it.
    """
    try:
        import datasets
    except ImportError:
        raise tc.CorpusError("data/fineweb.py needs the datasets package: pip install datasets") from None
    return datasets.load_dataset(HF_REPO, name=remote_name, split="train", streaming=True)


def iter_fineweb_texts(records):
    """The text of each record, in dataset order; reading failures become one line."""
    try:
        for record in records:
            yield record["text"]
    except tc.CorpusError:
        raise
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise tc.CorpusError(f"reading {HF_REPO} failed ({type(e).__name__}: {first})") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fineweb.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", choices=sorted(VERSIONS), default="10B",
                    help="10B: sample-10BT, 100B: sample-100BT (default: %(default)s)")
    ap.add_argument("--out-dir", default=None,
                    help="output folder (default: data/fineweb10B/ or data/fineweb100B/ next to this script)")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS,
                    help="tokens per shard, val included (default: %(default)s, as the hosted files)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="tokenizer processes (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    remote_name, folder = VERSIONS[args.version]
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)
    try:
        texts = iter_fineweb_texts(load_documents(remote_name))
        # the val shard is one full shard, as the hosted fineweb_val_000000.bin (it serves one token fewer)
        info = tc.tokenize_texts(texts, out_dir, "fineweb", val_tokens=args.shard_tokens - 1,
                                 shard_tokens=args.shard_tokens, workers=max(1, args.workers),
                                 progress=not args.no_progress)
    except tc.CorpusError as e:
        print(f"fineweb.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fineweb.py: interrupted; no shard was replaced", file=sys.stderr)
        return 130
    print(tc.format_summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
