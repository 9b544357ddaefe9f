#!/usr/bin/env bash
# One model for MR and CT, or one per modality? Trains stage hw x2 with the same budget
# (6 epochs x 310 steps x 128 patches, seed 0) on MR only and on MR + CT, and scores both
# in 2D x2 on the held-out IXI scans and the held-out CT slices (stage hw alone: 2D).
#
#   bash experiments/modality_check.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/modality}
SHARED=${SR3D_SHARED_DATA:-../shared/data}
mkdir -p "$RUNS"
python3 experiments/split_ct.py "$SHARED/totalseg-ct/example_ct.nii.gz" "$RUNS/data"
IXI=$(ls "$SHARED"/ixi-t1-2mm/*.nii.gz)
MR=$(echo "$IXI" | head -6 | paste -sd, -)
for NAME in mr mr_ct; do
  DATA=$MR
  [ "$NAME" = mr_ct ] && DATA="$MR,$RUNS/data/ct_train.nii.gz"
  python3 train.py --data="$DATA" --stage=hw --scale=2 --epochs=6 --steps_per_epoch=310 --seed=0 \
    --model_dir="$RUNS/$NAME"
  # Stage d is unused in 2D; the shipped one completes the bundle.
  python3 -m sr3d bundle --hw "$RUNS/$NAME/model.keras" --d sr3d/data_files/models/x2/d.keras --scale 2 \
    --out "$RUNS/bundle_$NAME"
done
for TEST in ixi ct; do
  DATA=$(echo "$IXI" | tail -2 | paste -sd, -)
  [ "$TEST" = ct ] && DATA="$RUNS/data/ct_test.nii.gz"
  python3 evaluate.py --data="$DATA" --scale=2 --mode=2d --methods=lanczos --cnn="$RUNS/bundle_mr" \
    --protocols=float --no_ifc --out_dir="$RUNS/eval_${TEST}_mr"
  python3 evaluate.py --data="$DATA" --scale=2 --mode=2d --methods=lanczos --cnn="$RUNS/bundle_mr_ct" \
    --protocols=float --no_ifc --out_dir="$RUNS/eval_${TEST}_mr_ct"
done
