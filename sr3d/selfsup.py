"""Thick-slice scans without training data: the stage-d network trained on the scan itself.

Clinical scans are often fine in-plane (0.5-1 mm) with thick slices (3-7 mm),
and no high-resolution ground truth exists to train on. Stage `d` of the
two-stage design already upsamples one axis of a plane, so it can learn the
thick axis from the fine one (as SMORE/ECLARE do): every in-plane slice is
degraded along one of its axes the way the scanner degraded the thick axis
(blurred by the slice profile and decimated by the thickness ratio), which
gives (LR, HR) pairs whose LR looks like the planes that contain the thick
axis; the network trained on them then upsamples the thick axis.

Geometry. The thick axis is the one with the largest spacing (`thick_axis`).
`plan_for` turns the spacing and a target spacing t (default: the in-plane
spacing) into a plan: the network factor r = ceil(thick / t) (any integer
>= 2), the network's output spacing thick / r, and whether the result is
resampled to exactly t (when thick / t is not an integer). Training HR slices
are first resampled along the degraded axis to thick / r, so that a training
pair has the same physical spacings as the inference planes (thick LR axis,
fine r-times axis, untouched in-plane axis): a 6.5 mm scan with 0.78 mm pixels
taken to 1.3 mm trains on 1.3 mm -> 6.5 mm pairs, not 0.78 -> 3.9 mm.

Degradation model (`sr3d.degrade.degrade_along`): thick voxel i covers fine voxels
i*r .. i*r + r - 1 (the grid convention of `sr3d.volume.upscaled_affine`); its
value is the slice profile (`sr3d.degrade.slice_profile`: a box of width r, or a Gaussian
with FWHM r, in fine voxels) centred on that span, with mirrored borders.
The slice thickness (box width or FWHM) may differ from the spacing: thinner is a gap
between slices, thicker an overlap (`SliceProfile`, `resolve_profile`).

Training (`train_on_scan`): both in-plane directions give pairs (rotating the
degradation direction is the augmentation), drawn as 7x7 LR patches by
`sr3d.data.PatchSampler` with the paper's blur augmentation, loss and
optimizer; it stops at a wall-clock budget (default 180 s) or a step count,
and drops the learning rate 10x half way. Batches are seeded by (seed, epoch,
step) and ops are deterministic, so two runs with the same seed agree step for
step; only where the time budget cuts differs.

Inference (`upscale_thick`): the thick axis is moved to D, the scan normalised
(`sr3d.intensity.window`), stage `d` run on every (D, W) plane (optionally also
(D, H), averaged), denormalised and clipped to the input's range; for a
non-integer ratio the r-times result is resampled along D (cubic spline) to
exactly the target spacing. The output overlays the input: integer factors use
`sr3d.volume.upscaled_volume` (field-of-view edges coincide); resampled grids keep
the centre of the field of view, with round(n * thick / t) voxels.

A trained network is saved as `.keras` with a JSON beside it (factor, profile,
spacings, config: `save_model`), and reused for other scans of the same
protocol (`load_model`, `upscale_thick(volume, "model.keras")`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

import numpy as np

from sr3d import data, degrade, intensity, upscaling
from sr3d.degrade import PROFILES, degrade_along, simulate_thick_slices, slice_profile  # noqa: F401
from sr3d import files as sr3d_files
from sr3d import volume as sr3d_volume
from sr3d.progress import Progress, Step

# Spacings within this relative difference count as equal (isotropic scan, same protocol).
ISOTROPY_TOLERANCE = 0.10
PROTOCOL_TOLERANCE = 0.05
# A ratio within this relative distance of an integer is that integer (no resampling).
_INTEGER_TOLERANCE = 1e-3
MODEL_JSON_FORMAT = "sr3d-selfsup-1"


# ---------------------------------------------------------------------------- geometry

def thick_axis(spacing) -> int:
    """The axis (0, 1 or 2 of (D, H, W)) whose spacing is largest.

    Raises ValueError when the scan is isotropic within ISOTROPY_TOLERANCE (nothing to
    upscale) or when two axes are thick (the in-plane slices would not be fine).
    """
    spacing = np.asarray(spacing, np.float64).ravel()
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing must be 3 positive numbers in mm (D, H, W), got {spacing.tolist()}")
    order = np.argsort(spacing)[::-1]
    thick, middle = spacing[order[0]], spacing[order[1]]
    if thick <= (1 + ISOTROPY_TOLERANCE) * spacing.min():
        raise ValueError(f"the scan is isotropic within {ISOTROPY_TOLERANCE:.0%} (spacing "
                         f"{_mm(spacing)} mm): it has no thick axis to upscale; use the supervised "
                         "model (sr3d upscale without --self-supervised)")
    if thick <= (1 + ISOTROPY_TOLERANCE) * middle:
        raise ValueError(f"two axes are thick (spacing {_mm(spacing)} mm): self-supervision needs one "
                         "thick axis and fine slices across it")
    return int(order[0])


def _mm(values) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)


@dataclasses.dataclass(frozen=True)
class ThickSlicePlan:
    """How a thick-slice scan is upscaled.

    axis: thick axis of the (D, H, W) array. thick_mm: its spacing. inplane_mm: the
    spacings of the two other axes, in (D, H, W) order. target_mm: spacing of the
    result along the thick axis. factor: the network's integer factor.
    """

    axis: int
    thick_mm: float
    inplane_mm: tuple[float, float]
    target_mm: float
    factor: int

    @property
    def ratio(self) -> float:
        return self.thick_mm / self.target_mm

    @property
    def network_mm(self) -> float:
        """Spacing of the network's output along the thick axis: thick_mm / factor."""
        return self.thick_mm / self.factor

    @property
    def resample(self) -> bool:
        """True when thick / target is not an integer: the network output is resampled."""
        return abs(self.ratio - self.factor) > _INTEGER_TOLERANCE * self.factor

    def describe(self) -> str:
        axis = "DHW"[self.axis]
        text = (f"sr3d self-supervised thick-slice upscaling along axis {axis}: {self.thick_mm:.4g} mm "
                f"slices, {_mm(self.inplane_mm)} mm in-plane; stage-d network x{self.factor} trained on "
                f"the scan's own in-plane slices")
        if self.resample:
            text += (f"; ratio {self.ratio:.4g} is not an integer: upsampled x{self.factor} to "
                     f"{self.network_mm:.4g} mm, then resampled (cubic spline) to {self.target_mm:.4g} mm")
        else:
            text += f"; output spacing {self.target_mm:.4g} mm"
        return text


def plan_for(spacing, factor: int | None = None, target_spacing: float | None = None) -> ThickSlicePlan:
    """The plan for a scan of this (D, H, W) spacing in mm.

    factor: integer factor along the thick axis (target = thick / factor), or
    target_spacing: spacing wanted along the thick axis, in mm (factor = ceil(thick / target)).
    Neither: target = the coarser in-plane spacing (isotropic output). Not both.
    """
    axis = thick_axis(spacing)
    spacing = tuple(float(s) for s in np.ravel(spacing))
    thick = spacing[axis]
    inplane = tuple(s for a, s in enumerate(spacing) if a != axis)
    if factor is not None and target_spacing is not None:
        raise ValueError(f"give a factor or a target spacing, not both: got factor {factor} and "
                         f"target spacing {target_spacing} mm")
    if factor is not None:
        factor = degrade.check_scale(factor, minimum=2, where="sr3d.selfsup.plan_for")
        return ThickSlicePlan(axis, thick, inplane, thick / factor, factor)
    target = max(inplane) if target_spacing is None else float(target_spacing)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target spacing must be a positive number of mm, got {target_spacing!r}")
    if target < min(inplane) * (1 - PROTOCOL_TOLERANCE):
        raise ValueError(f"target spacing {target:g} mm is finer than the in-plane spacing "
                         f"{_mm(inplane)} mm: the scan holds no detail at that scale to learn from")
    ratio = thick / target
    factor = max(2, math.ceil(ratio - _INTEGER_TOLERANCE * ratio))
    if ratio < 1 + _INTEGER_TOLERANCE:
        raise ValueError(f"target spacing {target:g} mm is not finer than the slice spacing {thick:g} mm: "
                         "nothing to upscale")
    return ThickSlicePlan(axis, thick, inplane, target, factor)


# The slice-profile degradation (slice_profile, degrade_along, simulate_thick_slices) lives in
# sr3d.degrade with the other HR -> LR models; its names stay importable from here.


# ---------------------------------------------------------------------------- slice profile of a scan

@dataclasses.dataclass(frozen=True)
class SliceProfile:
    """The slice profile training pairs are simulated with: kind ("box" or "gaussian"), thickness
    in mm (the box width or the Gaussian's FWHM) and where it came from (`source`).
    distance: for an estimate, the spectral mismatch of the chosen candidate (see
    `estimate_profile`); None otherwise."""

    kind: str
    thickness_mm: float
    source: str
    distance: float | None = None

    def width(self, plan: ThickSlicePlan) -> float:
        """The thickness in voxels of the network's output grid (plan.network_mm)."""
        return self.thickness_mm / plan.network_mm

    def describe(self, plan: ThickSlicePlan) -> str:
        shape = "box" if self.kind == "box" else "Gaussian (FWHM)"
        gap = plan.thick_mm - self.thickness_mm
        spacing = (f"gap {gap:.3g} mm" if gap > 0.01 * plan.thick_mm else
                   f"overlap {-gap:.3g} mm" if gap < -0.01 * plan.thick_mm else "contiguous")
        return (f"slice profile: {shape} {self.thickness_mm:.3g} mm every {plan.thick_mm:.3g} mm ({spacing}; "
                f"{self.source})")

    def to_json(self) -> dict:
        out = {"kind": self.kind, "thickness_mm": round(self.thickness_mm, 4), "source": self.source}
        if self.distance is not None:
            out["spectral_distance"] = round(self.distance, 6)
        return out


@dataclasses.dataclass(frozen=True)
class ProfileMixture:
    """Slice profiles to train on together, each with its share of the training slices
    (`estimate_mixture`): the estimate's nearly-as-good candidates beside its best one, so the
    network does not bet on one profile. candidates: best first, each a distinct kernel on the
    network grid; weights: their shares, summing to 1. kind, thickness_mm, source and distance
    are the best candidate's (what `estimate_profile` returns), for readers of a single profile."""

    candidates: tuple[SliceProfile, ...]
    weights: tuple[float, ...]
    temperature: float | None
    top_k: int | None
    basis: str = "spectral distance"

    def __post_init__(self):
        if not self.candidates or len(self.candidates) != len(self.weights):
            raise ValueError(f"ProfileMixture: one weight per candidate, got {len(self.candidates)} candidates "
                             f"and {len(self.weights)} weights")
        if min(self.weights) < 0 or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError(f"ProfileMixture: weights must be >= 0 and sum to 1, got {list(self.weights)}")

    @property
    def best(self) -> SliceProfile:
        return self.candidates[0]

    @property
    def kind(self) -> str:
        return self.best.kind

    @property
    def thickness_mm(self) -> float:
        return self.best.thickness_mm

    @property
    def source(self) -> str:
        return f"{self.best.source}; trained on a mixture of {len(self.candidates)} candidates"

    @property
    def distance(self) -> float | None:
        return self.best.distance

    def describe(self, plan: ThickSlicePlan) -> str:
        shares = ", ".join(f"{'box' if c.kind == 'box' else 'Gaussian'} {c.thickness_mm:.3g} mm {w:.0%}"
                           for c, w in zip(self.candidates, self.weights))
        return f"{self.best.describe(plan)}; training slices degraded by a mixture: {shares}"

    def to_json(self) -> dict:
        out = self.best.to_json()
        out["source"] = self.source
        out["mixture"] = {"basis": self.basis, **({} if self.temperature is None else {"temperature": self.temperature}),
                          **({} if self.top_k is None else {"top_k": self.top_k}),
                          "candidates": [{**c.to_json(), "weight": round(w, 6)} for c, w in
                                         zip(self.candidates, self.weights)]}
        for c in out["mixture"]["candidates"]:
            del c["source"]
        return out

    def draws(self, count: int, seed) -> np.ndarray:
        """Which candidate degrades each of `count` training slices: int (count,). Stratified:
        candidate i gets round(weight_i x count) slices (largest remainders), in an order shuffled
        by `seed` (an int or a sequence of ints for np.random.default_rng)."""
        quota = np.asarray(self.weights) * count
        counts = np.floor(quota).astype(int)
        remainders = quota - counts
        for i in np.argsort(-remainders, kind="stable")[:count - counts.sum()]:
            counts[i] += 1
        return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


# Candidate thicknesses of `estimate_profile`, as fractions of the slice spacing.
ESTIMATE_FRACTIONS = tuple(np.round(np.arange(0.3, 1.61, 0.05), 2))
_SPECTRUM_LENGTH = 16          # samples per line segment of the spectra compared (thick spacing)
# Weight of the prior toward contiguous slices in `estimate_profile`: each candidate's spectral
# distance is multiplied by 1 + PRIOR_WEIGHT x log(thickness / spacing)^2. Chosen on three ds002748
# subjects of the training split (experiments/profile_estimators.py, "dev"), never on test scans, on a
# grid then scored with a wrong spacing; rescored, 0.2 is a little lower on dev (docs/thick_slice.md).
PRIOR_WEIGHT = 0.1
# `estimate_mixture`: the softmax temperature (relative to the best distance) and how many distinct
# kernels are kept. The temperature was chosen on three ds002748 subjects of the training split
# (sub-01, sub-10, sub-19; both gap cases, 1000 steps: experiments/thick_slice.py DEV_SCANS,
# docs/thick_slice/mixture_dev), between 0.05 and 0.2 with top_k 4, never on test scans.
MIXTURE_TEMPERATURE = 0.05
MIXTURE_TOP_K = 4
# What `--slice-profile estimate` trains on (`--profile-estimate`): "best" (the single best candidate,
# `estimate_profile`), "mixture" (`estimate_mixture`; measured no better on the test gap cases) or
# "posterior" (`estimate_posterior`: within 0.3 dB of the known profile on all six test gap cases, where
# "best" misses the T2 by 0.37 dB, but worse on the dev subjects: docs/thick_slice/posterior_dev, so
# "best" stays the default, chosen on dev).
ESTIMATES = ("best", "mixture", "posterior")
DEFAULT_ESTIMATE = "best"
# What `estimate_profile` compares the thick-axis spectra with: "inplane" (the scan's in-plane axes as
# they are) or "population" (corrected by the anatomy's own difference between the thick and the
# in-plane directions: ANISOTROPY_TABLE, measured on 1 mm training-split ds002748 subjects by
# experiments/anisotropy_table.py). The shrink (the fraction of the table subtracted) and the prior
# weight used with it were chosen on dev subjects (experiments/profile_estimators.py), never on test scans.
REFERENCES = ("inplane", "population")
DEFAULT_REFERENCE = "inplane"
ANISOTROPY_TABLE = pathlib.Path(__file__).resolve().parent / "data_files" / "anisotropy_brain_mr.json"
POPULATION_SHRINK = 1.0
# `estimate_posterior`: the estimate's errors on slices simulated from training-split scans
# (experiments/profile_errors.py), which turn an estimate into the profiles it may have been.
PROFILE_ERRORS_TABLE = pathlib.Path(__file__).resolve().parent / "data_files" / "profile_errors_brain_mr.json"
POPULATION_PRIOR_WEIGHT = 0.5
# World axes of the RAS+ affine: x (left-right), y (anterior-posterior), z (superior-inferior).
WORLD_DIRECTIONS = ("LR", "AP", "SI")


def prior_factor(fraction: float, weight: float = PRIOR_WEIGHT) -> float:
    """What `estimate_profile` multiplies a candidate's spectral distance by: 1 + weight x
    log(fraction)^2, fraction = thickness / slice spacing (1 for contiguous slices)."""
    return 1.0 + weight * math.log(fraction) ** 2


@dataclasses.dataclass(frozen=True)
class AnisotropyTable:
    """How much more power the anatomy has along one world direction than across it, by frequency:
    the thick-axis minus in-plane log10 spectra that `estimate_profile` compares when its candidate
    is the true profile (`match_residual`) for slices thickened along that direction, at
    `frequencies_cpmm` (cycles per mm, ascending), one tuple per direction of WORLD_DIRECTIONS.
    `estimate_profile(reference=...)` subtracts it from the thick-axis log spectrum, so the
    anatomy's own anisotropy is not read as a slice profile. about: how it was made (JSON)."""

    frequencies_cpmm: tuple[float, ...]
    log10_difference: dict
    about: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        f = np.asarray(self.frequencies_cpmm, np.float64)
        if f.ndim != 1 or f.size < 2 or not np.all(np.diff(f) > 0):
            raise ValueError(f"AnisotropyTable: frequencies must be >= 2 ascending values, got {list(f)}")
        for direction, values in self.log10_difference.items():
            if direction not in WORLD_DIRECTIONS or len(values) != f.size:
                raise ValueError(f"AnisotropyTable: one value per frequency for directions of {WORLD_DIRECTIONS}, "
                                 f"got {direction!r} with {len(values)} values for {f.size} frequencies")

    def correction(self, direction: str, frequencies_cpmm) -> np.ndarray:
        """log10 difference of `direction` at these frequencies (linear interpolation, the end values
        beyond the table's range)."""
        if direction not in self.log10_difference:
            raise ValueError(f"the anisotropy table has no direction {direction!r}: it has "
                             f"{sorted(self.log10_difference)}")
        return np.interp(np.asarray(frequencies_cpmm, np.float64), self.frequencies_cpmm,
                         self.log10_difference[direction])

    def to_json(self) -> dict:
        return {"about": self.about, "frequencies_cpmm": [round(float(v), 6) for v in self.frequencies_cpmm],
                "log10_difference": {d: [round(float(v), 5) for v in values]
                                     for d, values in self.log10_difference.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "AnisotropyTable":
        return cls(tuple(data["frequencies_cpmm"]), {d: tuple(v) for d, v in data["log10_difference"].items()},
                   data.get("about", {}))


_POPULATION_TABLE: list = []


def population_table() -> AnisotropyTable:
    """The shipped table (ANISOTROPY_TABLE), read once."""
    if not _POPULATION_TABLE:
        _POPULATION_TABLE.append(AnisotropyTable.from_json(json.loads(ANISOTROPY_TABLE.read_text())))
    return _POPULATION_TABLE[0]


def world_direction(affine: np.ndarray, axis: int) -> str:
    """The world direction (WORLD_DIRECTIONS) an array axis runs closest to: the largest component of
    the affine's column `axis` (4x4, voxel index -> world RAS+ mm)."""
    return WORLD_DIRECTIONS[int(np.argmax(np.abs(np.asarray(affine, np.float64)[:3, axis])))]


def _line_spectrum(lines: np.ndarray, length: int) -> np.ndarray:
    """Mean power spectrum (rfft, Hann window, mean removed) of every `length`-sample segment
    (hop length // 2) of the rows of `lines` (N, L)."""
    window = np.hanning(length + 2)[1:-1]
    starts = range(0, lines.shape[1] - length + 1, max(1, length // 2))
    segments = np.concatenate([lines[:, a:a + length] for a in starts])
    segments = segments - segments.mean(axis=1, keepdims=True)
    return np.mean(np.abs(np.fft.rfft(segments * window, axis=1)) ** 2, axis=0)


def _inplane_fine(volume: sr3d_volume.Volume, plan: ThickSlicePlan) -> list[tuple[int, np.ndarray]]:
    """(axis, array) for in-plane axes 1 and 2: the scan normalised, thick axis first, resampled along
    that axis to the network spacing and cropped to a multiple of the factor (what `estimate_profile`
    degrades by each candidate profile)."""
    moved, _ = _thick_first(volume, plan.axis)
    normalised = intensity.window(moved.array).normalise(moved.array).astype(np.float32)
    return [(axis, degrade.crop_to_multiple(_resample_inplane(normalised, axis, spacing, plan.network_mm),
                                            plan.factor, axes=(axis,)))
            for axis, spacing in ((1, plan.inplane_mm[0]), (2, plan.inplane_mm[1]))]


def _log_spectrum(array: np.ndarray, axis: int, length: int, name: str) -> np.ndarray:
    """Log of `_line_spectrum` (DC dropped) of the lines of `array` along `axis`, flat lines left out."""
    lines = np.moveaxis(array, axis, -1).reshape(-1, array.shape[axis])
    lines = lines[lines.std(axis=1) > 0.01]           # flat background says nothing
    if not lines.size:
        raise ValueError(f"{name}: the scan is flat: no slice profile to estimate")
    return np.log(_line_spectrum(lines, length)[1:] + 1e-12)


def estimate_profile(volume: sr3d_volume.Volume, plan: ThickSlicePlan | None = None,
                     kinds: tuple[str, ...] = PROFILES,
                     fractions: tuple[float, ...] = ESTIMATE_FRACTIONS,
                     match: str = "shape", prior_weight: float | None = None,
                     reference: str | AnisotropyTable = DEFAULT_REFERENCE,
                     shrink: float = POPULATION_SHRINK) -> SliceProfile:
    """The slice profile (kind and thickness) that best explains the scan's thick axis.

    The thick axis was sampled every `thick` mm through an unknown profile P; the in-plane
    axes are fine. For a candidate profile C, the scan (on the network grid along the in-plane
    axis a, as in `training_stacks`) is blurred along a by C and decimated to the slice spacing.
    Its lines along a then hold the anatomy seen through C along a and through P along the
    thick axis; its lines along the thick axis hold it through P along the thick axis and C
    along a. If the anatomy is statistically alike along the axes (as self-supervision
    assumes), the two power spectra agree exactly when C = P: the distance is the mean squared
    difference of their log spectra above DC, over both in-plane axes, and the closest
    candidate wins. Blurring both sides alike cancels what the unknown P did to the in-plane
    slices (partial volume), which a plain comparison of the scan's through-plane lines with
    its degraded in-plane lines would mistake for a thinner profile; aliasing is included on
    both sides (both are sampled at the slice spacing). A thinner profile (a gap) keeps more
    high-frequency energy, aliased; a thicker one less.

    match: how the spectra are compared. "shape" (default): the log spectra of both in-plane
    axes are averaged first, and so are the two thick-axis ones, and the distance is the
    variance of their difference (its mean removed): a level difference between the axes
    (one direction of the anatomy has more contrast than another) cannot come from the profile,
    whose gain at DC is 1, and averaging the two in-plane directions halves the anisotropy
    between them. "per-axis": the mean squared log difference per in-plane axis, averaged
    (the estimator before 2026-12-02, kept for comparison). On simulated slices from real
    1 mm brain MR both stay biased (docs/thick_slice.md): brain anatomy differs between axes
    at the 5-20 mm periods where a slice profile acts.

    prior_weight: the spectra alone read that anisotropy as a profile, and mostly as one too thin
    (a 2.5 mm Gaussian every 4 mm came out as a 1.2 mm box on a T2). Each candidate's distance is
    multiplied by `1 + prior_weight * log(thickness / spacing) ** 2` (relative, so it weighs alike
    on scans whose spectra match well or badly): where the spectra hardly tell candidates apart,
    the one nearer contiguous slices wins (the usual protocol). The weight was chosen on
    training-split subjects; on six test scans it cuts the mean absolute error from 0.90 to 0.80 mm
    and the mean error from -0.56 to -0.31 mm (docs/thick_slice/estimators.md). 0: spectra alone.
    None: PRIOR_WEIGHT with reference "inplane", POPULATION_PRIOR_WEIGHT with any other.

    reference: "inplane" (default): the in-plane axes as they are. "population": the thick-axis
    log spectrum minus `shrink` x the anatomy's own log10 difference between the thick axis' world
    direction and the two others (`population_table`, ANISOTROPY_TABLE: brain T1 at 1 mm,
    interpolated to the scan's frequencies k / (16 x spacing)), so that the anatomy's anisotropy
    is not read as a profile; an AnisotropyTable: that table instead. Measured (27 dev cases of
    three training-split subjects, 54 test cases of six scans, docs/thick_slice/estimators.md): with
    shrink 1 and prior weight 0.5 (POPULATION_SHRINK, POPULATION_PRIOR_WEIGHT, chosen on dev) the mean
    absolute error falls from 0.62 to 0.49 mm on dev and from 0.80 to 0.71 mm on test, but the T2
    Gaussian 2.5 mm every 4 mm stays a 2 mm box (the same network kernel): its anisotropy is not the
    T1 population's. So the default stays "inplane".
    """
    return profile_candidates(volume, plan, kinds, fractions, match, prior_weight, reference, shrink)[0]


def profile_candidates(volume: sr3d_volume.Volume, plan: ThickSlicePlan | None = None,
                       kinds: tuple[str, ...] = PROFILES,
                       fractions: tuple[float, ...] = ESTIMATE_FRACTIONS,
                       match: str = "shape", prior_weight: float | None = None,
                       reference: str | AnisotropyTable = DEFAULT_REFERENCE,
                       shrink: float = POPULATION_SHRINK) -> list[SliceProfile]:
    """Every candidate profile of `estimate_profile` with its distance (prior included), best
    first; candidates at the same distance keep the order kinds x fractions (so the first is
    `estimate_profile`'s answer)."""
    if match not in ("shape", "per-axis"):
        raise ValueError(f"match must be 'shape' or 'per-axis', got {match!r}")
    if isinstance(reference, str) and reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES} or an AnisotropyTable, got {reference!r}")
    if not (math.isfinite(shrink) and 0 <= shrink <= 1):
        raise ValueError(f"shrink must be in [0, 1], got {shrink!r}")
    if prior_weight is None:
        prior_weight = PRIOR_WEIGHT if reference == "inplane" else POPULATION_PRIOR_WEIGHT
    if plan is None:
        plan = plan_for(volume.spacing)
    for kind in kinds:
        if kind not in PROFILES:
            raise ValueError(f"profile kinds must be among {PROFILES}, got {kind!r}")
    spectra = _MatchSpectra.of(volume, plan)
    anatomy = 0.0                                  # natural log, as the spectra
    if reference != "inplane":
        table = population_table() if reference == "population" else reference
        anatomy = shrink * math.log(10) * table.correction(world_direction(volume.affine, plan.axis),
                                                           spectra.frequencies_cpmm(plan))
    candidates = []
    for kind in kinds:
        for fraction in fractions:
            inplane, through = spectra.of_candidate(slice_profile(fraction * plan.factor, kind, plan.factor))
            through = [t - anatomy for t in through]
            if match == "shape":
                distance = float(np.var(np.mean(inplane, axis=0) - np.mean(through, axis=0)))
            else:
                distance = float(np.mean([np.mean((a - t) ** 2) for a, t in zip(inplane, through)]))
            distance *= prior_factor(float(fraction), prior_weight)
            candidates.append(SliceProfile(kind, float(fraction) * plan.thick_mm, "estimated from the scan's spectra",
                                           distance))
    return sorted(candidates, key=lambda c: c.distance)


@dataclasses.dataclass(frozen=True)
class _MatchSpectra:
    """What `profile_candidates` compares: the scan's in-plane axes on the network grid (`_inplane_fine`),
    each degraded by a candidate kernel, and the log spectra of its lines along that axis and along
    the thick one, in segments of `length` slices."""

    fine: list
    factor: int
    length: int
    name: str

    @classmethod
    def of(cls, volume: sr3d_volume.Volume, plan: ThickSlicePlan) -> "_MatchSpectra":
        name = volume.source or "volume"
        slices = volume.array.shape[plan.axis]
        length = min(_SPECTRUM_LENGTH, slices)
        if length < 6:
            raise ValueError(f"{name}: {slices} slices are too few to estimate the slice profile "
                             "(at least 6); give the profile (--slice-profile box|gaussian, --slice-thickness)")
        fine = _inplane_fine(volume, plan)
        for axis, hr in fine:
            if hr.shape[axis] // plan.factor < length:
                raise ValueError(f"{name}: in-plane axis {axis} is too short to estimate the slice profile")
        return cls(fine, plan.factor, length, name)

    def frequencies_cpmm(self, plan: ThickSlicePlan) -> np.ndarray:
        """The frequencies of the log spectra (DC dropped), in cycles per mm."""
        return np.arange(1, self.length // 2 + 1) / (self.length * plan.thick_mm)

    def of_candidate(self, kernel: np.ndarray) -> tuple[list, list]:
        """([in-plane log spectrum per in-plane axis], [thick-axis log spectrum per in-plane axis])."""
        inplane, through = [], []
        for axis, hr in self.fine:
            lr = degrade_along(hr, self.factor, axis, kernel)
            inplane.append(_log_spectrum(lr, axis, self.length, self.name))
            through.append(_log_spectrum(lr, 0, self.length, self.name))
        return inplane, through


def match_residual(volume: sr3d_volume.Volume, kind: str, thickness_mm: float,
                   plan: ThickSlicePlan | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies in cycles per mm, log10 difference) of the spectra `estimate_profile` compares when
    its candidate is the scan's true profile (`kind`, `thickness_mm`): the thick-axis log10 spectrum
    minus the in-plane one, both averaged over the two in-plane axes. Zero (up to a constant, which the
    shape match ignores) where the anatomy is alike along the axes; what it is on 1 mm training-split
    brain MR, averaged, is the table of `reference="population"` (experiments/anisotropy_table.py)."""
    plan = plan_for(volume.spacing) if plan is None else plan
    spectra = _MatchSpectra.of(volume, plan)
    inplane, through = spectra.of_candidate(slice_profile(thickness_mm / plan.network_mm, kind, plan.factor))
    return spectra.frequencies_cpmm(plan), (np.mean(through, axis=0) - np.mean(inplane, axis=0)) / math.log(10)


def estimate_mixture(volume: sr3d_volume.Volume, plan: ThickSlicePlan | None = None,
                     temperature: float | None = None, top_k: int | None = None,
                     **options) -> ProfileMixture:
    """The estimate as a mixture of candidates (blind-SR kernel augmentation): `profile_candidates`
    grouped by the kernel they make on the network grid (a box of 1.2 mm and one of 2 mm are the
    same two taps on a 1 mm grid with an even factor; each group keeps its best candidate), the
    `top_k` closest groups, weighted by softmax(-(distance / best distance - 1) / temperature):
    a candidate whose distance is `temperature` x the best one's above it weighs e^-1 of the best.
    Relative, like the prior, so it weighs alike on scans whose spectra match well or badly.
    options: those of `estimate_profile` (kinds, fractions, match, prior_weight).
    Defaults MIXTURE_TEMPERATURE, MIXTURE_TOP_K (chosen on dev subjects: see there).

    Measured (docs/thick_slice.md, 4000 steps, six simulated gap cases of four test scans): within
    0.05 dB of the single best candidate everywhere, mean -0.03 dB against the network told the
    true profile (-0.02 for the best alone); it does not fix the T2 Gaussian case (-0.35 dB), whose
    second-closest kernel is 31% farther than the best and gets no slice: the close candidates are
    the estimate's neighbours, biased alike. So `--slice-profile estimate` keeps the best
    (DEFAULT_ESTIMATE).
    """
    temperature = MIXTURE_TEMPERATURE if temperature is None else float(temperature)
    top_k = MIXTURE_TOP_K if top_k is None else top_k
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"mixture temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"mixture top_k must be an integer >= 1, got {top_k!r}")
    plan = plan_for(volume.spacing) if plan is None else plan
    groups: dict[tuple, SliceProfile] = {}
    for candidate in profile_candidates(volume, plan, **options):
        key = tuple(np.round(slice_profile(candidate.width(plan), candidate.kind, plan.factor), 6))
        groups.setdefault(key, candidate)                # sorted best first: the best of its kernel
    chosen = list(groups.values())[:int(top_k)]
    best = max(chosen[0].distance, 1e-12)
    logits = np.array([-(c.distance / best - 1) / temperature for c in chosen])
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    return ProfileMixture(tuple(chosen), tuple(float(w) for w in weights), temperature, int(top_k))


POSTERIOR_NEIGHBOURS = 7     # `estimate_posterior`: rows of the error table kept (one per subject of it)


def estimate_posterior(volume: sr3d_volume.Volume, plan: ThickSlicePlan | None = None,
                       neighbours: int = POSTERIOR_NEIGHBOURS, table: dict | None = None) -> ProfileMixture:
    """The estimate as the profiles it may have been: the spectral estimate (`estimate_profile`), then
    the true profiles of the `neighbours` rows of the estimator's error table (PROFILE_ERRORS_TABLE:
    slices simulated from training-split 1 mm brain MR, experiments/profile_errors.py) whose estimate
    had the same kind and the nearest thickness (as fractions of the spacing; every row as near as the
    last one kept), each a share of the training slices (rows making the same kernel on the network
    grid pooled). An empirical posterior of the true profile given the estimate: where the estimator
    is biased (thin profiles come out at its smallest candidates) or cannot tell kinds apart, the
    network trains on what the truth was in those cases instead of betting on the estimate.
    The estimate itself comes first, with the share of the rows that make its kernel (maybe 0).
    table: the error table as loaded from JSON (default: the shipped one)."""
    if isinstance(neighbours, bool) or int(neighbours) != neighbours or neighbours < 1:
        raise ValueError(f"posterior neighbours must be an integer >= 1, got {neighbours!r}")
    plan = plan_for(volume.spacing) if plan is None else plan
    rows = (json.loads(PROFILE_ERRORS_TABLE.read_text()) if table is None else table)["rows"]
    best = estimate_profile(volume, plan)
    fraction = best.thickness_mm / plan.thick_mm
    same = [r for r in rows if r["estimated_kind"] == best.kind] or rows
    gaps = sorted(abs(r["estimated_fraction"] - fraction) for r in same)
    cut = gaps[min(int(neighbours), len(gaps)) - 1] + 1e-9
    kept = [r for r in same if abs(r["estimated_fraction"] - fraction) <= cut]

    def key(kind: str, thickness_mm: float) -> tuple:
        return tuple(np.round(slice_profile(thickness_mm / plan.network_mm, kind, plan.factor), 6))

    groups: dict[tuple, list] = {key(best.kind, best.thickness_mm): [best, 0]}
    for r in sorted(kept, key=lambda r: (r["kind"], r["fraction"])):
        thickness = min(max(r["fraction"], ESTIMATE_FRACTIONS[0]), ESTIMATE_FRACTIONS[-1]) * plan.thick_mm
        group = groups.setdefault(key(r["kind"], thickness),
                                  [SliceProfile(r["kind"], thickness, "the estimate's error table"), 0])
        group[1] += 1
    candidates = tuple(g[0] for g in groups.values())
    weights = tuple(g[1] / len(kept) for g in groups.values())
    return ProfileMixture(candidates, weights, None, None, basis=f"error table, {len(kept)} nearest rows")


def resolve_profile(volume: sr3d_volume.Volume, plan: ThickSlicePlan, profile: str = "box",
                    slice_thickness: float | None = None,
                    estimate: str = DEFAULT_ESTIMATE) -> SliceProfile | ProfileMixture:
    """The slice profile to train with: `profile` "estimate" estimates kind and thickness
    (`estimate` "best": `estimate_profile`; "mixture": `estimate_mixture`); otherwise the kind
    given, with thickness `slice_thickness` (mm), else the scan's own (DICOM SliceThickness, when
    the thick axis is the stacked one), else the slice spacing (contiguous slices)."""
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if profile == "estimate":
        if slice_thickness is not None:
            raise ValueError("a slice thickness with profile 'estimate': the estimate chooses the thickness too; "
                             "give a profile kind (box or gaussian) to use the thickness")
        if estimate == "posterior":
            return estimate_posterior(volume, plan)
        return estimate_mixture(volume, plan) if estimate == "mixture" else estimate_profile(volume, plan)
    if profile not in PROFILES:
        raise ValueError(f"slice profile must be one of {PROFILES + ('estimate',)}, got {profile!r}")
    if slice_thickness is not None:
        return SliceProfile(profile, _check_thickness(slice_thickness, plan), "given")
    if volume.slice_thickness_mm is not None and plan.axis == 0:
        return SliceProfile(profile, _check_thickness(volume.slice_thickness_mm, plan), "the scan's SliceThickness")
    return SliceProfile(profile, plan.thick_mm, "assumed equal to the slice spacing")


def _check_thickness(thickness: float, plan: ThickSlicePlan) -> float:
    thickness = float(thickness)
    if not (math.isfinite(thickness) and thickness > 0):
        raise ValueError(f"slice thickness must be a positive number of mm, got {thickness!r}")
    if not plan.network_mm * 0.5 <= thickness <= 3 * plan.thick_mm:
        raise ValueError(f"slice thickness {thickness:g} mm does not fit slices every {plan.thick_mm:.4g} mm "
                         f"upscaled to {plan.network_mm:.3g} mm: expected {plan.network_mm * 0.5:.3g} to "
                         f"{3 * plan.thick_mm:.3g} mm")
    return thickness


# ---------------------------------------------------------------------------- training

INITS = ("random", "shipped")  # SelfSupConfig.init


@dataclasses.dataclass(frozen=True)
class SelfSupConfig:
    """One self-supervised training run on a scan.

    factor / target_spacing: see `plan_for` (at most one; neither: isotropic output).
    profile: slice profile of the simulated thick slices: "box", "gaussian", or "estimate"
        (kind and thickness estimated from the scan: `estimate_profile`).
    estimate: with profile "estimate": "best" (train on the best candidate) or "mixture"
        (each training slice degraded by a candidate drawn from `estimate_mixture`, seeded).
    slice_thickness: slice thickness in mm (box width / Gaussian FWHM), thinner than the
        spacing for gaps; None: the scan's own (DICOM SliceThickness), else the spacing.
    time_budget_s: wall-clock training budget in seconds (None: only max_steps stops); the
        steps it allows depend on the machine's load.
    max_steps: stop after this many steps (None: only the budget stops); with
        time_budget_s=None two runs with one seed give the same network.
    steps_per_epoch: steps between progress lines.
    lr_drop_fraction: the learning rate drops 10x after this fraction of the budget/steps.
    init: the network's starting weights: "random" (seeded), or "shipped": the shipped stage d
        of the same factor (x2, x4), fine-tuned on the scan: it brings what the supervised
        networks learnt about anatomy, the scan's own slices teach its slice profile and gaps.
    learning_rate / learning_rate_after_drop: None: 1e-3 / 1e-4 from random weights, 1e-4 /
        1e-5 from the shipped ones (a smaller step keeps what they learnt).
    The rest are as in `sr3d.training.TrainConfig`.
    """

    factor: int | None = None
    target_spacing: float | None = None
    profile: str = "box"
    slice_thickness: float | None = None
    estimate: str = DEFAULT_ESTIMATE
    time_budget_s: float | None = 180.0
    max_steps: int | None = None
    steps_per_epoch: int = 100
    patch_size: int = 7
    batch_size: int = 128
    filters: int = 32
    learning_rate: float | None = None
    learning_rate_after_drop: float | None = None
    lr_drop_fraction: float = 0.5
    init: str = "random"
    intermediate_weight: float = 1.0
    blur: str = "random"
    min_contrast: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.factor is not None and self.target_spacing is not None:
            raise ValueError(f"SelfSupConfig: give factor or target_spacing, not both: got {self.factor} "
                             f"and {self.target_spacing} mm")
        if self.factor is not None:
            degrade.check_scale(self.factor, minimum=2, where="SelfSupConfig.factor")
        if self.target_spacing is not None and not (math.isfinite(self.target_spacing) and self.target_spacing > 0):
            raise ValueError(f"SelfSupConfig: target_spacing must be > 0 mm, got {self.target_spacing!r}")
        if self.profile not in PROFILES + ("estimate",):
            raise ValueError(f"SelfSupConfig: profile must be one of {PROFILES + ('estimate',)}, "
                             f"got {self.profile!r}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"SelfSupConfig: estimate must be one of {ESTIMATES}, got {self.estimate!r}")
        if self.slice_thickness is not None and not (math.isfinite(self.slice_thickness)
                                                     and self.slice_thickness > 0):
            raise ValueError(f"SelfSupConfig: slice_thickness must be > 0 mm, got {self.slice_thickness!r}")
        if self.profile == "estimate" and self.slice_thickness is not None:
            raise ValueError("SelfSupConfig: profile 'estimate' estimates the thickness too: drop slice_thickness "
                             "or give the profile kind")
        if self.time_budget_s is None and self.max_steps is None:
            raise ValueError("SelfSupConfig: give time_budget_s or max_steps (or both), got neither")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"SelfSupConfig: time_budget_s must be > 0 seconds, got {self.time_budget_s!r}")
        for name in ("max_steps", "steps_per_epoch", "patch_size", "batch_size", "filters"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"SelfSupConfig: {name} must be an integer >= 1, got {value!r}")
        if self.init not in INITS:
            raise ValueError(f"SelfSupConfig: init must be one of {INITS}, got {self.init!r}")
        for name, scratch, warm in (("learning_rate", 1e-3, 1e-4), ("learning_rate_after_drop", 1e-4, 1e-5)):
            if getattr(self, name) is None:  # frozen: resolved once here, so to_json records the value used
                object.__setattr__(self, name, scratch if self.init == "random" else warm)
            elif not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"SelfSupConfig: {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.lr_drop_fraction <= 1:
            raise ValueError(f"SelfSupConfig: lr_drop_fraction must be in (0, 1], got {self.lr_drop_fraction!r}")
        if self.blur not in data.BLUR_MODES:
            raise ValueError(f"SelfSupConfig: blur must be one of {data.BLUR_MODES}, got {self.blur!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _thick_first(volume: sr3d_volume.Volume, axis: int) -> tuple[sr3d_volume.Volume, tuple[int, int, int]]:
    """The volume with `axis` moved to D (array, spacing and affine permuted alike) and the
    permutation used; `_permuted(v, np.argsort(perm))` undoes it."""
    perm = (axis,) + tuple(a for a in range(3) if a != axis)
    return _permuted(volume, perm), perm


def _permuted(volume: sr3d_volume.Volume, perm) -> sr3d_volume.Volume:
    perm = tuple(int(p) for p in perm)
    if perm == (0, 1, 2):
        return volume
    # New index n has old index o with o[perm[j]] = n[j]: new column j = old column perm[j].
    return volume.replace(array=np.ascontiguousarray(volume.array.transpose(perm)),
                          spacing=tuple(volume.spacing[p] for p in perm),
                          affine=volume.affine[:, list(perm) + [3]])


def _resample_inplane(slices: np.ndarray, axis: int, from_mm: float, to_mm: float) -> np.ndarray:
    """(N, H, W) slices resampled along axis 1 or 2 from `from_mm` to about `to_mm` spacing
    (cv2: area averaging when shrinking, bicubic when enlarging); unchanged within 1%."""
    import cv2

    if abs(from_mm / to_mm - 1) <= 0.01:
        return slices
    n, h, w = slices.shape
    size = round((h if axis == 1 else w) * from_mm / to_mm)
    if size < 1:
        raise ValueError(f"in-plane size {h if axis == 1 else w} at {from_mm:g} mm is below one voxel "
                         f"at {to_mm:g} mm")
    flag = cv2.INTER_AREA if to_mm > from_mm else cv2.INTER_CUBIC
    dsize = (w, size) if axis == 1 else (size, h)
    return np.stack([cv2.resize(s, dsize, interpolation=flag) for s in slices]).astype(np.float32)


def training_stacks(normalised: np.ndarray, plan: ThickSlicePlan,
                    profile: str | SliceProfile | ProfileMixture = "box", seed: int = 0) -> list[data.PlaneStack]:
    """The (LR, HR) training planes of a normalised scan whose thick axis is D.

    normalised: float32 (D, H, W) in network units, D the thick axis. Two stacks: the
    in-plane slices degraded along H, and degraded along W then transposed, so in both the
    degraded axis is axis 1 of the plane as stage d expects: LR (D, h, w), HR (D, h * r, w).
    Each HR is the slice resampled along the degraded axis to the network spacing
    thick / r (`plan.network_mm`), its other axis kept at the in-plane spacing, as in the
    (D, W) and (D, H) planes the network sees at inference.
    profile: a SliceProfile (its thickness may differ from the spacing: gaps, overlaps), a
    kind ("box", "gaussian") with the thickness equal to the spacing, or a ProfileMixture: each
    slice of each stack degraded by the candidate `ProfileMixture.draws` gives it, drawn with
    seed (seed, 1) for the stack degraded along H and (seed, 2) along W.
    """
    r = plan.factor
    if isinstance(profile, str):
        profile = SliceProfile(profile, plan.thick_mm, "assumed equal to the slice spacing")
    candidates = profile.candidates if isinstance(profile, ProfileMixture) else (profile,)
    kernels = [slice_profile(c.width(plan), c.kind, r) for c in candidates]
    stacks = []
    for axis, spacing in ((1, plan.inplane_mm[0]), (2, plan.inplane_mm[1])):
        hr = _resample_inplane(np.asarray(normalised, np.float32), axis, spacing, plan.network_mm)
        if hr.shape[axis] < r:
            raise ValueError(f"in-plane axis {axis} has {hr.shape[axis]} voxels at {plan.network_mm:.3g} mm, "
                             f"fewer than the factor {r}")
        hr = degrade.crop_to_multiple(hr, r, axes=(axis,))
        if isinstance(profile, ProfileMixture):
            which = profile.draws(hr.shape[0], (seed, axis))
            lr = np.empty(hr.shape[:axis] + (hr.shape[axis] // r,) + hr.shape[axis + 1:], np.float32)
            for i, kernel in enumerate(kernels):
                if np.any(which == i):
                    lr[which == i] = degrade_along(hr[which == i], r, axis, kernel)
        else:
            lr = degrade_along(hr, r, axis, kernels[0])
        if axis == 2:
            hr, lr = hr.transpose(0, 2, 1), lr.transpose(0, 2, 1)
        stacks.append(data.PlaneStack(np.ascontiguousarray(lr, np.float32), np.ascontiguousarray(hr, np.float32)))
    return stacks


@dataclasses.dataclass
class Trained:
    """A network trained on a scan (`train`), with how it was made: the plan, the slice profile
    used (given, read or estimated), steps done, wall time and the config (seed included)."""

    model: object
    plan: ThickSlicePlan
    profile: SliceProfile | ProfileMixture
    steps: int
    seconds: float
    config: SelfSupConfig

    def to_json(self) -> dict:
        return {"factor": self.plan.factor, "slice_spacing_mm": self.plan.thick_mm,
                "network_spacing_mm": self.plan.network_mm, "slice_profile": self.profile.to_json(),
                "steps": self.steps, "seed": self.config.seed, "wall_seconds": round(self.seconds, 2),
                "stopped_by": "steps" if self.config.max_steps is not None and self.steps >= self.config.max_steps
                else "time budget", "config": self.config.to_json()}


def train_on_scan(volume: sr3d_volume.Volume, config: SelfSupConfig = SelfSupConfig(),
                  progress: Progress | None = None):
    """Trains a stage-d network on the scan's own in-plane slices; returns the keras.Model
    (`train` also returns how it was made)."""
    return train(volume, config, progress).model


def train(volume: sr3d_volume.Volume, config: SelfSupConfig = SelfSupConfig(),
          progress: Progress | None = None, profile: SliceProfile | ProfileMixture | None = None) -> Trained:
    """Trains a stage-d network on the scan's own in-plane slices.

    volume: the thick-slice scan (any axis may be the thick one). Stops when
    `config.time_budget_s` seconds of training have passed or `config.max_steps` steps are
    done; `progress` gets one line per `config.steps_per_epoch` steps.
    profile: the slice profile (or mixture) to simulate, if resolved already; default
    `resolve_profile(volume, plan, config.profile, config.slice_thickness, config.estimate)`.
    """
    import keras
    import tensorflow as tf

    from sr3d import models, training

    started = time.perf_counter()
    plan = plan_for(volume.spacing, config.factor, config.target_spacing)
    if profile is None:
        profile = resolve_profile(volume, plan, config.profile, config.slice_thickness, config.estimate)
        if progress is not None:
            progress(Step("steps", 0, config.max_steps, profile.describe(plan)))
    moved, _ = _thick_first(volume, plan.axis)
    normalised = intensity.window(moved.array).normalise(moved.array)
    stacks = training_stacks(normalised, plan, profile, seed=config.seed)
    patch_config = data.PatchConfig(stage="d", scale=plan.factor, patch_size=config.patch_size,
                                    batch_size=config.batch_size, blur=config.blur,
                                    min_contrast=config.min_contrast, seed=config.seed)
    sampler = data.PatchSampler([], patch_config, stacks=stacks)

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    model = models.build("d", plan.factor, filters=config.filters, name=f"sr3d_selfsup_d_x{plan.factor}")
    if config.init == "shipped":  # the fine-tuning start of train.py --init_model, same shape check
        training.start_from(model, _shipped_stage_d(plan.factor))
    training.compile_model(model, config)  # reads learning_rate and intermediate_weight

    steps = config.steps_per_epoch
    if config.max_steps is not None:
        max_epochs = math.ceil(config.max_steps / steps)
    else:  # more epochs than any machine gets through within the budget
        max_epochs = math.ceil(config.time_budget_s * 1000 / steps)
    if progress is not None:
        progress(Step("steps", 0, config.max_steps,
                      f"self-supervised training: x{plan.factor} stage-d network on the {stacks[0].lr.shape[0]} "
                      f"in-plane slices, each degraded along H and along W; budget {_limits(config)}"))
    budget = _Budget(config, started, progress)
    model.fit(data.dataset(sampler, [(e, 0, steps) for e in range(max_epochs)]), epochs=max_epochs,
              steps_per_epoch=steps, callbacks=[budget.callback()], verbose=0)
    seconds = time.perf_counter() - started
    if progress is not None:
        progress(Step("steps", budget.steps, budget.steps,
                      f"self-supervised training done: {budget.steps} steps, {budget.steps * config.batch_size} "
                      f"patches in {seconds:.0f} s"))
    return Trained(model, plan, profile, budget.steps, seconds, config)


def _shipped_stage_d(factor: int) -> str:
    """Path of the shipped stage d of `factor`, for init 'shipped'; ValueError if none is shipped."""
    from sr3d import models

    path = models.shipped_model_dir(factor) / models.MODEL_FILES["d"]
    if not path.is_file():
        raise ValueError(f"init 'shipped': no shipped stage d for x{factor} (shipped: "
                         f"{', '.join(f'x{r}' for r in models.available_scales())}); use init 'random' "
                         "or a factor the shipped models have")
    return str(path)


def _limits(config: SelfSupConfig) -> str:
    parts = []
    if config.time_budget_s is not None:
        parts.append(f"{config.time_budget_s:g} s")
    if config.max_steps is not None:
        parts.append(f"{config.max_steps} steps")
    return " or ".join(parts)


class _Budget:
    """Stops training at the time budget or step limit and drops the learning rate half way."""

    def __init__(self, config: SelfSupConfig, started: float, progress: Progress | None):
        self.config = config
        self.started = started
        self.progress = progress
        self.steps = 0
        self.dropped = False

    def _fraction_done(self) -> float:
        cfg = self.config
        fractions = []
        if cfg.time_budget_s is not None:
            fractions.append((time.perf_counter() - self.started) / cfg.time_budget_s)
        if cfg.max_steps is not None:
            fractions.append(self.steps / cfg.max_steps)
        return max(fractions)

    def callback(self):
        import keras

        budget = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if not budget.dropped and budget._fraction_done() >= budget.config.lr_drop_fraction:
                    self.model.optimizer.learning_rate.assign(budget.config.learning_rate_after_drop)
                    budget.dropped = True

            def on_train_batch_end(self, batch, logs=None):
                budget.steps += 1
                if budget._fraction_done() >= 1.0:
                    self.model.stop_training = True

            def on_epoch_end(self, epoch, logs=None):
                if budget.progress is not None:
                    loss = (logs or {}).get("final_loss", (logs or {}).get("loss", float("nan")))
                    budget.progress(Step("steps", budget.steps, budget.config.max_steps,
                                         f"  epoch {epoch + 1}: step {budget.steps}, "
                                         f"{time.perf_counter() - budget.started:5.0f} s, L1 {float(loss):.4f} "
                                         f"(normalised units), learning rate "
                                         f"{float(self.model.optimizer.learning_rate.numpy()):.0e}"))

        return Callback()


# ---------------------------------------------------------------------------- save / load

def save_model(model, path: str | os.PathLike, plan: ThickSlicePlan,
               config: SelfSupConfig | None = None, trained: Trained | None = None) -> pathlib.Path:
    """Writes the network to `path` (.keras) and its protocol to the same name with .json
    (with `trained`: the slice profile used, steps, seed and wall time too)."""
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a self-supervised model is saved as a .keras file")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: directory {path.parent} does not exist")
    info = {"format": MODEL_JSON_FORMAT, "stage": "d", "factor": plan.factor,
            "profile": trained.profile.kind if trained else (config.profile if config else None),
            "thick_spacing_mm": plan.thick_mm, "inplane_spacing_mm": list(plan.inplane_mm),
            "target_spacing_mm": plan.target_mm, "network_spacing_mm": plan.network_mm,
            "config": config.to_json() if config else None,
            "training_steps": int(model.optimizer.iterations.numpy()) if model.optimizer else None,
            "training": trained.to_json() if trained is not None else None,
            "note": "stage-d network trained on one scan's in-plane slices (sr3d.selfsup)"}
    with sr3d_files.atomic_path(path) as tmp:
        model.save(tmp)
    sr3d_files.write_json(_info_path(path), info)
    return path


def _info_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json")


def load_model(path: str | os.PathLike):
    """(keras.Model, info dict) of a model written by `save_model`."""
    from sr3d import models

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: self-supervised model file not found")
    info_path = _info_path(path)
    if not info_path.is_file():
        raise ValueError(f"{path}: {info_path.name} is missing beside it: not a model saved by "
                         "sr3d.selfsup.save_model (or sr3d upscale --self-supervised --save-model)")
    info = json.loads(info_path.read_text())
    if info.get("format") != MODEL_JSON_FORMAT:
        raise ValueError(f"{info_path}: format {info.get('format')!r} is not {MODEL_JSON_FORMAT!r}")
    return models.load(path), info


def plan_for_model(spacing, info: dict, target_spacing: float | None = None) -> ThickSlicePlan:
    """The plan for reusing a saved model (`load_model` info) on a scan of this spacing.

    The scan must be of the same protocol: thick and in-plane spacings within
    PROTOCOL_TOLERANCE of those the model was trained on. target_spacing: default the
    model's target; must need the model's factor.
    """
    target = info["target_spacing_mm"] if target_spacing is None else target_spacing
    plan = plan_for(spacing, target_spacing=target)
    trained = [info["thick_spacing_mm"], *info["inplane_spacing_mm"]]
    given = [plan.thick_mm, *plan.inplane_mm]
    if any(abs(g / t - 1) > PROTOCOL_TOLERANCE for g, t in zip(given, trained)):
        raise ValueError(f"the model was trained on {_mm(trained)} mm voxels (thick axis first), this scan "
                         f"has {_mm(given)} mm: not the same protocol; train on this scan instead")
    if plan.factor != info["factor"]:
        raise ValueError(f"target spacing {plan.target_mm:g} mm needs a x{plan.factor} network, the model is "
                         f"x{info['factor']}: choose a target between {plan.thick_mm / info['factor']:.3g} "
                         f"and {plan.thick_mm / (info['factor'] - 1):.3g} mm")
    return plan


# ---------------------------------------------------------------------------- inference

def _resampling_along_d(volume: sr3d_volume.Volume, factor: int, target_mm: float):
    """(resample, wrap) for the grid of exactly target_mm along D: round(D * thick / target) voxels
    centred on `volume`'s field of view. resample: `fine` (factor * D, H, W), the network output
    on `volume`'s grid, -> that grid's array; wrap: such an array -> its Volume."""
    from scipy import interpolate

    n = volume.shape[0]
    thick = volume.spacing[0]
    step = target_mm / thick                                  # new voxel step in old voxel units
    m = max(1, round(n * thick / target_mm))

    def resample(fine: np.ndarray) -> np.ndarray:
        old_index = (n - 1) / 2 + (np.arange(m) - (m - 1) / 2) * step
        fine_index = np.clip((old_index + 0.5) * factor - 0.5, 0, fine.shape[0] - 1)
        # Spline interpolation is linear in the data: the rows of the matrix interpolate the identity.
        matrix = interpolate.make_interp_spline(np.arange(fine.shape[0]), np.eye(fine.shape[0]), k=3)(fine_index)
        return (matrix.astype(np.float32) @ fine.reshape(fine.shape[0], -1)).reshape((m,) + fine.shape[1:])

    new_to_old = np.eye(4)
    new_to_old[0, 0] = step
    new_to_old[0, 3] = (n - 1) / 2 - (m - 1) / 2 * step

    def wrap(array: np.ndarray) -> sr3d_volume.Volume:
        return volume.replace(array=array, affine=volume.affine @ new_to_old,
                              spacing=(target_mm,) + tuple(volume.spacing[1:]), source=None)

    return resample, wrap


def upscale_thick(volume: sr3d_volume.Volume, model_or_config=None, *, target_spacing: float | None = None,
                  ensemble: bool = False, planes: str = "dw", batch_size: int = 8,
                  progress: Progress | None = None) -> sr3d_volume.Volume:
    """Upscales the thick axis of a scan with a stage-d network; returns the new Volume.

    model_or_config: a SelfSupConfig (or None for the default one): train on this scan
    first (`train_on_scan`); a keras.Model from `train_on_scan`; or the path of a model
    written by `save_model` (reused only on scans of the same protocol).
    target_spacing: mm along the thick axis; default: the config's, the saved model's, or
    thick / factor for an in-memory model. Output: the input's units, clipped to its range;
    spacing target_spacing along the thick axis, the same field of view.
    planes: "dw" (the (thick, W) planes) or "both" (also (thick, H), averaged).
    """
    from sr3d import models

    if model_or_config is None or isinstance(model_or_config, SelfSupConfig):
        config = model_or_config or SelfSupConfig()
        if target_spacing is not None:
            config = dataclasses.replace(config, target_spacing=target_spacing, factor=None)
        plan = plan_for(volume.spacing, config.factor, config.target_spacing)
        model = train_on_scan(volume, config, progress)
    elif isinstance(model_or_config, (str, os.PathLike)):
        model, info = load_model(model_or_config)
        plan = plan_for_model(volume.spacing, info, target_spacing)
    else:
        model = model_or_config
        factor = models.stage_scale(model, "d")
        if factor is None:
            raise ValueError("not a stage-d network (sr3d.models.build('d', r)): it does not upsample "
                             "a 4x4 plane along its first axis only")
        plan = (plan_for(volume.spacing, factor=factor) if target_spacing is None
                else plan_for(volume.spacing, target_spacing=target_spacing))
        if plan.factor != factor:
            raise ValueError(f"target spacing {target_spacing:g} mm needs a x{plan.factor} network, "
                             f"the model is x{factor}")

    moved, perm = _thick_first(volume, plan.axis)
    band_progress = None if progress is None else (
        lambda step: progress(Step(step.unit, step.done, step.total, f"upscaling the thick axis: {step}")))

    def run(normalised: np.ndarray) -> np.ndarray:
        return upscaling.upscale_depth_normalised(normalised, model, ensemble=ensemble, planes=planes,
                                                  batch_size=batch_size, progress=band_progress)

    if plan.resample:
        resample, wrap = _resampling_along_d(moved, plan.factor, plan.target_mm)
    else:
        resample, wrap = None, lambda fine: sr3d_volume.upscaled_volume(moved, fine, plan.factor, axes=(0,))
    result = upscaling.run_in_scanner_units(moved, run, wrap, resample=resample)
    return _permuted(result, np.argsort(perm))
