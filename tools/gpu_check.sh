#!/usr/bin/env bash
# One command for a CUDA machine: does every CUDA path work, and how fast is it? Runs, each with a time limit
# (under ten minutes in all):
#   1. the CUDA-only tests (tests/test_cuda.py, and every other test that is skipped without a GPU),
#   2. a short fp16-AMP training on a small SynthAG (generated on the fly) and its evaluation,
#   3. with two or more GPUs, the check that a 2-process NCCL step equals a single-process step,
#   4. tools/bench_model.py on every model: images/s, peak memory, TFLOP/s and share of peak, fp16 and bf16.
# Usage: bash tools/gpu_check.sh [OUTPUT_FOLDER]   (default outputs/gpu_check; logs and results go there)
# Exit code 0 when every step passed, 1 when one failed, 2 without a usable GPU.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OUT=${1:-outputs/gpu_check}
mkdir -p "$OUT"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch ($PY); this check needs one" >&2
    exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|',
      ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"

failed=0
summary=()
# step NAME SECONDS COMMAND...: run COMMAND with a time limit, output to OUT/NAME.log, record pass/fail.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s; log: $OUT/$name.log)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        summary+=("PASS  $name (${took} s)")
    else
        [ $rc -eq 124 ] && echo "   timed out after ${limit} s" >> "$OUT/$name.log"
        summary+=("FAIL  $name (${took} s, exit $rc): see $OUT/$name.log")
        failed=1
        tail -n 15 "$OUT/$name.log"
    fi
}

# 1. Tests that only run on a GPU (they are skipped on the CPU machines the suite usually runs on).
step cuda_tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_metrics.py -k "cuda"

# 2. Short mixed-precision training and evaluation on SynthAG (40 identities, 3 epochs).
step amp_training 120 "$PY" train_svpr.py --overwrite MODEL.DEVICE cuda SOLVER.AMP True SOLVER.AMP_DTYPE float16 \
    DATASETS.ROOT_DIR "$OUT/data" DATASETS.SYNTH.NUM_IDS 40 DATASETS.SYNTH.IMAGES_PER_ID 16 SOLVER.MAX_EPOCHS 3 \
    SOLVER.EVAL_PERIOD 3 DATALOADER.NUM_WORKERS 4 SOLVER.TENSORBOARD False OUTPUT_DIR "$OUT/amp_training"
if [ -f "$OUT/amp_training/results.json" ]; then
    "$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))['protocols']; print('   ' + ', '.join(
        f'{k}: mAP {100 * v[\"mAP\"]:.1f}' for k, v in r.items()))" "$OUT/amp_training/results.json"
fi

# 3. Distributed training equals single-process training, with NCCL (needs two GPUs).
if [ "$GPUS" -ge 2 ]; then
    step ddp_nccl 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ddp_equivalence.py -k "nccl"
else
    summary+=("SKIP  ddp_nccl (one GPU)")
fi

# 4. Throughput of every model (ViT-B/16 at 256x128, random weights) under fp16 and bf16 autocast.
step benchmark 180 "$PY" tools/bench_model.py --all configs/CP2108 --random-weights --device cuda --amp fp16 bf16 \
    --batch 64 --warmup 3 --iters 10
grep -v '^{' "$OUT/benchmark.log" | tail -n 16

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $failed
