"""Image quality metrics (PSNR, SSIM, IFC) and the two protocols that score a volume.

Definitions (complete here; no outside document needed):
- PSNR: 10 log10(L^2 / MSE) with an explicit peak L (`data_range`), never assumed.
- SSIM: Wang et al. 2004 (`ssim_index.m`): 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, population statistics, mean of the 'valid' map; or,
  with `gaussian=False`, scikit-image's default variant (7x7 uniform window,
  sample covariance) that the authors' evaluation code used.
- IFC: Sheikh, Bovik and de Veciana 2005, a port of LIVE `ifcvec.m` checked
  against the golden values of the original MATLAB code.

Slices of a volume are its (H, W) planes along D. Everything is float64 inside.
"""
import dataclasses
import functools
import math
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

# Slices converted to float64 and filtered together: bounds memory on 352 x 512 x 512 volumes.
_CHUNK_SLICES = 16

# IFC (ifcvec.m): 4-level steerable pyramid of order 5 (sp5Filters, 6 orientations),
# orientations 0 and 3 (0 and 90 degrees) at every level, 3x3 vectors.
_IFC_LEVELS = 4
_IFC_BANDS = (0, 3)
_IFC_BLOCK = 3
_IFC_TOL = 1e-15
_IFC_NOISE_FLOOR = 1e-10
_IFC_MIN_SIDE = 72  # smallest image on which pyrtools can build 4 levels of sp5Filters

_PAPER_PSNR_CAP_DB = 100.0


def _check_pair(reference: np.ndarray, test: np.ndarray, ndims: tuple[int, ...], what: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays, unconverted, after checking that shapes agree and have `ndims` axes."""
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(f"sr3d.metrics.{what}: reference and test must have the same shape, "
                         f"got {reference.shape} and {test.shape}")
    if reference.ndim not in ndims:
        raise ValueError(f"sr3d.metrics.{what}: expected a {' or '.join(f'{n}D' for n in ndims)} "
                         f"array, got shape {reference.shape}")
    return reference, test


def _as_pair(reference: np.ndarray, test: np.ndarray, ndims: tuple[int, ...], what: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float64 after checking shape, dimensionality and finiteness."""
    reference, test = _check_pair(reference, test, ndims, what)
    reference = reference.astype(np.float64, copy=False)
    test = test.astype(np.float64, copy=False)
    for name, array in (("reference", reference), ("test", test)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"sr3d.metrics.{what}: {name} contains NaN or infinite values, "
                             f"got {np.count_nonzero(~np.isfinite(array))} such voxels")
    return reference, test


def _check_data_range(data_range: float, what: str) -> float:
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"sr3d.metrics.{what}: data_range (the peak L) must be a positive "
                         f"number, got {data_range}")
    return float(data_range)


def _check_crop_border(crop_border: int, what: str) -> None:
    is_integer = isinstance(crop_border, (int, np.integer)) and not isinstance(crop_border, bool)
    if not is_integer or crop_border < 0:
        raise ValueError(f"sr3d.metrics.{what}: crop_border must be a non-negative integer, "
                         f"got {crop_border!r}")


def _crop(array: np.ndarray, crop_border: int, what: str) -> np.ndarray:
    """Shave `crop_border` pixels off each side of the last two axes (H, W)."""
    _check_crop_border(crop_border, what)
    if crop_border == 0:
        return array
    if min(array.shape[-2:]) <= 2 * crop_border:
        raise ValueError(f"sr3d.metrics.{what}: crop_border={crop_border} leaves nothing of "
                         f"(H, W) = {array.shape[-2:]}")
    return array[..., crop_border:-crop_border, crop_border:-crop_border]


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float, crop_border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(L^2 / MSE), MSE over all pixels or voxels.

    reference, test: same-shape 2D (H, W) or 3D (D, H, W) arrays, any units.
    data_range: the peak L in the units of the arrays (255 for 8 bits, 1.0 for [0, 1]).
    crop_border: pixels shaved off each side of H and W before scoring.
    Returns inf when the arrays are identical.
    """
    data_range = _check_data_range(data_range, "psnr")
    reference, test = _as_pair(reference, test, (2, 3), "psnr")
    reference = _crop(reference, crop_border, "psnr")
    test = _crop(test, crop_border, "psnr")
    mse = float(np.mean((reference - test) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def _ssim_window(gaussian: bool) -> np.ndarray:
    """1D taps of the separable SSIM window: Gaussian 11 taps sigma 1.5, or uniform 7 taps."""
    if gaussian:
        x = np.arange(-5, 6, dtype=np.float64)
        taps = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    else:
        taps = np.ones(7, dtype=np.float64)
    return taps / taps.sum()


def _ssim_slices(reference: np.ndarray, test: np.ndarray, data_range: float, gaussian: bool
                 ) -> np.ndarray:
    """SSIM of every (H, W) slice of two (D, H, W) float64 stacks, filtered together.

    Returns (D,) float64: the mean of each slice's 'valid' SSIM map.
    """
    taps = _ssim_window(gaussian)
    size = taps.size
    if min(reference.shape[-2:]) < size:
        window = "Gaussian" if gaussian else "uniform"
        raise ValueError(f"sr3d.metrics.ssim: slices must be at least {size}x{size} pixels for "
                         f"the {window} window, got {reference.shape[-2:]}")
    # scikit-image's uniform variant uses the sample covariance (N / (N - 1)); Wang's does not.
    cov_norm = 1.0 if gaussian else size * size / (size * size - 1.0)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    pad = (size - 1) // 2
    valid = (slice(None), slice(pad, -pad), slice(pad, -pad))

    def local_mean(array: np.ndarray) -> np.ndarray:
        out = ndimage.correlate1d(array, taps, axis=1, mode="reflect")
        out = ndimage.correlate1d(out, taps, axis=2, mode="reflect")
        return out[valid]  # only the 'valid' part is kept, so the border mode never matters

    values = np.empty(reference.shape[0], dtype=np.float64)
    for start in range(0, reference.shape[0], _CHUNK_SLICES):
        x = reference[start:start + _CHUNK_SLICES]
        y = test[start:start + _CHUNK_SLICES]
        mu_x, mu_y = local_mean(x), local_mean(y)
        var_x = cov_norm * (local_mean(x * x) - mu_x * mu_x)
        var_y = cov_norm * (local_mean(y * y) - mu_y * mu_y)
        cov_xy = cov_norm * (local_mean(x * y) - mu_x * mu_y)
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                    / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
        values[start:start + x.shape[0]] = ssim_map.mean(axis=(1, 2))
    return values


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float, crop_border: int = 0,
         gaussian: bool = True) -> float:
    """Structural similarity of a 2D image, or the mean over slices of a (D, H, W) volume.

    reference, test: same-shape 2D (H, W) or 3D (D, H, W) arrays.
    data_range: the peak L in the units of the arrays (sets C1 = (0.01 L)^2, C2 = (0.03 L)^2).
    crop_border: pixels shaved off each side of H and W before scoring.
    gaussian: True for Wang et al. 2004 (11x11 Gaussian, sigma 1.5, population statistics,
        equal to scikit-image with gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False); False for scikit-image's defaults (7x7 uniform window,
        sample covariance), the variant of the authors' evaluation code.
    """
    data_range = _check_data_range(data_range, "ssim")
    reference, test = _as_pair(reference, test, (2, 3), "ssim")
    reference = _crop(reference, crop_border, "ssim")
    test = _crop(test, crop_border, "ssim")
    if reference.ndim == 2:
        reference, test = reference[None], test[None]
    return float(np.mean(_ssim_slices(reference, test, data_range, gaussian)))


@functools.cache
def _steerable_tools() -> tuple[Callable, dict]:
    """pyrtools' corrDn and the sp5Filters, imported on first use (pyrtools loads matplotlib)."""
    import pyrtools
    from pyrtools.pyramids.filters import parse_filter
    return pyrtools.corrDn, parse_filter("sp5_filters", normalize=False)


def _ifc_subbands(image: np.ndarray) -> list[np.ndarray]:
    """The 8 subbands IFC uses, finest level first, each cropped to a multiple of 3.

    Same corrDn calls as pyrtools.pyramids.SteerablePyramidSpace(image, height=4, order=5,
    edge_type='reflect1') (buildSpyr in MATLAB), minus the bands and residuals IFC never reads.
    """
    corr_dn, filters = _steerable_tools()
    side = int(math.isqrt(filters["bfilts"].shape[0]))
    band_filters = [filters["bfilts"][:, b].reshape(side, side).T for b in _IFC_BANDS]
    lowpass = corr_dn(image=image, filt=filters["lo0filt"], edge_type="reflect1")
    subbands = []
    for level in range(_IFC_LEVELS):
        for band_filter in band_filters:
            band = corr_dn(image=lowpass, filt=band_filter, edge_type="reflect1")
            height, width = (s - s % _IFC_BLOCK for s in band.shape)
            subbands.append(band[:height, :width])
        if level + 1 < _IFC_LEVELS:
            lowpass = corr_dn(image=lowpass, filt=filters["lofilt"], edge_type="reflect1",
                              step=(2, 2))
    return subbands


def _block_box_sums(arrays: np.ndarray, window: int) -> np.ndarray:
    """Sums over window x window boxes centred on each non-overlapping 3x3 block.

    arrays: (K, H, W) with H, W multiples of 3; borders mirrored without repeating the edge
    pixel (corrDn 'reflect1'; the blocks IFC keeps never reach the mirrored part).
    Returns (K, H / 3, W / 3).
    """
    radius = (window - 1) // 2
    padded = np.pad(arrays, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    centre = _IFC_BLOCK // 2
    rows = sliding_window_view(padded, window, axis=1)[:, centre::_IFC_BLOCK].sum(axis=-1)
    return sliding_window_view(rows, window, axis=2)[:, :, centre::_IFC_BLOCK].sum(axis=-1)


def _ifc_channel(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Gain g and noise variance vv of the distortion channel y = g x + v per 3x3 block."""
    n = window * window
    sums = _block_box_sums(np.stack([x, y, x * y, x * x, y * y]), window)
    mean_x, mean_y = sums[0] / n, sums[1] / n
    cov_xy = sums[2] - n * mean_x * mean_y
    ss_x = np.maximum(sums[3] - n * mean_x ** 2, 0.0)
    ss_y = np.maximum(sums[4] - n * mean_y ** 2, 0.0)
    gain = cov_xy / (ss_x + _IFC_TOL)
    noise = (ss_y - gain * cov_xy) / n
    # Fix-ups in the order of ifcvec.m. Wherever the gain ends at 0 the block adds nothing to
    # IFC, whatever vv is.
    flat_x = ss_x < _IFC_TOL
    gain[flat_x] = 0.0
    noise[flat_x] = ss_y[flat_x]
    flat_y = ss_y < _IFC_TOL
    gain[flat_y] = 0.0
    noise[flat_y] = 0.0
    negative = gain < 0
    noise[negative] = ss_y[negative]
    gain[negative] = 0.0
    noise[noise <= _IFC_TOL] = _IFC_TOL
    return gain, noise


def _ifc_reference_field(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GSM field s per non-overlapping 3x3 block and eigenvalues of the 9x9 vector covariance."""
    m = _IFC_BLOCK
    # All overlapping 3x3 vectors (one per row) give the covariance; the field uses the
    # non-overlapping ones, mean not removed, as ifcvec.m does.
    overlapping = sliding_window_view(x, (m, m)).reshape(-1, m * m)
    count = overlapping.shape[0]
    centred = overlapping - np.ones(count) @ overlapping / count  # column means through BLAS
    covariance = centred.T @ centred / count
    height, width = x.shape
    blocks = x.reshape(height // m, m, width // m, m).swapaxes(1, 2).reshape(-1, m * m)
    try:
        inverse = np.linalg.inv(covariance)
    except np.linalg.LinAlgError:
        # Linearly dependent vectors (e.g. an image constant along one axis): ifcvec.m gives NaN;
        # the pseudo-inverse gives the limit, and a zero subband then adds nothing.
        inverse = np.linalg.pinv(covariance, hermitian=True)
    field = np.einsum("ij,ij->i", blocks @ inverse, blocks) / (m * m)
    eigenvalues = np.linalg.eigvalsh(covariance)
    return field.reshape(height // m, width // m), eigenvalues


def ifc(reference: np.ndarray, test: np.ndarray) -> float:
    """Information fidelity criterion (Sheikh et al. 2005, LIVE ifcvec.m) of a 2D image.

    reference, test: same-shape (H, W) arrays, both sides >= 72 pixels; the reference must not
        be constant.
    Returns the IFC summed over the 8 subbands, divided by the reference's pixel count
    (dimensionless, >= 0, larger is better; identical images give the largest value).
    """
    reference, test = _as_pair(reference, test, (2,), "ifc")
    if min(reference.shape) < _IFC_MIN_SIDE:
        raise ValueError(f"sr3d.metrics.ifc: both image sides must be >= {_IFC_MIN_SIDE} pixels "
                         f"for the 4-level steerable pyramid, got shape {reference.shape}")
    if np.ptp(reference) == 0:
        raise ValueError("sr3d.metrics.ifc: the reference image is constant, so IFC is undefined "
                         f"(ifcvec.m returns NaN), got every pixel = {reference.flat[0]}")
    total = 0.0
    subbands = zip(_ifc_subbands(reference), _ifc_subbands(test))
    for index, (x, y) in enumerate(subbands):
        level = index // len(_IFC_BANDS)  # 0 = finest
        window = 2 ** (_IFC_LEVELS - level) + 1  # 17, 9, 5, 3 px from finest to coarsest
        gain, noise = _ifc_channel(x, y, window)
        field, eigenvalues = _ifc_reference_field(x)
        # Blocks whose window overhangs the subband border are dropped.
        drop = math.ceil((window - 1) / 2 / _IFC_BLOCK)
        inner = (slice(drop, -drop), slice(drop, -drop))
        snr = (gain[inner] ** 2 * field[inner] / (noise[inner] + _IFC_NOISE_FLOOR))
        total += float(np.sum(np.log2(1.0 + snr[..., None] * eigenvalues)))
    return total / reference.size


def per_slice(metric: Callable[..., float], reference: np.ndarray, test: np.ndarray, axis: int = 0,
              **kwargs) -> np.ndarray:
    """`metric(reference_slice, test_slice, **kwargs)` for every 2D slice along `axis`.

    reference, test: same-shape 3D arrays. Returns float64 (n_slices,).
    """
    reference, test = _as_pair(reference, test, (3,), "per_slice")
    if not -3 <= axis < 3:
        raise ValueError(f"sr3d.metrics.per_slice: axis must be 0, 1 or 2, got {axis}")
    reference = np.moveaxis(reference, axis, 0)
    test = np.moveaxis(test, axis, 0)
    return np.array([metric(r, t, **kwargs) for r, t in zip(reference, test)], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a volume is scored: intensity mapping, averaging, border crop, SSIM variant.

    name: "float" (intensities mapped from the fixed per-dataset window `data_range` = (lo, hi)
        in scanner units to [0, 1], clipped, L = 1) or "paper" (each slice mapped to 8 bits
        by the reference slice's min/max, as the authors' code did).
    crop_border: pixels shaved off each side of H and W before anything else.
    with_ifc: compute IFC (needs slices of at least 72 x 72 after the crop; about 5 ms per
        120 x 120 slice).
    """

    name: str
    data_range: tuple[float, float] | None = None
    crop_border: int = 0
    with_ifc: bool = True

    def __post_init__(self):
        if self.name not in ("float", "paper"):
            raise ValueError("sr3d.metrics.Protocol: name must be 'float' or 'paper', "
                             f"got {self.name!r}")
        if self.name == "float":
            if self.data_range is None or len(self.data_range) != 2:
                raise ValueError("sr3d.metrics.Protocol: the float protocol needs "
                                 f"data_range=(lo, hi) in scanner units, got {self.data_range!r}")
            lo, hi = (float(v) for v in self.data_range)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError("sr3d.metrics.Protocol: data_range must be finite with lo < hi, "
                                 f"got {self.data_range!r}")
            object.__setattr__(self, "data_range", (lo, hi))
        elif self.data_range is not None:
            raise ValueError("sr3d.metrics.Protocol: the paper protocol maps each slice by its own "
                             f"min/max and takes no data_range, got {self.data_range!r}")
        _check_crop_border(self.crop_border, "Protocol")

    def describe(self) -> str:
        """One sentence saying how the numbers were computed, to print with every result."""
        crop = (f"{self.crop_border} px shaved off each side of H and W" if self.crop_border
                else "no border crop")
        if self.name == "float":
            lo, hi = self.data_range
            averaged = "SSIM (Wang 2004: 11x11 Gaussian window, sigma 1.5, population statistics)"
            if self.with_ifc:
                averaged += " and IFC (LIVE ifcvec.m)"
            no_ifc = "" if self.with_ifc else "no IFC; "
            return (f"float protocol: intensities mapped from the fixed window [{lo:g}, {hi:g}] "
                    "(scanner units) to [0, 1] and clipped, L = 1; PSNR over all voxels of the "
                    f"volume; {averaged} averaged over the (H, W) slices along D, skipping slices "
                    f"where the reference is constant; {no_ifc}{crop}.")
        ifc_text = ("IFC (LIVE ifcvec.m) averaged over the 8-bit slices" if self.with_ifc
                    else "no IFC")
        return ("paper protocol (as the authors' code): each (H, W) slice mapped to 8 bits by the "
                "reference slice's own min/max (same mapping for the test, rounded, clipped to "
                "0..255), constant reference slices skipped; PSNR with peak 255 per slice, "
                "infinite values set to 100 dB, averaged over slices; SSIM with scikit-image's "
                "defaults (7x7 uniform window, sample covariance, L = 255) averaged over slices; "
                f"{ifc_text}; {crop}.")


def float_protocol(data_range: tuple[float, float], crop_border: int = 0,
                   with_ifc: bool = True) -> Protocol:
    """Scores on intensities mapped from the fixed window (lo, hi) in scanner units to [0, 1]."""
    return Protocol(name="float", data_range=tuple(data_range), crop_border=crop_border,
                    with_ifc=with_ifc)


def paper_protocol(crop_border: int = 0, with_ifc: bool = True) -> Protocol:
    """Scores on 8-bit slices, each mapped by the reference slice's min/max (the authors' code)."""
    return Protocol(name="paper", crop_border=crop_border, with_ifc=with_ifc)


def _to_float_window(volume: np.ndarray, data_range: tuple[float, float]) -> np.ndarray:
    lo, hi = data_range
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0)


def _to_8bit_slices(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both stacks mapped slice by slice with the reference slice's min/max to rounded 0..255.

    Returns float64 arrays holding integer values 0..255 (what uint8 would hold).
    Constant reference slices must be removed beforehand (their mapping is undefined).
    """
    low = reference.min(axis=(1, 2), keepdims=True)
    scale = 255.0 / (reference.max(axis=(1, 2), keepdims=True) - low)
    return tuple(np.clip(np.round((v - low) * scale), 0.0, 255.0) for v in (reference, test))


def score_volume(reference: np.ndarray, test: np.ndarray, protocol: Protocol) -> dict:
    """PSNR, SSIM and IFC of a test volume against its reference under `protocol`.

    reference, test: same-shape (D, H, W) arrays in scanner units; slices are the (H, W)
    planes along D.
    Returns {"psnr", "ssim", "ifc" (None without IFC), "per_slice": {"psnr", "ssim", "ifc"}
    (lists over the scored slices; "ifc" None without IFC), "n_slices" (slices scored),
    "slice_indices" (their indices along D), "protocol" (protocol.describe())}.
    "psnr" is the whole-volume PSNR under the float protocol (all voxels, constant slices
    included) and the mean of the per-slice values under the paper protocol.
    Works through the volume a few slices at a time, so memory stays small.
    """
    if not isinstance(protocol, Protocol):
        raise ValueError(f"sr3d.metrics.score_volume: protocol must be a Protocol (see "
                         f"float_protocol / paper_protocol), got {type(protocol).__name__}")
    reference, test = _check_pair(reference, test, (3,), "score_volume")
    reference = _crop(reference, protocol.crop_border, "score_volume")
    test = _crop(test, protocol.crop_border, "score_volume")
    if protocol.with_ifc and min(reference.shape[1:]) < _IFC_MIN_SIDE:
        raise ValueError(f"sr3d.metrics.score_volume: IFC needs (H, W) slices of at least "
                         f"{_IFC_MIN_SIDE}x{_IFC_MIN_SIDE} after the border crop, got "
                         f"{reference.shape[1:]}: score without IFC (evaluate.py --no_ifc; with_ifc=False in the API)")

    is_float = protocol.name == "float"
    peak = 1.0 if is_float else 255.0
    scored, psnr_slices, ssim_slices, ifc_slices = [], [], [], []
    squared_error = 0.0
    for start in range(0, reference.shape[0], _CHUNK_SLICES):
        chunk = slice(start, start + _CHUNK_SLICES)
        ref, tst = _as_pair(reference[chunk], test[chunk], (3,), "score_volume")
        if is_float:
            ref = _to_float_window(ref, protocol.data_range)
            tst = _to_float_window(tst, protocol.data_range)
            squared_error += float(np.sum((ref - tst) ** 2))
        keep = np.flatnonzero(np.ptp(ref, axis=(1, 2)) > 0)
        ref, tst = ref[keep], tst[keep]
        if not is_float:
            ref, tst = _to_8bit_slices(ref, tst)
        scored.extend(int(i) + start for i in keep)
        mse = np.mean((ref - tst) ** 2, axis=(1, 2))
        with np.errstate(divide="ignore"):
            psnr_slices.extend(10.0 * np.log10(peak ** 2 / mse))
        ssim_slices.extend(_ssim_slices(ref, tst, peak, gaussian=is_float))
        if protocol.with_ifc:
            ifc_slices.extend(ifc(r, t) for r, t in zip(ref, tst))
    if not scored:
        raise ValueError("sr3d.metrics.score_volume: every reference slice is constant "
                         f"{'after the intensity window ' if is_float else ''}"
                         "so there is nothing to score: check the volume and the data_range")

    psnr_slices = [float(v) for v in psnr_slices]
    if is_float:
        mse = squared_error / reference.size
        volume_psnr = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    else:
        psnr_slices = [_PAPER_PSNR_CAP_DB if math.isinf(v) else v for v in psnr_slices]
        volume_psnr = float(np.mean(psnr_slices))
    return {
        "psnr": volume_psnr,
        "ssim": float(np.mean(ssim_slices)),
        "ifc": float(np.mean(ifc_slices)) if protocol.with_ifc else None,
        "per_slice": {
            "psnr": psnr_slices,
            "ssim": [float(v) for v in ssim_slices],
            "ifc": [float(v) for v in ifc_slices] if protocol.with_ifc else None,
        },
        "n_slices": len(scored),
        "slice_indices": scored,
        "protocol": protocol.describe(),
    }
