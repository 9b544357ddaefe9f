"""Which layers must stay float32 for bf16 inference to keep its quality: bf16 - float32 PSNR / SSIM
per set of float32 layers, for one stage at a time, on real test scans.

  python benchmarks/precision_layers.py --out docs/benchmarks      # precision_layers.json / .md

Each scan is degraded as in evaluate.py (`sr3d.degrade.simulate_lr`, 3D) and upscaled by the
shipped x2 bundle (`--scale`) in float32, then again with one stage's network copied to bf16
(`sr3d.precision.bf16_copy`) keeping each candidate set of layers in float32, the other stage in
float32. Scored under the float protocol (window: the scan's HR min/max, no IFC), as
benchmarks/precision_quality.py. Speed: each stage network alone on 8 planes of the 256 x 256 x 176
-> 2x case ((256, 256) for hw, (176, 512) for d), every candidate and float32 interleaved, best of
`--rounds`, CPU-seconds of this process; benchmarks/bench_inference.py times `sr3d upscale` end to end.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _report import cpu_name, write_report  # noqa: E402
from sr3d import degrade, inference, metrics  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import precision  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST = REPO / "runs" / "corpus" / "test"
DEFAULT_SCANS = ("lidc_slices000-105.nii.gz", "ds002748_sub-40.nii.gz", "stroke_T1.nii.gz")
OUTPUTS = ("intermediate", "final")
# Candidate float32 sets besides the outputs: none, each thin (one-channel in or out) layer, and
# combinations; the one sr3d uses (precision.FLOAT32_LAYERS) is marked in the report.
CANDIDATES = {
    "none": (),
    "conv1": ("conv1",),
    "conv7": ("conv7",),
    "conv6+subpixel": ("conv6", "subpixel"),
    "conv10": ("conv10",),
    "conv1+conv10": ("conv1", "conv10"),
    "conv1+conv7+conv10": ("conv1", "conv7", "conv10"),
    "all thin layers (conv1, conv6, subpixel, conv7, conv10)": ("conv1", "conv6", "subpixel", "conv7", "conv10"),
}
SR3D_SET = tuple(name for name in precision.FLOAT32_LAYERS if name not in OUTPUTS)
SPEED_PLANES = {"hw": (256, 256), "d": (176, 512)}


def speeds(scale: int, stages: list[str], rounds: int) -> dict:
    """CPU-seconds of each stage network on 8 planes, float32 and every candidate, interleaved."""
    import tensorflow as tf

    bundle = inference.load_models(None, scale)
    rng = np.random.default_rng(0)
    runs = {}
    for stage in stages:
        planes = rng.random((8, *SPEED_PLANES[stage], 1)).astype(np.float32)
        model = getattr(bundle, stage)
        for label, layers in {"float32": None, **CANDIDATES}.items():
            net = model if layers is None else precision.bf16_copy(model, OUTPUTS + layers)
            fn = tf.function(lambda x, net=net: net(x, training=False)["final"])
            fn(planes[:2])
            runs[(stage, label)] = (fn, planes)
    best = {key: float("inf") for key in runs}
    for _ in range(rounds):
        for key, (fn, planes) in runs.items():
            tick = time.process_time()
            fn(planes).numpy()
            best[key] = min(best[key], time.process_time() - tick)
    return {stage: {label: {"cpu_s": best[(stage, label)],
                            "speedup_over_float32": best[(stage, "float32")] / best[(stage, label)]}
                    for (s, label) in runs if s == stage} for stage in stages}


def run(scans: list[pathlib.Path], scale: int, stages: list[str]) -> dict:
    bundle = inference.load_models(None, scale)
    cells = []
    for path in scans:
        volume = sr3d_io.load_volume(path)
        hr, lr = degrade.simulate_lr(volume.array, scale, "3d")
        protocol = metrics.float_protocol((float(hr.min()), float(hr.max())), with_ifc=False)
        lr_volume = volume.replace(array=lr, source=None)
        reference = metrics.score_volume(hr, inference.upscale_volume(lr_volume, bundle, mode="3d").array, protocol)
        cell = {"scan": path.name, "float32": {"psnr": reference["psnr"], "ssim": reference["ssim"]}, "runs": {}}
        for stage in stages:
            for label, layers in CANDIDATES.items():
                copy = precision.bf16_copy(getattr(bundle, stage), OUTPUTS + layers)
                nets = {"hw": bundle.hw, "d": bundle.d, stage: copy}
                variant = inference.ModelBundle(hw=nets["hw"], d=nets["d"], scale=scale, info=bundle.info)
                tick = time.process_time()
                score = metrics.score_volume(hr, inference.upscale_volume(lr_volume, variant, mode="3d").array,
                                             protocol)
                cell["runs"][f"{stage}: {label}"] = {
                    "stage": stage, "layers": label, "delta_psnr_db": score["psnr"] - reference["psnr"],
                    "delta_ssim": score["ssim"] - reference["ssim"], "cpu_s": time.process_time() - tick}
                print(f"{path.name} stage {stage} float32 [{label}]: "
                      f"dPSNR {cell['runs'][f'{stage}: {label}']['delta_psnr_db']:+.4f} dB", flush=True)
        cells.append(cell)
    return {"scale": scale, "cells": cells}


def markdown(result: dict) -> list[str]:
    cells = result["cells"]
    lines = [f"# bf16 quality by float32 layer set ({result['date']})", "",
             f"Command: `{result['command']}`. CPU: {result['cpu']} (native bf16: "
             f"{', '.join(result['native_bf16']) or 'none'}). Shipped x{result['scale']} bundle, 3D, one stage in "
             "bf16 (the other float32); delta = bf16 - float32, float protocol (window = the scan's HR "
             "min/max). Speed: the stage network alone on 8 planes, CPU-s, best of interleaved rounds "
             f"(float32: " + ", ".join(f"{stage} {row['float32']['cpu_s']:.2f} s" for stage, row in
                                      result["speed"].items()) + ").", "",
             "| stage: layers kept float32 | " + " | ".join(c["scan"].replace(".nii.gz", "") for c in cells)
             + " | stage CPU-s | speed over float32 |",
             "|---|" + "---|" * (len(cells) + 2)]
    for run, first in cells[0]["runs"].items():
        values = " | ".join(f"{c['runs'][run]['delta_psnr_db']:+.4f} dB / {c['runs'][run]['delta_ssim']:+.5f}"
                            for c in cells)
        speed = result["speed"][first["stage"]][first["layers"]]
        if CANDIDATES[first["layers"]] == SR3D_SET:
            run = f"**{run}** (sr3d)"
        lines.append(f"| {run} | {values} | {speed['cpu_s']:.2f} | {speed['speedup_over_float32']:.2f}x |")
    lines += ["", "float32 scores: " + ", ".join(f"{c['scan']} {c['float32']['psnr']:.3f} dB / "
                                                 f"{c['float32']['ssim']:.4f}" for c in cells)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scans", nargs="+", type=pathlib.Path, default=[TEST / name for name in DEFAULT_SCANS])
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--stages", nargs="+", choices=("hw", "d"), default=["d", "hw"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("TMPDIR", "/tmp")))
    args = parser.parse_args()
    result = run(args.scans, args.scale, args.stages)
    result["speed"] = speeds(args.scale, args.stages, args.rounds)
    result.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
                  cpu=cpu_name(), native_bf16=precision.native_bf16())
    write_report(args.out, "precision_layers", result, markdown(result))


if __name__ == "__main__":
    main()
