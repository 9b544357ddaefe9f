"""Taller bands without the self-ensemble (docs/benchmarks.md, recommendation 2): CPU time of
`upscale_normalised` with the band height of before (room for the ensemble's copies even without
it) against the taller bands now, interleaved A/B repeats on one volume, medians.

  python benchmarks/bench_bands.py --out docs/benchmarks        # bands.json / bands.md

The old band height at tile_mb T equals the new one at T / 2 (the headroom factor was 2), so A
runs tile_mb T / 2 and B tile_mb T; both are also compared with the untiled result.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from sr3d import inference, intensity, models, upscaling  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[88, 128, 128], help="(D, H, W) of the input")
    parser.add_argument("--tile-mb", type=float, default=20.0, help="budget T of the new bands (A: T / 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("TMPDIR", "/tmp")))
    args = parser.parse_args()
    scan = sr3d_io.load_volume(pathlib.Path(sr3d_io.__file__).parent / "data_files" / "studyforrest_t1_2mm.nii.gz")
    lr = ndimage.zoom(scan.array, np.array(args.shape) / np.array(scan.array.shape), order=1)
    lr = intensity.window(lr).normalise(lr).astype(np.float32)
    bundle = models.load_models(None, 2)
    cases = {"A: bands as before": args.tile_mb / 2, "B: taller bands": args.tile_mb}
    rows = {name: upscaling._band_rows(lr.shape, 2, mb, "3d", ensemble=False) for name, mb in cases.items()}
    untiled = inference.upscale_normalised(lr, bundle, tile_mb=None)   # also warms up the traced functions
    times = {name: [] for name in cases}
    max_diff = {}
    for _ in range(args.repeats):
        for name, mb in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = inference.upscale_normalised(lr, bundle, tile_mb=mb)
            times[name].append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
            max_diff[name] = float(np.abs(out - untiled).max())
            print(name, times[name][-1], flush=True)
    median = {name: {k: float(np.median([t[k] for t in ts])) for k in ("wall_s", "cpu_s")} for name, ts in times.items()}
    a, b = (median[name]["cpu_s"] for name in cases)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "cpu": cpu_name(), "load_before_after": None, "shape": args.shape, "tile_mb": args.tile_mb,
              "rows_per_band": rows, "times": times, "median": median, "max_abs_diff_vs_untiled": max_diff,
              "cpu_ratio_b_over_a": b / a, "loadavg": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bands.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Taller bands without ensemble ({result['date']})", "", f"Command: `{result['command']}`; CPU: "
             f"{result['cpu']}; load average at the end {', '.join(f'{x:.1f}' for x in result['loadavg'])}.", "",
             f"Input (D, H, W) = {tuple(args.shape)}, shipped x2, 3D, batch 8, {args.repeats} interleaved repeats.", "",
             "| case | tile_mb | LR rows per band | median CPU-s | median wall s | max diff vs untiled |",
             "|---|---|---|---|---|---|"]
    for name, mb in cases.items():
        lines.append(f"| {name} | {mb:g} | {rows[name]} | {median[name]['cpu_s']:.2f} | {median[name]['wall_s']:.2f} "
                     f"| {max_diff[name]:.1e} |")
    lines += ["", f"B / A CPU time: **{b / a:.3f}**", ""]
    (args.out / "bands.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
