"""What an evaluation runs: `EvalConfig` (scans, scales, methods, protocols, report directory)
and the names its rows carry in the tables (`method_label`)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import numpy as np

from sr3d import baselines, degrade
from sr3d.degrade import MODES

PROTOCOLS = ("float", "paper")

_LABELS = {"nearest": "Nearest neighbor", "bilinear": "Bilinear", "bicubic": "Bicubic",
           "lanczos": "Lanczos"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: which scans, scales, methods and protocols, and where the report goes.

    scans: paths of HR scans (NIfTI/NRRD files, DICOM series directories), each the ground truth.
    scales: upscaling factors r, each an integer >= 2.
    mode: "2d" (H and W downscaled, the paper's Tables 3 and 5) or "3d" (D too, Tables 4 and 6).
    methods: interpolation baselines, a subset of `sr3d.baselines.METHODS`.
    cnn: extra rows, name -> model bundle directory (a directory holding the bundle, or
        holding one bundle per scale in subdirectories x2, x4, ...), None for the shipped
        model of each scale, or an in-memory `sr3d.models.ModelBundle`.
    protocols: scoring protocols, among "float" and "paper" (see `sr3d.metrics.Protocol`).
    data_range: (lo, hi) window of the float protocol in scanner units; None = the global
        min and max over the HR volumes of all `scans` (stated in the report).
    crop_border: pixels shaved off each side of H and W before scoring.
    with_ifc: compute IFC (slices must be at least 72 x 72 after the crop).
    out_dir: directory of the report (`write_report`).
    ensemble: self-ensemble for the CNN rows (8 transforms for stage hw, 4 for stage d).
    planes: stage d of the CNN rows in 3D on (D, W) planes ("dw") or on both (D, W) and (D, H)
        planes, averaged ("both"), or the cascade with each axis once as depth, the three averaged
        ("all", mode 3d only); see `sr3d.upscaling`.
    consistency: the CNN rows made consistent with the LR input (`sr3d.inference.upscale_volume`,
        on by default as in `sr3d upscale`; False: the networks' output alone, as in the paper).
    """

    scans: tuple[str, ...]
    scales: tuple[int, ...] = (2,)
    mode: str = "3d"
    methods: tuple[str, ...] = baselines.METHODS
    cnn: Mapping[str, object] = dataclasses.field(default_factory=dict)
    protocols: tuple[str, ...] = PROTOCOLS
    data_range: tuple[float, float] | None = None
    crop_border: int = 0
    with_ifc: bool = True
    out_dir: str = "results"
    ensemble: bool = False
    planes: str = "dw"
    consistency: bool = True

    def __post_init__(self):
        scans = (self.scans,) if isinstance(self.scans, (str, os.PathLike)) else tuple(self.scans)
        if not scans:
            raise ValueError("EvalConfig: scans is empty: give at least one scan")
        object.__setattr__(self, "scans", tuple(os.fspath(s) for s in scans))
        scales = tuple(degrade.check_scale(s, minimum=2, where="EvalConfig") for s in _as_tuple(self.scales))
        if not scales or len(set(scales)) != len(scales):
            raise ValueError(f"EvalConfig: scales must be distinct integers >= 2, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)
        if self.mode not in MODES:
            raise ValueError(f"EvalConfig: mode must be one of {MODES}, got {self.mode!r}")
        methods = _as_tuple(self.methods)
        unknown = [m for m in methods if m not in baselines.METHODS]
        if unknown or len(set(methods)) != len(methods):
            raise ValueError(f"EvalConfig: methods must be distinct names among {baselines.METHODS}, "
                             f"got {methods!r}")
        object.__setattr__(self, "methods", methods)
        cnn = dict(self.cnn or {})
        for name in cnn:
            if not isinstance(name, str) or not name or name in baselines.METHODS:
                raise ValueError(f"EvalConfig: a CNN row needs a name that is not a baseline's, got {name!r}")
        object.__setattr__(self, "cnn", cnn)
        if not methods and not cnn:
            raise ValueError("EvalConfig: nothing to evaluate: give methods or a cnn entry")
        protocols = _as_tuple(self.protocols)
        if not protocols or any(p not in PROTOCOLS for p in protocols) or len(set(protocols)) != len(protocols):
            raise ValueError(f"EvalConfig: protocols must be distinct names among {PROTOCOLS}, "
                             f"got {self.protocols!r}")
        object.__setattr__(self, "protocols", protocols)
        if self.data_range is not None:
            lo, hi = _pair_of_floats(self.data_range)
            object.__setattr__(self, "data_range", (lo, hi))
        if isinstance(self.crop_border, bool) or not isinstance(self.crop_border, (int, np.integer)) \
                or self.crop_border < 0:
            raise ValueError(f"EvalConfig: crop_border must be a non-negative integer, got {self.crop_border!r}")
        object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        from sr3d.upscaling import PLANES  # no TensorFlow: the name list only

        if self.planes not in PLANES:
            raise ValueError(f"EvalConfig: planes must be one of {PLANES}, got {self.planes!r}")
        if self.planes == "all" and self.mode != "3d":
            raise ValueError(f"EvalConfig: planes 'all' upscales every axis: it needs mode 3d, got {self.mode!r}")

    def to_json(self) -> dict:
        """The config as JSON values; CNN entries as their directory, "shipped" or "in-memory"."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["cnn"] = {name: _describe_model(spec) for name, spec in self.cnn.items()}
        out["data_range"] = list(self.data_range) if self.data_range is not None else None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _as_tuple(value) -> tuple:
    return (value,) if isinstance(value, (str, int, np.integer)) else tuple(value)


def _pair_of_floats(data_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"EvalConfig: data_range must be two numbers (lo, hi), got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"EvalConfig: data_range must be finite with lo < hi, got {data_range!r}")
    return lo, hi


def _describe_model(spec) -> str:
    if spec is None:
        return "shipped"
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    return f"in-memory model bundle (scale {getattr(spec, 'scale', '?')})"


def method_label(method: str, ensemble: bool = False) -> str:
    """Row name of a method in the tables: the paper's names for baselines, "CNN (name)" for CNNs."""
    if method in _LABELS:
        return _LABELS[method]
    label = "CNN" if method == "cnn" else f"CNN ({method})"
    return label + (" + self-ensemble" if ensemble else "")
