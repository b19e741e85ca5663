#!/usr/bin/env python3
"""Download the GPT-2-tokenized fineweb100B shards (1030 train shards) into data/fineweb100B/.

    python data/cached_fineweb100B.py [N] [--workers 4] [--local-dir DIR]

All logic lives in data/hub_shards.py; see --help and data/README.md.
"""

import sys

import hub_shards

if __name__ == "__main__":
    sys.exit(hub_shards.main("fineweb100B"))
