"""`evaluate`: every method on every scan and scale, scored under every protocol (the protocol:
`sr3d.evaluation`)."""
from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Mapping

import numpy as np

import sr3d
from sr3d import baselines, degrade, metrics, planes
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume
from sr3d.evaluation.config import EvalConfig, method_label
from sr3d.evaluation.figures import figure_info
from sr3d.evaluation.stats import REFERENCE_METHOD, SIGNIFICANCE_TEST, mean_scores, wilcoxon_vs_reference
from sr3d.progress import Progress, Step


def _global_data_range(scans: tuple[str, ...], progress: Progress | None) -> tuple[float, float]:
    """(min, max) over the voxels of all scans, scanner units (one extra read of each scan)."""
    lo, hi = math.inf, -math.inf
    for index, path in enumerate(scans):
        _report(progress, Step("scans read", index, len(scans),
                               f"data range: reading scan {index + 1}/{len(scans)} {path}"))
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
                                      mode=config.mode, ensemble=config.ensemble, planes=config.planes,
                                      consistency=config.consistency)
    return result.array


def _report(progress: Progress | None, step: Step) -> None:
    if progress is not None:
        progress(step)


def evaluate(config: EvalConfig, progress: Progress | None = None) -> dict:
    """Runs every method on every scan and scale and scores it under every protocol.

    progress: called with a `sr3d.progress.Step` per step: a line naming scan i/n, scale and method,
        counting the (scan, scale, method) runs done; e.g. `sr3d.progress.print_line`.
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
    runs_done, n_runs = 0, n_scans * len(config.scales) * len(methods)
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
                _report(progress, Step("runs", runs_done, n_runs,
                                       f"scan {index + 1}/{n_scans} {pathlib.Path(path).name} {key} {method}"))
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
                runs_done += 1
                if is_figure_scan and method in figure_methods:
                    # The LR slice that covers HR slice `middle` (in 3D, D was shrunk by r too).
                    lr_slice = lr[middle // scale if config.mode == "3d" else middle]
                    slices = figure_slices.setdefault(key, {"hr": hr[middle].copy(), "lr": lr_slice.copy(),
                                                            "scale": scale, "panels": {}})
                    slices["panels"][method] = test[middle].copy()
            if is_figure_scan:
                figures[key] = figure_info(path, middle, figure_methods, per_scan, key)
                figures[key]["plane"] = planes.plane_name(volume.affine, 0)
                figure_slices[key]["affine"] = np.asarray(volume.affine, np.float64)

    summary = {p: {key: {m: mean_scores(cells[m]) for m in methods} for key, cells in by_scale.items()}
               for p, by_scale in per_scan.items()}
    significance = {p: {key: {m: wilcoxon_vs_reference(cells[m], cells[REFERENCE_METHOD])
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
