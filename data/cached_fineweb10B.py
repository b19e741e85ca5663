#!/usr/bin/env python3
"""Download the GPT-2-tokenized fineweb10B shards (103 train shards) into data/fineweb10B/.

    python data/cached_fineweb10B.py [N] [--workers 4] [--local-dir DIR]

All logic lives in data/hub_shards.py; see --help and data/README.md.
"""

import sys

import hub_shards

if __name__ == "__main__":
    sys.exit(hub_shards.main("fineweb10B"))
