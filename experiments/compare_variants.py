"""Quick paired comparison of network variants against Lanczos on the test scans of the corpus.

Each variant is `HW:D` (two .keras files; `ship` for the shipped stage) or `shipped`. Every test
scan of experiments/corpus.py is cut to a central slab (at most --max_depth slices, at most 256 x
256 in-plane), degraded as in evaluate.py (2d: H and W; 3d: D, H and W), and upscaled by each
variant and by Lanczos; PSNR peak = the slab's HR range. Faster than experiments/generalization.py
(which scores whole scans per domain with SSIM and statistics) and meant for deciding between
training variants before running that.

    python experiments/compare_variants.py --mode 2d --scale 2 shipped runs/x/hw.keras:ship

A variant ending in `@PLANES` (3d only) runs with `planes=PLANES` (`sr3d.upscaling`): `shipped@all`
is the cascade with each axis once as depth, the three averaged; `shipped@both`.

--consistency runs every variant with the consistency step of `sr3d upscale` (`sr3d.degrade.make_consistent`,
after the passes) and adds a column: Lanczos made consistent the same way (a baseline for what the step
alone gives).

--perturb changes each HR slab before it is degraded, to see what in a scan limits the margin:
`noise:S` adds white Gaussian noise of S times the slab's 0.5-99.5 percentile window to its
non-background voxels, `blur:S` blurs it in-plane with a Gaussian of S pixels. The last column is
the slab's fine-scale noise sigma (sr3d.selfcheck.noise_sigma) in units of that window.
"""
import argparse
import glob
import pathlib
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sr3d import baselines, degrade, intensity, metrics, models, selfcheck, upscaling  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402


def central_slab(x: np.ndarray, depth: int = 64, side: int = 256) -> np.ndarray:
    """The slab scored here: at most `depth` central slices, at most `side` x `side` central voxels."""
    if x.shape[0] > depth:
        c = x.shape[0] // 2
        x = x[c - depth // 2:c + depth // 2]
    for axis in (1, 2):
        if x.shape[axis] > side:
            c = x.shape[axis] // 2
            x = np.take(x, np.arange(c - side // 2, c + side // 2), axis=axis)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="HW:D .keras pairs ('ship' = the shipped stage) or 'shipped'")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--mode", choices=("2d", "3d"), default="2d")
    parser.add_argument("--max_depth", type=int, default=64)
    parser.add_argument("--test", default="runs/corpus/test", help="folder of test scans (experiments/corpus.py)")
    parser.add_argument("--only", default="", help="comma-separated parts of scan names to keep")
    parser.add_argument("--perturb", default="none", help="none, noise:S or blur:S (see above)")
    parser.add_argument("--decimals", type=int, default=2, help="decimals of the per-scan margins")
    parser.add_argument("--ensemble", action="store_true", help="self-ensemble every variant (sr3d upscale --ensemble)")
    parser.add_argument("--consistency", action="store_true",
                        help="the consistency step after every variant, and a Lanczos + consistency column")
    args = parser.parse_args()
    r = args.scale
    shipped = models.load_models(None, r)
    bundles = []
    variant_planes = []
    for variant in args.variants:
        variant, _, suffix = variant.partition("@")
        if suffix and (suffix not in upscaling.PLANES or args.mode != "3d"):
            parser.error(f"{variant}@{suffix}: expected @ one of {upscaling.PLANES}, with --mode 3d")
        variant_planes.append(suffix or "dw")
        if variant == "shipped":
            bundles.append(shipped)
            continue
        hw, d = variant.split(":")
        bundles.append(models.ModelBundle(hw=shipped.hw if hw == "ship" else models.load(hw),
                                          d=shipped.d if d == "ship" else models.load(d), scale=r))
    axes = (0, 1, 2) if args.mode == "3d" else (1, 2)
    margins = []
    columns = [f"v{i}" for i in range(len(bundles))] + (["Lanczos+c"] if args.consistency else [])
    print(f"{'scan':24s} {'slab':16s} Lanczos  " + "  ".join(columns) + "   (CNN - Lanczos, dB; noise sigma / window)")
    for path in sorted(glob.glob(f"{args.test}/*.nii.gz")):
        name = pathlib.Path(path).name.split(".")[0]
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        x = central_slab(np.asarray(sr3d_io.load_volume(path).array, np.float32), args.max_depth)
        low_p, high_p = np.percentile(x, [0.5, 99.5])
        kind, _, amount = args.perturb.partition(":")
        if kind == "noise":
            noise = np.random.default_rng(0).normal(0.0, float(amount) * (high_p - low_p), x.shape)
            x = (x + noise * (x > x.min())).astype(np.float32)
        elif kind == "blur":
            x = ndimage.gaussian_filter(x, (0, float(amount), float(amount))).astype(np.float32)
        elif kind != "none":
            parser.error(f"--perturb {args.perturb!r}: expected none, noise:S or blur:S")
        sigma = selfcheck.noise_sigma(x) / (high_p - low_p)
        hr = degrade.crop_to_multiple(x, r, axes=axes)
        lr = degrade.downscale(hr, r, axes=axes)
        lo, hi = float(hr.min()), float(hr.max())

        def psnr(y):
            return metrics.psnr(hr, np.clip(y, lo, hi), data_range=hi - lo)

        lanczos_hr = baselines.upscale(lr, r, "lanczos", args.mode)
        lanczos = psnr(lanczos_hr)
        window = intensity.window(lr)
        row = [psnr(window.denormalise(upscaling.upscale_normalised(window.normalise(lr), b, mode=args.mode,
                                                                    planes=planes, ensemble=args.ensemble,
                                                                    consistency=args.consistency)))
               - lanczos
               for b, planes in zip(bundles, variant_planes)]
        if args.consistency:
            row.append(psnr(degrade.make_consistent(lanczos_hr, lr.astype(np.float32), r, axes)) - lanczos)
        margins.append(row)
        print(f"{name[:24]:24s} {str(hr.shape):16s} {lanczos:6.2f}  " + "  ".join(f"{m:+.{args.decimals}f}" for m in row)
              + f"   noise {sigma:.4f}", flush=True)
    print(f"{'mean':24s} {'':16s} {'':6s}  " + "  ".join(f"{m:+.3f}" for m in np.mean(margins, axis=0)))


if __name__ == "__main__":
    main()
