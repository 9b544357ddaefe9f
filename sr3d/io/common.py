"""What the readers of `sr3d.io` share: the (d, h, w) <-> (i, j, k) swap, shape and size
checks made before voxels are read, and how a reader reports what it assumed."""
from __future__ import annotations

import gzip
import os
import pathlib
import warnings
from collections.abc import Sequence

import numpy as np

from sr3d.volume import Volume, spacing_from_affine

# Volume index (d, h, w) <-> file index (i, j, k) = (w, h, d); the permutation is its own inverse.
SWAP_D_W = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def make_volume(path: pathlib.Path, array: np.ndarray, affine: np.ndarray, **fields) -> Volume:
    """Volume with spacing taken from the affine; validation errors name the file."""
    try:
        return Volume(array=array, spacing=spacing_from_affine(affine), affine=affine,
                      source=str(path), **fields)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def spatial_shape(shape: Sequence[int], path: pathlib.Path) -> tuple[int, int, int]:
    """The 3D shape of an image after dropping trailing length-1 axes; errors for 2D and 4D."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise ValueError(f"{path}: 4D image with {shape[3]} volumes along axis 3 (shape {shape}): "
                         "extract one volume, e.g. with nibabel `img.slicer[..., 0]`")
    if len(shape) != 3:
        raise ValueError(f"{path}: {len(shape)}D image with shape {shape}: expected a 3D volume")
    if min(shape) < 2:
        raise ValueError(f"{path}: shape {shape} has an axis shorter than 2 voxels: a volume "
                         "needs >= 2 voxels along every axis")
    return shape


def check_gzip(path: pathlib.Path) -> int:
    """Reads a .gz file to its end, so gzip checks its CRC and length: nibabel stops reading
    after the voxels, so damage inside the compressed stream could otherwise pass as data.
    Returns the uncompressed size in bytes."""
    size = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            size += len(chunk)
    return size


class GeometryWarning(UserWarning):
    """A reader had to assume something about a scan's geometry (see `Volume.assumptions`)."""


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.3g} MB"


def check_voxel_count(path, shape: Sequence[int], itemsize: int, offset: int, file_bytes: int | None,
                      compressed: bool = False) -> None:
    """Refuses a header whose voxels cannot be in the file (a memory bomb: a few KB claiming
    20000^3 voxels) or would not fit in this machine's memory as float32, before any is read."""
    n = 1
    for size in shape:
        n *= int(size)
    claimed = ' x '.join(map(str, shape))
    if file_bytes is not None and offset + n * itemsize > file_bytes:
        raise ValueError(f"{path}: truncated or wrong header: it claims {claimed} voxels "
                         f"of {itemsize} bytes ({_gb(offset + n * itemsize)} with the header) but the file holds "
                         f"{file_bytes} bytes{' uncompressed' if compressed else ''}")
    memory = _memory_bytes()
    if memory is not None and 4 * n > memory:
        raise ValueError(f"{path}: {claimed} voxels need {_gb(4 * n)} as float32, more than this "
                         f"machine's {_gb(memory)} of memory")


def warn_assumptions(assumptions: Sequence[str]) -> None:
    for assumption in assumptions:
        warnings.warn(assumption, GeometryWarning, stacklevel=3)
