#!/usr/bin/env bash
# How far can training data raise the 1 mm other-site T1 cells (issue 11)? An oracle: the shipped
# stage hw fine-tuned on the first half of the slices (D) of the two test scans themselves (stroke T1,
# seg3d head MR; same subject, scanner and noise), scored on their other half, against the same
# fine-tuning on the corpus training scans (the paired control) and the shipped network.
# No bundle is changed: the oracle has seen the test subjects and could never be shipped.
#
#   python experiments/corpus.py && bash experiments/oracle_ceiling.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/oracle}
mkdir -p "$RUNS/trainA" "$RUNS/testB"
python3 - "$RUNS" <<'PY'
import sys
from sr3d import io, volume
runs = sys.argv[1]
for name in ("stroke_T1", "seg3d_head_mr"):
    scan = io.load_volume(f"runs/corpus/test/{name}.nii.gz")
    half = scan.array.shape[0] // 2
    for part, rows, start, folder in (("A", slice(0, half), 0, "trainA"), ("B", slice(half, None), half, "testB")):
        affine = scan.affine.copy()
        affine[:3, 3] += affine[:3, 0] * start     # the half's first slice keeps its world position
        io.save_volume(volume.Volume(scan.array[rows], scan.spacing, affine), f"{runs}/{folder}/{name}_{part}.nii.gz")
PY
COMMON="--stage=hw --seed=0 --flat_fraction=0.1 --learning_rate=1e-4 --learning_rate_after_drop=5e-5"
for R in 2 4; do
  INIT="--init_model=sr3d/data_files/models/x$R/hw.keras --scale=$R --epochs=6 --steps_per_epoch=250"
  python3 train.py --data="$RUNS/trainA" $COMMON $INIT --model_dir="$RUNS/hw_x${R}_oracle"
  python3 train.py --data=runs/corpus/train $COMMON $INIT --model_dir="$RUNS/hw_x${R}_ctrl"
  python3 experiments/compare_variants.py --mode 2d --scale $R --test "$RUNS/testB" --decimals 3 shipped \
    "$RUNS/hw_x${R}_ctrl/model.keras:ship" "$RUNS/hw_x${R}_oracle/model.keras:ship" | tee "$RUNS/compare_2d_x$R.txt"
done
# Longer: 12 x 500 steps (4x the budget), x2.
python3 train.py --data="$RUNS/trainA" $COMMON --init_model=sr3d/data_files/models/x2/hw.keras --scale=2 \
  --epochs=12 --steps_per_epoch=500 --model_dir="$RUNS/hw_x2_oracle_long"
python3 experiments/compare_variants.py --mode 2d --scale 2 --test "$RUNS/testB" --decimals 3 \
  "$RUNS/hw_x2_oracle_long/model.keras:ship" | tee "$RUNS/compare_2d_x2_long.txt"
