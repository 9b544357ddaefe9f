"""Upscaling whole volumes with a pair of stage models: Volume in, Volume out.

The networks' passes over normalised arrays (3D, in-plane or one axis; tiled, self-ensembled,
bf16) are `sr3d.upscaling`'s, and their names stay importable from here. This module puts a
scan through them: mode "thick" is the one-axis mode of the axis with the largest spacing
(`resolve_mode`), `check_upscalable` refuses scans too small for the networks, and
`upscale_volume` runs the pass in the scan's units onto the upscaled grid. `upscale_checked`
adds the self-check on the scan (`sr3d.selfcheck`), test-time adaptation (`sr3d.adapt`) and
the Lanczos fallback; `upscale` takes what a user has (a Volume, a path, a numpy array).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from sr3d import baselines, degrade
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume
from sr3d.progress import Progress
from sr3d.upscaling import (AXIS_MODES, MODES, PLANES, clipped_to_range, make_consistent,  # noqa: F401
                            fuse_orientations, orientation_fusion_beta, orientation_passes, run_in_scanner_units,
                            upscale_depth_normalised, upscale_normalised)

if TYPE_CHECKING:  # sr3d.models imports Keras: imported where a network runs
    from sr3d.models import ModelBundle

SCAN_MODES = MODES + ("thick",)            # what a scan may ask for: "thick" is resolved per scan (resolve_mode)


def resolve_mode(mode: str, spacing) -> str:
    """`mode` itself, or for "thick" the one-axis mode of the scan's thickest axis ("d", "h" or
    "w"; ValueError when the scan is isotropic or has two thick axes: `sr3d.selfsup.thick_axis`)."""
    if mode == "thick":
        from sr3d import selfsup

        return "dhw"[selfsup.thick_axis(spacing)]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {SCAN_MODES}, got {mode!r}")
    return mode


ANISOTROPY_NOTE_RATIO = 2.5


def anisotropy_note(spacing_mm, mode: str) -> str | None:
    """A one-line suggestion for a 3D upscale of a strongly anisotropic scan (thickest voxel side
    >= 2.5x the finest, e.g. 8 mm slices of 1 mm pixels), else None. The networks learned
    near-isotropic voxels: x r along a thick axis leaves it thick."""
    spacing = [float(s) for s in spacing_mm]
    if mode != "3d" or max(spacing) < ANISOTROPY_NOTE_RATIO * min(spacing):
        return None
    axis = "DHW"[spacing.index(max(spacing))]
    return (f"note: voxels of {' x '.join(f'{s:.3g}' for s in spacing)} mm are {max(spacing) / min(spacing):.1f}x "
            f"thicker along {axis} than the finest axis: for a thick-slice scan, --axes 2d (in-plane only) or "
            "--self-supervised (learn the thick axis from the scan) usually does better than 3D")


def check_upscalable(volume: sr3d_volume.Volume, scale: int, mode: str) -> None:
    """ValueError naming the scan if it is too small for the networks at `scale` in `mode`."""
    from sr3d import models as sr3d_models

    name = volume.source or "volume"
    min_slices = 2
    if mode in AXIS_MODES:
        axis = AXIS_MODES[mode]
        if volume.array.shape[axis] < min_slices:
            raise ValueError(f"{name}: upscaling axis {mode.upper()} needs at least {min_slices} voxels along it, "
                             f"got {volume.array.shape[axis]}")
        return
    if mode == "3d" and volume.array.shape[0] < min_slices:
        raise ValueError(f"{name}: 3D upscaling needs at least {min_slices} slices, "
                         f"got {volume.array.shape[0]}; use mode='2d'")
    # Smaller slices would be all border: every output pixel would see the zero padding.
    min_side = 2 * sr3d_models.lr_halo("hw", scale)[0] + 1
    if min(volume.array.shape[1:]) < min_side:
        raise ValueError(f"{name}: slices of {volume.array.shape[1]} x {volume.array.shape[2]} voxels are "
                         f"smaller than the network's receptive field ({min_side} x {min_side} at scale {scale})")


def upscale_volume(volume: sr3d_volume.Volume, models: ModelBundle, *, mode: str = "3d", ensemble: bool = False,
                   planes: str = "dw", batch_size: int = 8, tile_mb: float | None = 256,
                   progress: Progress | None = None, precision: str = "float32",
                   consistency: bool = True) -> sr3d_volume.Volume:
    """Upscale a Volume: normalised in, the input's units out, clipped to the input's range.

    The result has the upscaled affine (voxel sizes / r, same physical extent).
    consistency: the output made consistent with the input under the training degradation
    (`sr3d.upscaling.make_consistent`; on by default: +0.04-0.23 dB on held-out scans, docs/model_card.md
    "Consistency with the input"); False gives the networks' output alone, as the served graph's
    `*_no_consistency` signatures do (`sr3d.export`).
    """
    r = models.scale
    mode = resolve_mode(mode, volume.spacing)
    check_upscalable(volume, r, mode)

    def run(normalised: np.ndarray) -> np.ndarray:
        return upscale_normalised(normalised, models, mode=mode, ensemble=ensemble, planes=planes,
                                  batch_size=batch_size, tile_mb=tile_mb, progress=progress, precision=precision,
                                  consistency=consistency)

    return run_in_scanner_units(volume, run, _upscaled_grid(volume, r, mode))



def _upscaled_grid(volume: sr3d_volume.Volume, scale: int, mode: str) -> Callable[[np.ndarray], sr3d_volume.Volume]:
    """array -> the Volume of it on `volume`'s grid upscaled by `scale` in `mode`."""
    return lambda array: sr3d_volume.upscaled_volume(volume, array, scale, axes=degrade.MODE_AXES[mode])


FALLBACKS = ("lanczos",)


def lanczos_volume(volume: sr3d_volume.Volume, scale: int, mode: str = "3d") -> sr3d_volume.Volume:
    """The Lanczos upscale of a Volume (`sr3d.baselines`), clipped to its range as the CNN's is:
    what `fallback="lanczos"` writes."""
    upscaled = baselines.upscale(volume.array, scale, "lanczos", mode)
    return _upscaled_grid(volume, scale, mode)(clipped_to_range(upscaled, volume))


def upscale_checked(volume: sr3d_volume.Volume, models: ModelBundle, *, mode: str = "3d", ensemble: bool = False,
                    self_check: bool = True, fallback: str | None = None, adapt=None, consistency: bool = True,
                    log: Callable[[str], None] | None = None, **options) -> tuple[sr3d_volume.Volume, ModelBundle]:
    """`upscale_volume` with the self-check on the scan (`sr3d.selfcheck`), optional test-time
    adaptation first (`adapt`: an `sr3d.adapt.AdaptConfig`) and optional fallback.

    consistency: as for `upscale_volume`; the self-check and adaptation run with it too.
    planes (in options): as for `upscale_volume`, or "auto"; None or absent: `default_planes`
    ("auto" in mode 3d with the self-check and without adaptation, else "dw").

    fallback: None (always the CNN) or "lanczos": write the Lanczos result when the CNN loses
    the self-check (lower PSNR). log: called with one line per event (the self-check
    line, warnings). Returns (the upscaled Volume with `report` = what was measured and done,
    the bundle used: the adapted one if adaptation was kept).
    """
    from sr3d import selfcheck

    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None or one of {FALLBACKS}, got {fallback!r}")
    if fallback is not None and not self_check:
        raise ValueError("a fallback needs the self-check to decide: drop --no-self-check")
    say = log or (lambda line: None)
    r = models.scale
    mode = resolve_mode(mode, volume.spacing)
    if adapt is not None and mode in AXIS_MODES:
        raise ValueError(f"adaptation (--adapt) fine-tunes both stages: it applies to modes 3d and 2d, not to "
                         f"one-axis mode {mode!r}")
    check_upscalable(volume, r, mode)  # before the self-check and adaptation spend any time
    if options.get("planes") is None:
        options["planes"] = default_planes(mode, self_check, adapt)
    report = {"scale": r, "mode": mode, "ensemble": ensemble, "model": models.info.get("note", "")}
    # The options that change the CNN's numbers: the self-check and adaptation score what is written.
    network_options = {k: v for k, v in options.items() if k in ("planes", "precision", "batch_size")}
    network_options["consistency"] = report["consistency"] = consistency
    auto = network_options.get("planes") == "auto"
    if auto:
        _check_auto_planes(mode, self_check, adapt)
    if mode == "3d":
        report["planes"] = network_options.get("planes", "dw")

    def run(normalised: np.ndarray, bundle: ModelBundle) -> np.ndarray:
        """The CNN as the real upscale runs it (the options that change its numbers, not tiling)."""
        return upscale_normalised(normalised, bundle, mode=mode, ensemble=ensemble, **network_options)

    if adapt is not None:
        from sr3d import adapt as sr3d_adapt

        adapted = sr3d_adapt.adapt(volume.array, models, mode, adapt, log=say, upscale_fn=run)
        say(adapted.line())
        report["adaptation"] = adapted.to_json()
        models = adapted.bundle
    check = None
    if auto:
        chosen, check, report["planes_choice"] = choose_planes(volume, models, ensemble, network_options, say)
        network_options["planes"] = options["planes"] = report["planes"] = chosen
    elif self_check:
        check = selfcheck.self_check(volume.array, lambda x: run(x, models), r, mode)
    if self_check:
        if check is None:
            why = selfcheck.check_size(volume.shape, r, mode)
            report["self_check"] = {"skipped": why}
            say(f"self-check skipped: {why}")
        else:
            report["self_check"] = check.to_json()
            say(check.line())
            if check.cnn_loses:
                say("warning: on this scan's self-check the CNN scores below Lanczos"
                    + ("; writing the Lanczos result (--fallback lanczos)" if fallback else
                       "; consider --adapt, or --fallback lanczos to write Lanczos when it loses"))
    if fallback == "lanczos" and check is not None and check.cnn_loses:
        result = lanczos_volume(volume, r, mode)
        report["method"] = "lanczos (fallback: the CNN lost the self-check)"
    else:
        result = upscale_volume(volume, models, mode=mode, ensemble=ensemble, consistency=consistency, **options)
        report["method"] = "cnn"
        if report.get("planes") == "all":
            report["orientation_fusion_beta"] = orientation_fusion_beta(models)
    return result.replace(report=report), models


AUTO_PLANES = ("dw", "all")   # what planes "auto" chooses between


def default_planes(mode: str, self_check: bool, adapt) -> str:
    """The planes of `upscale_checked` (`sr3d upscale`, `sr3d.upscale`) when none is given: "auto" in
    mode 3d with the self-check on and no adaptation (the self-check picks one pass or three
    orientations; docs/model_card.md "Three orientations"), else "dw" (one pass)."""
    return "auto" if mode == "3d" and self_check and adapt is None else "dw"


def _check_auto_planes(mode: str, self_check: bool, adapt) -> None:
    if mode != "3d":
        raise ValueError(f"planes 'auto' chooses between the 3D passes (dw, all): it applies to mode 3d, not {mode!r}")
    if not self_check:
        raise ValueError("planes 'auto' is chosen by the self-check: drop --no-self-check, or give --planes dw or all")
    if adapt is not None:
        raise ValueError("planes 'auto' with adaptation (--adapt): give --planes dw or all")


def choose_planes(volume: sr3d_volume.Volume, models: ModelBundle, ensemble: bool, network_options: dict,
                  say: Callable[[str], None]):
    """planes "auto": the self-check scored with one pass (dw) and with three orientations (all) on
    the same pair (`sr3d.selfcheck.self_checks`; the three passes run once, the first is dw); the
    higher self-check PSNR wins (the Lanczos side is the same for both). dw when the scan is too
    small for the self-check. Returns (planes, the winner's SelfCheck or None, what to report)."""
    from sr3d import selfcheck

    options = {k: v for k, v in network_options.items() if k not in ("planes", "consistency")}
    consistency = network_options.get("consistency", True)

    def candidates(lr: np.ndarray) -> dict[str, np.ndarray]:
        passes = list(orientation_passes(lr, models, ensemble=ensemble, **options))
        chosen = {"all": fuse_orientations(passes, orientation_fusion_beta(models)), "dw": passes[0]}
        if consistency:  # once per candidate, as upscale_normalised does after the passes
            chosen = {p: make_consistent(out, lr, models.scale, "3d") for p, out in chosen.items()}
        return chosen

    checks = selfcheck.self_checks(volume.array, candidates, models.scale, "3d")
    if checks is None:
        say("planes auto: one pass (dw); the scan is too small for the self-check that chooses")
        return "dw", None, {"chosen": "dw", "why": "the scan is too small for the self-check"}
    chosen = "all" if checks["all"].margin_db > checks["dw"].margin_db else "dw"
    say(f"planes auto: {'three orientations (all)' if chosen == 'all' else 'one pass (dw)'}; self-check "
        f"{checks['all'].margin_db:+.2f} dB with three orientations, {checks['dw'].margin_db:+.2f} dB with one pass")
    return chosen, checks[chosen], {"chosen": chosen, **{f"{p}_self_check_margin_db": round(checks[p].margin_db, 4)
                                                         for p in AUTO_PLANES}}


def as_volume(volume_or_path, spacing=None) -> sr3d_volume.Volume:
    """A Volume from a Volume, a path (NIfTI, NRRD, DICOM) or a (D, H, W) numpy array with
    `spacing` (mm, D H W; the affine is then diagonal: voxel (d, h, w) at (w, h, d) * spacing mm)."""
    if isinstance(volume_or_path, sr3d_volume.Volume):
        return volume_or_path
    if isinstance(volume_or_path, np.ndarray):
        if spacing is None:
            raise ValueError("a numpy array needs spacing=(d, h, w) in mm (or pass an sr3d.io.Volume)")
        array = volume_or_path
        if array.ndim != 3:
            raise ValueError(f"a numpy array to upscale must be 3D (D, H, W), got shape {array.shape}")
        spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, np.float64), (3,)))
        affine = np.eye(4)
        affine[:3, :3] = 0.0
        for axis, world in ((0, 2), (1, 1), (2, 0)):  # d -> S, h -> A, w -> R (NIfTI's k, j, i)
            affine[world, axis] = spacing[axis]
        return sr3d_volume.Volume(array=array, spacing=spacing, affine=affine)
    if spacing is not None:
        raise ValueError("spacing= applies only to a numpy array; files and Volumes carry their own")
    return sr3d_io.load_volume(volume_or_path)


def upscale(volume_or_path, scale: int = 2, ensemble: bool = False, model=None, *, mode: str = "3d",
            self_check: bool = True, fallback: str | None = None, adapt=None, spacing=None,
            **options) -> sr3d_volume.Volume:
    """Upscale a scan (Volume, path to NIfTI / NRRD / DICOM series, or a (D, H, W) numpy array
    with `spacing` in mm) with the shipped or a given model; returns an `sr3d.io.Volume`.

    model: None (the shipped model for `scale`), a bundle directory, or a ModelBundle.
    mode: "3d", "2d", one axis ("d", "h", "w": stage d alone along it) or "thick" (the axis
        with the largest spacing).
    self_check: measure CNN vs Lanczos on the scan downscaled once more (`sr3d.selfcheck`); the
        result is in the returned Volume's `report`, and a warning is issued when the CNN loses.
    fallback: "lanczos" writes the Lanczos result when the CNN loses the self-check.
    adapt: an `sr3d.adapt.AdaptConfig` (or True for the defaults): fine-tune on the scan first.
    planes (in options): "dw", "both", "all" or "auto"; default `default_planes` (auto in 3D with the
        self-check and without adapt, else dw).
    """
    import warnings

    volume = as_volume(volume_or_path, spacing)
    from sr3d import models as sr3d_models

    bundle = model if isinstance(model, sr3d_models.ModelBundle) else sr3d_models.load_models(model, scale)
    if bundle.scale != scale:
        raise ValueError(f"the model upscales by {bundle.scale}, not by {scale}")
    if adapt is True:
        from sr3d import adapt as sr3d_adapt

        adapt = sr3d_adapt.AdaptConfig()
    result, _ = upscale_checked(volume, bundle, mode=mode, ensemble=ensemble, self_check=self_check,
                                fallback=fallback, adapt=adapt or None, **options)
    check = (result.report or {}).get("self_check", {})
    if check.get("cnn_loses"):
        warnings.warn(f"{volume.source or 'volume'}: on the self-check the CNN scores below Lanczos "
                      f"({check['margin_db']:+.2f} dB, SSIM {check['ssim_margin']:+.4f}); "
                      + ("the Lanczos result was returned" if fallback else "consider adapt= or fallback='lanczos'"),
                      stacklevel=2)
    return result


def output_voxels(shape: tuple[int, int, int], scale: int, mode: str = "3d") -> int:
    d, h, w = shape
    return (d * scale if mode == "3d" else d) * h * scale * w * scale


def conv_flops(shape: tuple[int, int, int], scale: int, filters: int = 32, mode: str = "3d") -> float:
    """Multiply-add FLOPs (2 per MAC) of the two stages on a (D, H, W) input, without ensemble."""
    d, h, w = shape
    f = filters

    def stage(lr_pixels: int, hr_pixels: int, upsampled: int) -> float:
        block1 = 9 * (1 * f + 4 * f * f + f * upsampled) * lr_pixels
        block2 = 9 * (1 * f + 2 * f * f + f * 1) * hr_pixels
        return 2.0 * (block1 + block2)

    total = stage(d * h * w, d * h * w * scale * scale, scale * scale)
    if mode == "3d":
        total += stage(d * h * scale * w * scale, d * scale * h * scale * w * scale, scale)
    return total


# Model bundles live in `sr3d.models` (issue 16). These names are still found here for the
# benchmarks and experiments that say `inference.load_models` until they are edited; imported
# on first use, so `import sr3d.inference` stays free of TensorFlow.
_MOVED_TO_MODELS = ("ModelBundle", "load_models", "make_bundle", "save_bundle", "available_scales",
                    "shipped_model_dir", "SHIPPED_DIR", "MODEL_FILES", "BUNDLE_JSON")


def __getattr__(name: str):
    if name in _MOVED_TO_MODELS:
        from sr3d import models as sr3d_models

        return getattr(sr3d_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
