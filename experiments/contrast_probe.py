"""Probe (issue 11, a lever for the 1 mm other-site cells): does random contrast in training help
the shipped stage hw generalise across sites? Not a feature of sr3d: the probe patches the
sampler here, and nothing it trains is shipped.

  python experiments/contrast_probe.py --min_gain 0.25 --probability 0.5 --out runs/contrast/hw_x2_c25
  python experiments/contrast_probe.py --probability 0 --out runs/contrast/hw_x2_ctrl     # the control
  python experiments/compare_variants.py --mode 2d --scale 2 --decimals 3 shipped \
      runs/contrast/hw_x2_ctrl/model.keras:ship runs/contrast/hw_x2_c25/model.keras:ship

Stage hw is fine-tuned from the shipped weights as the other levers were (6 x 250 steps, Adam 1e-4
then 5e-5, seed 0, 10% flat patches, the corpus of experiments/corpus.py). A share `probability`
of the patches with contrast has its HR and LR mapped alike by x -> a x + b, a log-uniform in
[min_gain, 1], b uniform in [0, 1 - a]: the window [0, 1] lands inside itself with less contrast,
as in a whole-head scan whose bright scalp fat takes the top of the window. The map is exact on
the pairs: the degradation is linear and its weights sum to 1. It has its own random stream, so
the patches, blur and flat share are those of the control.
"""
import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sr3d import data, files, training  # noqa: E402


def with_contrast(batch_with_sigmas, min_gain: float, probability: float):
    def batch(self, epoch, step):
        lr, hr, sigmas = batch_with_sigmas(self, epoch, step)
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, step, 3])
        n_contrast = cfg.batch_size - int(round(cfg.flat_fraction * cfg.batch_size))  # contrast patches first
        picked = rng.random(n_contrast) < probability
        gain = np.exp(rng.uniform(np.log(min_gain), 0.0, n_contrast))
        offset = rng.uniform(0.0, 1.0, n_contrast) * (1 - gain)
        gain = np.where(picked, gain, 1.0).astype(np.float32)[:, None, None, None]
        offset = np.where(picked, offset, 0.0).astype(np.float32)[:, None, None, None]
        lr[:n_contrast] = lr[:n_contrast] * gain + offset
        hr[:n_contrast] = hr[:n_contrast] * gain + offset
        return lr, hr, sigmas
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--min_gain", type=float, default=0.25)
    parser.add_argument("--probability", type=float, default=0.5, help="0: the control, no contrast change")
    args = parser.parse_args()
    if not 0 < args.min_gain <= 1 or not 0 <= args.probability <= 1:
        parser.error("--min_gain must be in (0, 1] and --probability in [0, 1]")
    if args.probability > 0:
        data.PatchSampler.batch_with_sigmas = with_contrast(data.PatchSampler.batch_with_sigmas,
                                                            args.min_gain, args.probability)
    config = training.TrainConfig(
        data=files.expand_scans(["runs/corpus/train"]), val_data=files.expand_scans(["runs/corpus/val"]),
        model_dir=args.out, stage="hw", scale=args.scale, epochs=6, steps_per_epoch=250, learning_rate=1e-4,
        learning_rate_after_drop=5e-5, flat_fraction=0.1, seed=0,
        init_model=f"sr3d/data_files/models/x{args.scale}/hw.keras")
    print(f"saved {training.train(config)}")


if __name__ == "__main__":
    main()
