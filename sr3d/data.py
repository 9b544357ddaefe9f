"""Training data: (LR patch, HR patch) pairs from scans, as a deterministic `tf.data` pipeline.

Stage `hw` learns from axial slices: the HR slice and its LR twin degraded
on H and W (antialiased bicubic, `sr3d.degrade`). Stage `d` learns from planes
that contain the depth axis, (D, W) for every row and (D, H) for every
column, degraded along D only: at inference stage `d` sees the output of
stage `hw`, which is already fine in-plane.

Patches are cut from the LR plane with a one-pixel halo so the 3x3 blur
augmentation sees real neighbours, not a padded border. Patches whose HR
target is flat (intensity span below `min_contrast` in normalised units:
air around the head, background outside the body) are rejected and
redrawn: they make up most of a scan. `flat_fraction` keeps that share of
each batch flat on purpose, so the network also learns that a flat input
(the exact zeros around a skull-stripped brain) stays flat: without any, a
network may add a constant offset there that PSNR hardly sees and SSIM
punishes (docs/model_card.md).

With `flip_rotate`, each (LR, HR) pair is also flipped and rotated at random
(8 transforms for stage `hw`, the 4 flips that keep depth in place for stage
`d`; `sr3d.transforms`). The paper did not do this; its self-ensemble then
feeds the network orientations it never saw (docs/results.md).

Every batch is drawn from its own generator seeded by (seed, epoch, step), so
the same seed gives the same batches, and training resumed at any step sees
exactly the batches an uninterrupted run would have seen.

With `noise_probability`, that share of the patches with contrast gets white Gaussian noise of
sigma ~ U(0, max_noise) (normalised units) added to its HR, and the LR gets exactly the
degraded copy of that noise, as if the noisy scan had been degraded: the noise is drawn on an HR
region `NOISE_MARGIN` LR pixels wider than the LR patch and its halo on every side, downscaled
with the training degradation, and cut. The target is then the noisy HR: the noise the LR still
shows (its low-pass part) is to be kept, its fine part cannot be predicted, so the network learns
not to sharpen noise. The 1 mm training scans are 2-7x cleaner than 1 mm scans of other sites
(docs/model_card.md, "Noise augmentation"). Flat patches stay exact (see `flat_fraction`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator, Sequence

import numpy as np

from sr3d import degrade, transforms

STAGES = ("hw", "d")
BLUR_MODES = ("random", "fixed", "none")
# LR pixels of noise drawn beyond the patch's halo on each side, so that the degraded noise in the
# patch is what the whole noisy plane would give: the degradation's kernel reaches 2 LR pixels.
NOISE_MARGIN = 3


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """How training patches are cut and augmented."""

    stage: str
    scale: int
    patch_size: int = 7
    batch_size: int = 128
    blur: str = "random"            # random sigma (paper), fixed sigma (ablation) or none
    blur_probability: float = 0.5
    max_sigma: float = 0.5          # random: sigma ~ U(0, max_sigma); fixed: sigma = max_sigma
    min_contrast: float = 0.02      # HR patches with max - min below this are redrawn...
    flat_fraction: float = 0.0      # ...except this fraction of each batch, kept flat on purpose
    flip_rotate: bool = False       # random flips/rotations of each pair (not in the paper)
    noise_probability: float = 0.0  # share of the contrast patches given noise (HR) and its degraded copy (LR)
    max_noise: float = 0.0          # their noise sigma ~ U(0, max_noise), normalised units
    seed: int = 0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not isinstance(self.scale, (int, np.integer)) or self.scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {self.scale!r}")
        if self.patch_size < 1 or self.batch_size < 1:
            raise ValueError(f"patch_size and batch_size must be >= 1, got "
                             f"{self.patch_size} and {self.batch_size}")
        if self.blur not in BLUR_MODES:
            raise ValueError(f"blur must be one of {BLUR_MODES}, got {self.blur!r}")
        if not 0.0 <= self.flat_fraction < 1.0:
            raise ValueError(f"flat_fraction must be in [0, 1), got {self.flat_fraction!r}")
        if not 0.0 <= self.noise_probability <= 1.0:
            raise ValueError(f"noise_probability must be in [0, 1], got {self.noise_probability!r}")
        if not self.max_noise >= 0.0:
            raise ValueError(f"max_noise must be >= 0, got {self.max_noise!r}")
        if self.noise_probability > 0 and self.max_noise == 0:
            raise ValueError("noise_probability > 0 needs max_noise > 0 (the noise sigma's upper bound)")

    @property
    def hr_patch_shape(self) -> tuple[int, int]:
        p, r = self.patch_size, self.scale
        return (p * r, p * r) if self.stage == "hw" else (p * r, p)


@dataclasses.dataclass(frozen=True)
class PlaneStack:
    """Aligned LR and HR planes: lr (N, h, w), hr (N, h * ry, w * rx), float32 normalised."""

    lr: np.ndarray
    hr: np.ndarray


def plane_stacks(hr_volume: np.ndarray, stage: str, scale: int) -> list[PlaneStack]:
    """The training planes of one normalised (D, H, W) volume for a stage.

    hw: the D axial slices. d: the (D, W) plane of every row and the (D, H)
    plane of every column, depth first (the stage-d network upsamples axis 0).
    """
    if stage == "hw":
        hr = degrade.crop_to_multiple(hr_volume, scale, axes=(1, 2))
        lr = degrade.downscale(hr, scale, axes=(1, 2))
        return [PlaneStack(lr.astype(np.float32), hr.astype(np.float32))]
    if stage == "d":
        hr = degrade.crop_to_multiple(hr_volume, scale, axes=(0,))
        lr = degrade.downscale_axis(hr, scale, axis=0)
        return [PlaneStack(np.ascontiguousarray(lr.transpose(1, 0, 2), np.float32),
                           np.ascontiguousarray(hr.transpose(1, 0, 2), np.float32)),
                PlaneStack(np.ascontiguousarray(lr.transpose(2, 0, 1), np.float32),
                           np.ascontiguousarray(hr.transpose(2, 0, 1), np.float32))]
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def _blur_kernels(sigmas: np.ndarray) -> np.ndarray:
    """3-tap Gaussian kernels (n, 3), one per sigma; sigma 0 is the identity."""
    sigmas = np.asarray(sigmas, np.float64)
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        side = np.where(sigmas > 0, np.exp(-0.5 / np.maximum(sigmas, 1e-12) ** 2), 0.0)
    return np.stack([side, np.ones_like(side), side], axis=1) / (1.0 + 2.0 * side)[:, None]


def blur_patches(halo_patches: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Separable 3x3 Gaussian blur of (n, p+2, p+2) patches with a halo -> (n, p, p).

    Each patch gets its own sigma; the halo supplies the neighbours (no padding).
    """
    k = _blur_kernels(sigmas).astype(np.float32)
    rows = (k[:, 0, None, None] * halo_patches[:, :-2, :] + k[:, 1, None, None] * halo_patches[:, 1:-1, :]
            + k[:, 2, None, None] * halo_patches[:, 2:, :])
    return (k[:, 0, None, None] * rows[:, :, :-2] + k[:, 1, None, None] * rows[:, :, 1:-1]
            + k[:, 2, None, None] * rows[:, :, 2:]).astype(np.float32)


def degraded_noise(count: int, sigmas: np.ndarray, stage: str, scale: int, patch_size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """White noise for `count` HR patches and its degraded copy for their LR patches with halo.

    Returns (lr_noise (count, p+2, p+2), hr_noise (count, p*ry, p*rx)), float32, patch k with
    standard deviation sigmas[k] at HR. The noise is drawn on an HR region NOISE_MARGIN LR pixels
    wider than the LR halo patch on each side and degraded (`sr3d.degrade.downscale`, on H and W
    for stage hw, along the first axis for stage d), so the LR part is exactly what degrading the
    whole noisy plane would put there.
    """
    p, r, m = patch_size, scale, NOISE_MARGIN
    side = p + 2 + 2 * m                                   # LR pixels of the region
    if stage == "hw":
        region = rng.standard_normal((count, side * r, side * r))
        low = degrade.downscale(region, r, axes=(1, 2))
        lr = low[:, m:m + p + 2, m:m + p + 2]
        hr = region[:, (m + 1) * r:(m + 1 + p) * r, (m + 1) * r:(m + 1 + p) * r]
    else:  # stage d: degraded along the plane's first axis only; the second is at full resolution
        region = rng.standard_normal((count, side * r, p + 2))
        low = degrade.downscale_axis(region, r, axis=1)
        lr = low[:, m:m + p + 2, :]
        hr = region[:, (m + 1) * r:(m + 1 + p) * r, 1:1 + p]
    scale_by = np.asarray(sigmas, np.float64)[:, None, None]
    return (lr * scale_by).astype(np.float32), (hr * scale_by).astype(np.float32)


def random_transforms(lr: np.ndarray, hr: np.ndarray, stage: str,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random transform (one per pair) on LR (n, p, p) and HR (n, p*ry, p*rx) patches."""
    which = rng.integers(0, transforms.COUNT[stage], lr.shape[0])
    lr_out, hr_out = np.empty_like(lr), np.empty_like(hr)
    for k in np.unique(which):
        sel = which == k
        lr_out[sel] = transforms.forward(lr[sel], int(k), stage)
        hr_out[sel] = transforms.forward(hr[sel], int(k), stage)
    return lr_out, hr_out


class PatchSampler:
    """Draws random aligned (LR, HR) patches from normalised volumes.

    stacks: further aligned plane stacks used as they are, for LR made by another
    degradation model (`sr3d.selfsup` degrades in-plane slices by a slice profile);
    their HR must be the LR times (r, r) for stage "hw" or (r, 1) for stage "d".
    """

    def __init__(self, volumes: Sequence[np.ndarray], config: PatchConfig,
                 stacks: Sequence[PlaneStack] = ()):
        self.config = config
        p, r = config.patch_size, config.scale
        self._ry, self._rx = (r, r) if config.stage == "hw" else (r, 1)
        self._lr_padded: list[np.ndarray] = []
        self._hr: list[np.ndarray] = []
        positions = []
        lr_voxels = 0
        # A generator: each volume's planes are made only when its turn comes.
        groups = itertools.chain((plane_stacks(volume, config.stage, r) for volume in volumes), [stacks])
        for group in groups:
            for stack in group:
                n, h, w = stack.lr.shape
                if stack.hr.shape != (n, h * self._ry, w * self._rx):
                    raise ValueError(f"plane stack HR shape {stack.hr.shape} is not its LR shape "
                                     f"{stack.lr.shape} times ({self._ry}, {self._rx}) (stage {config.stage!r})")
                if h < p or w < p:
                    continue
                self._lr_padded.append(np.pad(stack.lr, ((0, 0), (1, 1), (1, 1)), mode="reflect"))
                self._hr.append(stack.hr)
                positions.append(n * (h - p + 1) * (w - p + 1))
                lr_voxels += stack.lr.size
        if not positions:
            raise ValueError(f"no plane is large enough for {p}x{p} LR patches at scale {r}")
        self._weights = np.asarray(positions, np.float64) / np.sum(positions)
        n_orientations = 2 if config.stage == "d" else 1
        # One epoch covers each LR voxel about once: LR voxels / patch area patches.
        self.patches_per_epoch = int(lr_voxels / n_orientations / (p * p))

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.patches_per_epoch / self.config.batch_size))

    def _draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` candidate patches: LR with a 1-px halo (n, p+2, p+2) and HR (n, p*ry, p*rx)."""
        p = self.config.patch_size
        which = rng.choice(len(self._hr), size=count, p=self._weights)
        lr_out = np.empty((count, p + 2, p + 2), np.float32)
        hr_out = np.empty((count, p * self._ry, p * self._rx), np.float32)
        ar_lr = np.arange(p + 2)
        ar_hy, ar_hx = np.arange(p * self._ry), np.arange(p * self._rx)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            lr_pad, hr = self._lr_padded[k], self._hr[k]
            n, h, w = lr_pad.shape[0], lr_pad.shape[1] - 2, lr_pad.shape[2] - 2
            i = rng.integers(0, n, sel.size)
            y = rng.integers(0, h - p + 1, sel.size)
            x = rng.integers(0, w - p + 1, sel.size)
            lr_out[sel] = lr_pad[i[:, None, None], (y[:, None] + ar_lr)[:, :, None],
                                 (x[:, None] + ar_lr)[:, None, :]]
            hr_out[sel] = hr[i[:, None, None], (y[:, None] * self._ry + ar_hy)[:, :, None],
                             (x[:, None] * self._rx + ar_hx)[:, None, :]]
        return lr_out, hr_out

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `step` of `epoch`: LR (B, p, p, 1) and HR (B, p*ry, p*rx, 1), float32."""
        lr, hr, _ = self.batch_with_sigmas(epoch, step)
        return lr, hr

    def batch_with_sigmas(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`batch` plus the blur sigma each LR patch got (0: not blurred)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, step])
        n_flat = int(round(cfg.flat_fraction * cfg.batch_size))
        wanted = {True: cfg.batch_size - n_flat, False: n_flat}   # keyed by "has contrast"
        parts = {True: [], False: []}
        have = {True: 0, False: 0}
        for _ in range(20):
            lr, hr = self._draw(rng, 2 * cfg.batch_size)
            contrast = (hr.max(axis=(1, 2)) - hr.min(axis=(1, 2))) >= cfg.min_contrast
            for kind, sel in ((True, contrast), (False, ~contrast)):
                if wanted[kind]:
                    parts[kind].append((lr[sel], hr[sel]))
                    have[kind] += int(sel.sum())
            if all(have[kind] >= wanted[kind] for kind in parts):
                break
        else:  # too few of a kind: take what we have, topped up with the last draw as it is
            for kind in parts:
                parts[kind].append((lr, hr))
        chosen = [(np.concatenate([p[0] for p in parts[kind]])[:wanted[kind]],
                   np.concatenate([p[1] for p in parts[kind]])[:wanted[kind]])
                  for kind in (True, False) if wanted[kind]]
        lr = np.concatenate([c[0] for c in chosen])
        hr = np.concatenate([c[1] for c in chosen])
        if cfg.blur == "none":
            sigmas = np.zeros(cfg.batch_size)
        else:
            blurred = rng.random(cfg.batch_size) < cfg.blur_probability
            drawn = (rng.uniform(0.0, cfg.max_sigma, cfg.batch_size) if cfg.blur == "random"
                     else np.full(cfg.batch_size, cfg.max_sigma))
            sigmas = np.where(blurred, drawn, 0.0)
        if cfg.noise_probability > 0:
            # Own stream: the patches and sigmas stay those of a run without noise. Noise goes
            # in before the blur: the blur augments the LR's point-spread function, which acts
            # on the noisy scan's degraded copy.
            noise_rng = np.random.default_rng([cfg.seed, epoch, step, 2])
            n_contrast = cfg.batch_size - n_flat        # `chosen` puts the contrast patches first
            noisy = noise_rng.random(n_contrast) < cfg.noise_probability
            levels = noise_rng.uniform(0.0, cfg.max_noise, n_contrast)[noisy]
            picked = np.flatnonzero(noisy)
            if picked.size:
                lr_noise, hr_noise = degraded_noise(picked.size, levels, cfg.stage, cfg.scale,
                                                    cfg.patch_size, noise_rng)
                lr[picked] += lr_noise
                hr[picked] += hr_noise
        lr = blur_patches(lr, sigmas)
        if cfg.flip_rotate:
            # Own stream: the patches and sigmas stay those of a run without flip_rotate.
            lr, hr = random_transforms(lr, hr, cfg.stage, np.random.default_rng([cfg.seed, epoch, step, 1]))
        return lr[..., None], hr[..., None], sigmas

    def batches(self, epoch: int, start_step: int, stop_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(start_step, stop_step):
            yield self.batch(epoch, step)


def dataset(sampler: PatchSampler, epochs: Sequence[tuple[int, int, int]]):
    """`tf.data.Dataset` of (lr, {"final": hr, "intermediate": hr}) batches.

    epochs: (epoch, first_step, stop_step) triples, in order: what `fit` will
    consume. Batches are produced by the seeded sampler (one Python thread,
    so the order is deterministic) and prefetched while the model trains.
    """
    import tensorflow as tf

    cfg = sampler.config
    hy, hx = cfg.hr_patch_shape

    def generate():
        for epoch, first, stop in epochs:
            for lr, hr in sampler.batches(epoch, first, stop):
                yield lr, {"final": hr, "intermediate": hr}

    p = cfg.patch_size
    hr_spec = tf.TensorSpec((None, hy, hx, 1), tf.float32)
    signature = (tf.TensorSpec((None, p, p, 1), tf.float32),
                 {"final": hr_spec, "intermediate": hr_spec})
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)
