#!/usr/bin/env bash
# Trains the shipped 2x and 4x models (both stages) and assembles them into
# sr3d/data_files/models/x{2,4}. Reruns resume interrupted runs and skip finished ones.
#
#   bash experiments/train_shipped.sh [RUNS_DIR]      (about 40 minutes on 2 CPU cores)
#
# Data: the first six IXI T1 scans (2 mm) and the upper 72 slices of the
# TotalSegmentator CT; held out for validation: the last two IXI scans and the
# lower 40 CT slices (experiments/split_ct.py writes the two CT parts).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/shipped}
SHARED=${SR3D_SHARED_DATA:-../shared/data}
mkdir -p "$RUNS"
python3 experiments/split_ct.py "$SHARED/totalseg-ct/example_ct.nii.gz" "$RUNS/data"
IXI=$(ls "$SHARED"/ixi-t1-2mm/*.nii.gz)
TRAIN=$(echo "$IXI" | head -6 | paste -sd, -),$RUNS/data/ct_train.nii.gz
VAL=$(echo "$IXI" | tail -2 | paste -sd, -),$RUNS/data/ct_test.nii.gz
for SCALE in 2 4; do
  for STAGE in hw d; do
    # Stage d sees ~2x the patches of stage hw per epoch; cap it to keep the budget.
    STEPS=""
    [ "$STAGE" = d ] && STEPS="--steps_per_epoch=400"
    python3 train.py --data="$TRAIN" --val_data="$VAL" --stage=$STAGE --scale=$SCALE --epochs=40 \
      $STEPS --seed=0 --model_dir="$RUNS/${STAGE}_x$SCALE"
  done
  python3 -m sr3d bundle --hw "$RUNS/hw_x$SCALE/model.keras" --d "$RUNS/d_x$SCALE/model.keras" \
    --scale $SCALE --out sr3d/data_files/models/x$SCALE \
    --note "trained by experiments/train_shipped.sh: IXI T1 (6 scans) + TotalSegmentator CT (upper 72 slices)"
done
