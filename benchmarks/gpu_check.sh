#!/usr/bin/env bash
# The CUDA checks in one run of a few minutes on one GPU:
#
#   1. pytest -m gpu: the three trainers and sample.py on CUDA in fp32, bf16 and fp16, the fast
#      path and torch.compile against the exact path (DDP is skipped with fewer than two GPUs);
#   2. bench_sampling at the small config and the original ADDPM config (256x256, 128 channels,
#      2 res blocks, attention at 16; K=5 ensemble, pre_t 300 -> T 250), fp32 and bf16 in the
#      same run, beside guided-diffusion's UNet and ddpm-1000 on the same weights, with peak GPU
#      memory per row and FLOP/s against the GPU's dense bf16 peak;
#   3. memory in use while sampling 100 images one after another (after image 10 vs image 100);
#   4. the original config with torch.compile (bf16);
#   5. bench_train at both configs, fp32 and bf16, with peak GPU memory.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# OUT_DIR (default: $OUT where set, else gpu_check) gets one <step>.txt per step and summary.txt
# (every PASS/FAIL line). A failing step does not stop the later ones; the exit status is 1 if
# any failed. PYTHON picks the interpreter (default: .venv/bin/python, else python3);
# PEAK_TFLOPS gives the dense bf16 peak of a GPU that bench_sampling's table does not name.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${1:-${OUT:-gpu_check}}

# No CUDA: one line, before anything is written.
reason=$("$PYTHON" -c "import torch; print('' if torch.cuda.is_available() else f'torch {torch.__version__} finds no CUDA device')" 2>&1 | tail -n 1)
if [ -n "$reason" ]; then
    echo "error: benchmarks/gpu_check.sh needs a CUDA GPU: $reason" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PEAK=()
if [ -n "${PEAK_TFLOPS:-}" ]; then PEAK=(--peak_tflops "$PEAK_TFLOPS"); fi

failed=()
step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
}

step environment "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
step gpu-tests "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests
step sampling "$PYTHON" -m benchmarks.bench_sampling --device cuda --config small default --precision fp32,bf16 \
    --repeats 3 ${PEAK[@]+"${PEAK[@]}"}
step sampling-memory "$PYTHON" -m benchmarks.bench_sampling --device cuda --config small --precision bf16 \
    --samplers none --repeats 1 --memory_batches 100 ${PEAK[@]+"${PEAK[@]}"}
step sampling-compiled "$PYTHON" -m benchmarks.bench_sampling --device cuda --config default --precision bf16 \
    --compile True --samplers addpm,addpm-k5 --repeats 3 ${PEAK[@]+"${PEAK[@]}"}
step training "$PYTHON" -m benchmarks.bench_train --device cuda --precision fp32,bf16 --steps 10

grep -h "PASS\|FAIL" "$OUT_DIR"/sampling*.txt > "$OUT_DIR/summary.txt" 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
    printf 'step failed: %s\n' "${failed[@]}" >> "$OUT_DIR/summary.txt"
fi
echo "== summary ($OUT_DIR/summary.txt)"
cat "$OUT_DIR/summary.txt"
[ ${#failed[@]} -eq 0 ]
