"""DICOM files and series directories -> `Volume` (pydicom): slices sorted along their normal,
the slice grid checked (or regularised), LPS patient coordinates converted to RAS+."""
from __future__ import annotations

import collections
import dataclasses
import pathlib

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from sr3d.io import common
from sr3d.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def has_preamble(path: pathlib.Path) -> bool:
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


def load_file(path: pathlib.Path, regularize: bool = False) -> Volume:
    dataset = _read_dicom(path)
    if dataset is None or "PixelData" not in dataset:
        raise ValueError(f"{path}: not a DICOM image file")
    slices = _slices_of(dataset, 0, path)
    if len(slices) < 2:
        raise ValueError(f"{path}: a single 2D DICOM slice ({dataset.Rows} x {dataset.Columns}); "
                         "a volume needs >= 2 slices: pass the directory of the series instead")
    return _stack_slices(path, slices, [dataset], regularize)


def load_series(directory: pathlib.Path, regularize: bool = False) -> Volume:
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
    volume = common.make_volume(where, array, _LPS_TO_RAS @ lps, modality=str(modality) if modality else None,
                        source_dtype=_dicom_source_dtype(slices, raw_dtypes, integral, low, high),
                        dicom=_dicom_source(datasets, slices, _LPS_TO_RAS @ lps),
                        assumptions=tuple(assumptions), slice_thickness_mm=_slice_thickness(datasets))
    common.warn_assumptions(assumptions)
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
