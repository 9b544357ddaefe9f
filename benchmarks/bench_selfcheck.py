"""Cost of the self-check relative to the upscale it accompanies (same process, same run).

  python benchmarks/bench_selfcheck.py [--scans A.nii.gz,B.nii.gz] [--out docs/benchmarks]

For each scan, scale and mode: wall time of `sr3d.inference.upscale_volume` and of
`sr3d.selfcheck.self_check` with the shipped bundle, and their ratio. Writes
OUT/selfcheck_cost.json and .md.
"""
import argparse
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _report  # noqa: E402
from sr3d import inference, models, selfcheck  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402

DEFAULT = ("../shared/data/stroke-t1-t2-flair/T2.nii.gz", "../shared/data/seg3d-head-mr/head_MR.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", default=",".join(DEFAULT))
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    rows = []
    for path in args.scans.split(","):
        volume = sr3d_io.load_volume(path)
        for scale in (2, 4):
            bundle = models.load_models(None, scale)
            for mode in ("3d", "2d"):
                inference.upscale_volume(volume.replace(array=volume.array[:4]), bundle, mode=mode)  # trace
                tick = time.perf_counter()
                inference.upscale_volume(volume, bundle, mode=mode)
                upscale_s = time.perf_counter() - tick
                tick = time.perf_counter()
                check = selfcheck.self_check(volume.array, functools.partial(
                    inference.upscale_normalised, models=bundle, mode=mode), scale, mode, min_side=selfcheck.MIN_SIDE)
                check_s = time.perf_counter() - tick
                rows.append({"scan": pathlib.Path(path).name, "shape": list(volume.shape), "scale": scale, "mode": mode,
                             "upscale_s": round(upscale_s, 2), "self_check_s": round(check_s, 2),
                             "ratio": round(check_s / upscale_s, 3), "skipped": check is None})
                print(rows[-1], flush=True)
    cpu = _report.cpu_name()
    lines = [f"Self-check cost ({cpu}; `python benchmarks/bench_selfcheck.py`)", "",
             "| scan | shape | x | mode | upscale s | self-check s | ratio |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scan']} | {' x '.join(map(str, r['shape']))} | {r['scale']} | {r['mode']} | {r['upscale_s']} | "
              f"{r['self_check_s']}{' (skipped)' if r['skipped'] else ''} | {r['ratio']:.2f} |" for r in rows]
    _report.write_report(args.out, "selfcheck_cost", {"cpu": cpu, "rows": rows}, lines)


if __name__ == "__main__":
    main()
