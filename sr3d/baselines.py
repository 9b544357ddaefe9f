"""Interpolation baselines: upscale an LR volume back to the HR grid with OpenCV.

Methods follow `cv2.resize` exactly, as the authors' baseline scripts do:
"bilinear" = INTER_LINEAR, "bicubic" = INTER_CUBIC (Keys a = -0.75, not
MATLAB's -0.5), "lanczos" = INTER_LANCZOS4 (a = 4, 8 taps). Pixel centres
src = (i + 0.5) / r - 0.5, replicated borders, no antialiasing (none is
needed when enlarging). "nearest" repeats each LR voxel r times (np.repeat);
for integer r this is also what cv2 INTER_NEAREST (src = floor(i / r)) gives.
"""
from typing import Sequence

import cv2
import numpy as np

from sr3d.degrade import check_axes, check_scale

METHODS = ("nearest", "bilinear", "bicubic", "lanczos")
_WHERE = "sr3d.baselines"

_CV2_FLAGS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
              "lanczos": cv2.INTER_LANCZOS4}

# Axes of a (D, H, W) volume enlarged by each mode; the first two (H, W) are
# resized together as 2D slices, then D, as stage 1 and stage 2 of the CNN do.
_MODE_AXES = {"2d": (1, 2), "3d": (1, 2, 0), "d": (0,), "h": (1,), "w": (2,)}

# cv2.resize has no SHRT_MAX width limit: checked up to 2**20 columns against
# narrow calls (equal within 1 float32 ulp: cv2's SIMD and scalar column
# paths round cubic and Lanczos sums differently). Wider 1-axis resizes are
# split into blocks of this many columns to stay inside the checked range.
_MAX_COLUMNS = 1 << 20


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"sr3d.baselines: method must be one of {METHODS}, got {method!r}")


def _resize_rows(image: np.ndarray, scale: int, flag: int) -> np.ndarray:
    """(n, m) float32 -> (scale * n, m) with cv2.resize along the first axis only.

    With an unchanged width cv2's horizontal pass has weights (0, .., 1, .., 0),
    so every column is the 1D cv2 resize of that column.
    """
    n, m = image.shape
    out = np.empty((scale * n, m), np.float32)
    for start in range(0, m, _MAX_COLUMNS):
        block = np.ascontiguousarray(image[:, start:start + _MAX_COLUMNS])
        out[:, start:start + block.shape[1]] = cv2.resize(
            block, (block.shape[1], scale * n), interpolation=flag)
    return out


def _upscale_one_axis(array: np.ndarray, scale: int, flag: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    result = _resize_rows(flat, scale, flag).reshape((scale * moved.shape[0],) + moved.shape[1:])
    return np.moveaxis(result, 0, axis)


def _upscale_two_axes(array: np.ndarray, scale: int, flag: int,
                      axes: tuple[int, int]) -> np.ndarray:
    """cv2.resize of every 2D slice spanned by `axes` (first axis = image rows)."""
    moved = np.moveaxis(array, axes, (-2, -1))
    rows, cols = moved.shape[-2:]
    planes = np.ascontiguousarray(moved).reshape(-1, rows, cols)
    result = np.empty((planes.shape[0], scale * rows, scale * cols), np.float32)
    for k, plane in enumerate(planes):
        result[k] = cv2.resize(plane, (scale * cols, scale * rows), interpolation=flag)
    result = result.reshape(moved.shape[:-2] + (scale * rows, scale * cols))
    return np.moveaxis(result, (-2, -1), axes)


def upscale_axes(array: np.ndarray, scale: int, method: str, axes: Sequence[int]) -> np.ndarray:
    """Enlarges each listed axis of `array` by `scale` with `method` (one of METHODS).

    array: any shape, converted to float32 (cv2 computes in float32). If two or
    more axes are given, the first two listed are resized together as 2D slices
    (cv2.resize of each slice, first of the two = image rows), then each further
    axis alone (exactly a 1-axis cv2.resize along it). Output: float32, length
    scale * n on every listed axis.
    """
    _check_method(method)
    scale = check_scale(scale, where=_WHERE)
    array = np.asarray(array, dtype=np.float32)
    axes = check_axes(axes, array.ndim, where=_WHERE)
    if array.size == 0:
        raise ValueError(f"sr3d.baselines: cannot upscale an empty array, got shape {array.shape}")
    if method == "nearest":
        for axis in axes:
            array = np.repeat(array, scale, axis=axis)
        return np.ascontiguousarray(array)
    flag = _CV2_FLAGS[method]
    if len(axes) >= 2:
        array = _upscale_two_axes(array, scale, flag, axes[:2])
        axes = axes[2:]
    for axis in axes:
        array = _upscale_one_axis(array, scale, flag, axis)
    return np.ascontiguousarray(array)


def upscale(lr: np.ndarray, scale: int, method: str, mode: str = "3d") -> np.ndarray:
    """Upscales an LR (D, H, W) volume to the HR grid with an interpolation baseline.

    mode "2d": H and W of every slice -> (D, rH, rW); "3d": H and W, then D ->
    (rD, rH, rW); "d", "h", "w": that axis alone. method: one of METHODS. Returns float32 in the units of `lr`.
    """
    _check_method(method)
    if mode not in _MODE_AXES:
        raise ValueError(f"sr3d.baselines: mode must be one of {tuple(_MODE_AXES)}, got {mode!r}")
    lr = np.asarray(lr)
    if lr.ndim != 3:
        raise ValueError(f"sr3d.baselines: lr must be a (D, H, W) volume, got shape {lr.shape}")
    return upscale_axes(lr, scale, method, _MODE_AXES[mode])
