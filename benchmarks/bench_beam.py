"""Scans per minute of `sr3d upscale-beam` on the local DirectRunner with 1 and 2 workers against
`sr3d upscale-batch` on the same scans (docs/beam.md): each run a fresh process (the CLI, as a
user runs it, start-up included), interleaved repeats, medians; CPU seconds and peak RSS per run.

  nice -n 5 python benchmarks/bench_beam.py --out docs/benchmarks      # beam.json / beam.md

Scans: crops of real IXI T1 scans (../shared/data/ixi-t1-2mm), upscaled x2 in 3D with the
shipped x2 model, self-check off in both (upscale-batch has none). CPU seconds are user + sys of
the run's process and its children (the Beam workers); peak RSS is the largest single process.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from _report import cpu_name, write_report  # noqa: E402

DATA = pathlib.Path(os.environ.get("SR3D_SHARED_DATA", REPO.parent / "shared" / "data")) / "ixi-t1-2mm"
# Runs the CLI, then prints its own and its children's resource use (children: the Beam workers).
_MEASURED = """
import json, resource, sys
from sr3d import cli
code = cli.main(sys.argv[1:])
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("SR3D_BENCH " + json.dumps({"code": code, "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
      "peak_rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024}), file=sys.stderr)
"""
CONFIGS = {
    "upscale-batch": lambda scans, out: ["upscale-batch", str(scans), str(out)],
    "beam, 1 worker": lambda scans, out: ["upscale-beam", "--input", f"{scans}/*.nii.gz", "--output", str(out),
                                          "--no-self-check", "--direct_num_workers=1"],
    "beam, 2 workers": lambda scans, out: ["upscale-beam", "--input", f"{scans}/*.nii.gz", "--output", str(out),
                                           "--no-self-check", "--direct_num_workers=2",
                                           "--direct_running_mode=multi_processing"],
}


def make_scans(folder: pathlib.Path, count: int, shape_xyz: tuple[int, int, int]) -> list[str]:
    files = sorted(DATA.glob("*.nii.gz"))[:count]
    if len(files) < count:
        raise SystemExit(f"{DATA}: needs {count} scans, found {len(files)}")
    folder.mkdir(parents=True)
    for f in files:
        image = nib.load(f)
        start = [(n - s) // 2 for n, s in zip(image.shape, shape_xyz)]
        crop = image.slicer[tuple(slice(a, a + s) for a, s in zip(start, shape_xyz))]
        nib.save(nib.Nifti1Image(np.asarray(crop.dataobj, np.float32), crop.affine), folder / f.name)
    return [f.name for f in files]


def run_once(args: list[str], out: pathlib.Path, count: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], env=env, capture_output=True, text=True,
                          timeout=3600)
    wall = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.startswith("SR3D_BENCH ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    measured = json.loads(lines[-1].split(" ", 1)[1])
    outputs = sorted(out.glob("*_x2.nii.gz"))
    if measured["code"] != 0 or len(outputs) != count:
        raise SystemExit(f"{' '.join(args)}: exit {measured['code']}, {len(outputs)} of {count} outputs")
    return {"wall_s": round(wall, 2), "cpu_s": round(measured["cpu_s"], 2),
            "peak_rss_mb": round(measured["peak_rss_mb"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 24], help="crop (x, y, z) of each scan")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    load_before = os.getloadavg()
    runs = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-beam-") as tmp:
        scans = pathlib.Path(tmp, "scans")
        names = make_scans(scans, args.scans, tuple(args.shape))
        order = list(CONFIGS)
        for repeat in range(args.repeats):
            for name in order[repeat % len(order):] + order[: repeat % len(order)]:  # rotated: interleaved
                out = pathlib.Path(tmp, f"out-{repeat}-{len(runs[name])}-{name.replace(' ', '').replace(',', '')}")
                result = run_once(CONFIGS[name](scans, out), out, args.scans)
                runs[name].append(result)
                print(f"{name}: {result}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    summary = {}
    for name, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        cpu = statistics.median(r["cpu_s"] for r in results)
        summary[name] = {"wall_s": wall, "scans_per_min": round(60 * args.scans / wall, 2),
                         "cpu_s_per_scan": round(cpu / args.scans, 2),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
    base = summary["upscale-batch"]["scans_per_min"]
    payload = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
               "load_after": [round(x, 2) for x in load_after], "scans": names, "crop_xyz": args.shape,
               "scale": 2, "mode": "3d", "model": "shipped x2", "repeats": args.repeats, "runs": runs,
               "summary": summary}
    lines = [f"# upscale-beam (DirectRunner) vs upscale-batch: {args.scans} scans, x2 3D, shipped model",
             "",
             f"CPU: {payload['cpu']}, {payload['cores']} cores; load average before "
             f"{payload['load_before']}, after {payload['load_after']} (shared machine: wall times are "
             "ratios within this run only).",
             f"Scans: {args.scans} crops {args.shape[0]} x {args.shape[1]} x {args.shape[2]} (x, y, z) of real IXI T1 "
             f"scans, medians of {args.repeats} interleaved runs, each a fresh `sr3d` process (start-up and "
             "model loading included).",
             "Command: `nice -n 5 python benchmarks/bench_beam.py --out docs/benchmarks`",
             "",
             "| run | wall s | scans / min | vs upscale-batch | CPU s / scan | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['wall_s']:.1f} | {s['scans_per_min']:.2f} | {s['scans_per_min'] / base:.2f}x | "
                     f"{s['cpu_s_per_scan']:.2f} | {s['peak_rss_mb']:.0f} |")
    write_report(args.out, "beam", payload, lines)


if __name__ == "__main__":
    main()
