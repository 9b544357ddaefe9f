"""CPU speed of the two stage networks through onnxruntime vs TensorFlow, on the bundled real scan.

  python benchmarks/bench_onnx.py --out docs/benchmarks      # writes onnx.json and onnx.md

The 3D x2 path of `sr3d.inference` without tiling: stage hw on every (H, W) slice, then stage d
on every (D, W) plane of the result, in batches of --batch planes, with the shipped x2 models
exported by `sr3d.onnx_export`. The two runtimes alternate for --repeats rounds so that load
from other processes hits both alike; the median round is reported, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np


def _batched(fn, planes: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(planes[i:i + batch]) for i in range(0, len(planes), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.gettempdir(), help="directory for onnx.json and onnx.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both runtimes")
    args = parser.parse_args()

    import onnxruntime
    import tensorflow as tf

    from sr3d import intensity, models, onnx_export
    from sr3d import io as sr3d_io
    from sr3d.demo import BUNDLED_SCAN

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    bundle = models.load_models(None, scale=2)
    volume = sr3d_io.load_volume(BUNDLED_SCAN)
    lr = intensity.window(volume.array).normalise(volume.array)
    exported = onnx_export.export_onnx(bundle, pathlib.Path(tempfile.mkdtemp()) / "onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads

    runtimes = {}
    for stage in onnx_export.STAGES:
        session = onnxruntime.InferenceSession(str(exported / f"{stage}.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        function = onnx_export.stage_function(getattr(bundle, stage), stage, bundle.scale)
        runtimes.setdefault("onnxruntime", {})[stage] = (
            lambda x, s=session: s.run(["final"], {"planes": x[..., None]})[0][..., 0])
        runtimes.setdefault("tensorflow", {})[stage] = (
            lambda x, f=function: f(tf.constant(x[..., None]))["final"].numpy()[..., 0])

    def upscale(stages) -> np.ndarray:
        slices = _batched(stages["hw"], lr, args.batch)
        return _batched(stages["d"], np.ascontiguousarray(slices.transpose(1, 0, 2)), args.batch).transpose(1, 0, 2)

    outputs = {name: upscale(stages) for name, stages in runtimes.items()}  # warm-up (tracing, allocation)
    seconds = {name: [] for name in runtimes}
    for _ in range(args.repeats):
        for name, stages in runtimes.items():
            start = time.perf_counter()
            upscale(stages)
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "scan": BUNDLED_SCAN.name, "lr_shape": list(lr.shape), "hr_shape": list(outputs["tensorflow"].shape),
        "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "seconds": seconds, "median_s": median,
        "onnxruntime_speedup": median["tensorflow"] / median["onnxruntime"],
        "max_abs_difference_network_units": float(np.abs(outputs["tensorflow"] - outputs["onnxruntime"]).max()),
        "load_average_1min_after": os.getloadavg()[0],
        "versions": {"tensorflow": tf.__version__, "onnxruntime": onnxruntime.__version__},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "onnx.md").write_text(
        f"# onnxruntime vs TensorFlow, shipped x2 stages, 3D, {BUNDLED_SCAN.name}\n\n"
        f"{' x '.join(map(str, lr.shape))} -> {' x '.join(map(str, result['hr_shape']))} voxels, batch "
        f"{args.batch}, {args.threads} threads, median of {args.repeats} alternating rounds "
        f"(1-min load average after the run: {result['load_average_1min_after']:.1f}).\n\n"
        "| runtime | median s | rounds (s) |\n|---|---|---|\n"
        + "".join(f"| {name} {result['versions'][name]} | {median[name]:.2f} | "
                  f"{', '.join(f'{s:.2f}' for s in seconds[name])} |\n" for name in runtimes)
        + f"\nonnxruntime / TensorFlow speed: {result['onnxruntime_speedup']:.2f}x; largest difference "
          f"{result['max_abs_difference_network_units']:.1e} (network units).\n")
    print((out / "onnx.md").read_text())


if __name__ == "__main__":
    main()
