"""Quality guard of bf16 inference: PSNR / SSIM of bfloat16 against float32, per stage, on real scans.

  python benchmarks/precision_quality.py --out docs/benchmarks                 # the model card's test scans
  python benchmarks/precision_quality.py --scans a.nii.gz b.nii.gz --scales 2  # others

Each scan is degraded as in evaluate.py (`sr3d.degrade.simulate_lr`), upscaled by the shipped
models with each stage in float32 or bfloat16, and scored under the float protocol (window: the
scan's own HR min/max, no IFC). 2D runs stage hw only; 3D runs both stages, so it is scored with
hw in bf16, d in bf16 and both. Writes precision_quality.json and precision_quality.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sr3d import degrade, inference, metrics  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import precision as sr3d_precision  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS_TEST = REPO / "runs" / "corpus" / "test"
PSNR_GUARD_DB = 0.05
SSIM_GUARD = 0.001
# Precision of (stage hw, stage d) per scored run; 2D has no stage d.
RUNS = {"2d": {"float32": ("float32", "float32"), "hw_bf16": ("bfloat16", "float32")},
        "3d": {"float32": ("float32", "float32"), "hw_bf16": ("bfloat16", "float32"),
               "d_bf16": ("float32", "bfloat16"), "both_bf16": ("bfloat16", "bfloat16")}}


def default_scans() -> list[pathlib.Path]:
    """The corpus test split (runs/corpus/test) if built, else the IXI and stroke test scans."""
    scans = sorted(CORPUS_TEST.glob("*.nii.gz"))
    if scans:
        return scans
    data = REPO.parent / "shared" / "data"
    return (sorted((data / "ixi-t1-2mm").glob("IXI039*")) + sorted((data / "ixi-t1-2mm").glob("IXI048*"))
            + [data / "stroke-t1-t2-flair" / "T2.nii.gz"])


def with_stage_precisions(bundle: inference.ModelBundle, hw: str, d: str) -> inference.ModelBundle:
    """The bundle with each stage replaced by its network at the given precision (float32 in/out)."""
    return inference.ModelBundle(hw=sr3d_precision.network(bundle.hw, hw), d=sr3d_precision.network(bundle.d, d),
                                 scale=bundle.scale, info=bundle.info)


def score_scan(path: pathlib.Path, bundle: inference.ModelBundle, mode: str) -> dict:
    volume = sr3d_io.load_volume(path)
    hr, lr = degrade.simulate_lr(volume.array, bundle.scale, mode)
    protocol = metrics.float_protocol((float(hr.min()), float(hr.max())), with_ifc=False)
    lr_volume = volume.replace(array=lr, source=None)
    scores = {}
    for run, (hw, d) in RUNS[mode].items():
        tick = time.process_time()
        test = inference.upscale_volume(lr_volume, with_stage_precisions(bundle, hw, d), mode=mode).array
        score = metrics.score_volume(hr, test, protocol)
        scores[run] = {"psnr": score["psnr"], "ssim": score["ssim"], "cpu_s": time.process_time() - tick}
    return {"scan": path.name, "hr_shape": list(hr.shape), "scores": scores}


def summarise(cells: list[dict], mode: str) -> dict:
    """Per bf16 run: the mean and the worst (most negative) bf16 - float32 delta over scans."""
    summary = {}
    for run in RUNS[mode]:
        if run == "float32":
            continue
        deltas = {m: [c["scores"][run][m] - c["scores"]["float32"][m] for c in cells] for m in ("psnr", "ssim")}
        summary[run] = {
            "mean_delta_psnr_db": float(np.mean(deltas["psnr"])), "worst_delta_psnr_db": float(np.min(deltas["psnr"])),
            "mean_delta_ssim": float(np.mean(deltas["ssim"])), "worst_delta_ssim": float(np.min(deltas["ssim"])),
            "max_abs_delta_psnr_db": float(np.max(np.abs(deltas["psnr"]))),
            "max_abs_delta_ssim": float(np.max(np.abs(deltas["ssim"]))),
        }
        summary[run]["within_guard"] = (summary[run]["worst_delta_psnr_db"] >= -PSNR_GUARD_DB
                                        and summary[run]["worst_delta_ssim"] >= -SSIM_GUARD)
    return summary


def markdown(result: dict) -> str:
    lines = [f"# bf16 vs float32 quality ({result['date']})", "",
             f"Command: `{result['command']}`. Models: {result['models']}. Guard: bf16 may lose at most "
             f"{PSNR_GUARD_DB} dB PSNR and {SSIM_GUARD} SSIM against float32 on any scan. "
             "Float protocol, window = each scan's HR min/max, no IFC.", "",
             "## Summary (delta = bf16 - float32; worst = most negative over scans)", "",
             "| mode | scale | bf16 stages | mean dPSNR dB | worst dPSNR dB | mean dSSIM | worst dSSIM | within guard |",
             "|---|---|---|---|---|---|---|---|"]
    for key, block in result["cases"].items():
        mode, scale = key.split("_")
        for run, s in block["summary"].items():
            lines.append(f"| {mode} | {scale} | {run} | {s['mean_delta_psnr_db']:+.4f} | {s['worst_delta_psnr_db']:+.4f} "
                         f"| {s['mean_delta_ssim']:+.5f} | {s['worst_delta_ssim']:+.5f} | "
                         f"{'yes' if s['within_guard'] else '**no**'} |")
    lines += ["", "## Per scan (PSNR dB / SSIM)", ""]
    for key, block in result["cases"].items():
        runs = list(RUNS[key.split("_")[0]])
        lines += [f"### {key}", "", "| scan | HR shape | " + " | ".join(runs) + " |",
                  "|---|---|" + "---|" * len(runs)]
        for cell in block["scans"]:
            values = " | ".join(f"{cell['scores'][r]['psnr']:.3f} / {cell['scores'][r]['ssim']:.4f}" for r in runs)
            lines.append(f"| {cell['scan']} | {tuple(cell['hr_shape'])} | {values} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scans", nargs="+", type=pathlib.Path, default=None, help="HR scans (default: test split)")
    parser.add_argument("--scales", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--modes", nargs="+", choices=list(RUNS), default=["2d", "3d"])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("TMPDIR", "/tmp")))
    args = parser.parse_args()
    scans = args.scans or default_scans()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "models": "shipped (sr3d/data_files/models)", "scans": [str(s) for s in scans],
              "cpu_native_bf16": sr3d_precision.native_bf16(), "cases": {}}
    for scale in args.scales:
        bundle = inference.load_models(None, scale)
        for mode in args.modes:
            cells = []
            for path in scans:
                cells.append(score_scan(path, bundle, mode))
                print(f"{mode} x{scale} {path.name}: " + ", ".join(
                    f"{r} {v['psnr']:.3f}/{v['ssim']:.4f}" for r, v in cells[-1]["scores"].items()), flush=True)
            result["cases"][f"{mode}_x{scale}"] = {"scans": cells, "summary": summarise(cells, mode)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_quality.json").write_text(json.dumps(result, indent=1))
    (args.out / "precision_quality.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
