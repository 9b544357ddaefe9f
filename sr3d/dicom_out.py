"""A Volume out as a new DICOM series: one CT or MR Image Storage file per slice (pydicom).

The series is DERIVED/SECONDARY, has new Series and SOP Instance UIDs and lies on the volume's
own grid (ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing, SliceThickness,
SpacingBetweenSlices from its affine). A volume read from DICOM (`Volume.dicom`) keeps its
patient, study and frame of reference, and each slice points at the source images it was
computed from (SourceImageSequence). Any other volume (e.g. from NIfTI) gets a fresh, minimal
patient and study: PatientName "SR3D^ANONYMOUS", PatientID "SR3D-" plus 8 hex digits, new
StudyInstanceUID and FrameOfReferenceUID, study date now.

Voxels are stored as int16 (uint16 when only that fits) with RescaleSlope 1 and RescaleIntercept
0 when the volume's units are integers (CT in HU, most MR), otherwise as int16 through a linear
RescaleSlope/RescaleIntercept over the volume's range. pydicom rather than highdicom: highdicom
writes enhanced multi-frame or segmentation/SR objects, while PACS viewers, SimpleITK and dcm2niix
all read classic one-file-per-slice CT/MR images, which pydicom writes directly.
"""
from __future__ import annotations

import datetime
import errno
import os
import pathlib
import shutil

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from sr3d import volume as sr3d_volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Kept from the source image: patient, study, frame of reference, and what a viewer needs to show
# the series as the source's sibling. Acquisition attributes are type 1/2 in the CT and MR modules.
_KEPT = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined",
    "Laterality",
    "KVP", "ConvolutionKernel",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName",
    "RepetitionTime", "EchoTime", "InversionTime", "EchoTrainLength", "FlipAngle",
    "MagneticFieldStrength", "ImagingFrequency", "ImagedNucleus",
)
# Type 1 and 2 attributes of the CT and MR image modules that a source may lack.
_DEFAULTS = {
    "CT": {"KVP": "", "AcquisitionNumber": ""},
    "MR": {"ScanningSequence": "RM", "SequenceVariant": "NONE", "ScanOptions": "", "MRAcquisitionType": "3D",
           "RepetitionTime": "", "EchoTime": "", "EchoTrainLength": "", "MagneticFieldStrength": ""},
}


def check_output_dir(path: str | os.PathLike) -> pathlib.Path:
    """The directory a series will be written to: it must not exist yet (or be empty) and its
    parent must be a writable directory; checked before a long upscaling, again when writing."""
    out = pathlib.Path(path)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out}: DICOM output must be a new (or empty) directory: it exists and is "
                         "not empty; choose a new directory or remove it")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "Directory to write into does not exist", str(parent))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{out}: directory {parent} is not writable")
    return out


def save_series(volume: sr3d_volume.Volume, directory: str | os.PathLike, note: str | None = None) -> pathlib.Path:
    """Write `volume` as a new DICOM series into `directory` (new or empty), atomically: the files
    are written into a temporary directory beside it, which is then renamed. Returns `directory`.

    volume: float32 (D, H, W) in scanner units; slice k of D becomes file k + 1 (InstanceNumber).
    note: how the volume was made (e.g. "x2 3d CNN"), added to the DerivationDescription (and to
    the SeriesDescription when the factor cannot be read off a DICOM source).
    """
    out = check_output_dir(directory)
    datasets = series_datasets(volume, note=note)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        temporary.mkdir()
        for k, dataset in enumerate(datasets):
            dataset.save_as(temporary / f"{k + 1:06d}.dcm", enforce_file_format=True)
        os.replace(temporary, out)  # POSIX rename replaces an empty directory
    except OSError as error:
        if error.errno is None:
            raise
        raise type(error)(error.errno, f"cannot write DICOM series: {error.strerror}", str(out)) from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out


def series_datasets(volume: sr3d_volume.Volume, note: str | None = None,
                    now: datetime.datetime | None = None) -> list[pydicom.Dataset]:
    """The datasets of the series `save_series` writes, one per slice (D order)."""
    now = now or datetime.datetime.now()
    source = volume.dicom
    modality = volume.modality or (str(source.header.get("Modality", "")) if source else "") or None
    kind = "CT" if modality == "CT" else "MR"
    geometry = slice_geometry(volume.affine, volume.shape[0])
    stored, slope, intercept = encode_pixels(volume.array, integral=np.dtype(volume.source_dtype).kind in "iu")

    common = pydicom.Dataset()
    if source is not None:
        for keyword in _KEPT:
            if keyword in source.header:
                common[keyword] = source.header[keyword]
    else:
        common.PatientName = "SR3D^ANONYMOUS"
        common.PatientID = f"SR3D-{os.urandom(4).hex().upper()}"
        common.PatientBirthDate = ""
        common.PatientSex = ""
        common.StudyInstanceUID = generate_uid()
        common.StudyDate = now.strftime("%Y%m%d")
        common.StudyTime = now.strftime("%H%M%S")
        common.StudyID = "1"
        common.AccessionNumber = ""
        common.ReferringPhysicianName = ""
        common.StudyDescription = "sr3d"
        common.FrameOfReferenceUID = generate_uid()
        common.PositionReferenceIndicator = ""
    for keyword, value in _DEFAULTS[kind].items():
        if keyword not in common:
            setattr(common, keyword, value)
    common.WindowCenter, common.WindowWidth = _window(volume.array, source)

    factor = _factor_label(volume, source)
    common.SOPClassUID = CT_IMAGE_STORAGE if kind == "CT" else MR_IMAGE_STORAGE
    common.Modality = modality or "OT"
    common.SeriesInstanceUID = generate_uid()
    common.SeriesNumber = _series_number(source)
    common.SeriesDate = common.ContentDate = common.InstanceCreationDate = now.strftime("%Y%m%d")
    common.SeriesTime = common.ContentTime = common.InstanceCreationTime = now.strftime("%H%M%S")
    source_description = str(source.header.get("SeriesDescription", "")) if source else ""
    common.SeriesDescription = " ".join(p for p in ("sr3d", factor or note, source_description) if p)[:64]
    source_type = list(source.header.get("ImageType", [])) if source else []
    common.ImageType = ["DERIVED", "SECONDARY"] + [str(v) for v in source_type[2:]]
    if source is not None:
        origin = f"series {source.header.get('SeriesInstanceUID', '(no SeriesInstanceUID)')}"
    else:
        origin = pathlib.Path(volume.source).name if volume.source else "a computed volume"
    what = " ".join(p for p in ("sr3d", note or factor) if p)
    common.DerivationDescription = f"{what} super-resolution of {origin}"[:1024]
    common.Manufacturer = "sr3d"
    common.SoftwareVersions = _version()
    common.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in geometry["orientation"]]
    common.PixelSpacing = [format_number_as_ds(float(v)) for v in geometry["pixel_spacing"]]
    common.SliceThickness = common.SpacingBetweenSlices = format_number_as_ds(geometry["slice_spacing"])
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows, common.Columns = volume.shape[1], volume.shape[2]
    common.BitsAllocated = common.BitsStored = 16
    common.HighBit = 15
    common.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    common.RescaleSlope = slope
    common.RescaleIntercept = intercept
    if kind == "CT":
        common.RescaleType = "HU"

    datasets = []
    for k in range(volume.shape[0]):
        dataset = pydicom.Dataset()
        dataset.update(common)
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = [format_number_as_ds(float(v)) for v in geometry["positions"][k]]
        dataset.SliceLocation = format_number_as_ds(float(geometry["positions"][k] @ geometry["normal"]))
        if source is not None:
            dataset.SourceImageSequence = [_reference(*source.instances[i]) for i in _source_slices(volume, source, k)]
        dataset.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(dataset)
    return datasets


def slice_geometry(affine: np.ndarray, n_slices: int) -> dict:
    """DICOM plane geometry (LPS mm) of the slices of a (D, H, W) grid whose voxel index maps to
    world RAS+ mm by `affine`: ImagePositionPatient of each slice, ImageOrientationPatient (row,
    then column direction cosines), PixelSpacing (between rows, between columns), the distance
    between slices along their normal, and the normal. Raises ValueError for in-plane shear,
    which DICOM planes cannot hold."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    slice_step, down_rows, along_row = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    row_spacing, column_spacing = np.linalg.norm(down_rows), np.linalg.norm(along_row)
    row_cosine, column_cosine = along_row / column_spacing, down_rows / row_spacing
    if abs(row_cosine @ column_cosine) > 1e-4:
        raise ValueError(f"in-plane axes of the affine are not perpendicular (cosine "
                         f"{row_cosine @ column_cosine:.4f}): DICOM images need a rectangular pixel grid")
    normal = np.cross(row_cosine, column_cosine)
    return {
        "positions": lps[:3, 3] + np.arange(n_slices)[:, None] * slice_step,
        "orientation": np.concatenate([row_cosine, column_cosine]),
        "pixel_spacing": (float(row_spacing), float(column_spacing)),
        "slice_spacing": float(abs(slice_step @ normal)),
        "normal": normal,
    }


def encode_pixels(array: np.ndarray, integral: bool) -> tuple[np.ndarray, str, str]:
    """Stored pixels (int16 or uint16, same shape), RescaleSlope and RescaleIntercept (as DICOM
    decimal strings) such that stored * slope + intercept gives `array`: exactly after rounding when
    `integral` and the rounded values fit 16 bits, else to within half a slope."""
    low, high = float(array.min()), float(array.max())
    if integral:
        rounded = np.rint(array)
        for dtype in (np.int16, np.uint16):
            info = np.iinfo(dtype)
            if info.min <= rounded.min() and rounded.max() <= info.max:
                return rounded.astype(dtype), "1", "0"
    slope = float(format_number_as_ds((high - low) / 65535.0)) if high > low else 1.0
    intercept = float(format_number_as_ds(low + 32768.0 * slope))
    stored = np.clip(np.rint((array.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)
    return stored, format_number_as_ds(slope), format_number_as_ds(intercept)


def _window(array: np.ndarray, source) -> tuple[str, str]:
    """WindowCenter and WindowWidth: the source's when valid (CT presets), else the 1st to 99th percentile."""
    if source is not None and "WindowWidth" in source.header:
        width = source.header.WindowWidth
        if min(np.atleast_1d(np.asarray(width, dtype=np.float64))) > 0:
            return source.header.WindowCenter, width
    low, high = np.percentile(array, [1, 99])
    return format_number_as_ds(float(low + high) / 2), format_number_as_ds(max(float(high - low), 1.0))


def _factor_label(volume: sr3d_volume.Volume, source) -> str:
    """'x2' (or 'x1x2x2', D x H x W) from the source grid's spacing over the volume's; '' without a
    source or when the grid is the source's."""
    if source is None:
        return ""
    factors = [round(a / b, 3) for a, b in zip(sr3d_volume.spacing_from_affine(source.affine), volume.spacing)]
    if factors == [1, 1, 1]:
        return ""
    if len(set(factors)) == 1:
        return f"x{factors[0]:g}"
    return "x" + "x".join(f"{f:g}" for f in factors)


def _series_number(source) -> int:
    number = source.header.get("SeriesNumber") if source is not None else None
    return (int(number) + 1000 if number not in (None, "") else 1000) % 2**31


def _source_slices(volume: sr3d_volume.Volume, source, k: int) -> list[int]:
    """Indices of the source slices on either side of output slice k (the images it was computed
    from), found by mapping its centre into the source grid; all source slices if that fails."""
    n = len(source.instances)
    centre = volume.affine @ np.array([k, (volume.shape[1] - 1) / 2, (volume.shape[2] - 1) / 2, 1.0])
    d = float((np.linalg.inv(source.affine) @ centre)[0])
    if not -0.5 <= d <= n - 0.5:
        return list(range(n))
    return sorted({int(np.clip(np.floor(d), 0, n - 1)), int(np.clip(np.ceil(d), 0, n - 1))})


def _reference(sop_class: str, sop_instance: str, frame: int | None) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


def _version() -> str:
    try:
        from importlib.metadata import version
        return f"sr3d {version('sr3d')}"
    except Exception:  # not installed (source checkout)
        return "sr3d"
