#!/usr/bin/env bash
# ADDPM end to end on a CPU: make demo data (or take yours), train the pre-segmentation net,
# the one-step denoising net and the diffusion UNet, segment the test split with the preseg,
# ddpm, ddim and addpm samplers, and print one table (Dice, HD95, UNet evaluations and
# seconds per image for each sampler).
#
#   bash run.sh                  # demo data; about 10 minutes on 2 CPU cores
#   bash run.sh --quick          # the same pipeline in about a minute (a smoke test)
#   bash run.sh --data_dir DIR   # your data: DIR/training and DIR/testing (with labels)
#   bash run.sh --update_docs    # the demo, then its table and pictures into docs/demo and README.md
#   MODE=regions bash run.sh     # the same in BraTS-like regions (WT, TC, ET): one table per region
#                                # (with --update_docs: into docs/regions and README.md)
#
# Writes everything under $OUT (data, checkpoints, samples; --quick: $OUT/quick) and the table
# to $RESULTS: table.md, table.json, overlay_example.png (an addpm case) and curves.png (the
# three trainers' loss, learning rate and validation Dice). Each run starts afresh. MODE=regions
# makes demo data with three nested labels (python -m data.demo --classes 3), trains and samples
# with --regions "WT:1,2,3;TC:1,3;ET:3" (BraTS 2023's values) under $OUT/regions, and writes one
# table per region beside the table of their mean to $RESULTS/regions.
# The Python is ${PYTHON:-python}: run it with the virtual environment on PATH
# (PATH="$PWD/.venv/bin:$PATH" bash run.sh) or set PYTHON=.venv/bin/python.
# On a machine shared with other jobs, OMP_NUM_THREADS=1 avoids thread oversubscription.
set -euo pipefail

# ---------------------------------------------------------------- settings (edit these)
OUT=demo_run
RESULTS=results
DATA_DIR=""                 # holds training/ and testing/; empty: make demo data in $OUT/data
MODE=${MODE:-binary}        # binary: one foreground; regions: BraTS-like WT/TC/ET on demo data
REGIONS="WT:1,2,3;TC:1,3;ET:3"  # regions mode: each region and the label values it unites

N_TRAIN=200                 # demo slices (4 per patient) for training ...
N_TEST=16                   # ... and for testing
IMAGE_SIZE=64               # every network's input side (all three must share it)
RESIZE_MODE=resize          # resize: any input size maps to IMAGE_SIZE; crop_pad: centre crop/pad

NUM_TIMESTEPS=1000          # diffusion steps N
PRE_T=300                   # addpm: level where the noised pre-segmentation enters
T=250                       # addpm: level where the denoising net takes over
DDPM_STEPS=250              # ddpm baseline: respaced chain of this many steps; 0 = all N
DDIM_STEPS=100              # ddim baseline: steps from pure noise

PRESEG_STEPS=200            # optimizer steps per network
DENOISER_STEPS=200
DIFFUSION_TRAIN_STEPS=700
EMA_RATE=0.99               # short runs need an EMA that forgets the random initial weights

QUICK=0
UPDATE_DOCS=0
while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --update_docs) UPDATE_DOCS=1 ;;
        --data_dir)
            [[ $# -ge 2 && -n "$2" ]] || { echo "error: --data_dir needs a folder" >&2; exit 2; }
            DATA_DIR=$2
            shift ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (usage: bash run.sh [--quick] [--data_dir DIR] [--update_docs])" >&2; exit 2 ;;
    esac
    shift
done

if ((UPDATE_DOCS)) && { ((QUICK)) || [[ -n "$DATA_DIR" ]]; }; then
    echo "error: --update_docs documents the demo run itself; it does not go with --quick or --data_dir" >&2
    exit 2
fi
DEMO_FLAGS=()
LABEL_FLAGS=()
DOCS=docs/demo
case "$MODE" in
    binary) ;;
    regions)
        OUT=$OUT/regions
        RESULTS=$RESULTS/regions
        DOCS=docs/regions
        DEMO_FLAGS=(--classes 3)
        LABEL_FLAGS=(--regions "$REGIONS") ;;
    *) echo "error: MODE=$MODE is unknown (binary or regions)" >&2; exit 2 ;;
esac
if ((QUICK)); then
    # A 100-step chain keeps the full ddpm chain cheap; pre_t and T are scaled with it.
    OUT=$OUT/quick
    RESULTS=$OUT/results
    N_TRAIN=32 N_TEST=8 IMAGE_SIZE=32
    NUM_TIMESTEPS=100 PRE_T=30 T=25 DDPM_STEPS=0 DDIM_STEPS=10
    PRESEG_STEPS=40 DENOISER_STEPS=30 DIFFUSION_TRAIN_STEPS=40 EMA_RATE=0.9
fi

# The networks' flags, named as in the original ADDPM README. The preprocessing (DATA_FLAGS)
# is recorded in every checkpoint and sample.py applies it to the test data.
DATA_FLAGS="--image_size $IMAGE_SIZE --resize_mode $RESIZE_MODE"
MODEL_FLAGS="--num_channels 16 --num_res_blocks 1 --num_heads 1 --attention_resolutions 8 --class_cond False --learn_sigma False --use_scale_shift_norm False"
DIFFUSION_FLAGS="--diffusion_steps $NUM_TIMESTEPS --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False"
TRAIN_FLAGS="--lr 3e-4 --batch_size 8 --ema_rate $EMA_RATE --log_interval 100 --save_interval 100000"
PRESEG_FLAGS="--base_channels 16 --depth 3 --batch_size 12 --lr 1e-3 --log_interval 100 --save_interval 0"
# The denoiser's chain and T must match the diffusion model's (sample.py checks).
DENOISER_FLAGS="$PRESEG_FLAGS --T $T --diffusion_steps $NUM_TIMESTEPS --noise_schedule cosine"
SAMPLE_FLAGS="--num_ensemble 3 --seed 0 --batch_size 1"

# ---------------------------------------------------------------- the pipeline
PY=${PYTHON:-python}
if [[ -n "$DATA_DIR" ]]; then
    [[ -d "$DATA_DIR" ]] || { echo "error: --data_dir $DATA_DIR is not a folder" >&2; exit 2; }
    DATA_DIR=$(cd "$DATA_DIR" && pwd)
fi
# The scripts run from the repository root; relative OUT and RESULTS are taken from there too.
cd "$(dirname "$0")"
RUNS=$OUT/runs
SAMPLES=$OUT/samples
START=$SECONDS

phase() {
    echo
    echo "== [$(date +%H:%M:%S), $((SECONDS - START)) s] $*"
}

if [[ -z "$DATA_DIR" ]]; then
    DATA_DIR=$OUT/data
    phase "demo data: $N_TRAIN training and $N_TEST test slices of ${IMAGE_SIZE}x${IMAGE_SIZE} in $DATA_DIR"
    rm -rf "$DATA_DIR"
    "$PY" -m data.demo --out "$DATA_DIR" --n_train "$N_TRAIN" --n_test "$N_TEST" --image_size "$IMAGE_SIZE" --seed 0 \
        ${DEMO_FLAGS[@]+"${DEMO_FLAGS[@]}"}
fi
for part in training testing; do
    [[ -d "$DATA_DIR/$part" ]] || { echo "error: --data_dir $DATA_DIR has no $part/ folder" >&2; exit 2; }
done
rm -rf "$RUNS" "$SAMPLES"

phase "pre-segmentation net: $PRESEG_STEPS steps"
# shellcheck disable=SC2086  # the flag strings are meant to split into words
"$PY" train_preseg_network.py --data_dir "$DATA_DIR/training" $DATA_FLAGS ${LABEL_FLAGS[@]+"${LABEL_FLAGS[@]}"} $PRESEG_FLAGS \
    --max_steps "$PRESEG_STEPS" --max_epoch 0 --out_dir "$RUNS/preseg"

phase "denoising net (T = $T): $DENOISER_STEPS steps"
# shellcheck disable=SC2086
"$PY" train_denoising_network.py --data_dir "$DATA_DIR/training" $DATA_FLAGS ${LABEL_FLAGS[@]+"${LABEL_FLAGS[@]}"} $DENOISER_FLAGS \
    --max_steps "$DENOISER_STEPS" --max_epoch 0 --out_dir "$RUNS/denoiser"

phase "diffusion UNet: $DIFFUSION_TRAIN_STEPS steps"
# shellcheck disable=SC2086
"$PY" train_addpm.py --data_dir "$DATA_DIR/training" $DATA_FLAGS ${LABEL_FLAGS[@]+"${LABEL_FLAGS[@]}"} $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS \
    --max_steps "$DIFFUSION_TRAIN_STEPS" --out_dir "$RUNS/addpm"

best_or_final() {
    if [[ -f "$1/best.pt" ]]; then echo "$1/best.pt"; else echo "$1/final.pt"; fi
}
CHECKPOINTS=(--model_path "$RUNS/addpm/final.pt" --preseg_path "$(best_or_final "$RUNS/preseg")"
    --denoiser_path "$(best_or_final "$RUNS/denoiser")")

# Row names say how many steps each sampler walked.
if ((DDPM_STEPS > 0)); then DDPM_NAME=ddpm-$DDPM_STEPS; else DDPM_NAME=ddpm-$NUM_TIMESTEPS; fi
DDIM_NAME=ddim-$DDIM_STEPS
ADDPM_NAME=addpm-$PRE_T-$T
ROWS=()
sample() {
    local name=$1
    shift
    phase "sampling the test split: $name"
    # shellcheck disable=SC2086
    "$PY" sample.py --data_dir "$DATA_DIR/testing" "${CHECKPOINTS[@]}" "$@" $SAMPLE_FLAGS \
        --out_dir "$SAMPLES/$name"
    ROWS+=("$name=$SAMPLES/$name")
}
sample preseg --sampler preseg
sample "$DDPM_NAME" --sampler ddpm --sampling_steps "$DDPM_STEPS"
sample "$DDIM_NAME" --sampler ddim --sampling_steps "$DDIM_STEPS"
sample "$ADDPM_NAME" --sampler addpm --pre_t "$PRE_T" --T "$T"

phase "comparison"
mkdir -p "$RESULTS"
COMPARE_FLAGS=()
if [[ "$MODE" == regions ]]; then COMPARE_FLAGS=(--per_class True); fi
"$PY" -m evaluation.compare "${ROWS[@]}" ${COMPARE_FLAGS[@]+"${COMPARE_FLAGS[@]}"} --out "$RESULTS/table.md"

# The overlay of the addpm case whose Dice is the median of the cases with a tumour (not the best).
OVERLAY=$("$PY" -c '
import sys
from evaluation.report import read_metrics_csv
rows = [r for r in read_metrics_csv(sys.argv[1] + "/metrics.csv")
        if r["kind"] == "case" and (r.get("label_voxels") or 0) > 0]
rows.sort(key=lambda r: r["dice"])
print(sys.argv[1] + "/overlays/" + rows[len(rows) // 2]["case_id"] + ".png" if rows else "")
' "$SAMPLES/$ADDPM_NAME")
if [[ -n "$OVERLAY" && -f "$OVERLAY" ]]; then
    cp "$OVERLAY" "$RESULTS/overlay_example.png"
    echo "overlay: $OVERLAY -> $RESULTS/overlay_example.png"
fi
"$PY" -m evaluation.plot "$RUNS/preseg" "$RUNS/denoiser" "$RUNS/addpm" \
    --labels "pre-segmentation,denoiser,diffusion UNet" --out "$RESULTS/curves.png"

if ((UPDATE_DOCS)); then
    # The README shows the demo's own table and pictures: copied here, never retyped.
    mkdir -p "$DOCS"
    cp "$RESULTS/table.md" "$DOCS/table.md"
    cp "$RESULTS/curves.png" "$DOCS/curves.png"
    if [[ -f "$RESULTS/overlay_example.png" ]]; then cp "$RESULTS/overlay_example.png" "$DOCS/overlay.png"; fi
    "$PY" docs/sync_readme.py
fi
echo "run.sh finished in $((SECONDS - START)) s"
