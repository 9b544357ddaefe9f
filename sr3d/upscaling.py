"""The networks' passes over normalised arrays: a pair of stage models on (D, H, W) float32 in the
network's range, 3D or in-plane or along one axis, tiled, self-ensembled.

3D (the paper's pipeline): stage `hw` upsamples every axial slice (D, H, W) ->
(D, rH, rW); stage `d` then upsamples every (D, rW) plane, one per output row,
-> (rD, rH, rW). `planes="both"` also runs stage `d` on the (D, rH) planes,
one per output column, and averages the two (the authors' code did this).
`planes="all"` runs the whole cascade three times, each axis taken once as depth (stage
`hw` on the axial, then the coronal, then the sagittal slices), and fuses the three
outputs per spatial frequency (`fuse_orientations`; the plain mean for bundles without an
`orientation_fusion` beta): the errors of the passes are partly independent and each pass is
weakest along the axis its stage d upscaled (held-out MRI at 3D x2: +0.08 to +0.39 dB over one
pass; docs/model_card.md "Three orientations") for three times the time and about 4.5 times the
output's memory.

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
(axis, W) plane (for "d"; the other fine axis for "h" and "w") goes through stage d.

Precision (`precision=`): "float32", or "bfloat16" convolutions with float32 inputs, outputs
and intensity arithmetic; "auto" is bfloat16 only on CPUs with native bf16 (`sr3d.precision`).
Tiling, ensemble and planes work the same in either.

`run_in_scanner_units` runs any such pass on a Volume in its own units (normalise -> run ->
denormalise -> clip -> wrap): `sr3d.inference` and `sr3d.selfsup` both upscale through it.
"""
from __future__ import annotations

import numbers
import weakref
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from sr3d import degrade, intensity, tiling, transforms
from sr3d import volume as sr3d_volume
from sr3d import precision as sr3d_precision
from sr3d.progress import Progress, Step

if TYPE_CHECKING:  # sr3d.models imports Keras: imported where a network runs
    from sr3d.models import ModelBundle

MODES = ("3d", "2d", "d", "h", "w")
AXIS_MODES = {"d": 0, "h": 1, "w": 2}     # one-axis modes: the axis stage d upsamples
PLANES = ("dw", "both", "all")
DEPTH_PLANES = ("dw", "both")              # what stage d alone (one axis) can run on
# planes "all": the axis orders of the three passes (each axis once as depth), and back.
ORIENTATIONS = ((0, 1, 2), (1, 0, 2), (2, 0, 1))


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
    if planes not in DEPTH_PLANES:
        raise ValueError(f"planes must be one of {DEPTH_PLANES}, got {planes!r}")
    lr = np.asarray(lr, np.float32)
    if lr.ndim != 3:
        raise ValueError(f"lr must be a (D, H, W) array, got shape {lr.shape}")
    stage_d = _Stage(d_model, batch_size, ensemble, "d")
    rows = lr.shape[1] if planes == "both" else max(1, rows_per_band)
    # No halo: each output row comes from its own row's (D, W) plane (with "both", one band).
    return tiling.banded(lr, rows, lambda band, keep: _depth_pass(stage_d, band, planes == "both"),
                         progress=progress)


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
                       progress: Progress | None = None, precision: str = "float32",
                       consistency: bool = False) -> np.ndarray:
    """Upscale a normalised (D, H, W) float32 array -> (rD, rH, rW) (3d) or (D, rH, rW) (2d).

    consistency: make the output consistent with `lr` under the training degradation
    (`sr3d.degrade.make_consistent`: the smallest change after which the output, downscaled as
    the networks' training pairs were, is `lr` again); once, after the passes (with planes "all",
    on their fusion). Off here; `sr3d.inference` turns it on by default, as the served graph's
    default signatures do (`sr3d.export`).

    tile_mb: memory budget of one band of rows (None: the whole volume in one band).
    precision: "float32", "bfloat16" (bf16 convolutions, float32 in and out) or "auto"
    (bfloat16 where the CPU multiplies bf16 natively): see `sr3d.precision`.
    progress: called with a `sr3d.progress.Step(unit, done, total)` after every network call, with unit
    "slices" (stage hw; total D x bands: each band runs its rows of every slice) or "planes"
    (stage d; total rH, + rW with planes "both"), and Step("bands", i, n) before the first (i = 0)
    and after each band; with planes "all" the counts run on over the three passes.
    """
    from sr3d import models as sr3d_models

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if planes not in PLANES:
        raise ValueError(f"planes must be one of {PLANES}, got {planes!r}")
    if mode != "3d" and planes == "all":
        raise ValueError(f"planes='all' applies to mode 3d (every axis upscaled), not to mode {mode!r}")
    if mode in AXIS_MODES and planes != "dw":
        raise ValueError(f"planes={planes!r} applies to mode 3d; one-axis mode {mode!r} runs stage d on one "
                         "plane per voxel")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if tile_mb is not None and not tile_mb > 0:
        raise ValueError(f"tile_mb must be a positive number of megabytes or None, got {tile_mb!r}")
    if np.ndim(lr) != 3:
        raise ValueError(f"expected a (D, H, W) array, got shape {np.shape(lr)}")
    if consistency:
        out = upscale_normalised(lr, models, mode=mode, ensemble=ensemble, planes=planes, batch_size=batch_size,
                                 tile_mb=tile_mb, progress=progress, precision=precision)
        return make_consistent(out, lr, models.scale, mode)
    if planes == "all":
        return fuse_orientations(orientation_passes(lr, models, ensemble=ensemble, batch_size=batch_size,
                                                    tile_mb=tile_mb, progress=progress, precision=precision),
                                 orientation_fusion_beta(models))
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


def make_consistent(out: np.ndarray, lr: np.ndarray, scale: int, mode: str) -> np.ndarray:
    """`out` (an upscale of `lr` in `mode`, both normalised float32) made consistent with `lr`, in place:
    `sr3d.degrade.make_consistent` on the axes `mode` upscales. Measured on held-out scans:
    docs/model_card.md "Consistency with the input"."""
    return degrade.make_consistent(out, np.asarray(lr, np.float32), scale, degrade.MODE_AXES[mode])


def orientation_passes(lr: np.ndarray, models: ModelBundle, *, progress: Progress | None = None,
                       **options) -> "Iterator[np.ndarray]":
    """The 3D cascade (planes "dw") with each axis of `lr` once as depth (ORIENTATIONS), each
    output moved back to (rD, rH, rW), one pass at a time; the first pass is planes "dw" itself.
    progress: one count over the passes (`_PassProgress`)."""
    lr = np.asarray(lr, np.float32)
    for k, order in enumerate(ORIENTATIONS):
        passes = None if progress is None else _PassProgress(progress, k, len(ORIENTATIONS))
        yield upscale_normalised(np.ascontiguousarray(lr.transpose(order)), models, mode="3d", planes="dw",
                                 progress=passes, **options).transpose(np.argsort(order))


def orientation_fusion_beta(models: ModelBundle) -> float:
    """The bundle's `orientation_fusion` beta (bundle.json, checked by `sr3d.models.load_models`; 0 when
    absent: the plain mean)."""
    return float(models.info.get("orientation_fusion", {}).get("beta", 0.0))


def fuse_orientations(passes: "Iterable[np.ndarray]", beta: float = 0.0) -> np.ndarray:
    """planes "all": the three passes of `orientation_passes` (in their order) made one.

    beta 0: their mean (`mean_of_orientations`). beta > 0: a mean per spatial frequency k whose
    weights favour, along each direction, the passes that resolved it in-plane. Pass j ran stage d
    along axis a_j = ORIENTATIONS[j][0] and stage hw on the other two; its weight at k is
    exp(-beta f_j) / sum_i exp(-beta f_i), with f_j = k_{a_j}^2 / |k|^2 the share of k along a_j
    (k in cycles per voxel). The weights sum to 1 at every k, so what the passes agree on passes
    unchanged (a flat volume, a shared structure); only their disagreement is weighed. At k = 0 and
    wherever k is equally along every axis the weights are 1/3 (the mean). Measured on central slabs
    of the corpus (docs/model_card.md, "Three orientations"): beta is chosen per bundle on its
    training and validation scans and stored in its bundle.json (`orientation_fusion_beta`).
    Computed with real FFTs in float32 (periodic: the weights act on the passes' differences, which
    wrap across the borders); memory about 4.5 times the output's, against 2 for the mean.
    """
    if beta == 0:
        return mean_of_orientations(passes)
    from scipy import fft

    total = weights = shape = None
    for j, out in enumerate(passes):
        if total is None:
            shape = out.shape
            freqs = [fft.fftfreq(n).astype(np.float32) for n in shape[:-1]] + [fft.rfftfreq(shape[-1]).astype(np.float32)]
            weights = orientation_weights([f.reshape([-1 if i == axis else 1 for i in range(3)]) ** 2
                                           for axis, f in enumerate(freqs)], beta)
            total = np.zeros(shape[:-1] + (freqs[-1].size,), np.complex64)
        elif out.shape != shape:
            raise ValueError(f"fuse_orientations: pass {j} has shape {out.shape}, pass 0 {shape}")
        total += fft.rfftn(np.asarray(out, np.float32)) * next(weights)
    return np.ascontiguousarray(fft.irfftn(total, s=shape), np.float32)


def orientation_weights(squared_freqs: list, beta: float, xp=np) -> Iterator:
    """The weights of `fuse_orientations`, one pass of ORIENTATIONS at a time: exp(-beta f_j) /
    sum_i exp(-beta f_i) at every k of the real spectrum, f_j = k_{a_j}^2 / |k|^2.

    squared_freqs: k_d^2, k_h^2, k_w^2 (cycles per voxel, float32) as grids that broadcast to the
    spectrum's shape. xp: numpy, or `tf.math` for the served graph (`fuse_orientations_tf`): the
    same float32 arithmetic in either.
    """
    # k = 0: every share 0 / tiny = 0, equal weights (|k|^2 is at least 1/n^2 everywhere else).
    norm = xp.maximum(squared_freqs[0] + squared_freqs[1] + squared_freqs[2], np.finfo(np.float32).tiny)
    terms = [lambda axis=order[0]: xp.exp(-beta * squared_freqs[axis] / norm) for order in ORIENTATIONS]
    # Each pass's term is computed twice rather than kept: one spectrum-sized weight alive, not three.
    weights_sum = terms[0]() + terms[1]() + terms[2]()
    for term in terms:
        yield term() / weights_sum


def fuse_orientations_tf(passes: list, beta: float = 0.0):
    """`fuse_orientations` in TensorFlow, for graphs whose (rD, rH, rW) is known only when they run
    (`sr3d.export`): the same frequency grids, weights and float32 real FFTs; beta 0, the passes'
    mean in the order of `mean_of_orientations`. passes: the three float32 [rD, rH, rW] tensors."""
    import tensorflow as tf

    if beta == 0:
        total = passes[0]
        for out in passes[1:]:
            total += out
        return total / len(ORIENTATIONS)
    shape = tf.shape(passes[0])

    def freqs(n, real: bool = False):
        """scipy.fft.fftfreq(n) (rfftfreq(n) if real): i * (1 / n) in float64, then float32."""
        i = tf.range(n // 2 + 1 if real else n)
        if not real:
            i = tf.where(i <= (n - 1) // 2, i, i - n)
        return tf.cast(tf.cast(i, tf.float64) * (1.0 / tf.cast(n, tf.float64)), tf.float32)

    grids = [freqs(shape[0]), freqs(shape[1]), freqs(shape[2], real=True)]
    weights = orientation_weights([tf.reshape(f, [-1 if i == axis else 1 for i in range(3)]) ** 2
                                   for axis, f in enumerate(grids)], beta, tf.math)
    total = None
    for out in passes:
        term = tf.signal.rfft3d(out) * tf.cast(next(weights), tf.complex64)
        total = term if total is None else total + term
    return tf.signal.irfft3d(total, fft_length=shape)


def mean_of_orientations(passes: "Iterable[np.ndarray]") -> np.ndarray:
    """planes "all": the passes of `orientation_passes` summed into a new array in their order and
    divided by their number (deterministic; the passes are left as they are)."""
    total = None
    for out in passes:
        if total is None:
            total = np.array(out, np.float32, order="C")
        else:
            total += out
    total /= len(ORIENTATIONS)
    return total


class _PassProgress:
    """Pass k of n: each Step's done and total carried on over the passes (one bar, not three)."""

    def __init__(self, progress: Progress, k: int, n: int):
        self.progress, self.k, self.n = progress, k, n

    def __call__(self, step: Step) -> None:
        # Each pass counts from 0 to its own total (the passes' shapes differ): the fraction stays right.
        self.progress(step if step.total is None else
                      Step(step.unit, self.k * step.total + step.done, self.n * step.total))


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
    return wrap(clipped_to_range(result, volume))


def clipped_to_range(array: np.ndarray, volume: sr3d_volume.Volume) -> np.ndarray:
    """`array` (scanner units) clipped in place to the range of `volume`'s voxels."""
    np.clip(array, float(volume.array.min()), float(volume.array.max()), out=array)
    return array
