"""Volume I/O: NIfTI, NRRD and DICOM files to and from `Volume` (float32 (D, H, W) plus affine).

`load_volume` and `save_volume` are the entry points; the readers are `nifti`, `nrrd` and
`dicom` (DICOM output: `sr3d.dicom_out`), sharing the checks of `common`. `Volume` and the
affine maths are `sr3d.volume`, atomic writes and scan listing `sr3d.files`.

Axis convention: D is the slice axis. For NIfTI and NRRD, whose arrays are indexed
(i, j, k) with i fastest, D = k, H = j, W = i. For DICOM, D runs along the slice
normal (sorted by ImagePositionPatient), H along the pixel rows and W along the
columns. Affines map voxel index (d, h, w) to world RAS+ millimetres; DICOM and
NRRD patient coordinates in LPS are converted (x and y negated).
"""
from __future__ import annotations

import errno
import os
import pathlib

from sr3d import files as sr3d_files
from sr3d.io import dicom, nifti, nrrd
from sr3d.io.common import GeometryWarning, check_voxel_count  # noqa: F401  (public names of sr3d.io)
from sr3d.io.dicom import SLICE_JITTER_TOLERANCE, DicomSource  # noqa: F401
# What a reader returns, named here too (sr3d.io.Volume): the README's and older callers' name.
from sr3d.volume import Volume, spacing_from_affine, upscaled_affine, upscaled_volume  # noqa: F401


def load_volume(path: str | os.PathLike, regularize: bool = False) -> Volume:
    """Read a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), DICOM file or DICOM series directory.

    A DICOM directory must hold exactly one series (files directly inside it; other
    files are skipped). Raises FileNotFoundError or ValueError naming the file and the problem.
    DICOM slice positions may jitter by up to `SLICE_JITTER_TOLERANCE` of the spacing; missing
    slices or irregular spacing are an error unless `regularize`, which resamples the slices
    linearly onto a regular grid (recorded in `Volume.assumptions`). A tilted gantry gives a
    sheared affine (slices stepping along their positions' line, not the normal): no resampling.
    What a reader assumes is also warned about (`GeometryWarning`).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
    if path.is_dir():
        volume_files = sr3d_files.volume_files(path)
        if volume_files:  # the rule of expand_scans: such a directory is many scans
            raise ValueError(f"{path}: holds {len(volume_files)} NIfTI/NRRD files, not a DICOM series: "
                             "pass one of them (commands taking several scans accept the directory)")
        return dicom.load_series(path, regularize)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return nifti.load(path)
    if name.endswith((".nrrd", ".nhdr")):
        return nrrd.load(path)
    if name.endswith((".dcm", ".dicom", ".ima")) or dicom.has_preamble(path):
        return dicom.load_file(path, regularize)
    raise ValueError(f"{path}: unsupported file type: expected .nii, .nii.gz, .nrrd, .nhdr, "
                     "a DICOM file or a directory holding one DICOM series")


def save_volume(volume: Volume, path: str | os.PathLike, dtype: str | None = None,
                note: str | None = None, format: str = "nifti") -> pathlib.Path:
    """Write `volume` to NIfTI (.nii or .nii.gz) atomically; return the path written.

    format: "nifti", or "dicom" for a new DICOM series in the directory `path`, one file per
    slice (see `sr3d.dicom_out.save_series`; `dtype` does not apply, `note` is its description).

    dtype: stored voxel type, default `volume.source_dtype`; integer types are rounded and
    clipped to their range. note: free text (how the volume was made) stored in the header
    as a NIfTI comment extension (ecode 6). The file appears complete or not at all: it is written to a
    temporary file in the same directory and renamed. sform and qform hold the affine with D
    stored as the third (slice) axis, with the input's codes (`volume.xform_codes`, default 1,
    scanner); `descrip` keeps the input's text and adds the modality; `volume.assumptions`
    are recorded in the comment extension.
    """
    if format == "dicom":
        if dtype is not None:
            raise ValueError(f"{path}: dtype does not apply to DICOM output (int16/uint16 plus RescaleSlope)")
        from sr3d import dicom_out
        return dicom_out.save_series(volume, path, note=note)
    if format != "nifti":
        raise ValueError(f"{path}: format must be 'nifti' or 'dicom', got {format!r}")
    return nifti.save(volume, path, dtype=dtype, note=note)
