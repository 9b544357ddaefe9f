"""The shipped models' training corpus and its cross-site split, written as NIfTI files.

  python experiments/corpus.py [--shared ../shared/data] [--out runs/corpus]

Writes OUT/{train,val,test}/*.nii.gz and OUT/corpus.json (which scan is which, its
source, modality, resolution and licence). Reruns rewrite nothing that is there.

The split keeps whole sources out of training, so the test cells measure scans
from sites, scanners and resolutions the networks never saw:

  train  ds002748 (1 mm T1, skull-stripped) 10 subjects, IXI T1 (2 mm) 6 scans,
         LIDC chest CT (1 mm) upper 140 slices, TotalSegmentator abdominal CT (3 mm)
         upper 72 slices
  val    ds002748 sub-31, the LIDC slab just below the training slab (20 slices)
  test   ds002748 5 other subjects; IXI039, IXI048; the LIDC lower slab (105 slices,
         10 slices of gap to the validation slab); the TotalSegmentator lower 40
         slices; and sources never trained on: studyforrest 7T T1 (0.67 mm, DICOM),
         the stroke T1 / T2 / FLAIR (1 mm), the seg3d head MR (1 mm, whole head)

The skull-stripped ds002748 scans are cropped to their brain's bounding box plus
a 12-voxel margin (the background stays represented: the flat-patch share of
each batch, `--flat_fraction`, draws from it), which halves what training holds
in memory.
"""
import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sr3d import files as sr3d_files  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import volume as sr3d_volume  # noqa: E402

DS_TRAIN = ("01", "04", "07", "10", "13", "16", "19", "22", "25", "28")
DS_VAL = ("31",)
DS_TEST = ("34", "37", "40", "43", "46")
IXI_TRAIN = ("IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236", "IXI015-HH-1258",
             "IXI033-HH-1259", "IXI034-HH-1260")
IXI_TEST = ("IXI039-HH-1261", "IXI048-HH-1326")
# LIDC slice index 0 is the most inferior (the affine's slice axis points superior).
LIDC_TEST = (0, 105)
LIDC_VAL = (115, 135)
LIDC_TRAIN = (135, 275)
CT_TRAIN_SLICES = 72
MARGIN = 12

LICENCES = {
    "ds002748": "CC0 (OpenNeuro ds002748, Bezmaternykh et al. 2021)",
    "ixi": "CC BY-SA 3.0 (IXI project, Imperial College London)",
    "lidc": "CC BY 3.0 (LIDC-IDRI, Armato et al. 2015, TCIA)",
    "totalseg": "CC BY 4.0 (Wasserthal et al. 2023)",
    "studyforrest": "ODC PDDL (Hanke et al. 2014)",
    "stroke": "see ../shared/data/stroke-t1-t2-flair/SOURCE.txt",
    "seg3d": "see ../shared/data/seg3d-head-mr/SOURCE.txt",
}


def crop(volume: sr3d_volume.Volume, lo, hi) -> sr3d_volume.Volume:
    """The voxels [lo, hi) of each axis, with the affine moved to the new first voxel."""
    lo = np.asarray(lo, int)
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ np.append(lo, 1.0))[:3]
    index = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return volume.replace(array=np.ascontiguousarray(volume.array[index]), affine=affine, source=None)


def brain_box(volume: sr3d_volume.Volume, margin: int = MARGIN):
    nonzero = np.argwhere(volume.array != 0)
    lo = np.maximum(nonzero.min(axis=0) - margin, 0)
    hi = np.minimum(nonzero.max(axis=0) + 1 + margin, volume.shape)
    return lo, hi


def entries(shared: pathlib.Path):
    """(split, name, make_volume, source, modality, domain) of every corpus scan."""
    ds = shared / "ds002748-t1-1mm"
    for split, subjects in (("train", DS_TRAIN), ("val", DS_VAL), ("test", DS_TEST)):
        for sub in subjects:
            path = ds / f"sub-{sub}_T1w.nii.gz"
            yield (split, f"ds002748_sub-{sub}", lambda p=path: crop(sr3d_io.load_volume(p),
                                                                     *brain_box(sr3d_io.load_volume(p))),
                   "ds002748", "MR", "T1 1 mm (ds002748)")
    ixi = shared / "ixi-t1-2mm"
    for split, names in (("train", IXI_TRAIN), ("test", IXI_TEST)):
        for name in names:
            yield split, f"ixi_{name}", lambda p=ixi / f"{name}-T1_ds.nii.gz": sr3d_io.load_volume(p), \
                "ixi", "MR", "T1 2 mm"
    lidc = shared / "lidc-chest-ct-1mm"
    for split, (a, b) in (("train", LIDC_TRAIN), ("val", LIDC_VAL), ("test", LIDC_TEST)):
        yield (split, f"lidc_slices{a:03d}-{b:03d}",
               lambda a=a, b=b: _slab(sr3d_io.load_volume(lidc), a, b), "lidc", "CT", "chest CT 1 mm")
    ct = shared / "totalseg-ct" / "example_ct.nii.gz"
    yield "train", "totalseg_upper72", lambda: _slab(sr3d_io.load_volume(ct), 0, CT_TRAIN_SLICES), \
        "totalseg", "CT", "abdominal CT 3 mm"
    yield "test", "totalseg_lower40", lambda: _slab(sr3d_io.load_volume(ct), CT_TRAIN_SLICES, None), \
        "totalseg", "CT", "abdominal CT 3 mm"
    yield ("test", "studyforrest_t1", lambda: sr3d_io.load_volume(shared / "studyforrest-t1-dicom"),
           "studyforrest", "MR", "T1 0.7 mm")
    for contrast in ("T1", "T2", "FLAIR"):
        yield ("test", f"stroke_{contrast}",
               lambda c=contrast: sr3d_io.load_volume(shared / "stroke-t1-t2-flair" / f"{c}.nii.gz"),
               "stroke", "MR", f"{contrast} 1 mm" if contrast != "T1" else "T1 1 mm (other sites)")
    yield ("test", "seg3d_head_mr", lambda: sr3d_io.load_volume(shared / "seg3d-head-mr" / "head_MR.nii.gz"),
           "seg3d", "MR", "T1 1 mm (other sites)")


def _slab(volume: sr3d_volume.Volume, a: int, b: int | None) -> sr3d_volume.Volume:
    b = volume.shape[0] if b is None else b
    return crop(volume, (a, 0, 0), (b, volume.shape[1], volume.shape[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="runs/corpus")
    args = parser.parse_args()
    shared, out = pathlib.Path(args.shared), pathlib.Path(args.out)
    records = []
    for split, name, make, source, modality, domain in entries(shared):
        path = out / split / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            volume = make()
            sr3d_io.save_volume(volume.replace(modality=modality), path, dtype="float32")
            print(f"wrote {path}: {volume.shape}", flush=True)
        volume = sr3d_io.load_volume(path)
        records.append({"split": split, "name": name, "path": str(path), "source": source,
                        "modality": modality, "domain": domain, "shape": list(volume.shape),
                        "spacing_mm": [round(s, 3) for s in volume.spacing], "licence": LICENCES[source]})
    sr3d_files.write_json(out / "corpus.json", {"scans": records})
    for split in ("train", "val", "test"):
        chosen = [r for r in records if r["split"] == split]
        print(f"{split}: {len(chosen)} scans, {sum(np.prod(r['shape']) for r in chosen) / 1e6:.0f} M voxels")


if __name__ == "__main__":
    main()
