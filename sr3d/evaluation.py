"""Scores super-resolution methods on real scans: the paper's Tables 3-6 as Markdown, JSON and a figure.

Protocol (the paper's): every HR scan is cropped so the
downscaled axes divide by r and shrunk by r (`sr3d.degrade.simulate_lr`: MATLAB
imresize bicubic, antialiased; H and W in "2d" mode, D too in "3d"); every
method brings that LR back to the grid of the cropped HR; the result is scored
against the cropped HR under each protocol of `sr3d.metrics` ("float": the
scan's own units through one fixed intensity window; "paper": 8-bit slices as
the authors' code). A table cell is the mean over scans of the per-volume
scores; per-scan and per-slice values are kept in the JSON.

Significance: each method against Lanczos, paired by slice (the same slice of
the same scan reconstructed by both), with the two-sided Wilcoxon signed-rank
test on per-slice PSNR. Pairing removes how hard each slice is; the per-slice
differences are not normal (near-empty slices at the top and bottom of a scan
give heavy tails), so a paired t-test would be wrong, and the paper's McNemar
test needs a yes/no outcome per item, which PSNR is not. Slices of one scan are
correlated, so the p-values are optimistic: treat them as a screen, and the
per-scan scores in the JSON as the evidence.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Mapping

import numpy as np

import sr3d
from sr3d import baselines, degrade, metrics, planes
from sr3d import files as sr3d_files
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume
from sr3d.degrade import MODES

PROTOCOLS = ("float", "paper")
REFERENCE_METHOD = "lanczos"
# The paper's significance level (Table 2).
ALPHA = 1e-3

SIGNIFICANCE_TEST = {
    "test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon) on per-slice PSNR, each method "
            f"vs {REFERENCE_METHOD}, slices of all scans pooled and paired by (scan, slice)",
    "why": "paired: both methods reconstruct the same slices, so slice difficulty cancels; the "
           "per-slice PSNR differences are not normal (heavy tails from near-empty slices), so no "
           "t-test; slices of one scan are correlated, so p-values are optimistic",
    "alpha": ALPHA,
}

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIGURE_NAME = "comparison_x{scale}.png"

_LABELS = {"nearest": "Nearest neighbor", "bilinear": "Bilinear", "bicubic": "Bicubic",
           "lanczos": "Lanczos"}
_MODE_TITLES = {"2d": "2D super-resolution", "3d": "3D super-resolution"}
_MODE_TEXT = {"2d": "H and W of every slice downscaled by r (D kept)",
              "3d": "D, H and W downscaled by r"}
# Column order and decimals of the paper's tables.
_COLUMNS = (("ssim", "SSIM", 4), ("psnr", "PSNR", 2), ("ifc", "IFC", 2))
_SIGNIFICANT = "†"

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    """A `progress` callback for `evaluate` that writes one line per step to stderr."""
    print(message, file=sys.stderr, flush=True)


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
        planes, averaged ("both"); see `sr3d.inference`.
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
        from sr3d.inference import PLANES  # no TensorFlow: the name list only

        if self.planes not in PLANES:
            raise ValueError(f"EvalConfig: planes must be one of {PLANES}, got {self.planes!r}")

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


# ---------------------------------------------------------------------------- evaluation

def _global_data_range(scans: tuple[str, ...], progress: Progress | None) -> tuple[float, float]:
    """(min, max) over the voxels of all scans, scanner units (one extra read of each scan)."""
    lo, hi = math.inf, -math.inf
    for index, path in enumerate(scans):
        _report(progress, f"data range: reading scan {index + 1}/{len(scans)} {path}")
        array = sr3d_io.load_volume(path).array
        lo, hi = min(lo, float(array.min())), max(hi, float(array.max()))
    if not lo < hi:
        raise ValueError(f"every voxel of the {len(scans)} scans equals {lo}: nothing to evaluate "
                         "(or pass data_range)")
    return lo, hi


def _make_protocols(config: EvalConfig, data_range: tuple[float, float]) -> dict[str, metrics.Protocol]:
    makers = {
        "float": lambda: metrics.float_protocol(data_range, crop_border=config.crop_border,
                                                with_ifc=config.with_ifc),
        "paper": lambda: metrics.paper_protocol(crop_border=config.crop_border, with_ifc=config.with_ifc),
    }
    return {name: makers[name]() for name in config.protocols}


def _load_bundle(spec, scale: int):
    """The model bundle of one CNN row for `scale` (see EvalConfig.cnn)."""
    from sr3d import models as sr3d_models

    if isinstance(spec, sr3d_models.ModelBundle):
        if spec.scale != scale:
            raise ValueError(f"EvalConfig: the in-memory model bundle upscales by {spec.scale}, not by {scale}")
        return spec
    if spec is None:
        return sr3d_models.load_models(None, scale)
    directory = pathlib.Path(spec)
    per_scale = directory / f"x{scale}"
    return sr3d_models.load_models(per_scale if per_scale.is_dir() else directory, scale)


def _lr_volume(volume: sr3d_volume.Volume, lr: np.ndarray, scale: int, mode: str) -> sr3d_volume.Volume:
    """The simulated LR as a Volume on the grid the cropped HR came from.

    LR voxel l covers HR voxels l*r .. l*r + r - 1, i.e. sits at HR index (l + 0.5) r - 0.5,
    so `sr3d.volume.upscaled_affine` of this affine is the HR affine again.
    """
    return sr3d_volume.downscaled_volume(volume, lr, scale, degrade.MODE_AXES[mode])


def _upscale(method: str, volume: sr3d_volume.Volume, lr: np.ndarray, scale: int, config: EvalConfig,
             bundles: Mapping[str, object]) -> np.ndarray:
    if method in baselines.METHODS:
        return baselines.upscale(lr, scale, method, config.mode)
    from sr3d import inference

    result = inference.upscale_volume(_lr_volume(volume, lr, scale, config.mode), bundles[method],
                                      mode=config.mode, ensemble=config.ensemble, planes=config.planes)
    return result.array


def _report(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def evaluate(config: EvalConfig, progress: Progress | None = None) -> dict:
    """Runs every method on every scan and scale and scores it under every protocol.

    progress: called with one line of text per step (scan i/n, scale, method), e.g.
        `print_progress`.
    Returns a dict (JSON-ready apart from "figure_slices", the float32 slices `write_report`
    draws): "summary"[protocol]["x{r}"][method] = mean over scans of "psnr", "ssim",
    "ifc" (plus "psnr_std" over scans, "n_scans"); "per_scan" the same keys down to a list
    of {scan, psnr, ssim, ifc, n_slices, slice_indices, per_slice}; "significance" the
    Wilcoxon test of each method against Lanczos; "config", "data_range", "protocols"
    (their descriptions), "sr3d_version", "timing_s".
    Raises ValueError or FileNotFoundError naming the scan for bad input.
    """
    start = time.perf_counter()
    missing = [path for path in config.scans if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file or directory"
                                + (f" (and {len(missing) - 1} more missing scans)" if len(missing) > 1 else ""))
    # Models first: a bad bundle directory fails before any scan is read.
    bundles = {scale: {name: _load_bundle(spec, scale) for name, spec in config.cnn.items()}
               for scale in config.scales}
    if config.data_range is None:
        data_range = _global_data_range(config.scans, progress)
        range_source = f"global min and max of the {len(config.scans)} HR volumes"
    else:
        data_range, range_source = config.data_range, "given"
    protocols = _make_protocols(config, data_range)
    methods = config.methods + tuple(config.cnn)
    figure_methods = list(methods)

    per_scan = {p: {f"x{s}": {m: [] for m in methods} for s in config.scales} for p in protocols}
    figures, figure_slices = {}, {}
    timing = {"upscale": dict.fromkeys(methods, 0.0), "score": dict.fromkeys(protocols, 0.0)}
    n_scans = len(config.scans)
    for index, path in enumerate(config.scans):
        volume = sr3d_io.load_volume(path)
        is_figure_scan = index == n_scans - 1
        for scale in config.scales:
            key = f"x{scale}"
            try:
                hr, lr = degrade.simulate_lr(volume.array, scale, config.mode)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
            middle = hr.shape[0] // 2
            for method in methods:
                _report(progress, f"scan {index + 1}/{n_scans} {pathlib.Path(path).name} {key} {method}")
                tick = time.perf_counter()
                test = _upscale(method, volume, lr, scale, config, bundles[scale])
                timing["upscale"][method] += time.perf_counter() - tick
                if test.shape != hr.shape:
                    raise ValueError(f"{path}: {method} returned shape {test.shape}, expected the "
                                     f"cropped HR shape {hr.shape}")
                for name, protocol in protocols.items():
                    tick = time.perf_counter()
                    try:
                        score = metrics.score_volume(hr, test, protocol)
                    except ValueError as error:
                        raise ValueError(f"{path}: {error}") from error
                    timing["score"][name] += time.perf_counter() - tick
                    score.pop("protocol")  # the same for every scan: kept once under "protocols"
                    per_scan[name][key][method].append({"scan": path, **score})
                if is_figure_scan and method in figure_methods:
                    # The LR slice that covers HR slice `middle` (in 3D, D was shrunk by r too).
                    lr_slice = lr[middle // scale if config.mode == "3d" else middle]
                    slices = figure_slices.setdefault(key, {"hr": hr[middle].copy(), "lr": lr_slice.copy(),
                                                            "scale": scale, "panels": {}})
                    slices["panels"][method] = test[middle].copy()
            if is_figure_scan:
                figures[key] = _figure_info(path, middle, figure_methods, per_scan, key)
                figures[key]["plane"] = planes.plane_name(volume.affine, 0)
                figure_slices[key]["affine"] = np.asarray(volume.affine, np.float64)

    summary = {p: {key: {m: _mean_scores(cells[m]) for m in methods} for key, cells in by_scale.items()}
               for p, by_scale in per_scan.items()}
    significance = {p: {key: {m: _wilcoxon_vs_reference(cells[m], cells[REFERENCE_METHOD])
                              for m in methods if m != REFERENCE_METHOD}
                        for key, cells in by_scale.items()}
                    for p, by_scale in per_scan.items()} if REFERENCE_METHOD in methods else {}
    timing = {"total": time.perf_counter() - start,
              "upscale": {m: round(t, 3) for m, t in timing["upscale"].items()},
              "score": {p: round(t, 3) for p, t in timing["score"].items()}}
    return {
        "sr3d_version": sr3d.__version__,
        "config": config.to_json(),
        "mode": config.mode,
        "scans": list(config.scans),
        "scales": list(config.scales),
        "methods": list(methods),
        "method_labels": {m: method_label(m, config.ensemble and m in config.cnn) for m in methods},
        "data_range": list(data_range),
        "data_range_source": range_source,
        "protocols": {name: protocol.describe() for name, protocol in protocols.items()},
        "summary": summary,
        "significance": significance,
        "significance_test": SIGNIFICANCE_TEST,
        "per_scan": per_scan,
        "figures": figures,
        "figure_slices": figure_slices,
        "timing_s": timing,
    }


def _mean_scores(cells: list[dict]) -> dict:
    """Mean over scans of the per-volume scores (IFC None when not computed)."""
    psnr = np.array([c["psnr"] for c in cells], dtype=np.float64)
    ifc = [c["ifc"] for c in cells]
    return {
        "psnr": float(np.mean(psnr)),
        "ssim": float(np.mean([c["ssim"] for c in cells])),
        "ifc": None if any(v is None for v in ifc) else float(np.mean(ifc)),
        "psnr_std": float(np.std(psnr)),
        "n_scans": len(cells),
    }


def _paired_slice_values(cells: list[dict], reference_cells: list[dict],
                         metric: str = "psnr") -> tuple[np.ndarray, np.ndarray]:
    """Per-slice `metric` of a method and of the reference method, pooled over scans, in the same order."""
    tests, references = [], []
    for cell, reference in zip(cells, reference_cells, strict=True):
        if cell["slice_indices"] != reference["slice_indices"]:
            raise RuntimeError(f"{cell['scan']}: scored slices differ between methods; cannot pair them")
        if cell["per_slice"][metric] is None or reference["per_slice"][metric] is None:
            raise ValueError(f"{cell['scan']}: no per-slice {metric} was computed (IFC needs with_ifc)")
        tests.extend(cell["per_slice"][metric])
        references.extend(reference["per_slice"][metric])
    return np.array(tests, dtype=np.float64), np.array(references, dtype=np.float64)


def _wilcoxon_vs_reference(cells: list[dict], reference_cells: list[dict], metric: str = "psnr") -> dict:
    """Two-sided Wilcoxon signed-rank test of per-slice `metric`, method minus reference."""
    from scipy import stats

    test, reference = _paired_slice_values(cells, reference_cells, metric)
    finite = np.isfinite(test) & np.isfinite(reference)  # identical slices give infinite PSNR
    difference = test[finite] - reference[finite]
    median = float(np.median(difference)) if difference.size else None
    result = {"n_pairs": int(difference.size), "median_difference": median,
              "p_value": None, "significant": False}
    if metric == "psnr":
        result["median_psnr_difference_db"] = median
    if difference.size and np.any(difference != 0):
        result["p_value"] = float(stats.wilcoxon(difference, alternative="two-sided").pvalue)
        result["significant"] = bool(result["p_value"] < ALPHA)
    elif difference.size:
        result["p_value"] = 1.0  # every slice identical to the reference's
    return result


def compare_methods(results: dict, method: str, reference: str, metric: str = "psnr") -> dict:
    """The test of "significance" between any two rows of one `evaluate` result (there: every
    method against Lanczos, on PSNR), e.g. an ablated CNN against the full one, on any metric.

    results: as returned by `evaluate`, or its JSON read back (None per-slice values count as
    non-finite and are dropped, as infinite ones are). metric: "psnr", "ssim" or "ifc".
    Returns [protocol]["x{r}"] -> {"n_pairs", "median_difference" (method minus reference;
    also as "median_psnr_difference_db" for PSNR), "p_value", "significant"}.
    """
    per_scan = results["per_scan"]
    for name in (method, reference):
        if any(name not in cells for by_scale in per_scan.values() for cells in by_scale.values()):
            raise ValueError(f"compare_methods: no row {name!r} in the results, which have "
                             f"{results.get('methods')}")
    return {protocol: {key: _wilcoxon_vs_reference(cells[method], cells[reference], metric)
                       for key, cells in by_scale.items()}
            for protocol, by_scale in per_scan.items()}


def _figure_info(path: str, slice_index: int, methods: list[str], per_scan: dict, key: str) -> dict:
    """Scan, slice and the per-slice PSNR of each figure panel under the first protocol."""
    protocol = next(iter(per_scan))
    psnr = {}
    for method in methods:
        cell = per_scan[protocol][key][method][-1]
        indices = cell["slice_indices"]
        psnr[method] = (cell["per_slice"]["psnr"][indices.index(slice_index)]
                        if slice_index in indices else None)
    return {"scan": path, "slice_index": slice_index, "psnr_protocol": protocol, "psnr": psnr,
            "file": FIGURE_NAME.format(scale=key[1:])}


# ---------------------------------------------------------------------------- report

def _format(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _table(results: dict, protocol: str) -> list[str]:
    """Rows = methods, columns = SSIM, PSNR, IFC for each scale; best per column in bold."""
    with_ifc = results["config"]["with_ifc"]
    columns = [c for c in _COLUMNS if with_ifc or c[0] != "ifc"]
    summary = results["summary"][protocol]
    significance = results["significance"].get(protocol, {})
    keys = [f"x{s}" for s in results["scales"]]
    header = ["Method"] + [f"{key[1:]}× {title}" for key in keys for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" + "---:|" * (len(header) - 1)]
    cells = {m: [] for m in results["methods"]}
    for key in keys:
        for metric, _, decimals in columns:
            texts = {m: _format(summary[key][m][metric], decimals) for m in results["methods"]}
            numbers = [float(t) for t in texts.values() if t != "-"]
            best = max(numbers) if numbers else None
            for method, text in texts.items():
                if text != "-" and float(text) == best:
                    text = f"**{text}**"
                if metric == "psnr" and significance.get(key, {}).get(method, {}).get("significant"):
                    text += f" {_SIGNIFICANT}"
                cells[method].append(text)
    for method in results["methods"]:
        lines.append("| " + " | ".join([results["method_labels"][method]] + cells[method]) + " |")
    return lines


def _significance_table(results: dict, protocol: str) -> list[str]:
    significance = results["significance"].get(protocol)
    if not significance:
        return []
    keys = [f"x{s}" for s in results["scales"]]
    header = ["Method"] + [f"{key[1:]}× {t}" for key in keys for t in ("median ΔPSNR (dB)", "p")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for method in results["methods"]:
        if method == REFERENCE_METHOD:
            continue
        row = [results["method_labels"][method]]
        for key in keys:
            test = significance[key][method]
            median = test["median_psnr_difference_db"]
            row += ["-" if median is None else f"{median:+.2f}",
                    "-" if test["p_value"] is None else f"{test['p_value']:.2g}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def format_markdown(results: dict) -> str:
    """The report as Markdown: one table per protocol in the layout of the paper's Tables 3 and 4."""
    mode = results["mode"]
    config = results["config"]
    names = [pathlib.Path(s).name for s in results["scans"]]
    lo, hi = results["data_range"]
    crop = (f"{config['crop_border']} px shaved off each side of H and W" if config["crop_border"]
            else "no border crop")
    ensemble = " CNN rows with self-ensemble." if config["ensemble"] and config["cnn"] else ""
    lines = [f"# {_MODE_TITLES[mode]}", "",
             f"sr3d {results['sr3d_version']}. LR simulated from each HR scan (mode {mode}: "
             f"{_MODE_TEXT[mode]}, MATLAB imresize bicubic, antialiased) and brought back to the HR "
             f"grid by each method.{ensemble} Each cell: mean over the {len(names)} scans of the "
             "per-volume score; bold: best value in the column.", ""]
    for protocol, description in results["protocols"].items():
        lines += [f"## {_MODE_TITLES[mode]}, {protocol} protocol", ""]
        lines += _table(results, protocol)
        lines += ["",
                  f"Protocol: {description}",
                  "",
                  f"Scans ({len(names)}): {', '.join(names)}. Mode: {mode} ({_MODE_TEXT[mode]}). "
                  f"Crop: {crop}."
                  + (f" Float window: [{lo:g}, {hi:g}] ({results['data_range_source']})."
                     if protocol == "float" else ""),
                  ""]
        significance = _significance_table(results, protocol)
        if significance:
            lines += [f"{_SIGNIFICANT}: per-slice PSNR differs from Lanczos at p < {ALPHA:g} "
                      "(two-sided Wilcoxon signed-rank test, slices of all scans paired by "
                      "(scan, slice)). Median per-slice PSNR difference to Lanczos and p-value:", ""]
            lines += significance + [""]
    if results["significance"]:
        lines += ["Why Wilcoxon: " + results["significance_test"]["why"] + ".", ""]
    for key, figure in results["figures"].items():
        lines += [f"Figure {figure['file']}: {pathlib.Path(figure['scan']).name}, slice "
                  f"{figure['slice_index']} along D, x{key[1:]}.", ""]
    lines += [f"Time: {results['timing_s']['total']:.1f} s.", ""]
    return "\n".join(lines)


def _json_ready(value):
    """Non-finite floats as None (strict JSON has no Infinity), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _zoom_region(error: np.ndarray) -> tuple[int, int, int]:
    """(row, col, side) of the square where `error` sums highest: the region to magnify."""
    from scipy import ndimage

    side = max(8, min(error.shape) // 5)
    sums = ndimage.uniform_filter(error.astype(np.float64), size=side, mode="constant")
    half = side // 2
    valid = sums[half:error.shape[0] - side + half + 1, half:error.shape[1] - side + half + 1]
    row, col = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return int(row), int(col), side


def _draw_figure(path: pathlib.Path, slices: dict, info: dict, labels: Mapping[str, str],
                 title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    affine = slices.get("affine", np.eye(4))

    def shown(image: np.ndarray) -> planes.Shown:  # slices are (H, W) planes, normal to D
        return planes.display(image, affine, 0)

    r = int(slices["scale"])
    # The LR input drawn on the HR grid, each LR pixel an r x r block, so the insets line up.
    lr_on_hr_grid = np.repeat(np.repeat(slices["lr"], r, axis=0), r, axis=1)[:slices["hr"].shape[0],
                                                                              :slices["hr"].shape[1]]
    edges = shown(slices["hr"])
    hr = edges.image
    panels = {m: shown(image).image for m, image in slices["panels"].items()}
    lr_on_hr_grid = shown(lr_on_hr_grid).image
    errors = {m: np.abs(image - hr) for m, image in panels.items()}
    row, col, side = _zoom_region(next(iter(errors.values())))
    vmin, vmax = float(hr.min()), float(np.percentile(hr, 99.5)) or float(hr.max())
    origin = "upper"
    # Scaled to the errors inside the scan (HR above 5% of its window), so that the maps of a dim
    # brain on a dark background are not all black; the colorbar gives the units.
    inside = hr > vmin + 0.05 * (vmax - vmin)
    error_max = max(float(np.percentile(e[inside] if inside.any() else e, 99)) for e in errors.values()) or 1.0
    n = 2 + len(panels)
    figure, axes = plt.subplots(2, n, figsize=(4.0 * n, 8.4), squeeze=False, constrained_layout=True)
    images = [(f"LR input ({r}x coarser)", lr_on_hr_grid)] + [
        (labels[m] + ("" if info["psnr"][m] is None else f"\nPSNR {info['psnr'][m]:.2f} dB"), panels[m])
        for m in panels] + [("HR (ground truth)", hr)]
    for ax, (name, image) in zip(axes[0], images):
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", origin=origin)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
        planes.label_edges(ax, edges)
        inset = ax.inset_axes([0.58, 0.58, 0.42, 0.42])
        inset.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", origin=origin)
        inset.set_xlim(col - 0.5, col + side - 0.5)
        rows = (row - 0.5, row + side - 0.5)
        inset.set_ylim(rows if origin == "lower" else rows[::-1])
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor("yellow")
        ax.indicate_inset_zoom(inset, edgecolor="yellow")
    axes[1][0].set_axis_off()
    axes[1][-1].set_axis_off()
    error_image = None
    for ax, method in zip(axes[1][1:-1], panels):
        error_image = ax.imshow(errors[method], cmap="inferno", vmin=0.0, vmax=error_max,
                                interpolation="nearest", origin=origin)
        ax.set_title(f"|{labels[method]} - HR|", fontsize=10)
        ax.set_axis_off()
        planes.label_edges(ax, edges, color="white")
    if error_image is not None:
        figure.colorbar(error_image, ax=axes[1][0], fraction=0.5,
                        label="absolute error (scanner units)")
    figure.suptitle(f"{title} ({edges.name} slice)", fontsize=11)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Writes results.json, results.md and comparison_x{r}.png (one per scale) into `out_dir`.

    Every file is written under a temporary name and renamed, so a reader never sees a
    partial file. Returns {"json", "markdown", "figure_x{r}"...} -> path.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD}
    for key, slices in results.get("figure_slices", {}).items():
        info = results["figures"][key]
        title = (f"{pathlib.Path(info['scan']).name}, slice {info['slice_index']} (D), x{key[1:]} "
                 f"{results['mode']}; PSNR: {info['psnr_protocol']} protocol")
        paths[f"figure_{key}"] = out / info["file"]
        with sr3d_files.atomic_path(paths[f"figure_{key}"]) as temporary:
            _draw_figure(temporary, slices, info, results["method_labels"], title)
    serialisable = _json_ready({k: v for k, v in results.items() if k != "figure_slices"})
    text = json.dumps(serialisable, indent=1, allow_nan=False)
    sr3d_files.write_text(paths["json"], text + "\n")
    markdown = format_markdown(results)
    sr3d_files.write_text(paths["markdown"], markdown)
    return paths
