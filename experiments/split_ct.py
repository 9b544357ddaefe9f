"""Splits a CT NIfTI along its slice axis into a training part (upper slices) and a held-out part.

  python experiments/split_ct.py CT.nii.gz OUT_DIR [--train_slices 72]
"""
import argparse
import pathlib

import nibabel as nib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct")
    parser.add_argument("out_dir")
    parser.add_argument("--train_slices", type=int, default=72)
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img = nib.load(args.ct)
    img.slicer[:, :, :args.train_slices].to_filename(out / "ct_train.nii.gz")
    img.slicer[:, :, args.train_slices:].to_filename(out / "ct_test.nii.gz")


if __name__ == "__main__":
    main()
