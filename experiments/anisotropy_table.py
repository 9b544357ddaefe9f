"""The anatomy's anisotropy table of `estimate_profile(reference="population")`:
sr3d/data_files/anisotropy_brain_mr.json (`sr3d.selfsup.ANISOTROPY_TABLE`).

  python experiments/anisotropy_table.py                     # ~3 min: the shipped table (--method=match)
  python experiments/anisotropy_table.py --method=anatomy \
      --out=runs/anisotropy_anatomy.json                      # ~1 min: the 1 mm spectra alone, for comparison

Subjects: every ds002748 subject of the corpus' training split (runs/corpus/corpus.json of the main
checkout, split "train") except the dev subjects on which the estimator's options are chosen
(experiments/thick_slice.py DEV_SCANS: sub-01, sub-10, sub-19, left out so that their estimates are
not judged on a table made from them). ds002748 (OpenNeuro, Bezmaternykh et al. 2021) is CC0, so the
derived table ships with the package. The table is the mean over subjects (their spread beside it).

--method=match (shipped): slices simulated from each 1 mm scan along each world direction (contiguous
boxes every 3-7 voxels), and `selfsup.match_residual`: the thick-axis minus in-plane log10 spectra
that `estimate_profile` compares when its candidate is the true profile, by frequency in cycles per
mm; the factors' curves are interpolated to one grid and averaged where they overlap.
--method=anatomy: the 1 mm scan's own line spectra per world direction, minus the mean of the two
others (no slicing, no decimation): measured, and worse on dev (docs/thick_slice.md).
"""
import json
import os
import pathlib
import re

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from sr3d import intensity  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import selfsup  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SR3D_SHARED_DATA", REPO.parent / "shared" / "data"))
DEV_SUBJECTS = ("sub-01", "sub-10", "sub-19")     # experiments/thick_slice.py DEV_SCANS
SEGMENT_MM = 128.0                                # --method=anatomy
FACTORS = (3, 4, 5, 6, 7)                         # --method=match: slice spacings, in voxels
FREQUENCIES = np.arange(1, 49) / 256              # cycles per mm: the shipped table's grid

_CORPUS = flags.DEFINE_string("corpus", str(REPO.parent / "main" / "runs" / "corpus" / "corpus.json"),
                              "corpus.json whose split 'train' names the subjects.")
_METHOD = flags.DEFINE_enum("method", "match", ["match", "anatomy"], "How the anisotropy is measured (see above).")
_OUT = flags.DEFINE_string("out", str(selfsup.ANISOTROPY_TABLE), "The table (JSON).")


def table_subjects(corpus: dict) -> list[str]:
    """ds002748 subjects of the training split, dev subjects left out, as 'sub-NN'."""
    names = [re.search(r"sub-\d+", scan["name"]).group(0) for scan in corpus["scans"]
             if scan["source"] == "ds002748" and scan["split"] == "train"]
    return sorted(n for n in names if n not in DEV_SUBJECTS)


def anatomy_anisotropy(volume: sr3d_io.Volume) -> tuple[np.ndarray, dict]:
    """(frequencies in cycles per mm, {direction: log10 difference}): per array axis the mean power
    spectrum of the scan's lines (segments of SEGMENT_MM, Hann window, normalised as estimate_profile
    does, flat lines left out), log10, on the grid k / SEGMENT_MM; each direction minus the mean of the
    two others."""
    spacing = np.asarray(volume.spacing, np.float64)
    directions = [selfsup.world_direction(volume.affine, a) for a in range(3)]
    frequencies = np.arange(1, int(SEGMENT_MM * 0.5 / spacing.max() + 0.01) + 1) / SEGMENT_MM
    normalised = intensity.window(volume.array).normalise(volume.array).astype(np.float32)
    logs = []
    for axis in range(3):
        length = int(round(SEGMENT_MM / spacing[axis]))
        lines = np.moveaxis(normalised, axis, -1).reshape(-1, volume.array.shape[axis])
        power = selfsup._line_spectrum(lines[lines.std(axis=1) > 0.01], length)
        own = np.arange(power.size) / (length * spacing[axis])
        logs.append(np.interp(frequencies, own[1:], np.log10(power[1:] + 1e-12)))
    return frequencies, {directions[a]: logs[a] - 0.5 * (logs[(a + 1) % 3] + logs[(a + 2) % 3]) for a in range(3)}


def match_anisotropy(volume: sr3d_io.Volume) -> tuple[np.ndarray, dict]:
    """(frequencies in cycles per mm, {direction: log10 difference}): `selfsup.match_residual` of
    contiguous box slices every FACTORS voxels along each array axis, the factors' curves interpolated
    to FREQUENCIES and averaged where they cover it (the nearest end value beyond all of them)."""
    out = {}
    for axis in range(3):
        curves = []
        for factor in FACTORS:
            _, thick = selfsup.simulate_thick_slices(volume, factor, axis=axis, profile="box", thickness=factor)
            plan = selfsup.plan_for(thick.spacing, factor=factor)
            f, residual = selfsup.match_residual(thick, "box", plan.thick_mm, plan)
            curves.append(np.interp(FREQUENCIES, f, residual, left=np.nan, right=np.nan))
        curves = np.asarray(curves)
        covered = np.isfinite(curves).any(axis=0)
        mean = np.nanmean(curves[:, covered], axis=0)
        out[selfsup.world_direction(volume.affine, axis)] = np.interp(FREQUENCIES, FREQUENCIES[covered], mean)
    return FREQUENCIES, out


METHODS = {"match": match_anisotropy, "anatomy": anatomy_anisotropy}


def make_table(subjects: list[str], method: str) -> selfsup.AnisotropyTable:
    per_subject = []
    for subject in subjects:
        volume = sr3d_io.load_volume(SHARED / "ds002748-t1-1mm" / f"{subject}_T1w.nii.gz")
        frequencies, differences = METHODS[method](volume)
        if sorted(differences) != sorted(selfsup.WORLD_DIRECTIONS):
            raise ValueError(f"{subject}: array axes do not run along three distinct world directions")
        per_subject.append(differences)
        print(f"{subject}: SI at 1/64, 1/32, 1/16, 1/8 per mm: "
              + ", ".join(f"{np.interp(f, frequencies, differences['SI']):+.3f}" for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8)),
              flush=True)
    mean = {d: np.mean([s[d] for s in per_subject], axis=0) for d in selfsup.WORLD_DIRECTIONS}
    spread = {d: np.std([s[d] for s in per_subject], axis=0) for d in selfsup.WORLD_DIRECTIONS}
    how = {"match": "sr3d.selfsup.match_residual of contiguous box slices every "
                    f"{', '.join(map(str, FACTORS))} voxels (~1 mm) along each direction, averaged over the factors",
           "anatomy": f"the 1 mm scan's line spectra (segments of {SEGMENT_MM:g} mm) along each direction minus the "
                      "mean of the two others; no slicing"}[method]
    about = {
        "what": "log10 power difference, thick axis minus in-plane axes, of the anatomy when the slice profile is "
                "known; per world direction of the thick axis (RAS+ axes LR: x, AP: y, SI: z); frequencies in "
                "cycles per mm",
        "method": f"{method}: {how}",
        "made_by": f"python experiments/anisotropy_table.py --method={method}",
        "subjects": [f"ds002748 {s} T1w (1 x 0.87 x 0.87 mm)" for s in subjects],
        "split": "training split of runs/corpus/corpus.json; dev subjects " + ", ".join(DEV_SUBJECTS) + " left out",
        "licence": "derived from OpenNeuro ds002748 (Bezmaternykh et al. 2021), CC0",
        "std_over_subjects": {d: [round(float(v), 5) for v in spread[d]] for d in selfsup.WORLD_DIRECTIONS},
    }
    return selfsup.AnisotropyTable(tuple(float(f) for f in frequencies),
                                   {d: tuple(float(v) for v in mean[d]) for d in selfsup.WORLD_DIRECTIONS}, about)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    subjects = table_subjects(json.loads(pathlib.Path(_CORPUS.value).read_text()))
    if not subjects:
        raise app.UsageError(f"--corpus {_CORPUS.value}: no ds002748 subject in the training split")
    out = pathlib.Path(_OUT.value)
    out.write_text(json.dumps(make_table(subjects, _METHOD.value).to_json(), indent=1) + "\n")
    print(f"wrote {out} from {len(subjects)} subjects: {', '.join(subjects)}")


if __name__ == "__main__":
    app.run(main)
