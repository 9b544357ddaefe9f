"""Simulate low-resolution scans from high-resolution ones (HR -> LR).

The evaluation protocol of the paper (and of sr3d/evaluation/): crop the HR
volume so every downscaled axis divides by the scale factor r, then shrink it
by r with MATLAB's `imresize(..., 1/r, 'bicubic')`: Keys cubic with a = -0.5,
antialiased (kernel widened by r), symmetric (mirrored) borders. "2d" shrinks
H and W of every slice; "3d" also shrinks D.

Pixel centres follow MATLAB/PIL/cv2: output sample i (0-based) sits at input
coordinate (i + 0.5) * r - 0.5, so LR voxel i covers HR voxels i*r .. i*r+r-1.

The consistency step (`make_consistent`) has a TensorFlow twin for graphs whose lengths are known
only when they run (`make_consistent_tf`, in the served SavedModel); TensorFlow is imported there.
"""
import functools
import math
import operator
from typing import Sequence

import numpy as np

from sr3d import volume as sr3d_volume

MODES = ("2d", "3d")

# Axes shrunk by each simulation mode of a (D, H, W) volume; "d", "h", "w": that axis alone
# (one-axis upscaling with stage d, `sr3d.inference`).
MODE_AXES = {"2d": (1, 2), "3d": (0, 1, 2), "d": (0,), "h": (1,), "w": (2,)}


def check_scale(scale, minimum: int = 1, where: str = "sr3d.degrade") -> int:
    """Returns `scale` as an int, or raises if it is not an integer >= minimum."""
    if isinstance(scale, (bool, np.bool_)):
        value = None
    else:
        try:
            value = operator.index(scale)
        except TypeError:
            value = None
    if value is None or value < minimum:
        raise ValueError(f"{where}: scale must be an integer >= {minimum}, "
                         f"got {scale!r} ({type(scale).__name__})")
    return value


def check_axes(axes: Sequence[int], ndim: int, where: str = "sr3d.degrade") -> tuple[int, ...]:
    """Normalises (possibly negative) axes of an ndim-array; raises on bad or repeated ones."""
    normalised = []
    for axis in axes:
        if not -ndim <= axis < ndim:
            raise ValueError(f"{where}: axis {axis} out of range for an array with "
                             f"{ndim} dimensions")
        normalised.append(axis % ndim)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"{where}: repeated axis in {tuple(axes)}")
    return tuple(normalised)


def _output_dtype(array: np.ndarray) -> np.dtype:
    """float64 stays float64; float32 and everything else (ints, float16) give float32."""
    return np.dtype(np.float64) if array.dtype == np.float64 else np.dtype(np.float32)


def crop_to_multiple(array: np.ndarray, scale: int, axes: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Crops the END of each listed axis so its length divides by `scale`.

    The crop keeps voxel 0 in place (no shift of the grid or the affine origin);
    it is the HR ground truth the LR is compared against. Returns a view.
    Raises ValueError if an axis is shorter than `scale`.
    """
    scale = check_scale(scale)
    array = np.asarray(array)
    axes = check_axes(axes, array.ndim)
    index = [slice(None)] * array.ndim
    for axis in axes:
        length = array.shape[axis]
        if length < scale:
            raise ValueError(f"sr3d.degrade: axis {axis} has length {length}, shorter than "
                             f"the scale factor {scale} (shape {array.shape})")
        index[axis] = slice(0, length - length % scale)
    return array[tuple(index)]


def _cubic(x, where=np.where):
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's and PIL's bicubic); where=tf.where
    evaluates it on a TensorFlow tensor (`imresize_weights_tf`)."""
    ax = abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return where(ax <= 1, 1.5 * ax3 - 2.5 * ax2 + 1,
                 where(ax <= 2, -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2, 0.0))


@functools.lru_cache(maxsize=32)
def _imresize_weights(n_in: int, scale: int) -> np.ndarray:
    """Dense (n_in // scale, n_in) float64 matrix of MATLAB imresize(1/scale, 'bicubic').

    Mirrors MATLAB's `contributions`: kernel h(x) = cubic(x / scale) / scale of
    width 4 * scale, P = 4 * scale + 2 taps starting at floor(u - 2 * scale),
    rows normalised to sum 1, then out-of-range taps folded back with the
    half-sample symmetric extension [0 .. n-1, n-1 .. 0] (period 2n).
    """
    n_out = n_in // scale
    centres = (np.arange(n_out) + 0.5) * scale - 0.5          # 0-based input coordinates
    taps = 4 * scale + 2
    first = np.floor(centres - 2 * scale).astype(np.int64)
    indices = first[:, None] + np.arange(taps)[None, :]
    weights = _cubic((centres[:, None] - indices) / scale) / scale
    weights /= weights.sum(axis=1, keepdims=True)
    period = indices % (2 * n_in)
    mirrored = np.where(period < n_in, period, 2 * n_in - 1 - period)
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.repeat(np.arange(n_out), taps), mirrored.ravel()), weights.ravel())
    matrix.setflags(write=False)
    return matrix


def _downscale_axis_f64(array: np.ndarray, scale: int, axis: int) -> np.ndarray:
    """float64 core of `downscale_axis`; `axis` already normalised."""
    n_in = array.shape[axis]
    if n_in % scale:
        raise ValueError(f"sr3d.degrade: axis {axis} has length {n_in}, which does not divide "
                         f"by the scale factor {scale}: crop first with crop_to_multiple")
    matrix = _imresize_weights(n_in, scale)
    if axis == array.ndim - 1:
        return array @ matrix.T
    # matmul broadcasts (n_out, n_in) @ (..., n_in, rest): no copy of the input needed.
    moved = np.moveaxis(array, axis, -2)
    return np.moveaxis(matrix @ moved, -2, axis)


def downscale_axis(array: np.ndarray, scale: int, axis: int) -> np.ndarray:
    """Shrinks one axis by `scale` with MATLAB `imresize(..., 1/scale, 'bicubic')` semantics.

    array: any shape; the length of `axis` must divide by `scale` (the output
    has length n // scale there). Computed in float64; returns float64 for
    float64 input and float32 for anything else.
    """
    scale = check_scale(scale)
    array = np.asarray(array)
    (axis,) = check_axes((axis,), array.ndim)
    dtype = _output_dtype(array)
    return _downscale_axis_f64(array.astype(np.float64, copy=False), scale, axis).astype(dtype)


def downscale(array: np.ndarray, scale: int, axes: Sequence[int]) -> np.ndarray:
    """Shrinks every listed axis by `scale` (see `downscale_axis`), in float64 throughout.

    The resize is separable and linear, so the axis order only changes float64
    rounding. Returns float64 for float64 input, float32 otherwise.
    """
    scale = check_scale(scale)
    array = np.asarray(array)
    axes = check_axes(axes, array.ndim)
    dtype = _output_dtype(array)
    result = array.astype(np.float64, copy=False)
    for axis in axes:
        result = _downscale_axis_f64(result, scale, axis)
    return result.astype(dtype, copy=False)


def downscale_float32(array: np.ndarray, scale: int, axes: Sequence[int]) -> np.ndarray:
    """`downscale` (the same weights) as float32 BLAS products, several times faster; equal to
    it to float32 round-off. For the self-check and test-time adaptation, which degrade whole
    scans on every upscale; the evaluation protocol and training keep the float64 `downscale`."""
    out = np.asarray(array, np.float32)
    for axis in axes:
        out = _along(_imresize_weights(out.shape[axis], scale).astype(np.float32), out, axis)
    return np.ascontiguousarray(out)


def _along(matrix: np.ndarray, array: np.ndarray, axis: int) -> np.ndarray:
    """`matrix` (m, n) applied to every line of `array` along `axis` (length n -> m)."""
    return np.moveaxis(np.tensordot(matrix, array, axes=([1], [axis])), 0, axis)


@functools.lru_cache(maxsize=32)
def _consistency_weights(n_in: int, scale: int) -> np.ndarray:
    """(n_in, n_in // scale) float32 right inverse W+ = W^T (W W^T)^-1 of `_imresize_weights`
    (its rows are linearly independent): W @ W+ = I, and W+ e is the least-norm x with W x = e."""
    weights = _imresize_weights(n_in, scale)
    inverse = np.linalg.solve(weights @ weights.T, weights).T.astype(np.float32)
    inverse.setflags(write=False)
    return inverse


def make_consistent(hr: np.ndarray, lr: np.ndarray, scale: int, axes: Sequence[int],
                    rows_per_band: int = 64) -> np.ndarray:
    """Adds to `hr`, in place, the least-squares smallest change after which `downscale(hr, scale,
    axes)` equals `lr` (to float32 round-off): the orthogonal projection of `hr` onto the HR
    volumes this degradation maps to `lr` ("data consistency", as in MRI reconstruction; the limit
    of iterative back-projection, Irani and Peleg 1991).

    hr: float32, `lr`'s shape times `scale` on `axes`; lr: float32. The degradation is separable,
    so the change is the LR residual `lr - downscale(hr)` taken back through the right inverse
    of each axis's weights (`_consistency_weights`): a sum of the weights' rows, so it changes only
    what the degradation sees (no frequency above the LR band is touched, a flat residual adds a
    flat change). Memory: besides `hr`, the residual upscaled on all axes but the first (1/scale of
    `hr`) and one band of `rows_per_band` rows along axis 1. Returns `hr`.
    """
    scale = check_scale(scale)
    axes = check_axes(axes, hr.ndim)
    if hr.dtype != np.float32 or not hr.flags.writeable:
        raise ValueError(f"sr3d.degrade.make_consistent: hr must be a writeable float32 array, got {hr.dtype}")
    expected = tuple(n // scale if axis in axes else n for axis, n in enumerate(hr.shape))
    if any(hr.shape[axis] % scale for axis in axes) or tuple(np.shape(lr)) != expected:
        raise ValueError(f"sr3d.degrade.make_consistent: hr {hr.shape} is not lr {np.shape(lr)} upscaled by "
                         f"{scale} on axes {axes}")
    residual = np.asarray(lr, np.float32) - downscale_float32(hr, scale, sorted(axes))
    for axis in (a for a in axes if a != 0):
        residual = _along(_consistency_weights(hr.shape[axis], scale), residual, axis)
    if 0 not in axes:
        hr += residual
        return hr
    inverse = _consistency_weights(hr.shape[0], scale)
    rows = max(1, rows_per_band)
    for start in range(0, hr.shape[1], rows):  # along the depth axis, one band of rows at a time
        band = slice(start, start + rows)
        hr[:, band] += _along(inverse, residual[:, band], 0)
    return hr


def simulate_lr(hr: np.ndarray, scale: int, mode: str = "3d") -> tuple[np.ndarray, np.ndarray]:
    """Makes the (ground truth, LR input) pair of the evaluation protocol.

    hr: (D, H, W) volume in scanner units. mode "2d" crops H and W to multiples
    of `scale` and shrinks them; "3d" does the same to D too.
    Returns (hr_cropped, lr): hr_cropped is a contiguous copy of the cropped HR
    (the ground truth), lr has shape (D, H // scale, W // scale) for "2d" and
    (D // scale, H // scale, W // scale) for "3d". Both are float32 (float64 if
    hr is float64).
    """
    scale = check_scale(scale, minimum=2, where="sr3d.degrade.simulate_lr")
    if mode not in MODE_AXES:
        raise ValueError(f"sr3d.degrade.simulate_lr: mode must be one of {MODES}, got {mode!r}")
    hr = np.asarray(hr)
    if hr.ndim != 3:
        raise ValueError(f"sr3d.degrade.simulate_lr: hr must be a (D, H, W) volume, "
                         f"got shape {hr.shape}")
    axes = MODE_AXES[mode]
    hr_cropped = crop_to_multiple(hr, scale, axes)
    lr = downscale(hr_cropped, scale, axes)
    return np.array(hr_cropped, dtype=_output_dtype(hr), order="C"), lr


# ---------------------------------------------------------------------------- TensorFlow twins
# For graphs whose lengths are known only when they run (the served SavedModel, `sr3d.export`):
# the weights are built in the graph from the runtime length, with the arithmetic of the numpy
# functions above (tests/test_degrade.py checks them against each other).

def imresize_weights_tf(n_in, scale: int):
    """TensorFlow twin of `_imresize_weights`: n_in an integer scalar (tensor) -> float64
    (n_in // scale, n_in) tensor; the same taps, row normalisation and fold-back, the taps that
    fold onto one input sample summed (scatter_nd adds duplicate indices)."""
    import tensorflow as tf

    n_in = tf.cast(n_in, tf.int64)
    n_out = n_in // scale
    centres = (tf.range(n_out, dtype=tf.float64) + 0.5) * scale - 0.5
    offsets = tf.range(4 * scale + 2, dtype=tf.float64)
    indices = tf.floor(centres - 2 * scale)[:, None] + offsets[None, :]
    weights = _cubic((centres[:, None] - indices) / scale, tf.where) / scale
    weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
    period = tf.math.floormod(tf.cast(indices, tf.int64), 2 * n_in)
    columns = tf.where(period < n_in, period, 2 * n_in - 1 - period)
    rows = tf.broadcast_to(tf.range(n_out)[:, None], tf.shape(columns))
    return tf.scatter_nd(tf.reshape(tf.stack([rows, columns], axis=-1), [-1, 2]), tf.reshape(weights, [-1]),
                         tf.stack([n_out, n_in]))


def consistency_weights_tf(n_in, scale: int):
    """TensorFlow twin of `_consistency_weights`: float32 (n_in, n_in // scale) right inverse of
    `imresize_weights_tf`, solved in float64."""
    import tensorflow as tf

    return _right_inverse_tf(imresize_weights_tf(n_in, scale))


def _right_inverse_tf(weights):
    """float32 W+ = W^T (W W^T)^-1 of a float64 `imresize_weights_tf` matrix, solved in float64."""
    import tensorflow as tf

    inverse = tf.linalg.solve(tf.matmul(weights, weights, transpose_b=True), weights)
    return tf.cast(tf.transpose(inverse), tf.float32)


def _along_tf(matrix, array, axis: int):
    """`_along` for a tensor of static rank: `matrix` (m, n) applied along `axis` (length n -> m)."""
    import tensorflow as tf

    dims = "bcdefgh"[:array.shape.rank]
    return tf.einsum(f"a{dims[axis]},{dims}->{dims.replace(dims[axis], 'a')}", matrix, array)


def make_consistent_tf(hr, lr, scale: int, axes: Sequence[int]):
    """TensorFlow twin of `make_consistent`: float32 tensors hr (lr's shape times `scale` on
    `axes`, lengths known when the graph runs) and lr -> hr plus the change, a new tensor.
    Memory: besides hr, the change (grown from lr's size one axis at a time) and the sum."""
    import tensorflow as tf

    axes = check_axes(axes, hr.shape.rank)
    # Each axis's weights once, for the downscale and for its right inverse.
    weights = {axis: imresize_weights_tf(tf.shape(hr)[axis], scale) for axis in axes}
    residual = hr
    for axis in sorted(axes):  # float32 weights, as `downscale_float32`
        residual = _along_tf(tf.cast(weights[axis], tf.float32), residual, axis)
    residual = lr - residual
    for axis in sorted(axes, reverse=True):
        residual = _along_tf(_right_inverse_tf(weights[axis]), residual, axis)
    return hr + residual


# ---------------------------------------------------------------------------- thick slices
# A thick slice is the tissue averaged across the slice profile (box or Gaussian of the slice
# thickness), one sample every slice spacing: the degradation of sr3d.selfsup's training pairs and
# of the thick-slice evaluation (experiments/thick_slice.py).

PROFILES = ("box", "gaussian")
_GAUSSIAN_TRUNCATE = 3.0  # Gaussian profile support, in standard deviations


def slice_profile(ratio: float, kind: str = "box", factor: int | None = None) -> np.ndarray:
    """The slice profile sampled on the fine grid: float64 1D kernel summing to 1.

    ratio: slice thickness in fine voxels (the box width, or the Gaussian's FWHM); below the
    factor when the slices have gaps between them, above it when they overlap.
    factor: the integer decimation it is used with (default round(ratio)). Thick voxel i
    covers fine voxels i*factor .. i*factor + factor - 1, so its centre falls on a fine
    voxel for odd factors and between two for even ones: the kernel has odd length for
    an odd factor and even length for an even one, taps at offsets k - (n - 1) / 2 from
    the centre. Box: each tap weighs the overlap of its voxel [x - 1/2, x + 1/2] with
    [-ratio / 2, ratio / 2]. Gaussian: exp(-x^2 / (2 sigma^2)), sigma = ratio / (2 sqrt(2 ln 2)),
    cut at 3 sigma.
    """
    if kind not in PROFILES:
        raise ValueError(f"slice profile must be one of {PROFILES}, got {kind!r}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"slice profile width must be a positive number of fine voxels, got {ratio!r}")
    factor = max(1, round(ratio)) if factor is None else check_scale(factor, where="sr3d.degrade.slice_profile")
    half_width = ratio / 2 if kind == "box" else _GAUSSIAN_TRUNCATE * ratio / (2 * math.sqrt(2 * math.log(2)))
    # Smallest length with the factor's parity whose taps cover [-half_width, half_width].
    n = max(1, math.ceil(2 * half_width - 1e-9))
    if n % 2 != factor % 2:
        n += 1
    offsets = np.arange(n) - (n - 1) / 2
    if kind == "box":
        lo = np.maximum(offsets - 0.5, -ratio / 2)
        hi = np.minimum(offsets + 0.5, ratio / 2)
        weights = np.clip(hi - lo, 0.0, None)
    else:
        sigma = ratio / (2 * math.sqrt(2 * math.log(2)))
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def degrade_along(planes: np.ndarray, factor: int, axis: int, profile: str | np.ndarray = "box") -> np.ndarray:
    """Simulated thick-slice acquisition along one axis: blur by the slice profile, keep every
    factor-th sample. Output sample i is the profile centred on input samples
    i*factor .. i*factor + factor - 1, borders mirrored (half-sample symmetric).

    planes: any array; its length along `axis` must divide by `factor` (crop first with
    `crop_to_multiple`). profile: "box", "gaussian" (`slice_profile(factor, kind)`)
    or an explicit kernel whose length has the parity of `factor`. Returns float32
    (float64 for float64 input) with length n // factor along `axis`.
    """
    factor = check_scale(factor, where="sr3d.degrade.degrade_along")
    planes = np.asarray(planes)
    (axis,) = check_axes((axis,), planes.ndim, where="sr3d.degrade.degrade_along")
    kernel = slice_profile(factor, profile, factor) if isinstance(profile, str) else np.asarray(profile, np.float64)
    if kernel.ndim != 1 or kernel.size == 0 or kernel.size % 2 != factor % 2:
        raise ValueError(f"slice profile must be a 1D kernel whose length has the parity of the factor "
                         f"{factor}, got shape {kernel.shape}")
    length = planes.shape[axis]
    if length % factor:
        raise ValueError(f"sr3d.degrade.degrade_along: axis {axis} has length {length}, which does not divide "
                         f"by the factor {factor}: crop first with sr3d.degrade.crop_to_multiple")
    dtype = np.float64 if planes.dtype == np.float64 else np.float32
    moved = np.moveaxis(planes, axis, 0).astype(np.float64, copy=False)
    n_out = length // factor
    start = (factor - kernel.size) // 2          # first tap of output 0, may be negative
    pad = max(0, -start)
    padded = np.pad(moved, [(pad, pad)] + [(0, 0)] * (moved.ndim - 1), mode="symmetric") if pad else moved
    out = np.zeros((n_out,) + moved.shape[1:], np.float64)
    for k, weight in enumerate(kernel):
        first = start + pad + k
        out += weight * padded[first:first + factor * (n_out - 1) + 1:factor]
    return np.moveaxis(out, 0, axis).astype(dtype)


def simulate_thick_slices(volume: sr3d_volume.Volume, factor: int, axis: int = 0, profile: str = "box",
                          thickness: float | None = None) -> tuple[sr3d_volume.Volume, sr3d_volume.Volume]:
    """(ground truth, thick-slice scan) from a fine scan, for evaluation.

    The fine scan is cropped at the end of `axis` to a multiple of `factor` (the ground
    truth) and degraded along `axis` (`degrade_along`); the thick scan's affine places
    thick voxel i at the centre of the fine voxels it covers, so `sr3d.volume.upscaled_affine`
    of it is the ground truth's affine again.
    thickness: slice thickness in fine voxels (box width or Gaussian FWHM; default `factor`:
    contiguous slices); below `factor` simulates gaps (e.g. factor 4, thickness 2.5: 2.5 mm
    slices every 4 mm from a 1 mm scan). When D is the axis, the thick scan's
    `slice_thickness_mm` says it, as a DICOM series would.
    """
    factor = check_scale(factor, minimum=2, where="sr3d.degrade.simulate_thick_slices")
    hr = np.ascontiguousarray(crop_to_multiple(volume.array, factor, axes=(axis,)))
    width = factor if thickness is None else float(thickness)
    lr = degrade_along(hr, factor, axis, slice_profile(width, profile, factor))
    truth = volume.replace(array=hr, source=None)
    thick = sr3d_volume.downscaled_volume(volume, lr, factor, axes=(axis,),
                                          slice_thickness_mm=width * volume.spacing[axis] if axis == 0 else None)
    return truth, thick
