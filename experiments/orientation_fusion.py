"""Choose the orientation-fusion beta of `--planes all` (`sr3d.upscaling.fuse_orientations`) on the
training and validation scans, and measure it on the test scans.

  python experiments/orientation_fusion.py [--scales 2,4] [--out docs/model_card/orientation_fusion]

Every scan of experiments/corpus.py (train, val and test) is cut to a central slab as in
experiments/compare_variants.py (at most 64 slices, at most 256 x 256 in-plane), degraded as evaluate.py
does in 3D (antialiased bicubic along D, H and W), and run once through the shipped bundle's three
orientation passes (`sr3d.upscaling.orientation_passes`; cached in --cache). For each beta of --betas the
passes are fused, made consistent with the LR (`sr3d.degrade.make_consistent`, as `sr3d upscale` does)
and scored against the HR (PSNR, peak = the slab's HR range) minus Lanczos. beta = 0 is the plain mean
(the fusion before 2026-12-03). The chosen beta is the one with the highest mean margin over the train
and validation slabs together; the test slabs play no part in the choice. Writes OUT/results.json and
OUT/results.md (per slab and per beta, means per split, the choice per scale).
"""
import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sr3d import baselines, degrade, intensity, metrics, models, upscaling  # noqa: E402
from sr3d import files as sr3d_files  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from compare_variants import central_slab  # noqa: E402  (experiments/, beside this script)

SPLITS = ("train", "val", "test")


def passes_of(path: pathlib.Path, scale: int, bundle, cache: pathlib.Path) -> dict:
    """HR slab, its LR, Lanczos and the three orientation passes (scanner units), cached as .npz."""
    cached = cache / f"x{scale}" / f"{path.name.split('.')[0]}.npz"
    if cached.exists():
        return dict(np.load(cached))
    hr = degrade.crop_to_multiple(central_slab(np.asarray(sr3d_io.load_volume(path).array, np.float32)),
                                  scale, axes=(0, 1, 2))
    lr = degrade.downscale(hr, scale, axes=(0, 1, 2)).astype(np.float32)
    window = intensity.window(lr)
    passes = [window.denormalise(p.copy()) for p in upscaling.orientation_passes(window.normalise(lr), bundle)]
    arrays = {"hr": hr, "lr": lr, "lanczos": baselines.upscale(lr, scale, "lanczos", "3d"),
              **{f"p{j}": p for j, p in enumerate(passes)}}
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cached.with_suffix(".tmp.npz"), **arrays)
    cached.with_suffix(".tmp.npz").replace(cached)
    return arrays


def margins(arrays: dict, scale: int, betas) -> dict:
    """{"dw": ..., "beta=B": ...}: CNN (+ consistency) minus Lanczos PSNR, dB."""
    hr, lr = arrays["hr"], arrays["lr"]
    lo, hi = float(hr.min()), float(hr.max())

    def psnr(y):
        return metrics.psnr(hr, np.clip(y, lo, hi), data_range=hi - lo)

    def consistent(y):
        return degrade.make_consistent(np.array(y, np.float32), lr, scale, (0, 1, 2))

    lanczos = psnr(arrays["lanczos"])
    passes = [arrays[f"p{j}"] for j in range(3)]
    out = {"dw": psnr(consistent(passes[0])) - lanczos}
    for beta in betas:
        out[f"beta={beta:g}"] = psnr(consistent(upscaling.fuse_orientations(iter(passes), beta))) - lanczos
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="2,4")
    parser.add_argument("--betas", default="0,0.5,1,1.5,2,2.5,3,4,6")
    parser.add_argument("--corpus", default="runs/corpus")
    parser.add_argument("--cache", default="runs/orientation_fusion")
    parser.add_argument("--out", default="docs/model_card/orientation_fusion")
    args = parser.parse_args()
    betas = [float(b) for b in args.betas.split(",")]
    results = {"betas": betas, "scales": {}}
    lines = ["# Orientation fusion of `--planes all`: beta chosen on the train and validation scans", "",
             "Written by `python experiments/orientation_fusion.py`. Central slabs (at most 64 x 256 x 256) of every "
             "corpus scan, 3D degradation, the shipped bundle's three orientation passes fused "
             "(`sr3d.upscaling.fuse_orientations`), then the consistency step; margin = CNN minus Lanczos PSNR (dB, "
             "peak = the slab's HR range). beta = 0 is the plain mean. Choice: the highest mean over train + val.", ""]
    for scale in (int(s) for s in args.scales.split(",")):
        bundle = models.load_models(None, scale)
        rows = []
        for split in SPLITS:
            for path in sorted(pathlib.Path(args.corpus, split).glob("*.nii.gz")):
                row = margins(passes_of(path, scale, bundle, pathlib.Path(args.cache)), scale, betas)
                rows.append({"scan": path.name.split(".")[0], "split": split, "margins_db": row})
                print(f"x{scale} {split:5s} {rows[-1]['scan'][:24]:24s} "
                      + " ".join(f"{k} {v:+.3f}" for k, v in row.items()), flush=True)
        keys = list(rows[0]["margins_db"])
        means = {split: {k: float(np.mean([r["margins_db"][k] for r in rows if r["split"] == split])) for k in keys}
                 for split in SPLITS}
        choose = {k: float(np.mean([r["margins_db"][k] for r in rows if r["split"] != "test"])) for k in keys}
        chosen = max(betas, key=lambda b: choose[f"beta={b:g}"])
        results["scales"][str(scale)] = {"rows": rows, "means": means, "train_val_mean": choose, "chosen_beta": chosen}
        lines += [f"## x{scale}: chosen beta = {chosen:g}", "",
                  "| scan | split | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        lines += [f"| {r['scan']} | {r['split']} | " + " | ".join(f"{r['margins_db'][k]:+.3f}" for k in keys) + " |"
                  for r in rows]
        lines += [f"| mean {split} | | " + " | ".join(f"{means[split][k]:+.3f}" for k in keys) + " |" for split in SPLITS]
        lines += ["| mean train + val (the choice) | | " + " | ".join(f"{choose[k]:+.3f}" for k in keys) + " |", ""]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sr3d_files.write_json(out / "results.json", results)
    sr3d_files.write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
