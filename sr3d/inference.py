"""Upscaling whole volumes with a pair of stage models: 3D or in-plane, tiled, self-ensembled.

3D (the paper's pipeline): stage `hw` upsamples every axial slice (D, H, W) ->
(D, rH, rW); stage `d` then upsamples every (D, rW) plane, one per output row,
-> (rD, rH, rW). `planes="both"` also runs stage `d` on the (D, rH) planes,
one per output column, and averages the two (the authors' code did this).

Tiling works in bands of LR rows (`sr3d.tiling.banded`, which also batches the planes of
each network call: `sr3d.tiling.batched`). A band's slices are extended by the
receptive-field halo (`sr3d.models.lr_halo`), run through stage `hw`, trimmed,
and its output rows go straight through stage `d` into the output array. So
besides the output only one band lives in memory: peak memory is the output
plus a budget set by `tile_mb`, and since each band sees all the context its
outputs depend on, the tiled result equals the untiled one (up to float
round-off of different convolution sizes).

Self-ensemble (Lim et al. 2017, as in the paper): each input is also run
flipped and rotated, each output transformed back, and the pixel-wise median
taken: 8 transforms for stage `hw`; for stage `d` only the 4 flips that keep
the depth axis in place (a 90-degree rotation would swap depth with a spatial
axis).

One axis (mode "d", "h" or "w"): stage d alone upsamples that axis of the scan, in-plane
untouched: for scans fine in two axes and coarse in one (thick slices), with the shipped
networks instead of `sr3d.selfsup`'s per-scan training. The axis is moved to D and every
(axis, W) plane (for "d"; the other fine axis for "h" and "w") goes through stage d. Mode
"thick" (`resolve_mode`) is the axis with the largest spacing.

Precision (`precision=`): "float32", or "bfloat16" convolutions with float32 inputs, outputs
and intensity arithmetic; "auto" is bfloat16 only on CPUs with native bf16 (`sr3d.precision`).
Tiling, ensemble and planes work the same in either.
"""
from __future__ import annotations

import numbers
import weakref
from typing import TYPE_CHECKING, Callable

import numpy as np

from sr3d import baselines, degrade, intensity, tiling, transforms
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume
from sr3d import precision as sr3d_precision
from sr3d.progress import Progress, Step

if TYPE_CHECKING:  # sr3d.models imports Keras: imported where a network runs
    from sr3d.models import ModelBundle

MODES = ("3d", "2d", "d", "h", "w")
SCAN_MODES = MODES + ("thick",)            # what a scan may ask for: "thick" is resolved per scan (resolve_mode)
AXIS_MODES = {"d": 0, "h": 1, "w": 2}     # one-axis modes: the axis stage d upsamples
PLANES = ("dw", "both")


# One traced function per model, kept as long as the model lives: upscaling many scans with the
# same bundle (sr3d upscale-batch) traces each network once, not once per scan.
_TRACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _traced(model, precision: str = "float32"):
    import tensorflow as tf

    model = sr3d_precision.network(model, precision)
    fn = _TRACED.get(model)
    if fn is None:
        fn = tf.function(lambda x: model(x, training=False)["final"],
                         input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)])
        _TRACED[model] = fn
    return fn


class _Stage:
    """One stage network as a batched numpy function (B, h, w) -> (B, h', w')."""

    def __init__(self, model, batch_size: int, ensemble: bool, kind: str, precision: str = "float32"):
        self._fn = _traced(model, precision)
        self.batch_size = batch_size
        self.ensemble = ensemble
        self.kind = kind

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] == 1:
            # oneDNN runs a batch of one plane through other kernels: on Intel AMX a float32
            # layer's output then differs in its last bit, which a bf16 layer after it can turn into
            # a difference of 0.003. The result would depend on how the planes were batched (tiles,
            # memory budget), so one plane runs as two (itself twice); the exported graph does too.
            return self._run(np.concatenate([batch, batch]))[:1]
        return self._fn(np.ascontiguousarray(batch[..., None], np.float32)).numpy()[..., 0]

    def _batch(self, batch: np.ndarray) -> np.ndarray:
        if not self.ensemble:
            return self._run(batch)
        # Each plane's transforms are independent of the other planes: the median per batch is
        # the median over the whole stack, with progress after each batch and 1/B of the memory.
        outs = [transforms.inverse(self._run(transforms.forward(batch, k, self.kind)), k, self.kind)
                for k in range(transforms.COUNT[self.kind])]
        return np.median(np.stack(outs), axis=0).astype(np.float32)

    def __call__(self, planes: np.ndarray, tick: Callable[[int], None] | None = None) -> np.ndarray:
        """tick: called with the number of planes done after each network call (batch)."""
        return tiling.batched(planes, self._batch, self.batch_size, tick)


class _Counter:
    """Counts planes done for `progress(Step(unit, done, total))`; silent when progress is None."""

    def __init__(self, progress: Progress | None, unit: str, total: int):
        self.progress, self.unit, self.total, self.done = progress, unit, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(Step(self.unit, self.done, self.total))


def _depth_pass(stage_d: _Stage, volume: np.ndarray, both: bool, tick=None) -> np.ndarray:
    """Stage d on a (D, H, W) array -> (rD, H, W): one (D, W) plane per row, and with `both`
    also one (D, H) plane per column, the two results averaged. tick: see `_Stage`."""
    out = stage_d(np.ascontiguousarray(volume.transpose(1, 0, 2)), tick).transpose(1, 0, 2)
    if both:
        out = out + stage_d(np.ascontiguousarray(volume.transpose(2, 0, 1)), tick).transpose(1, 2, 0)
        out *= 0.5
    return out


def upscale_depth_normalised(lr: np.ndarray, d_model, *, ensemble: bool = False, planes: str = "dw",
                             batch_size: int = 8, rows_per_band: int = 64,
                             progress: Progress | None = None) -> np.ndarray:
    """Stage d alone: a normalised (D, H, W) float32 array -> (rD, H, W), r the model's factor.

    For scans whose slices are already fine in-plane (thick-slice scans, `sr3d.selfsup`).
    planes "dw" runs bands of `rows_per_band` rows; "both" needs whole columns (one band).
    """
    if planes not in PLANES:
        raise ValueError(f"planes must be one of {PLANES}, got {planes!r}")
    lr = np.asarray(lr, np.float32)
    if lr.ndim != 3:
        raise ValueError(f"lr must be a (D, H, W) array, got shape {lr.shape}")
    stage_d = _Stage(d_model, batch_size, ensemble, "d")
    rows = lr.shape[1] if planes == "both" else max(1, rows_per_band)
    # No halo: each output row comes from its own row's (D, W) plane (with "both", one band).
    return tiling.banded(lr, rows, lambda band, keep: _depth_pass(stage_d, band, planes == "both"),
                         progress=progress)


def resolve_mode(mode: str, spacing) -> str:
    """`mode` itself, or for "thick" the one-axis mode of the scan's thickest axis ("d", "h" or
    "w"; ValueError when the scan is isotropic or has two thick axes: `sr3d.selfsup.thick_axis`)."""
    if mode == "thick":
        from sr3d import selfsup

        return "dhw"[selfsup.thick_axis(spacing)]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {SCAN_MODES}, got {mode!r}")
    return mode


def _upscale_one_axis(lr: np.ndarray, models: ModelBundle, axis: int, *, ensemble: bool, batch_size: int,
                      tile_mb: float | None, progress: Progress | None, precision: str) -> np.ndarray:
    """Stage d alone along `axis` of a normalised (D, H, W) array: the axis moved to D, then
    `upscale_depth_normalised` on (axis, other) planes in bands that fit tile_mb."""
    d_precision = sr3d_precision.stage_precisions(precision, models.scale, "3d")[1]
    moved = np.moveaxis(np.asarray(lr, np.float32), axis, 0)
    n, rows, width = moved.shape
    bytes_per_row = 4 * n * models.scale * width * 3
    rows_per_band = rows if tile_mb is None else int(min(rows, max(1, tile_mb * 2**20 // bytes_per_row)))
    planes_per_call = _planes_per_call(models.d, n * models.scale * width, tile_mb, batch_size)
    out = upscale_depth_normalised(np.ascontiguousarray(moved), sr3d_precision.network(models.d, d_precision),
                                   ensemble=ensemble, batch_size=planes_per_call, rows_per_band=rows_per_band,
                                   progress=progress)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _band_rows(shape: tuple[int, int, int], scale: int, tile_mb: float | None, mode: str,
               ensemble: bool = True) -> int:
    """LR rows per band so one band's stage-hw output (and its stage-d output) fits in tile_mb;
    the self-ensemble's transformed copies get as much again (taller bands without it:
    less halo recomputed, docs/benchmarks.md "Taller bands")."""
    d, h, w = shape
    if tile_mb is None:
        return h
    depth_out = d * scale if mode == "3d" else d
    bytes_per_lr_row = 4 * scale * (w * scale) * (d + depth_out) * (2 if ensemble else 1)
    return int(min(h, max(1, tile_mb * 2**20 // bytes_per_lr_row)))


def _planes_per_call(model, hr_pixels: int, tile_mb: float | None, batch_size: int) -> int:
    """Planes per network call so that the activations of one call fit in tile_mb: about four
    HR-sized maps of `filters` channels are alive at once in block 2 (conv7 kept for its skip)."""
    if tile_mb is None:
        return batch_size
    try:
        filters = int(model.get_layer("conv1").filters)
    except (ValueError, AttributeError):
        filters = 32
    bytes_per_plane = 4 * filters * 4 * hr_pixels
    return int(min(batch_size, max(1, tile_mb * 2**20 // bytes_per_plane)))


def upscale_normalised(lr: np.ndarray, models: ModelBundle, *, mode: str = "3d", ensemble: bool = False,
                       planes: str = "dw", batch_size: int = 8, tile_mb: float | None = 256,
                       progress: Progress | None = None, precision: str = "float32") -> np.ndarray:
    """Upscale a normalised (D, H, W) float32 array -> (rD, rH, rW) (3d) or (D, rH, rW) (2d).

    tile_mb: memory budget of one band of rows (None: the whole volume in one band).
    precision: "float32", "bfloat16" (bf16 convolutions, float32 in and out) or "auto"
    (bfloat16 where the CPU multiplies bf16 natively): see `sr3d.precision`.
    progress: called with a `sr3d.progress.Step(unit, done, total)` after every network call, with unit
    "slices" (stage hw; total D x bands: each band runs its rows of every slice) or "planes"
    (stage d; total rH, + rW with planes "both"), and Step("bands", i, n) before the first (i = 0)
    and after each band.
    """
    from sr3d import models as sr3d_models

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if planes not in PLANES:
        raise ValueError(f"planes must be one of {PLANES}, got {planes!r}")
    if mode in AXIS_MODES and planes != "dw":
        raise ValueError(f"planes={planes!r} applies to mode 3d; one-axis mode {mode!r} runs stage d on one "
                         "plane per voxel")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if tile_mb is not None and not tile_mb > 0:
        raise ValueError(f"tile_mb must be a positive number of megabytes or None, got {tile_mb!r}")
    if np.ndim(lr) != 3:
        raise ValueError(f"expected a (D, H, W) array, got shape {np.shape(lr)}")
    if mode in AXIS_MODES:
        return _upscale_one_axis(lr, models, AXIS_MODES[mode], ensemble=ensemble, batch_size=batch_size,
                                 tile_mb=tile_mb, progress=progress, precision=precision)
    hw_precision, d_precision = sr3d_precision.stage_precisions(precision, models.scale, mode)
    r = models.scale
    d, h, w = lr.shape
    halo = sr3d_models.lr_halo("hw", r)[0]
    both = mode == "3d" and planes == "both"
    # Averaging over (D, H) planes needs whole columns: the stage-hw output is then kept whole.
    rows = h if both else _band_rows(lr.shape, r, tile_mb, mode, ensemble)
    # The budget also bounds the network's activations: big planes go through a few at a time.
    hw_pixels = (min(h, rows + 2 * halo) * r) * (w * r)
    d_pixels = (d * r) * (max(h, w) * r if both else w * r)
    stage_hw = _Stage(models.hw, _planes_per_call(models.hw, hw_pixels, tile_mb, batch_size), ensemble, "hw",
                      hw_precision)
    stage_d = _Stage(models.d, _planes_per_call(models.d, d_pixels, tile_mb, batch_size), ensemble, "d",
                     d_precision)
    n_bands = len(tiling.bands(h, rows))
    slices_done = _Counter(progress, "slices", d * n_bands)
    planes_done = _Counter(progress, "planes", (h + w if both else h) * r)
    if progress is not None:
        progress(Step("bands", 0, n_bands))

    def run_band(window: np.ndarray, keep: slice) -> np.ndarray:
        """Stage hw on the band and its halo, the halo's rows dropped, then stage d on the rest."""
        hw_out = stage_hw(window, slices_done)[:, keep.start * r:keep.stop * r, :]
        return hw_out if mode == "2d" else _depth_pass(stage_d, hw_out, both, planes_done)

    return tiling.banded(lr, rows, run_band, halo=halo, progress=progress)


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
                   progress: Progress | None = None, precision: str = "float32") -> sr3d_volume.Volume:
    """Upscale a Volume: normalised in, the input's units out, clipped to the input's range.

    The result has the upscaled affine (voxel sizes / r, same physical extent).
    """
    r = models.scale
    mode = resolve_mode(mode, volume.spacing)
    check_upscalable(volume, r, mode)

    def run(normalised: np.ndarray) -> np.ndarray:
        return upscale_normalised(normalised, models, mode=mode, ensemble=ensemble, planes=planes,
                                  batch_size=batch_size, tile_mb=tile_mb, progress=progress, precision=precision)

    return run_in_scanner_units(volume, run, _upscaled_grid(volume, r, mode))


def run_in_scanner_units(volume: sr3d_volume.Volume, run: Callable[[np.ndarray], np.ndarray],
                         wrap: Callable[[np.ndarray], sr3d_volume.Volume], *,
                         resample: Callable[[np.ndarray], np.ndarray] | None = None) -> sr3d_volume.Volume:
    """A network that works in normalised units run on a Volume in its own units:
    normalise -> run -> denormalise -> resample -> clip to the input's range -> wrap.

    run: normalised float32 (D, H, W) -> the network's float32 output (a new array: it is
    denormalised and clipped in place). resample: None, or the output in scanner units -> the
    same on another grid (`sr3d.selfsup`'s target spacing; before the clip, which bounds its
    overshoot). wrap: the clipped array -> its Volume (e.g. `sr3d.volume.upscaled_volume`).
    The served graph does the same steps in TensorFlow (`sr3d.export`).
    """
    win = intensity.window(volume.array)
    # In place: a copy of the output would double the peak memory of a big scan.
    result = win.denormalise(run(win.normalise(volume.array)), in_place=True)
    if resample is not None:
        result = resample(result)
    return wrap(_clipped_to_range(result, volume))


def _clipped_to_range(array: np.ndarray, volume: sr3d_volume.Volume) -> np.ndarray:
    """`array` (scanner units) clipped in place to the range of `volume`'s voxels."""
    np.clip(array, float(volume.array.min()), float(volume.array.max()), out=array)
    return array


def _upscaled_grid(volume: sr3d_volume.Volume, scale: int, mode: str) -> Callable[[np.ndarray], sr3d_volume.Volume]:
    """array -> the Volume of it on `volume`'s grid upscaled by `scale` in `mode`."""
    return lambda array: sr3d_volume.upscaled_volume(volume, array, scale, axes=degrade.MODE_AXES[mode])


FALLBACKS = ("lanczos",)


def lanczos_volume(volume: sr3d_volume.Volume, scale: int, mode: str = "3d") -> sr3d_volume.Volume:
    """The Lanczos upscale of a Volume (`sr3d.baselines`), clipped to its range as the CNN's is:
    what `fallback="lanczos"` writes."""
    upscaled = baselines.upscale(volume.array, scale, "lanczos", mode)
    return _upscaled_grid(volume, scale, mode)(_clipped_to_range(upscaled, volume))


def upscale_checked(volume: sr3d_volume.Volume, models: ModelBundle, *, mode: str = "3d", ensemble: bool = False,
                    self_check: bool = True, fallback: str | None = None, adapt=None,
                    log: Callable[[str], None] | None = None, **options) -> tuple[sr3d_volume.Volume, ModelBundle]:
    """`upscale_volume` with the self-check on the scan (`sr3d.selfcheck`), optional test-time
    adaptation first (`adapt`: an `sr3d.adapt.AdaptConfig`) and optional fallback.

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
    report = {"scale": r, "mode": mode, "ensemble": ensemble, "model": models.info.get("note", "")}
    network_options = {k: v for k, v in options.items() if k in ("planes", "precision", "batch_size")}

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
    if self_check:
        check = selfcheck.self_check(volume.array, lambda x: run(x, models), r, mode)
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
        result = upscale_volume(volume, models, mode=mode, ensemble=ensemble, **options)
        report["method"] = "cnn"
    return result.replace(report=report), models


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
