"""NRRD (.nrrd, .nhdr) files -> `Volume` (pynrrd); patient spaces converted to RAS+."""
from __future__ import annotations

import pathlib
import zlib

import nrrd
import numpy as np

from sr3d.io import common
from sr3d.volume import Volume

# NRRD `space` values we can place in RAS: sign of the x and y axes relative to RAS.
_NRRD_SPACE_FLIPS = {
    "right-anterior-superior": (1.0, 1.0), "ras": (1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0), "las": (-1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0), "lps": (-1.0, -1.0),
}


def _check_nrrd_size(path: pathlib.Path) -> None:
    """The NRRD header's voxel count against the file (raw encoding) and this machine's memory."""
    try:
        with open(path, "rb") as stream:
            header = nrrd.read_header(stream)
            offset = stream.tell()
        sizes = [int(n) for n in np.ravel(header.get("sizes", []))]
        itemsize = np.dtype(nrrd.reader._determine_datatype(header)).itemsize
    except Exception:  # noqa: BLE001  (nrrd.read below reports a bad header in its own words)
        return
    detached = "data file" in header or "datafile" in header
    raw = str(header.get("encoding", "raw")).lower() == "raw" and not detached
    common.check_voxel_count(path, sizes, itemsize, offset, path.stat().st_size if raw else None)


def load(path: pathlib.Path) -> Volume:
    """The volume of a NRRD file; ValueError naming the file for what it cannot place or read."""
    _check_nrrd_size(path)
    try:
        data, header = nrrd.read(str(path))
    except (nrrd.NRRDError, OSError, EOFError, ValueError, zlib.error) as error:
        raise ValueError(f"{path}: not a readable NRRD file: {type(error).__name__}: {error}") from error
    shape = common.spatial_shape(data.shape, path)
    data = data.reshape(shape)
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{path}: voxel type {data.dtype} is not a real scalar")
    units = header.get("space units")
    if units is not None and any(u not in ("mm", "") for u in units):
        raise ValueError(f"{path}: space units {units} are not millimetres")
    ijk_to_world = np.eye(4)
    if "space directions" in header:
        space = str(header.get("space", "")).lower()
        if space not in _NRRD_SPACE_FLIPS:
            raise ValueError(f"{path}: NRRD space {space or '(none)'!r} has no known relation to "
                             f"RAS: expected one of {sorted(_NRRD_SPACE_FLIPS)}")
        directions = np.asarray(header["space directions"], dtype=np.float64)[:3]
        ijk_to_world[:3, :3] = directions.T  # pynrrd gives one row per array axis
        ijk_to_world[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        flip_x, flip_y = _NRRD_SPACE_FLIPS[space]
        ijk_to_world = np.diag([flip_x, flip_y, 1.0, 1.0]) @ ijk_to_world
    else:
        # No orientation in the file: like nibabel for unoriented NIfTI, axes are taken as RAS.
        ijk_to_world[:3, :3] = np.diag(np.asarray(header.get("spacings", np.ones(3)), dtype=np.float64))
    return common.make_volume(path, data.transpose(2, 1, 0), ijk_to_world @ common.SWAP_D_W,
                        source_dtype=data.dtype.name)
