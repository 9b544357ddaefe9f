#!/usr/bin/env bash
# Trains the shipped 2x and 4x models (both stages) on the cross-site corpus of
# experiments/corpus.py and assembles them into sr3d/data_files/models/x{2,4}.
# Reruns resume interrupted runs (from the last 50-step checkpoint) and skip finished ones.
#
#   bash experiments/train_shipped.sh [RUNS_DIR] [SCALES]
#
# SCALES defaults to "2 4" (one after the other). On 2 cores the two chains run
# faster side by side, one core each:
#   taskset -c 0 bash experiments/train_shipped.sh runs/shipped 2 &
#   taskset -c 1 bash experiments/train_shipped.sh runs/shipped 4 &
# Wall time of that on 2 cores: docs/model_card.md.
#
# Data (experiments/corpus.py, docs/model_card.md): train = 10 ds002748 1 mm T1 (cropped to
# the brain), 6 IXI 2 mm T1, LIDC chest CT 1 mm (upper 140 slices), TotalSegmentator abdominal
# CT 3 mm (upper 72 slices); val = ds002748 sub-31 + a LIDC slab; every other scan is test.
#
# Recipe: the paper's (40 epochs, 7x7 patches, batch 128, Adam 1e-3 -> 1e-4 at epoch 20,
# two-term loss, random blur) with a fixed number of steps per epoch (the corpus is large),
# 10% flat patches in both stages (skull-stripped scans are mostly exact-zero background),
# and stage d learning from this stage-hw network's outputs on scans degraded in 3D
# (--hw_model, cascade training), which is what it gets in the 3D pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/shipped}
SCALES=${2:-"2 4"}
SHARED=${SR3D_SHARED_DATA:-../shared/data}
CORPUS=${SR3D_CORPUS:-runs/corpus}
mkdir -p "$RUNS"
python3 experiments/corpus.py --shared "$SHARED" --out "$CORPUS" >/dev/null
COMMON="--data=$CORPUS/train --val_data=$CORPUS/val --epochs=40 --seed=0 --flat_fraction=0.1"
for SCALE in $SCALES; do
  HW_STEPS=$([ "$SCALE" = 2 ] && echo 400 || echo 250)
  python3 train.py $COMMON --stage=hw --scale=$SCALE --steps_per_epoch=$HW_STEPS --model_dir="$RUNS/hw_x$SCALE"
  # Stage d: 20 epochs (learning-rate drop at 10), to fit the recipe in the budget.
  D_EPOCHS=20
  python3 train.py $COMMON --stage=d --scale=$SCALE --steps_per_epoch=400 --epochs=$D_EPOCHS \
    --hw_model="$RUNS/hw_x$SCALE/model.keras" --model_dir="$RUNS/d_x$SCALE"
  python3 -m sr3d bundle --hw "$RUNS/hw_x$SCALE/model.keras" --d "$RUNS/d_x$SCALE/model.keras" \
    --scale $SCALE --out sr3d/data_files/models/x$SCALE \
    --note "trained by experiments/train_shipped.sh on the corpus of experiments/corpus.py: ds002748 1 mm T1 (10 subjects), IXI 2 mm T1 (6), LIDC chest CT 1 mm (140 slices), TotalSegmentator CT 3 mm (72 slices); stage d on stage hw's outputs (cascade), 10% flat patches"
done
