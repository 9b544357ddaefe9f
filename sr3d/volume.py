"""`Volume` (a float32 (D, H, W) scan plus its world geometry) and the affine maths of sr3d.

Affines are 4x4 float64, voxel index (d, h, w) -> world RAS+ mm, never implicit (nibabel's
`affines.py` style: small pure functions). The grid convention of every resampling here: a
coarse voxel covering fine voxels l*r .. l*r + r - 1 sits at their centre, fine index
(l + 0.5) r - 0.5, so `upscaled_affine(downscaled_affine(a, r), r)` is `a` again and the outer
edges of the field of view coincide. Reading and writing files is `sr3d.io`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

# How far `Volume.spacing` may be from the affine's column lengths (round-off, not a geometry).
SPACING_RTOL = 1e-5
# The voxel types `save_volume` can store (and `Volume.source_dtype` may name).
SAVE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
               "float32", "float64")


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan: float32 (D, H, W) voxels in scanner units plus its world geometry.

    array: float32 (D, H, W), scanner units (HU for CT after DICOM rescaling).
    spacing: voxel size in mm, (D, H, W) order: the lengths of the affine's first three columns
        (checked to `SPACING_RTOL`; `spacing_from_affine`).
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
    dicom: object | None = None    # sr3d.io.dicom.DicomSource (the reader builds it)
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
        # One geometry, stated twice: an LR array must not carry the HR affine (MONAI's MetaTensor
        # derives pixdim from the affine for the same reason).
        from_affine = spacing_from_affine(affine)
        if not np.allclose(spacing, from_affine, rtol=SPACING_RTOL, atol=0.0):
            raise ValueError(f"spacing {_mm(spacing)} mm does not match the affine's voxel sizes {_mm(from_affine)} "
                             f"mm (the lengths of its first three columns; affine {affine.tolist()}): give the "
                             "affine of this grid (sr3d.volume.downscaled_affine / upscaled_affine)")
        source_dtype = storable_dtype(self.source_dtype, "source_dtype").name
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


def storable_dtype(value, what: str) -> np.dtype:
    """The numpy dtype named by `value` if NIfTI can store it, else ValueError."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in SAVE_DTYPES:
        raise ValueError(f"{what} must be one of {SAVE_DTYPES}, got {value!r}")
    return dtype
def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each voxel axis: the lengths of the affine's first three columns."""
    top_left = np.asarray(affine, dtype=np.float64)[:-1, :-1]
    return tuple(float(s) for s in np.sqrt(np.sum(top_left ** 2, axis=0)))  # as nibabel's voxel_sizes


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


def downscaled_affine(affine: np.ndarray, scale: int | Sequence[int], axes: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Affine of the grid `scale` times coarser along `axes` on the same field of view: coarse
    voxel l covers fine voxels l*r .. l*r + r - 1 and sits at fine index (l + 0.5) r - 0.5, so
    `upscaled_affine` of the result is `affine` again (the grid of `sr3d.degrade`'s block means)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    factors = _scale_factors(scale, axes)
    coarse = affine.copy()
    coarse[:3, 3] += affine[:3, :3] @ (0.5 * factors - 0.5)
    coarse[:3, :3] = affine[:3, :3] * factors
    return coarse


def downscaled_volume(volume: Volume, array: np.ndarray, scale: int | Sequence[int],
                      axes: Sequence[int] = (0, 1, 2), **changes) -> Volume:
    """Wrap `array`, `volume` made `scale` times coarser along `axes` (e.g. by
    `sr3d.degrade.simulate_lr` on a grid cropped to multiples of the scale), with the coarser
    spacing and `downscaled_affine`; other fields kept, `source` None, `changes` applied."""
    factors = _scale_factors(scale, axes)
    return volume.replace(array=array, spacing=tuple(s * f for s, f in zip(volume.spacing, factors)),
                          affine=downscaled_affine(volume.affine, scale, axes), source=None, **changes)
