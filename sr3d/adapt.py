"""Test-time adaptation (`sr3d upscale --adapt`): fine-tune a bundle on the scan itself.

A scan the shipped networks never met (another scanner, resolution, noise
level) may lose to interpolation. The scan is its own training data one scale
down: the scan as HR and its copy downscaled by r with the training
degradation as LR, noise-matched as in the self-check (`sr3d.selfcheck`), so
the LR pairs are as noisy as the input the networks will really get. Stage hw
is fine-tuned on its slices and, in 3D, stage d on the stage-hw outputs
(cascade) along depth, with the shipped recipe's loss, patches, blur and flat
share, Adam at a small learning rate, for a time or step budget.

Adaptation must not be applied blindly: it can also make things worse (on a
held-out abdominal CT a 120 s probe cut the margin over Lanczos from +1.05 to
+0.12 dB). So a slab of the scan's rows is held out of the adaptation pairs, and the
adapted bundle is used only as a repair: when, upscaling that slab's own
downscaled copy, the bundle it started from scores below Lanczos, and the
adapted one scores higher PSNR than it and no lower SSIM. Otherwise the
original bundle is used; all scores are reported. Gains measured one scale
down did not carry over where the un-adapted model already won: +0.27 dB on
the held-out rows was -0.62 dB against the ground truth on a 1 mm chest CT,
+0.44 dB held out was +0.85 dB real on a 1 mm whole-head T1, and a kept
adaptation of the new bundles cost that scan 0.19 dB (docs/model_card.md), so
no held-out threshold was safe on our test scans (`min_gain_db` sets one).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from sr3d import baselines, data, degrade, intensity, metrics, selfcheck, upscaling

_MIN_TRAIN_LR_ROWS = 7          # the LR patch side: the rows left for training must hold one patch


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """How a bundle is fine-tuned on one scan."""

    seconds: float = 120.0          # wall-time budget of the fine-tuning (both stages)
    steps: int | None = None        # a fixed number of steps instead (reproducible); split between stages
    learning_rate: float = 1e-4
    batch_size: int = 64
    holdout: float = 0.2            # share of the scan's rows held out to decide whether to keep it
    hw_share: float = 0.6           # share of the budget for stage hw in 3D (2D: all of it)
    flat_fraction: float = 0.1
    min_gain_db: float | None = None  # held-out PSNR gain that keeps the adapted networks even where the
                                      # un-adapted model beats Lanczos; None: never (see the module doc)
    seed: int = 0

    def __post_init__(self):
        if not self.seconds > 0:
            raise ValueError(f"adapt seconds must be > 0, got {self.seconds!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) != self.steps
                                       or self.steps < 1):
            raise ValueError(f"adapt steps must be an integer >= 1, got {self.steps!r}")
        if not 0 < self.holdout < 0.5:
            raise ValueError(f"holdout must be in (0, 0.5), got {self.holdout!r}")


@dataclasses.dataclass
class AdaptResult:
    bundle: object                  # the bundle to use: adapted if kept, else the original
    adapted: object                 # the adapted bundle, kept or not
    kept: bool
    original_psnr: float            # on the held-out slab's downscaled copy (normalised, peak 1)
    adapted_psnr: float
    original_ssim: float
    adapted_ssim: float
    lanczos_psnr: float
    steps: dict
    seconds: float
    reason: str

    def line(self) -> str:
        verdict = "kept" if self.kept else "not kept"
        return (f"adaptation ({self.steps.get('hw', 0)} + {self.steps.get('d', 0)} steps, {self.seconds:.0f} s): "
                f"held-out rows {self.adapted_psnr - self.original_psnr:+.2f} dB vs the un-adapted model, "
                f"{self.adapted_psnr - self.lanczos_psnr:+.2f} dB vs Lanczos: {verdict} ({self.reason})")

    def to_json(self) -> dict:
        return {"kept": self.kept, "reason": self.reason, "steps": self.steps, "seconds": round(self.seconds, 2),
                "held_out": {"original_psnr_db": round(self.original_psnr, 4),
                             "adapted_psnr_db": round(self.adapted_psnr, 4),
                             "original_ssim": round(self.original_ssim, 5), "adapted_ssim": round(self.adapted_ssim, 5),
                             "lanczos_psnr_db": round(self.lanczos_psnr, 4),
                             "what": "the held-out rows of the scan, downscaled once more (noise-matched), upscaled "
                                     "and scored against themselves; normalised units, peak 1"}}


def _split_rows(h: int, scale: int, min_rows: int, share: float) -> tuple[int, int] | None:
    """[a, b) HR rows held out: a central slab of about `share` of the rows, a multiple of r,
    at least `min_rows`; None if the rest would be too small to learn from."""
    rows = max(int(round(share * h)), min_rows)
    rows -= rows % scale
    if rows < min_rows or h - rows < _MIN_TRAIN_LR_ROWS * scale:
        return None
    a = (h - rows) // 2
    a -= a % scale
    return a, a + rows


def _clone(model):
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _fine_tune(model, stacks: list[data.PlaneStack], stage: str, scale: int, config: AdaptConfig,
               deadline: float, max_steps: int | None, log: Callable[[str], None]) -> int:
    """Adam on patches of `stacks` until `deadline` (perf_counter) or `max_steps`; returns the steps run."""
    import keras
    import tensorflow as tf

    from sr3d import training

    sampler = data.PatchSampler([], data.PatchConfig(stage=stage, scale=scale, batch_size=config.batch_size,
                                                     flat_fraction=config.flat_fraction, seed=config.seed),
                                stacks=stacks)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)

    @tf.function
    def step(lr, hr):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(training.two_term_loss(hr, model(lr, training=True), 1.0))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    done, losses = 0, []
    while (max_steps is None and time.perf_counter() < deadline) or (max_steps is not None and done < max_steps):
        lr, hr = sampler.batch(0, done)
        losses.append(float(step(tf.constant(lr), tf.constant(hr))))
        done += 1
        if done % 100 == 0:
            log(f"adapting stage {stage}: step {done}, loss {np.mean(losses[-100:]):.4f}")
    return done


def adapt(array: np.ndarray, bundle, mode: str = "3d", config: AdaptConfig = AdaptConfig(),
          log: Callable[[str], None] = lambda line: None, upscale_fn=None) -> AdaptResult:
    """Fine-tunes `bundle` (an `sr3d.models.ModelBundle`) on the scan `array` and decides
    on held-out rows whether to keep the result.

    array: float32 (D, H, W), scanner units. upscale_fn(normalised, bundle) -> upscaled in `mode`
    (default `sr3d.upscaling.upscale_normalised`). Raises ValueError if the scan is too small.
    """
    import keras

    from sr3d import training
    from sr3d import models as sr3d_models

    start = time.perf_counter()
    if mode not in degrade.MODE_AXES:
        raise ValueError(f"mode must be one of {tuple(degrade.MODE_AXES)}, got {mode!r}")
    upscale_fn = upscale_fn or (lambda x, b: upscaling.upscale_normalised(x, b, mode=mode))
    r, axes = bundle.scale, degrade.MODE_AXES[mode]
    min_lr = selfcheck.MIN_SIDE
    win = intensity.window(array)
    scan = degrade.crop_to_multiple(win.normalise(array), r, axes).astype(np.float32)
    if mode == "3d" and scan.shape[0] // r < 2:
        raise ValueError(f"--adapt in 3D needs at least {2 * r} slices, got {array.shape[0]}")
    split = _split_rows(scan.shape[1], r, min_lr * r, config.holdout)
    if split is None or scan.shape[2] // r < min_lr:
        raise ValueError(f"the scan ({' x '.join(map(str, array.shape))}) is too small to adapt on at scale {r}: "
                         f"its copy downscaled by {r} must leave {min_lr} held-out rows and {_MIN_TRAIN_LR_ROWS} training rows")
    a, b = split
    target, lr_input, _ = selfcheck.noise_matched_pair(scan, r, axes, config.seed)
    parts = [(target[:, :a], lr_input[:, :a // r]), (target[:, b:], lr_input[:, b // r:])]
    parts = [(t, x) for t, x in parts if x.shape[1] >= _MIN_TRAIN_LR_ROWS]
    if not parts:
        raise ValueError(f"the scan ({' x '.join(map(str, array.shape))}) is too small to adapt on at scale {r}: "
                         f"the rows beside the held-out ones are fewer than {_MIN_TRAIN_LR_ROWS} px per side")
    held_target, held_input = target[:, a:b], lr_input[:, a // r:b // r]

    keras.utils.set_random_seed(config.seed)
    adapted = sr3d_models.ModelBundle(hw=_clone(bundle.hw), d=_clone(bundle.d), scale=r,
                                      info={**bundle.info, "adapted": True})
    steps_total = config.steps
    hw_share = config.hw_share if mode == "3d" else 1.0
    deadline_hw = start + config.seconds * hw_share
    # Stage hw: the slices of each part, degraded in-plane only (as stage hw is trained).
    hw_stacks = []
    for t, _ in parts:
        hr = degrade.crop_to_multiple(t, r, (1, 2))
        hw_stacks.append(data.PlaneStack(degrade.downscale_float32(hr, r, (1, 2)), np.ascontiguousarray(hr)))
    steps = {"hw": _fine_tune(adapted.hw, hw_stacks, "hw", r, config, deadline_hw,
                              None if steps_total is None else max(1, int(round(steps_total * hw_share))), log)}
    if mode == "3d":
        # Stage d: the (D, W) planes of each part's stage-hw output (cascade), as in 3D inference.
        d_stacks = []
        for t, x in parts:
            in_plane = training.predict_planes(adapted.hw, x)
            d_stacks.append(data.PlaneStack(np.ascontiguousarray(in_plane.transpose(1, 0, 2)),
                                            np.ascontiguousarray(t.transpose(1, 0, 2))))
        steps["d"] = _fine_tune(adapted.d, d_stacks, "d", r, config, start + config.seconds,
                                None if steps_total is None else max(1, steps_total - steps["hw"]), log)

    lo, hi = win.normalise(np.array([array.min(), array.max()], np.float32))
    scores = {}
    for name, candidate in (("original", bundle), ("adapted", adapted)):
        out = np.clip(upscale_fn(held_input, candidate), lo, hi)
        scores[name] = (metrics.psnr(held_target, out, 1.0), metrics.ssim(held_target, out, 1.0))
    lanczos = np.clip(baselines.upscale(held_input, r, "lanczos", mode=mode), lo, hi)
    lanczos_psnr = metrics.psnr(held_target, lanczos, 1.0)
    gain = scores["adapted"][0] - scores["original"][0]
    ssim_gain = scores["adapted"][1] - scores["original"][1]
    needed = scores["original"][0] < lanczos_psnr
    enough = (needed and gain > 0) or (config.min_gain_db is not None and gain >= config.min_gain_db)
    kept = enough and ssim_gain >= 0
    if kept:
        reason = f"held-out gain {gain:+.2f} dB" + (" where the un-adapted model lost to Lanczos" if needed else "")
    elif enough:
        reason = "lower SSIM on the held-out rows"
    elif needed:
        reason = f"held-out gain {gain:+.2f} dB is not a gain"
    else:
        reason = f"held-out gain {gain:+.2f} dB, but the un-adapted model already beats Lanczos there"
    return AdaptResult(bundle=adapted if kept else bundle, adapted=adapted, kept=kept, original_psnr=scores["original"][0],
                       adapted_psnr=scores["adapted"][0], original_ssim=scores["original"][1],
                       adapted_ssim=scores["adapted"][1], lanczos_psnr=lanczos_psnr, steps=steps,
                       seconds=time.perf_counter() - start, reason=reason)
