"""Makes the real scan bundled with sr3d (sr3d/data_files/studyforrest_t1_2mm.nii.gz).

The studyforrest 7T T1 DICOM series (0.67 x 0.67 x 0.70 mm, public domain, PDDL)
downscaled 3x with the MATLAB-style antialiased bicubic of sr3d.degrade to about
2 mm, the resolution of the IXI training scans, cropped to the head and stored
as int16. 2 mm is a common clinical resolution, and the 0.67 mm original lets
the demo compare against a real finer scan.

  python experiments/make_bundled_scan.py ../shared/data/studyforrest-t1-dicom sr3d/data_files
"""
import argparse
import pathlib

import numpy as np

from sr3d import degrade
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume

FACTOR = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dicom_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    volume = sr3d_io.load_volume(args.dicom_dir)
    hr = degrade.crop_to_multiple(volume.array, FACTOR)
    lr = degrade.downscale(hr, FACTOR, axes=(0, 1, 2))
    # LR voxel u covers HR voxels 3u .. 3u+2: its centre is HR index 3u + 1.
    index_map = np.diag([FACTOR, FACTOR, FACTOR, 1.0])
    index_map[:3, 3] = (FACTOR - 1) / 2.0
    affine = volume.affine @ index_map
    # Crop to the head: the bounding box of voxels above 5% of the maximum, plus a margin.
    mask = lr > 0.05 * lr.max()
    lo = [max(0, int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))).min()) - 3)
          for ax in range(3)]
    hi = [min(lr.shape[ax], int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))).max()) + 4)
          for ax in range(3)]
    crop = lr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shift = np.eye(4)
    shift[:3, 3] = lo
    out = sr3d_volume.Volume(array=np.clip(crop, 0, None), spacing=tuple(s * FACTOR for s in volume.spacing),
                             affine=affine @ shift, modality=volume.modality, source_dtype="int16")
    path = sr3d_io.save_volume(out, pathlib.Path(args.out_dir) / "studyforrest_t1_2mm.nii.gz")
    print(f"wrote {path}: {out.array.shape} voxels at {out.spacing} mm")


if __name__ == "__main__":
    main()
