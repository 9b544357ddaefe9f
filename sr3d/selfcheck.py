"""The self-check: how the CNN does against Lanczos on the scan itself, one scale down.

There is no ground truth for a scan a user upscales, but the scan is ground
truth for its own copy downscaled once more by r with the training
degradation (`sr3d.degrade`). Upscaling that copy with the CNN and with
Lanczos and scoring both against the scan (PSNR and SSIM, peak = the scan's
intensity window) tells, cheaply, whether the networks suit this scan.

The naive version of that is not predictive on noisy scans. Downscaling the
scan once more averages away most of the noise at its finest scale, so the
self-check input is far cleaner than the scan the network will really get,
and its target holds less noise than a finer scan would: a CNN that sharpens
noise then looks good on the self-check and loses in reality (on a chest CT
the naive check said +3.3 dB where the real margin was -2.1 dB). So the
self-check is made noise-matched:

  1. sigma: the scan's own noise at its finest scale, from a robust statistic
     of its high-pass band (Immerkaer's 3x3 Laplacian-difference kernel on every
     slice, median absolute response over voxels where it is not exactly 0, so
     exact-zero or clipped background is ignored, scaled to a Gaussian sigma).
  2. target T = scan + white Gaussian noise (seeded) of the level that makes the
     self-check input D(T) carry the scan's own fine-scale noise sigma: the
     network is tested on input as noisy as what it will get, and the target
     holds noise it cannot predict, as a finer scan would.
  3. the CNN and Lanczos upscale D(T); both are clipped to the scan's range and
     scored against T.

Cost: the check runs on the scan's central slab (3D) or on evenly spaced
slices (2D), sized so it costs about `COST_FRACTION` of the upscale itself.
One-axis modes ("d", "h", "w": stage d alone) degrade and upscale only that axis,
on evenly spaced planes across it (rows for "d", slices for "h" and "w").
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from scipy import ndimage

from sr3d import baselines, degrade, intensity, metrics

COST_FRACTION = 0.08      # share of the upscale's network work the self-check may add
MIN_SLICES = 8            # of the scan, along D, used by the check
MIN_SIDE = 8              # LR pixels: the check runs on smaller slices than upscale accepts (a coarse check)
SSIM_SLICES = 24          # slices SSIM is computed on
SSIM_MIN_SIDE = 11        # the Gaussian SSIM window (sr3d.metrics)
# Immerkaer (1996): this kernel is orthogonal to planes and linear ramps; on white noise of
# sigma its response has sigma 6 sigma (sum of squared taps 36).
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_MAD_TO_SIGMA = 1.0 / 0.6744897501960817


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    """Scores on the scan downscaled once more (normalised units: PSNR peak 1 = the window)."""

    scale: int
    mode: str
    cnn_psnr: float
    lanczos_psnr: float
    cnn_ssim: float
    lanczos_ssim: float
    noise_sigma: float        # the scan's fine-scale noise, scanner units
    added_noise: float        # sigma of the white noise added to the target, scanner units
    slices: tuple[int, int]   # [first, stop) of the scan's slices the check used (3d), or (count, 0) (2d)
    seconds: float

    @property
    def margin_db(self) -> float:
        return self.cnn_psnr - self.lanczos_psnr

    @property
    def ssim_margin(self) -> float:
        return self.cnn_ssim - self.lanczos_ssim

    @property
    def cnn_loses(self) -> bool:
        """True when the CNN scores below Lanczos in PSNR. (The SSIM margin is reported but not
        used: with added noise it fell below 0 on a scan whose real SSIM margin was positive.)"""
        return self.margin_db < 0

    def line(self) -> str:
        return (f"self-check on this scan (downscaled x{self.scale}, {self.mode}): CNN {self.margin_db:+.2f} dB "
                f"PSNR, {self.ssim_margin:+.4f} SSIM vs Lanczos")

    def to_json(self) -> dict:
        return {"scale": self.scale, "mode": self.mode,
                "cnn": {"psnr_db": round(self.cnn_psnr, 4), "ssim": round(self.cnn_ssim, 5)},
                "lanczos": {"psnr_db": round(self.lanczos_psnr, 4), "ssim": round(self.lanczos_ssim, 5)},
                "margin_db": round(self.margin_db, 4), "ssim_margin": round(self.ssim_margin, 5),
                "cnn_loses": self.cnn_loses,
                "noise_sigma": round(self.noise_sigma, 6), "added_noise_sigma": round(self.added_noise, 6),
                "slices": list(self.slices), "seconds": round(self.seconds, 3),
                "what": "the scan downscaled once more by the factor (antialiased bicubic, as in training), "
                        "noise-matched (docs/model_card.md), upscaled by the CNN and by Lanczos and scored "
                        "against the scan; PSNR peak and SSIM range = the scan's intensity window"}


def noise_sigma(array: np.ndarray) -> float:
    """Robust estimate of the white-noise sigma of a (D, H, W) (or (H, W)) array, its units.

    The median absolute response of Immerkaer's kernel on each slice, over the voxels where
    the response is not exactly 0 (flat background), scaled to a Gaussian sigma. 0 for an
    array without any such voxel.
    """
    array = np.asarray(array, np.float32)
    if array.ndim == 2:
        array = array[None]
    if min(array.shape[1:]) < 3:
        return 0.0
    response = ndimage.correlate(array, _NOISE_KERNEL[None], mode="nearest")[:, 1:-1, 1:-1]
    magnitudes = np.abs(response[response != 0])
    if magnitudes.size == 0:
        return 0.0
    return float(np.median(magnitudes) * _MAD_TO_SIGMA / 6.0)


def _region(shape: tuple[int, int, int], scale: int, mode: str) -> tuple[slice | np.ndarray, tuple[int, int]]:
    """The slices of the scan the check uses: a central slab along D (3d), evenly spaced slices (2d,
    h, w), evenly spaced rows ("d": every plane the network sees is a (D, W) plane of one row)."""
    if mode == "d":
        share = min(1.0, COST_FRACTION * scale)
        count = min(shape[1], max(MIN_SLICES, int(round(share * shape[1]))))
        picks = np.unique(np.linspace(0, shape[1] - 1, count).round().astype(int))
        return (slice(None), picks), (int(picks.size), 0)
    d = shape[0]
    axes_upscaled = len(degrade.MODE_AXES[mode])
    # The check upscales 1/r^k of the data to the scan's size: a share c of the scan costs
    # c / r^k of the upscale (k = 3 axes in 3d, 2 in 2d).
    share = min(1.0, COST_FRACTION * scale ** axes_upscaled)
    count = min(d, max(MIN_SLICES, int(round(share * d))))
    if mode == "3d":
        count = min(d - d % scale, max(count - count % scale, 2 * scale))
        first = (d - count) // 2
        return slice(first, first + count), (first, first + count)
    picks = np.unique(np.linspace(0, d - 1, count).round().astype(int))
    return picks, (int(picks.size), 0)


def check_size(shape: tuple[int, int, int], scale: int, mode: str, min_side: int = MIN_SIDE) -> str | None:
    """Why the scan is too small for a self-check (its copy downscaled once more must still fit
    the network), or None."""
    axes = degrade.MODE_AXES[mode]
    small = [shape[a] // scale for a in axes]
    if len(axes) == 1:
        if small[0] < 2:
            return f"too few voxels ({shape[axes[0]]}) along {mode.upper()} to downscale once more by {scale}"
        scored = (shape[0], shape[2]) if mode == "d" else shape[1:]   # the planes SSIM is computed on
        if min(scored) < SSIM_MIN_SIDE:
            return (f"the {'(D, W)' if mode == 'd' else '(H, W)'} planes ({scored[0]} x {scored[1]}) are smaller "
                    f"than the SSIM window ({SSIM_MIN_SIDE} px)")
        return None
    if mode == "3d" and shape[0] // scale < 2:
        return f"too few slices ({shape[0]}) to downscale once more by {scale}"
    if min(small[-2:]) < min_side:
        return (f"slices of {shape[1]} x {shape[2]} downscaled once more by {scale} are smaller than the "
                f"network's receptive field ({min_side} px)")
    return None


NOISE_MODELS = ("measured", "white", "none")


def noise_matched_pair(scan: np.ndarray, scale: int, axes, seed: int = 0, noise: str = "measured",
                       sigma: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(target, input, s): the scan plus white noise of sigma s (seeded), and that target
    downscaled by `scale` along `axes`, with s chosen so the input carries the scan's own
    fine-scale noise sigma (`noise_sigma`). scan: float32, its length along `axes` divisible by scale.

    noise "measured" (default): the noise left in D(scan) is measured with the same estimator
    and s * g tops it up to sigma (g: the estimate of D on unit white noise). The estimator
    also counts D(scan)'s structure as noise, so this adds noise only where the scan is
    clearly noisy (studyforrest 7T, chest CT) and leaves clean scans as the naive check does.
    "white": the scan's noise is taken as white, so D leaves g * sigma of it, topped up to
    sigma; on clean MR the estimate of sigma is mostly structure and this adds far too much
    (measured: self-check near 0 dB where the real margin is +2.4 dB). "none": the naive
    pair (target = scan, s = 0). Accuracy of each: docs/model_card.md.
    sigma: `noise_sigma(scan)` if the caller has it already.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    scan = np.asarray(scan, np.float32)
    clean_input = degrade.downscale_float32(scan, scale, axes)
    if noise == "none":
        return scan, clean_input, 0.0
    sigma = noise_sigma(scan) if sigma is None else sigma
    unit = np.random.default_rng(seed).standard_normal(scan.shape, dtype=np.float32)
    unit_input = degrade.downscale_float32(unit, scale, axes)
    gain = noise_sigma(unit_input)
    left = gain * sigma if noise == "white" else noise_sigma(clean_input)
    # D is linear: the input's noise is what D leaves of the scan's and s * D(unit), combined.
    s = math.sqrt(max(sigma ** 2 - left ** 2, 0.0)) / gain if gain > 0 else 0.0
    return scan + np.float32(s) * unit, clean_input + np.float32(s) * unit_input, s


def self_check(array: np.ndarray, upscale_normalised, scale: int, mode: str = "3d", *, seed: int = 0,
               min_side: int = MIN_SIDE, noise: str = "measured") -> SelfCheck | None:
    """The noise-matched self-check of a scan; None if the scan is too small for it.

    array: float32 (D, H, W), scanner units (the scan to be upscaled).
    upscale_normalised: the CNN as a function, normalised (D, H, W) -> upscaled by `scale`
        in `mode` (e.g. `functools.partial(sr3d.upscaling.upscale_normalised, models=bundle, mode=mode)`).
    min_side: the smallest slice side the network takes (its receptive field).
    noise: how the pair is noise-matched (`noise_matched_pair`): "measured" (default),
        "white", or "none" for the naive check, kept to measure what the matching buys.
    """
    checks = self_checks(array, lambda lr: {"cnn": upscale_normalised(lr)}, scale, mode, seed=seed,
                         min_side=min_side, noise=noise)
    return None if checks is None else checks["cnn"]


def self_checks(array: np.ndarray, candidates, scale: int, mode: str = "3d", *, seed: int = 0,
                min_side: int = MIN_SIDE, noise: str = "measured") -> dict[str, SelfCheck] | None:
    """`self_check` of several upscalers on one and the same pair: the region, the noise-matched
    pair, Lanczos and its scores are made once. candidates: normalised LR -> {name: its upscaled
    output} (one call, so candidates can share work, e.g. the passes of `sr3d.upscaling`'s planes
    "dw" and "all"). Returns {name: SelfCheck} (seconds: the whole check), or None if the scan is
    too small."""
    start = time.perf_counter()
    array = np.asarray(array, np.float32)
    if mode not in degrade.MODE_AXES:
        raise ValueError(f"mode must be one of {tuple(degrade.MODE_AXES)}, got {mode!r}")
    if check_size(array.shape, scale, mode, min_side) is not None:
        return None
    axes = degrade.MODE_AXES[mode]
    win = intensity.window(array)
    index, slices = _region(array.shape, scale, mode)
    scan = degrade.crop_to_multiple(win.normalise(array[index]), scale, axes).astype(np.float32)
    lo, hi = win.normalise(np.array([array.min(), array.max()], np.float32))

    sigma = noise_sigma(scan)
    target, lr, s = noise_matched_pair(scan, scale, axes, seed, noise, sigma=sigma)

    outputs = {name: np.clip(out, lo, hi) for name, out in candidates(lr).items()}
    lanczos = np.clip(baselines.upscale(lr, scale, "lanczos", mode=mode), lo, hi)
    # SSIM (the slow score) on at most SSIM_SLICES evenly spaced slices; PSNR on all.
    if mode == "d":  # SSIM on the (D, W) planes, the ones the network upscaled
        target, lanczos = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (target, lanczos))
        outputs = {name: np.ascontiguousarray(out.transpose(1, 0, 2)) for name, out in outputs.items()}
    some = np.unique(np.linspace(0, target.shape[0] - 1, min(SSIM_SLICES, target.shape[0])).round().astype(int))

    def score(out: np.ndarray) -> tuple[float, float]:
        return metrics.psnr(target, out, 1.0), metrics.ssim(target[some], out[some], 1.0)

    lanczos_psnr, lanczos_ssim = score(lanczos)
    width = win.hi - win.lo
    checks = {}
    for name, out in outputs.items():
        psnr, ssim = score(out)
        checks[name] = SelfCheck(scale=scale, mode=mode, cnn_psnr=psnr, lanczos_psnr=lanczos_psnr, cnn_ssim=ssim,
                                 lanczos_ssim=lanczos_ssim, noise_sigma=sigma * width, added_noise=s * width,
                                 slices=slices, seconds=0.0)
    seconds = time.perf_counter() - start
    return {name: dataclasses.replace(check, seconds=seconds) for name, check in checks.items()}
