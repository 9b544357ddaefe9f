"""NIfTI (.nii, .nii.gz) files <-> `Volume`: nibabel, with what it repairs reported, and atomic writes."""
from __future__ import annotations

import errno
import gzip
import os
import pathlib
import re
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from sr3d import files as sr3d_files
from sr3d import volume as sr3d_volume
from sr3d.io import common
from sr3d.volume import Volume

_MODALITY_DESCRIP = re.compile(r"(?:; )?sr3d modality=(\S+)$")


def _nifti_assumptions(raw_header, shape: Sequence[int], affine_used: np.ndarray) -> list[str]:
    """What nibabel guessed for this header: voxel sizes for pixdim <= 0, an orientation for
    sform and qform codes 0, and which of two disagreeing transforms it used."""
    sform_code, qform_code = int(raw_header["sform_code"]), int(raw_header["qform_code"])
    notes = []
    if sform_code == 0:  # the qform and the fallback both take voxel sizes from pixdim
        for axis, size in zip("ijk", raw_header["pixdim"][1:4]):
            if not size > 0:
                notes.append(f"pixdim of axis {axis} is {float(size):g}: voxel size taken as "
                             f"{abs(float(size)) or 1:g} mm")
    if sform_code == 0 and qform_code == 0:
        notes.append("no orientation (sform_code and qform_code 0): axes taken as x left, y anterior, "
                     "z superior (Analyze convention, as nibabel and FSL), origin at the centre")
    elif sform_code > 0 and qform_code > 0:
        qform = raw_header.get_qform()
        corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                            for k in (0, shape[2] - 1)])
        apart = float(np.max(np.linalg.norm((corners @ (affine_used - qform).T)[:, :3], axis=1)))
        if apart > 0.1:
            notes.append(f"sform (code {sform_code}) and qform (code {qform_code}) place the volume up to "
                         f"{apart:.3g} mm apart: used the sform, as nibabel and FSL do")
    return notes


def _read_raw_nifti_header(path: pathlib.Path, header_class):
    """The header as stored, before nibabel's repairs (pixdim 0 -> 1, negative -> abs)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:
        return header_class.from_fileobj(stream, check=False)


def load(path: pathlib.Path) -> Volume:
    """The volume of a NIfTI file; what nibabel assumed for its header is recorded and warned about."""
    try:
        compressed = path.name.lower().endswith(".gz")
        file_bytes = common.check_gzip(path) if compressed else path.stat().st_size
        with nib.imageglobals.LoggingOutputSuppressor():  # its repairs are reported below instead
            image = nib.load(path)
        shape = common.spatial_shape(image.shape, path)
        stored = image.get_data_dtype()
        if stored.kind not in "biuf":
            raise ValueError(f"{path}: voxel type {stored} is not a real scalar: expected a "
                             "grey-level volume")
        common.check_voxel_count(path, image.shape, stored.itemsize, int(image.dataobj.offset), file_bytes,
                          compressed)
        raw_header = _read_raw_nifti_header(path, type(image.header))
        with np.errstate(over="ignore"):
            data = image.get_fdata(dtype=np.float32).reshape(shape)
        if not np.isfinite(np.sum(data, dtype=np.float64)):
            # Volume says which voxels are NaN or Inf, or which finite values float32 cannot hold.
            data = np.asanyarray(image.dataobj).reshape(shape)
    except PermissionError:
        raise
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError,
            EOFError, zlib.error, gzip.BadGzipFile) as error:
        # nibabel reports truncated or non-NIfTI files from deep inside gzip/zlib.
        raise ValueError(f"{path}: not a readable NIfTI file (corrupt, truncated or another "
                         f"format): {type(error).__name__}: {error}") from error
    slope, inter = image.dataobj.slope, image.dataobj.inter
    source_dtype = stored.name if (slope, inter) == (1.0, 0.0) else "float32"
    descrip = image.header["descrip"].item().decode("latin-1").strip()
    modality = _MODALITY_DESCRIP.search(descrip)
    description = descrip[:modality.start()] if modality else descrip
    assumptions = [f"{path}: {a}" for a in _nifti_assumptions(raw_header, shape, image.affine)]
    volume = common.make_volume(path, data.transpose(2, 1, 0), image.affine @ common.SWAP_D_W,
                          modality=modality.group(1) if modality else None, source_dtype=source_dtype,
                          xform_codes=(int(raw_header["sform_code"]), int(raw_header["qform_code"])),
                          description=description, assumptions=tuple(assumptions))
    common.warn_assumptions(assumptions)
    return volume


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 array -> dtype; integers are rounded and clipped to the dtype's range."""
    if dtype.kind == "f":
        return array.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    # The largest float32 not above info.max, so the cast cannot overflow.
    high = np.float32(info.max)
    if int(high) > info.max:
        high = np.nextafter(high, np.float32(0))
    return np.clip(np.rint(array), np.float32(info.min), high).astype(dtype)


def _descrip(description: str, modality: str | None) -> bytes:
    """The input's `descrip` with sr3d's modality tag added, within NIfTI's 80 bytes."""
    text = description.encode("latin-1", "replace")
    if not modality:
        return text[:80]
    tag = f"sr3d modality={modality}".encode("latin-1", "replace")[:80]
    return (text[:80 - len(tag) - 2] + b"; " + tag) if text and len(tag) < 78 else tag


def save(volume: Volume, path: str | os.PathLike, dtype: str | None = None, note: str | None = None) -> pathlib.Path:
    """Write `volume` to NIfTI (.nii or .nii.gz) atomically; return the path written (see
    `sr3d.io.save_volume`)."""
    path = pathlib.Path(path)
    name = path.name
    suffix = next((s for s in (".nii.gz", ".nii") if name.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{path}: can only write NIfTI: the name must end with .nii or .nii.gz")
    if len(name) == len(suffix):
        raise ValueError(f"{path}: the file name is only the suffix {name}: give it a name, e.g. out{suffix}")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file name to write", str(path))
    dtype = sr3d_volume.storable_dtype(dtype if dtype is not None else volume.source_dtype, f"{path}: dtype")
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "Directory to write into does not exist", str(path))

    affine = volume.affine @ common.SWAP_D_W
    image = nib.Nifti1Image(_cast(volume.array, dtype).transpose(2, 1, 0), affine)
    image.header.set_data_dtype(dtype)
    # The input's codes say which space the affine is in (FSLeyes shows MNI, aligned, ...).
    sform_code, qform_code = volume.xform_codes if volume.xform_codes is not None else (1, 1)
    image.header.set_sform(affine, code=sform_code)
    image.header.set_qform(affine, code=qform_code)  # nibabel drops any shear here; the sform keeps it
    image.header.set_xyzt_units("mm")
    image.header.set_dim_info(slice=2)
    image.header["descrip"] = _descrip(volume.description, volume.modality)
    comment = "\n".join(([note] if note else [])
                        + [f"assumed when reading {a}" for a in volume.assumptions])
    if comment:
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", comment.encode("utf-8")))

    try:
        with sr3d_files.atomic_path(path) as temporary:
            nib.save(image, temporary)
    except OSError as error:
        if error.errno is None:
            raise
        raise type(error)(error.errno, f"cannot write NIfTI: {error.strerror}", str(path)) from error
    return path
