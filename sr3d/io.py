"""Volume I/O: NIfTI, NRRD and DICOM files to and from `Volume` (float32 (D, H, W) plus affine).

Axis convention: D is the slice axis. For NIfTI and NRRD, whose arrays are indexed
(i, j, k) with i fastest, D = k, H = j, W = i. For DICOM, D runs along the slice
normal (sorted by ImagePositionPatient), H along the pixel rows and W along the
columns. Affines map voxel index (d, h, w) to world RAS+ millimetres; DICOM and
NRRD patient coordinates in LPS are converted (x and y negated).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import glob
import gzip
import json
import os
import pathlib
import re
import zlib
from collections.abc import Iterator, Sequence

import nibabel as nib
import nrrd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# Volume index (d, h, w) <-> file index (i, j, k) = (w, h, d); the permutation is its own inverse.
_SWAP_D_W = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# NRRD `space` values we can place in RAS: sign of the x and y axes relative to RAS.
_NRRD_SPACE_FLIPS = {
    "right-anterior-superior": (1.0, 1.0), "ras": (1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0), "las": (-1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0), "lps": (-1.0, -1.0),
}
_SAVE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                "float32", "float64")
_MODALITY_DESCRIP = re.compile(r"(?:; )?sr3d modality=(\S+)$")


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan: float32 (D, H, W) voxels in scanner units plus its world geometry.

    array: float32 (D, H, W), scanner units (HU for CT after DICOM rescaling).
    spacing: voxel size in mm, (D, H, W) order.
    affine: 4x4 float64, voxel index (d, h, w) -> world RAS+ mm.
    modality: "CT", "MR", ... when the file says so, else None.
    source_dtype: numpy dtype name of the stored voxel values; `save_volume` writes it by default.
    source: path the volume was read from, None for computed volumes.
    dicom: what a volume read from DICOM remembers of its series (patient, study, source
        instances), so `save_volume(..., format="dicom")` writes a derived series of the same study.
    xform_codes: NIfTI (sform_code, qform_code) of the file read (1 scanner, 2 aligned,
        3 Talairach, 4 MNI, 5 other template, 0 unknown), kept by `save_volume`; None: not from NIfTI (written as 1).
    description: the NIfTI `descrip` of the file read (without sr3d's own tag), kept on save.
    assumptions: what the reader had to guess (voxel size, orientation, slice grid), one
        sentence each, starting with the file read ("<file>: ..."); warned about when read, recorded in the header by `save_volume`.
    report: how a computed volume was made (`sr3d.upscale`: the self-check, adaptation, which
        method wrote it), JSON values; the CLI writes it as the sidecar next to the output.
    slice_thickness_mm: the thickness of the slices stacked along D, when the file says it
        (DICOM SliceThickness); None: unknown. Thinner than spacing[0] means gaps between slices
        (`sr3d.selfsup` simulates them). Not carried to upscaled volumes.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str | None = None
    source_dtype: str = "float32"
    source: str | None = None
    dicom: DicomSource | None = None
    xform_codes: tuple[int, int] | None = None
    description: str = ""
    assumptions: tuple[str, ...] = ()
    report: dict | None = None
    slice_thickness_mm: float | None = None

    def __post_init__(self):
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise ValueError(f"volume array must be 3D (D, H, W), got shape {array.shape}")
        if array.dtype.kind not in "biuf":
            raise ValueError(f"volume array must hold real numbers, got dtype {array.dtype}")
        original = array
        with np.errstate(over="ignore"):
            array = array.astype(np.float32, copy=False)
        # A float64 sum cannot overflow on float32 input, so it is finite iff every voxel is.
        if not np.isfinite(np.sum(array, dtype=np.float64)):
            n_bad = array.size - np.count_nonzero(np.isfinite(array))
            n_beyond = n_bad - (original.size - np.count_nonzero(np.isfinite(original)))
            if n_beyond:
                largest = float(np.max(np.abs(original[np.isfinite(original)])))
                raise ValueError(f"volume array has {n_beyond} finite values beyond float32's range "
                                 f"(|value| up to {largest:.3g} > 3.4e38): rescale the scan's intensities")
            raise ValueError(f"volume array has non-finite values (NaN or Inf) at {n_bad} voxels")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got {np.asarray(affine).tolist()}")
        if not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]) or np.linalg.det(affine[:3, :3]) == 0:
            raise ValueError(f"affine must be invertible with last row (0, 0, 0, 1), got {affine.tolist()}: "
                             "the header's voxel-to-world transform is degenerate")
        spacing = tuple(float(s) for s in np.ravel(self.spacing))
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers (mm, D H W), got {self.spacing!r}")
        source_dtype = _storable_dtype(self.source_dtype, "source_dtype").name
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "source_dtype", source_dtype)
        if self.source is not None:
            object.__setattr__(self, "source", os.fspath(self.source))
        if self.xform_codes is not None:
            codes = tuple(int(c) for c in self.xform_codes)
            if len(codes) != 2 or not all(0 <= c <= 5 for c in codes):
                raise ValueError(f"xform_codes must be (sform_code, qform_code) in 0..5, got {self.xform_codes!r}")
            object.__setattr__(self, "xform_codes", codes)
        object.__setattr__(self, "assumptions", tuple(str(a) for a in self.assumptions))
        if self.slice_thickness_mm is not None:
            thickness = float(self.slice_thickness_mm)
            if not (np.isfinite(thickness) and thickness > 0):
                raise ValueError(f"slice_thickness_mm must be a positive number of mm or None, got "
                                 f"{self.slice_thickness_mm!r}")
            object.__setattr__(self, "slice_thickness_mm", thickness)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape

    def replace(self, **changes) -> Volume:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _storable_dtype(value, what: str) -> np.dtype:
    """The numpy dtype named by `value` if NIfTI can store it, else ValueError."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in _SAVE_DTYPES:
        raise ValueError(f"{what} must be one of {_SAVE_DTYPES}, got {value!r}")
    return dtype


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each voxel axis: the lengths of the affine's first three columns."""
    return tuple(float(s) for s in nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64)))


def _scale_factors(scale: int | Sequence[int], axes: Sequence[int]) -> np.ndarray:
    """Per-axis integer factors (D, H, W): `scale` along `axes`, 1 elsewhere."""
    axes = tuple(axes)
    if len(set(axes)) != len(axes) or not all(a in (0, 1, 2) for a in axes):
        raise ValueError(f"axes must be distinct axes among (0, 1, 2), got {axes}")
    scales = [scale] * len(axes) if np.ndim(scale) == 0 else list(scale)
    if len(scales) != len(axes):
        raise ValueError(f"scale needs one factor per axis in {axes}, got {scale!r}")
    factors = np.ones(3)
    for axis, s in zip(axes, scales):
        if isinstance(s, (bool, np.bool_)) or int(s) != s or s < 1:
            raise ValueError(f"scale factors must be integers >= 1, got {scale!r}")
        factors[axis] = int(s)
    return factors


def upscaled_affine(affine: np.ndarray, shape: tuple[int, int, int], scale: int | Sequence[int],
                    axes: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Affine of the grid upscaled by `scale` along `axes` that overlays the original volume.

    Voxel size is divided by r along each upscaled axis and the origin moves by the
    half-voxel change, so upscaled index u sits where the original continuous index
    (u + 0.5) / r - 0.5 sits and the outer edges of the field of view coincide.
    Rotations and shears are kept. `shape` is the original (D, H, W) grid; the result
    does not depend on it. (nibabel's `rescale_affine` keeps voxel (shape - 1) // 2
    fixed instead, which misplaces the grid by a fraction of a voxel for even shapes.)

    scale: one integer for all `axes`, or one per entry of `axes`.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes (D, H, W), got {shape}")
    factors = _scale_factors(scale, axes)
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(1.0 / factors)
    new_to_old[:3, 3] = 0.5 / factors - 0.5
    return affine @ new_to_old


def upscaled_volume(volume: Volume, array: np.ndarray, scale: int | Sequence[int],
                    axes: Sequence[int] = (0, 1, 2)) -> Volume:
    """Wrap `array`, the upscaled `volume`, with the upscaled spacing and affine.

    array: (D, H, W) of `volume` times `scale` along `axes`. Modality and source dtype
    are kept; `source` is None since the result was not read from a file.
    """
    factors = _scale_factors(scale, axes)
    expected = tuple(int(n * f) for n, f in zip(volume.shape, factors))
    if np.shape(array) != expected:
        raise ValueError(f"upscaled array should have shape {expected} ({volume.shape} times "
                         f"{scale} along axes {tuple(axes)}), got {np.shape(array)}")
    return Volume(
        array=array,
        spacing=tuple(s / f for s, f in zip(volume.spacing, factors)),
        affine=upscaled_affine(volume.affine, volume.shape, scale, axes),
        modality=volume.modality,
        source_dtype=volume.source_dtype,
        dicom=volume.dicom,
        xform_codes=volume.xform_codes,
        description=volume.description,
        assumptions=volume.assumptions,
    )


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
        volume_files = _volume_files(path)
        if volume_files:  # the rule of expand_scans: such a directory is many scans
            raise ValueError(f"{path}: holds {len(volume_files)} NIfTI/NRRD files, not a DICOM series: "
                             "pass one of them (commands taking several scans accept the directory)")
        return _load_dicom_series(path, regularize)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _load_nifti(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path)
    if name.endswith((".dcm", ".dicom", ".ima")) or _has_dicom_preamble(path):
        return _load_dicom_file(path, regularize)
    raise ValueError(f"{path}: unsupported file type: expected .nii, .nii.gz, .nrrd, .nhdr, "
                     "a DICOM file or a directory holding one DICOM series")


VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


def volume_stem(name: str) -> str:
    """A scan's file name without its volume suffix (.nii.gz, .nii, .nrrd, .nhdr, .dcm; any case)."""
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary name beside `path` to write to; renamed over `path` when the block succeeds,
    removed when it fails, so `path` is never half-written. The temporary name keeps the full
    suffix (.nii.gz, .weights.h5, .keras, .png) because writers choose the format by it."""
    path = pathlib.Path(path)
    stem, suffix = _stem_and_suffix(path)
    temporary = path.with_name(f".{stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _stem_and_suffix(path: pathlib.Path) -> tuple[str, str]:
    suffix = "".join(path.suffixes[-2:]) if len(path.suffixes) > 1 else path.suffix
    return (path.name[: len(path.name) - len(suffix)] if suffix else path.name), suffix


def remove_stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Deletes the temporaries that `atomic_path(path)` left when its process was killed
    mid-write (its pid no longer runs); returns them. A live writer's temporary is kept."""
    path = pathlib.Path(path)
    stem, suffix = _stem_and_suffix(path)
    pattern = re.compile(rf"\.{re.escape(stem)}\.tmp-(\d+)-[0-9a-f]{{8}}{re.escape(suffix)}")
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(stem)}.tmp-*"):
        match = pattern.fullmatch(candidate.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload) -> None:
    """Writes `payload` as indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def _volume_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))


def expand_scans(paths: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """Scan paths from files and directories: a directory holding NIfTI/NRRD files gives each
    file; any other directory is taken as one DICOM series. The one rule of every command that
    takes a list of scans (train.py, evaluate.py, sr3d study make); `scans_in` is its batch form."""
    out: list[str] = []
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():
            files = _volume_files(p)
            out.extend(str(f) for f in files) if files else out.append(str(p))
        elif p.exists():
            out.append(str(p))
        else:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(p))
    return tuple(out)


def scans_in(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The scans of a batch directory: each NIfTI/NRRD or .dcm file in it, and each
    subdirectory (one DICOM series), sorted by name."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "No such directory", str(directory))
    entries = [p for p in sorted(directory.iterdir()) if not p.name.startswith(".")]
    return [p for p in entries if p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES + (".dcm",))]


def _make_volume(path: pathlib.Path, array: np.ndarray, affine: np.ndarray, **fields) -> Volume:
    """Volume with spacing taken from the affine; validation errors name the file."""
    try:
        return Volume(array=array, spacing=spacing_from_affine(affine), affine=affine,
                      source=str(path), **fields)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _spatial_shape(shape: Sequence[int], path: pathlib.Path) -> tuple[int, int, int]:
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


def _check_gzip(path: pathlib.Path) -> int:
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


def _warn(assumptions: Sequence[str]) -> None:
    import warnings

    for assumption in assumptions:
        warnings.warn(assumption, GeometryWarning, stacklevel=3)


def _load_nifti(path: pathlib.Path) -> Volume:
    try:
        compressed = path.name.lower().endswith(".gz")
        file_bytes = _check_gzip(path) if compressed else path.stat().st_size
        with nib.imageglobals.LoggingOutputSuppressor():  # its repairs are reported below instead
            image = nib.load(path)
        shape = _spatial_shape(image.shape, path)
        stored = image.get_data_dtype()
        if stored.kind not in "biuf":
            raise ValueError(f"{path}: voxel type {stored} is not a real scalar: expected a "
                             "grey-level volume")
        check_voxel_count(path, image.shape, stored.itemsize, int(image.dataobj.offset), file_bytes,
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
    volume = _make_volume(path, data.transpose(2, 1, 0), image.affine @ _SWAP_D_W,
                          modality=modality.group(1) if modality else None, source_dtype=source_dtype,
                          xform_codes=(int(raw_header["sform_code"]), int(raw_header["qform_code"])),
                          description=description, assumptions=tuple(assumptions))
    _warn(assumptions)
    return volume


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
    check_voxel_count(path, sizes, itemsize, offset, path.stat().st_size if raw else None)


def _load_nrrd(path: pathlib.Path) -> Volume:
    _check_nrrd_size(path)
    try:
        data, header = nrrd.read(str(path))
    except (nrrd.NRRDError, OSError, EOFError, ValueError, zlib.error) as error:
        raise ValueError(f"{path}: not a readable NRRD file: {type(error).__name__}: {error}") from error
    shape = _spatial_shape(data.shape, path)
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
    return _make_volume(path, data.transpose(2, 1, 0), ijk_to_world @ _SWAP_D_W,
                        source_dtype=data.dtype.name)


# ---------------------------------------------------------------- DICOM


@dataclasses.dataclass(frozen=True)
class _Slice:
    """One 2D DICOM image (a file, or a frame of a multi-frame file) in LPS patient coordinates."""

    label: str                 # file, and frame if any, for messages
    dataset: int               # index into the datasets read
    frame: int | None          # None for single-frame files
    position: np.ndarray       # (3,) ImagePositionPatient, mm
    orientation: np.ndarray    # (6,) ImageOrientationPatient: row then column direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slope: float
    intercept: float


def _has_dicom_preamble(path: pathlib.Path) -> bool:
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def _read_dicom(path: pathlib.Path) -> pydicom.Dataset | None:
    """The dataset of a DICOM file, or None for a file that is not DICOM."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        return None
    except Exception as error:  # pydicom raises many types on corrupt files
        raise ValueError(f"{path}: unreadable DICOM file: {type(error).__name__}: {error}") from error


def _number(dataset, keyword: str, default: float) -> float:
    value = None if dataset is None else dataset.get(keyword)
    return default if value is None or value == "" else float(value)


def _slices_of(dataset: pydicom.Dataset, index: int, path: pathlib.Path) -> list[_Slice]:
    """The 2D images of one DICOM file with their position, orientation and rescaling."""
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: colour image ({dataset.SamplesPerPixel} samples per pixel): "
                         "expected a grey-level CT or MR image")
    slope = _number(dataset, "RescaleSlope", _number(dataset, "DoseGridScaling", 1.0))
    intercept = _number(dataset, "RescaleIntercept", 0.0)
    if "PerFrameFunctionalGroupsSequence" in dataset:
        return _enhanced_frames(dataset, index, path, slope, intercept)
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if k not in dataset]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}: cannot place the image in space")
    position = np.asarray(dataset.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    pixel_spacing = tuple(float(s) for s in dataset.PixelSpacing)
    n_frames = int(dataset.get("NumberOfFrames") or 1)
    if n_frames == 1:
        return [_Slice(str(path), index, None, position, orientation, pixel_spacing, slope, intercept)]
    # Plain multi-frame: frames are stacked along the normal from ImagePositionPatient.
    if "GridFrameOffsetVector" in dataset:  # RT Dose: offsets, relative to the first frame
        offsets = np.asarray(dataset.GridFrameOffsetVector, dtype=np.float64)
        offsets = offsets - offsets[0]
    elif "SpacingBetweenSlices" in dataset:
        offsets = np.arange(n_frames) * float(dataset.SpacingBetweenSlices)
    else:
        raise ValueError(f"{path}: multi-frame image with no per-frame positions (no functional "
                         "groups, GridFrameOffsetVector or SpacingBetweenSlices)")
    if len(offsets) != n_frames:
        raise ValueError(f"{path}: {len(offsets)} frame offsets for {n_frames} frames")
    normal = _unit(np.cross(orientation[:3], orientation[3:]))
    return [_Slice(f"{path} (frame {f + 1})", index, f, position + offset * normal, orientation,
                   pixel_spacing, slope, intercept) for f, offset in enumerate(offsets)]


def _enhanced_frames(dataset, index, path, slope, intercept) -> list[_Slice]:
    """Frames of an enhanced multi-frame file: geometry from the per-frame or shared groups."""
    shared = dataset.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in dataset else None

    def item(groups, name):
        for group in (groups, shared):
            sequence = None if group is None else group.get(name)
            if sequence:
                return sequence[0]
        return None

    slices = []
    for f, groups in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        plane_position = item(groups, "PlanePositionSequence")
        plane_orientation = item(groups, "PlaneOrientationSequence")
        measures = item(groups, "PixelMeasuresSequence")
        if plane_position is None or plane_orientation is None or measures is None:
            raise ValueError(f"{path}: frame {f + 1} has no plane position, plane orientation or "
                             "pixel measures: cannot place it in space")
        transform = item(groups, "PixelValueTransformationSequence")
        slices.append(_Slice(
            f"{path} (frame {f + 1})", index, f,
            np.asarray(plane_position.ImagePositionPatient, dtype=np.float64),
            np.asarray(plane_orientation.ImageOrientationPatient, dtype=np.float64),
            tuple(float(s) for s in measures.PixelSpacing),
            _number(transform, "RescaleSlope", slope), _number(transform, "RescaleIntercept", intercept)))
    return slices


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _load_dicom_file(path: pathlib.Path, regularize: bool = False) -> Volume:
    dataset = _read_dicom(path)
    if dataset is None or "PixelData" not in dataset:
        raise ValueError(f"{path}: not a DICOM image file")
    slices = _slices_of(dataset, 0, path)
    if len(slices) < 2:
        raise ValueError(f"{path}: a single 2D DICOM slice ({dataset.Rows} x {dataset.Columns}); "
                         "a volume needs >= 2 slices: pass the directory of the series instead")
    return _stack_slices(path, slices, [dataset], regularize)


def _load_dicom_series(directory: pathlib.Path, regularize: bool = False) -> Volume:
    """One DICOM series from the files directly inside `directory`, each read once."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    datasets, paths = [], []
    for file in files:
        dataset = _read_dicom(file)
        if dataset is not None and "PixelData" in dataset:  # skip DICOMDIR, reports, non-DICOM
            datasets.append(dataset)
            paths.append(file)
    if not datasets:
        raise ValueError(f"{directory}: no DICOM images among its {len(files)} files (subdirectories "
                         "are not searched): pass a directory holding one DICOM series")
    series = collections.Counter(str(d.get("SeriesInstanceUID", "(no SeriesInstanceUID)")) for d in datasets)
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common())
        raise ValueError(f"{directory}: holds {len(series)} DICOM series: {listing}; pass a "
                         "directory with one series")
    slices = [s for i, (d, p) in enumerate(zip(datasets, paths)) for s in _slices_of(d, i, p)]
    if len(slices) < 2:
        raise ValueError(f"{directory}: holds a single 2D DICOM slice; a volume needs >= 2 slices")
    return _stack_slices(directory, slices, datasets, regularize)


def _stack_slices(where: pathlib.Path, slices: list[_Slice], datasets: list, regularize: bool = False) -> Volume:
    """Sort slices along their normal, check the spacing is regular (or resample it onto a
    regular grid with `regularize`) and build the volume."""
    first = slices[0]
    image_shape = (int(datasets[first.dataset].Rows), int(datasets[first.dataset].Columns))
    for s in slices[1:]:
        shape = (int(datasets[s.dataset].Rows), int(datasets[s.dataset].Columns))
        if (shape != image_shape or not np.allclose(s.orientation, first.orientation, atol=1e-4)
                or not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4)):
            raise ValueError(
                f"{where}: {s.label} ({shape}, orientation {s.orientation.tolist()}, pixel spacing "
                f"{s.pixel_spacing}) does not match {first.label} ({image_shape}, "
                f"{first.orientation.tolist()}, {first.pixel_spacing}): not one volume")
    row_cosine, column_cosine = _unit(first.orientation[:3]), _unit(first.orientation[3:])
    normal = np.cross(row_cosine, column_cosine)
    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    positions = np.array([s.position for s in slices])
    step, resample_at, assumptions = _slice_grid(where, slices, along, positions, regularize)
    assumptions = [f"{where}: {a}" for a in assumptions]

    array = np.empty((len(slices),) + image_shape, dtype=np.float32)
    decoded = {}  # multi-frame files are decoded once, for all their frames
    raw_dtypes = set()
    integral, low, high = True, np.inf, -np.inf
    for k, s in enumerate(slices):
        if s.frame is None:
            frame = _decode(datasets[s.dataset], s.label)
        else:
            if s.dataset not in decoded:
                decoded[s.dataset] = _decode(datasets[s.dataset], s.label)
            frames = decoded[s.dataset]
            frame = frames if frames.ndim == 2 else frames[s.frame]
        if frame.shape != image_shape:
            raise ValueError(f"{s.label}: pixel data of shape {frame.shape}, expected {image_shape}")
        raw_dtypes.add(frame.dtype.name)
        if (s.slope, s.intercept) == (1.0, 0.0):
            array[k] = frame
        else:
            array[k] = frame * s.slope + s.intercept
            integral = integral and bool(np.all(array[k] == np.rint(array[k])))
        low, high = min(low, float(array[k].min())), max(high, float(array[k].max()))

    if resample_at is not None:
        array = _resample_slices(array, along, resample_at)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = column_cosine * first.pixel_spacing[0]  # down the rows
    lps[:3, 2] = row_cosine * first.pixel_spacing[1]     # along a row
    lps[:3, 3] = positions[0]
    modality = datasets[first.dataset].get("Modality")
    volume = _make_volume(where, array, _LPS_TO_RAS @ lps, modality=str(modality) if modality else None,
                        source_dtype=_dicom_source_dtype(slices, raw_dtypes, integral, low, high),
                        dicom=_dicom_source(datasets, slices, _LPS_TO_RAS @ lps),
                        assumptions=tuple(assumptions), slice_thickness_mm=_slice_thickness(datasets))
    _warn(assumptions)
    return volume


def _slice_thickness(datasets: list) -> float | None:
    """The series' SliceThickness in mm (the median over its files; for enhanced multi-frame files
    the shared PixelMeasuresSequence's), or None when no file states a positive one."""
    values = []
    for dataset in datasets:
        value = _number(dataset, "SliceThickness", None)
        if value is None and "SharedFunctionalGroupsSequence" in dataset:
            measures = dataset.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
            value = _number(measures[0], "SliceThickness", None) if measures else None
        if value is not None and np.isfinite(value) and value > 0:
            values.append(value)
    return float(np.median(values)) if values else None


@dataclasses.dataclass(frozen=True, eq=False)
class DicomSource:
    """The source series of a volume read from DICOM.

    header: the first image's public attributes without pixel data (patient, study, series, ...).
    instances: (SOPClassUID, SOPInstanceUID, frame number or None) of each source slice, in D order.
    affine: 4x4 voxel index (d, h, w) -> world RAS+ mm of the source grid.
    """

    header: pydicom.Dataset
    instances: tuple[tuple[str, str, int | None], ...]
    affine: np.ndarray


def _dicom_source(datasets: list, slices: list[_Slice], affine: np.ndarray) -> DicomSource:
    first = datasets[slices[0].dataset]
    header = pydicom.Dataset({e.tag: e for e in first if e.tag.group != 0x7FE0 and not e.tag.is_private})
    instances = tuple((str(datasets[s.dataset].get("SOPClassUID", "")),
                       str(datasets[s.dataset].get("SOPInstanceUID", "")),
                       None if s.frame is None else s.frame + 1) for s in slices)
    return DicomSource(header, instances, affine)


# Slice positions may jitter by this fraction of the spacing (0.4 mm on 8 mm slices is 5%) and
# still be placed on a regular grid; a missing slice makes a gap 100% too long.
SLICE_JITTER_TOLERANCE = 0.2


def _slice_grid(where, slices: list[_Slice], along: np.ndarray, positions: np.ndarray,
                regularize: bool) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The regular grid the sorted slices make: (step, resample_at, assumptions).

    step: LPS vector (mm) from one slice of the volume to the next, along the line the slice
    positions lie on (not the normal when the gantry was tilted: then the grid is sheared).
    resample_at: None if the acquired slices are the volume's slices, else the positions along
    the normal of a regular grid to interpolate them at (`regularize` and irregular spacing).
    Raises for repeated positions, positions off a straight line, and irregular spacing
    without `regularize`.
    """
    gaps = np.diff(along)
    duplicate = np.flatnonzero(gaps < 0.01)
    if duplicate.size:
        a, b = slices[duplicate[0]], slices[duplicate[0] + 1]
        raise ValueError(f"{where}: {a.label} and {b.label} are at the same position "
                         f"({along[duplicate[0]]:.3f} mm along the slice normal): repeated positions "
                         "(echoes, phases, time points) make a 4D series: split it into one "
                         "directory per volume")
    median = float(np.median(gaps))
    # Positions are often rounded to 0.1 mm in the header: never tolerate less than 0.15 mm.
    tolerance = min(max(SLICE_JITTER_TOLERANCE * median, 0.15), 0.5 * median)
    extent = float(along[-1] - along[0])
    direction = (positions[-1] - positions[0]) / extent  # mm moved per mm along the normal
    off_line = np.linalg.norm(positions - (positions[0] + (along - along[0])[:, None] * direction), axis=1)
    if off_line.max() > tolerance:
        i = int(np.argmax(off_line))
        raise ValueError(f"{where}: slice positions are not on a straight line: {slices[i].label} is "
                         f"{off_line[i]:.3f} mm off it")
    mean_step = extent / (len(along) - 1)
    deviation = along - (along[0] + np.arange(len(along)) * mean_step)
    irregular = np.flatnonzero(np.abs(gaps - median) > tolerance)
    if not irregular.size and np.abs(deviation).max() <= tolerance:
        notes = []
        jitter = float(np.abs(deviation).max())
        if jitter > max(0.1, 0.02 * median):
            notes.append(f"slice positions deviate up to {jitter:.3g} mm ({100 * jitter / mean_step:.2g}% of the "
                         f"{mean_step:.4g} mm spacing) from a regular grid: each slice placed on the grid "
                         f"(up to {100 * SLICE_JITTER_TOLERANCE:g}% is tolerated)")
        return direction * mean_step, None, notes
    i = int(irregular[0]) if irregular.size else int(np.argmax(np.abs(np.diff(deviation))))
    ratio = gaps[i] / median
    if ratio > 1.5 and abs(ratio - round(ratio)) * median <= tolerance:
        problem = (f"missing slices: gap of {gaps[i]:.3f} mm between {slices[i].label} and "
                   f"{slices[i + 1].label} where the slices are {median:.3f} mm apart")
    else:
        problem = (f"irregular slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm (median "
                   f"{median:.3g} mm; {gaps[i]:.3f} mm between {slices[i].label} and {slices[i + 1].label})")
    if not regularize:
        raise ValueError(f"{where}: {problem}: pass --regularize (load_volume(..., regularize=True)) to "
                         f"resample onto a regular grid of about {median:.3g} mm, the gaps filled by linear "
                         "interpolation")
    intervals = max(1, int(round(extent / median)))
    spacing = extent / intervals
    resample_at = along[0] + np.arange(intervals + 1) * spacing
    acquired = int(np.sum(np.min(np.abs(resample_at[:, None] - along[None, :]), axis=1) <= 0.05 * spacing))
    note = (f"{problem}; resampled onto a regular {spacing:.4g} mm grid of {intervals + 1} slices: {acquired} "
            f"at acquired positions, {intervals + 1 - acquired} interpolated linearly between the nearest "
            "acquired slices on either side (--regularize)")
    return direction * spacing, resample_at, [note]


def _resample_slices(array: np.ndarray, along: np.ndarray, resample_at: np.ndarray) -> np.ndarray:
    """Slices (N, H, W) at sorted positions `along` -> (K, H, W) at `resample_at`, linearly."""
    out = np.empty((len(resample_at),) + array.shape[1:], np.float32)
    for k, t in enumerate(resample_at):
        i = int(np.clip(np.searchsorted(along, t, side="right") - 1, 0, len(along) - 2))
        w = float(np.clip((t - along[i]) / (along[i + 1] - along[i]), 0.0, 1.0))
        out[k] = (1.0 - w) * array[i] + w * array[i + 1]
    return out


def _decode(dataset: pydicom.Dataset, label: str) -> np.ndarray:
    try:
        return dataset.pixel_array
    except Exception as error:  # missing decoder plugin, corrupt or truncated pixel data
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise ValueError(f"{label}: cannot decode pixel data (transfer syntax {getattr(syntax, 'name', syntax)}): "
                         f"{type(error).__name__}: {error}") from error


def _dicom_source_dtype(slices, raw_dtypes: set, integral: bool, low: float, high: float) -> str:
    """Stored dtype when no rescaling applies, else the smallest of int16/int32 that holds the
    rescaled values if they are integers (HU), else float32."""
    if all((s.slope, s.intercept) == (1.0, 0.0) for s in slices) and len(raw_dtypes) == 1:
        return raw_dtypes.pop()
    if integral:
        for name in ("int16", "int32"):
            if np.iinfo(name).min <= low and high <= np.iinfo(name).max:
                return name
    return "float32"


# ---------------------------------------------------------------- writing


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
    path = pathlib.Path(path)
    name = path.name
    suffix = next((s for s in (".nii.gz", ".nii") if name.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{path}: can only write NIfTI: the name must end with .nii or .nii.gz")
    if len(name) == len(suffix):
        raise ValueError(f"{path}: the file name is only the suffix {name}: give it a name, e.g. out{suffix}")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file name to write", str(path))
    dtype = _storable_dtype(dtype if dtype is not None else volume.source_dtype, f"{path}: dtype")
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "Directory to write into does not exist", str(path))

    affine = volume.affine @ _SWAP_D_W
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
        with atomic_path(path) as temporary:
            nib.save(image, temporary)
    except OSError as error:
        if error.errno is None:
            raise
        raise type(error)(error.errno, f"cannot write NIfTI: {error.strerror}", str(path)) from error
    return path
