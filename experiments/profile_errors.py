"""The slice-profile estimate's errors on training-split scans: the table that
`sr3d.selfsup.estimate_posterior` turns an estimate into a mixture of the profiles it may have been.

  python experiments/profile_errors.py          # ~8 min: sr3d/data_files/profile_errors_brain_mr.json

Subjects: the seven ds002748 subjects of the anisotropy table (sr3d/data_files/anisotropy_brain_mr.json,
training split of the corpus, the dev subjects sub-01, sub-10 and sub-19 left out so the mixture's use
can be judged on them). Each gets box and Gaussian profiles of 0.35-1.3 x the slice spacing, slices
every 3 and every 6 voxels along D (CASES; not the test cases' profiles or spacings), simulated with
`selfsup.simulate_thick_slices`, and `selfsup.estimate_profile` (the default options) is run on each.
A row: the true kind and thickness, the estimate's kind and thickness, all as fractions of the slice
spacing. ds002748 (OpenNeuro, Bezmaternykh et al. 2021) is CC0, so the derived table ships.
"""
import json
import os
import pathlib
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sr3d import io as sr3d_io  # noqa: E402
from sr3d import selfsup  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SR3D_SHARED_DATA", REPO.parent / "shared" / "data"))
SUBJECTS = ("sub-04", "sub-07", "sub-13", "sub-16", "sub-22", "sub-25", "sub-28")  # the anisotropy table's
# (kind, thickness as a fraction of the slice spacing, factor: slices every factor x the scan's ~1 mm D
# spacing). A grid of its own, not the test cases' profiles and spacings (docs/thick_slice.md: Gaussian
# 2.5 mm every 4 mm, box 4 mm every 5 mm, i.e. 0.625 and 0.8 of the spacing at factors 4 and 5), so that
# no row holds a test case's true profile.
FRACTIONS = (0.35, 0.5, 0.7, 0.9, 1.1, 1.3)
FACTORS = (3, 6)
CASES = [(kind, fraction, factor) for factor in FACTORS for kind in selfsup.PROFILES for fraction in FRACTIONS]

_OUT = flags.DEFINE_string("out", str(selfsup.PROFILE_ERRORS_TABLE), "The table (JSON).")


def case_row(volume: sr3d_io.Volume, kind: str, fraction: float, factor: int) -> dict:
    """One simulated case: the truth and the estimate, thicknesses as fractions of the slice spacing."""
    _, thick = selfsup.simulate_thick_slices(volume, factor, axis=0, profile=kind, thickness=fraction * factor)
    plan = selfsup.plan_for(thick.spacing, factor=factor)
    found = selfsup.estimate_profile(thick, plan)
    return {"kind": kind, "fraction": fraction, "factor": factor,
            "estimated_kind": found.kind, "estimated_fraction": round(found.thickness_mm / plan.thick_mm, 4)}


def main(argv):
    del argv
    rows, started = [], time.perf_counter()
    for subject in SUBJECTS:
        path = SHARED / "ds002748-t1-1mm" / f"{subject}_T1w.nii.gz"
        volume = sr3d_io.load_volume(path)
        for kind, fraction, factor in CASES:
            rows.append({"subject": subject, **case_row(volume, kind, fraction, factor)})
        print(f"{subject}: {len(CASES)} cases ({time.perf_counter() - started:.0f} s)", flush=True)
    table = {"about": {
        "what": "slice-profile estimates (sr3d.selfsup.estimate_profile, default options) on thick slices simulated "
                "along D from 1 mm scans; thicknesses as fractions of the slice spacing (box width, Gaussian FWHM)",
        "made_by": "python experiments/profile_errors.py",
        "subjects": [f"ds002748 {s} T1w" for s in SUBJECTS],
        "split": "training split of runs/corpus/corpus.json, the anisotropy table's subjects; dev subjects sub-01, "
                 "sub-10, sub-19 left out",
        "licence": "derived from OpenNeuro ds002748 (Bezmaternykh et al. 2021), CC0"},
        "rows": rows}
    out = pathlib.Path(_OUT.value)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    app.run(main)
