#!/usr/bin/env bash
# Launch the speedrun: the record configuration on every GPU of this machine.
#
#   ./run.sh                          # 8 GPUs (the record setting)
#   NPROC=4 ./run.sh                  # 4 GPUs, same math (2 gradient-accumulation steps)
#   ./run.sh --seed 1 --run-id try1   # any train_gpt.py flag is passed through
#
# NPROC (default 8) is the number of processes, one per GPU. The global batch is fixed, so
# NPROC must divide 8; train_gpt.py refuses other values and says why.
set -euo pipefail

# Run from the repository root so the default data paths (data/fineweb10B/...) and logs/ resolve.
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v torchrun >/dev/null 2>&1; then
    echo "run.sh: error: torchrun is not on the PATH; install the requirements first: pip install -r requirements.txt" >&2
    exit 1
fi

exec torchrun --standalone --nproc_per_node="${NPROC:-8}" train_gpt.py "$@"
