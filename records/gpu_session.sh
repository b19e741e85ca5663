#!/usr/bin/env bash
# The GPU checks of a session that is lent one H100 (or H200), prepared so that each device call is one command.
#
#   bash records/gpu_session.sh prepare      here, on the CPU machine, before the first device call
#   bash records/gpu_session.sh PART         on the GPU machine, one part per call (about 9.5 minutes at most):
#
#   smoke    nvidia-smi and torch versions; tests/test_gpu.py (at most 200 s); then the record, its whole staged
#            schedule compressed to 20 steps (every stage, the split, the extension), on a cold compile cache
#            with TORCH_LOGS=recompiles: compile s, ms/step, peak memory, the loss falling, recompiles
#   record   the record compressed to 120 steps on a cold cache against REFERENCE.md's targets: proxy val loss
#            3.2302 in <= 45.6 s of training, first timed step <= 60 s after launch, ms/step, tok/s and MFU
#   glue     A/B on the record (120 steps): base against --compile-glue (the same warm cache for both)
#   kernels  A/B on the record (120 steps): base against --triton-kernels ce,symmetric,mlp
#
# Device call:  command "bash records/gpu_session.sh smoke", carry [".gpu"], timeout_s 590.
# A part keeps within the call: the benchmark's --budget is what is left of LIMIT (570 s), a run is cut at it,
# and an A/B's second run is skipped when under 120 s are left (reported as skipped: run that part again).
# Everything lands in $OUT (the device tool's folder; logs/gpu_session/ elsewhere): PART.log, the whole console,
# the benchmark's DATE-PART.json (GPU name, source hash, figures, the targets' verdicts), which belongs under
# records/benchmarks/ once reported, and runs/: each trainer log (<run_id>.txt) and its console (<run_id>.out).
# Loss figures on the proxy corpus are proxy figures, never FineWeb ones.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
part=${1:-}
OUT=${OUT:-logs/gpu_session}
CORPUS=.gpu/docs.jsonl.xz
LIMIT=570  # seconds this script may run: the device call's 600 s, less the start of python and the transfers
PY=$(command -v python3 || command -v python)
stamp=$(date -u +%Y-%m-%d)
export PYTHONUNBUFFERED=1

usage() {
    echo "gpu_session: unknown part '${part:-}': choose prepare, smoke, record, glue or kernels" >&2
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

benchmark() {  # benchmark NAME [benchmark flags...]: one records/benchmark.py call within what is left of LIMIT
    local name=$1
    shift
    local left=$((LIMIT - SECONDS))
    echo "== records/benchmark.py --budget $left $*"
    "$PY" records/benchmark.py --corpus "$CORPUS" --budget "$left" --json "$OUT/$stamp-$name.json" \
        --out-dir "$OUT/runs" ${DRY_RUN:+--dry-run} "$@"
}

require_corpus() {
    if [[ ! -f $CORPUS ]]; then
        echo "gpu_session: $CORPUS is missing: run 'bash records/gpu_session.sh prepare' here and name .gpu in carry" >&2
        exit 2
    fi
}

prepare() {
    # The proxy corpus travels in .gpu/ (git-ignored): ../shared stays behind when the working tree is sent.
    local source=${PROXY_CORPUS:-../shared/data/proxy_corpus/docs.jsonl.xz}
    if [[ ! -f $source ]]; then
        echo "gpu_session: $source not found: the proxy corpus sits beside the checkout on the development machine" \
            "(elsewhere: PROXY_CORPUS=PATH)" >&2
        exit 2
    fi
    mkdir -p .gpu
    cp -u "$source" "$CORPUS"
    git check-ignore -q .gpu/ || { echo "gpu_session: .gpu/ is not git-ignored" >&2; exit 2; }
    echo "== $CORPUS: $(du -h "$CORPUS" | cut -f1), travels with carry [\".gpu\"]"
    echo "== the CUDA tests it will run:"
    "$PY" -m pytest tests/test_gpu.py -q --collect-only -p no:cacheprovider | tail -1
    for part in smoke record glue kernels; do
        echo "== $part:"
        OUT=/tmp/gpu_session_dry DRY_RUN=1 bash "${BASH_SOURCE[0]}" "$part" || exit
    done
}

smoke() {
    if [[ -z ${DRY_RUN:-} ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        echo "== tests/test_gpu.py (at most 200 s)"
        timeout 200 "$PY" -m pytest tests/test_gpu.py -q -rs --durations=8 -p no:cacheprovider
        echo "== pytest exit: $?"
    fi
    echo "== the record, 20 compressed steps, cold compile cache, TORCH_LOGS=recompiles"
    TORCH_LOGS=recompiles benchmark smoke --train-steps 20 --val-every 10 --fresh-compile-cache
}

run_part() {
    case $part in
        smoke) smoke ;;
        record) benchmark record --fresh-compile-cache ;;
        glue) benchmark ab-glue --variant base="" --variant glue="--compile-glue" ;;
        kernels) benchmark ab-kernels --variant base="" --variant kernels="--triton-kernels ce,symmetric,mlp" ;;
    esac
}

case $part in
    prepare | smoke | record | glue | kernels) ;;
    *) usage ;;
esac
if [[ $part == prepare ]]; then
    prepare
elif [[ -n ${DRY_RUN:-} ]]; then  # prepare's check of a part: the trainer commands it would run, nothing run
    run_part
else
    require_corpus
    mkdir -p "$OUT"
    run_part 2>&1 | tee "$OUT/$part.log"
    echo "== $part: $SECONDS s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
