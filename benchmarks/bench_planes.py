"""Time of the 3D cascade's plane options against Lanczos, measured in one run (same process).

  python benchmarks/bench_planes.py [--scans A.nii.gz,B.nii.gz] [--scales 2,4] [--out docs/benchmarks]

For each scan and scale: wall time of `sr3d.upscaling.upscale_normalised` (shipped bundle, mode
3d, default precision) with planes "dw" (the paper's single pass), "both" and "all" (each axis once
as depth, averaged), and of Lanczos (`sr3d.baselines`) on the same LR array, interleaved over
--rounds rounds (best time of each), and each option's ratio to "dw" and to Lanczos. The LR is the
scan downscaled by the factor along every axis, as evaluate.py does. Also the consistency step that
`sr3d upscale` runs after the passes (`sr3d.upscaling.make_consistent` on a copy of the dw output;
"consistency", its ratio to dw and to Lanczos), the fusion of the three passes ("fusion":
`sr3d.upscaling.fuse_orientations` with the bundle's beta, against "mean", the plain mean; both on
the same three passes), and what `sr3d upscale` costs end to end (`sr3d.inference.upscale_checked`
on the LR as a Volume, self-check and consistency on): "checked dw" with --planes dw and
"checked default", the default (planes auto: self-checks of both candidates, then the winner).
Writes OUT/planes.json and .md.
"""
import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _report  # noqa: E402
from sr3d import baselines, degrade, inference, intensity, models, upscaling  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402

SHARED = pathlib.Path(os.environ.get("SR3D_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT = (str(SHARED / "stroke-t1-t2-flair" / "T1.nii.gz"), str(SHARED / "seg3d-head-mr" / "head_MR.nii.gz"))
PLANE_OPTIONS = ("dw", "both", "all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", default=",".join(DEFAULT))
    parser.add_argument("--scales", default="2,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    rows = []
    for path in args.scans.split(","):
        volume = sr3d_io.load_volume(path)
        for scale in (int(s) for s in args.scales.split(",")):
            bundle = models.load_models(None, scale)
            hr = degrade.crop_to_multiple(np.asarray(volume.array, np.float32), scale, axes=(0, 1, 2))
            lr = degrade.downscale(hr, scale, axes=(0, 1, 2))
            x = intensity.window(lr).normalise(lr)
            runs = {p: (lambda p=p: upscaling.upscale_normalised(x, bundle, planes=p)) for p in PLANE_OPTIONS}
            runs["lanczos"] = lambda: baselines.upscale(lr, scale, "lanczos", "3d")
            dw_out = upscaling.upscale_normalised(x, bundle)
            runs["consistency"] = lambda: upscaling.make_consistent(dw_out.copy(), x, scale, "3d")
            passes = list(upscaling.orientation_passes(x, bundle))
            beta = upscaling.orientation_fusion_beta(bundle)
            runs["fusion"] = lambda: upscaling.fuse_orientations(iter(passes), beta)
            runs["mean"] = lambda: upscaling.mean_of_orientations(iter(passes))
            lr_volume = inference.as_volume(lr, spacing=tuple(float(z) * scale for z in volume.spacing))
            runs["checked dw"] = lambda: inference.upscale_checked(lr_volume, bundle, planes="dw")
            runs["checked default"] = lambda: inference.upscale_checked(lr_volume, bundle)
            upscaling.upscale_normalised(x[:4, :32, :32], bundle, planes="all")  # trace every plane shape once
            best = {name: float("inf") for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    tick = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - tick)
            row = {"scan": pathlib.Path(path).name, "lr_shape": list(lr.shape), "scale": scale,
                   "seconds": {k: round(v, 2) for k, v in best.items()},
                   "ratio_to_dw": {p: round(best[p] / best["dw"], 2) for p in PLANE_OPTIONS},
                   "ratio_to_lanczos": {p: round(best[p] / best["lanczos"], 1) for p in PLANE_OPTIONS + ("consistency",)},
                   "consistency_to_dw": round(best["consistency"] / best["dw"], 3),
                   "fusion_beta": beta, "default_to_checked_dw": round(best["checked default"] / best["checked dw"], 2)}
            rows.append(row)
            print(row, flush=True)
    cpu = _report.cpu_name()
    lines = [f"3D plane options, time per LR volume ({cpu}; `python benchmarks/bench_planes.py`; best of "
             f"{args.rounds} interleaved rounds, same process)", "",
             "| scan | LR shape | x | Lanczos s | dw s | both s (x dw) | all s (x dw) | all / Lanczos | "
             "consistency step s (x dw, x Lanczos) | fusion s (beta) / mean s | sr3d upscale --planes dw s | "
             "sr3d upscale default (auto) s (x --planes dw) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scan']} | {' x '.join(map(str, r['lr_shape']))} | {r['scale']} | {r['seconds']['lanczos']} | "
              f"{r['seconds']['dw']} | {r['seconds']['both']} ({r['ratio_to_dw']['both']:.2f}) | {r['seconds']['all']} "
              f"({r['ratio_to_dw']['all']:.2f}) | {r['ratio_to_lanczos']['all']:.1f} | {r['seconds']['consistency']} "
              f"({r['consistency_to_dw']:.3f}, {r['ratio_to_lanczos']['consistency']:.1f}) | {r['seconds']['fusion']} "
              f"({r['fusion_beta']:g}) / {r['seconds']['mean']} | {r['seconds']['checked dw']} | "
              f"{r['seconds']['checked default']} ({r['default_to_checked_dw']:.2f}) |" for r in rows]
    _report.write_report(args.out, "planes", {"cpu": cpu, "rounds": args.rounds, "rows": rows}, lines)


if __name__ == "__main__":
    main()
