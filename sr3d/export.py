"""SavedModel export for TF Serving and TensorFlow pipelines.

`export(bundle, export_dir, name)` writes `<export_dir>/<name>/<version>/`, the
layout TF Serving polls, holding one SavedModel with these signatures:

  serving_default   volume: float32 [D, H, W] in the scan's own units (HU for CT)
                    -> upscaled: float32 [rD, rH, rW], same units. Stage hw on every
                    slice, then stage d on every (D, rW) plane, then the consistency step
                    (`sr3d.degrade.make_consistent_tf`), with the intensity window,
                    normalisation, its inverse and the clip to the input's range inside the
                    graph: the same arithmetic as `sr3d upscale` (`sr3d.inference` with its
                    default `consistency=True`).
  upscale_3d_all    volume [D, H, W] -> upscaled [rD, rH, rW]: `sr3d upscale --planes all`: the
                    cascade of serving_default three times, each axis once as depth, the three
                    outputs fused per spatial frequency with the bundle's beta (read at export:
                    `sr3d.upscaling.orientation_fusion_beta`, 0 = their mean;
                    `sr3d.upscaling.fuse_orientations_tf`), then the consistency step: three times
                    the time of serving_default. The same limits on the volume as serving_default,
                    as the Python path has. `--planes auto` (the self-check's choice) is not served:
                    a client that wants it picks between the two signatures.
  upscale_2d        volume [D, H, W] -> upscaled [D, rH, rW]: stage hw, then the consistency
                    step on H and W.
  upscale_3d_no_consistency, upscale_2d_no_consistency
                    the same without the consistency step: the networks' output alone, as
                    `sr3d upscale --no-consistency` (`consistency=False`) writes it.
  stage_hw          images: float32 [B, h, w, 1], normalised units -> final [B, rh, rw, 1].
  stage_d           images: float32 [B, d, w, 1], normalised units -> final [B, rd, w, 1].

The consistency step builds its weights in the graph from the volume's D, H and W, which are
known only when it runs; it costs a few MB for axes up to ~1000 voxels and one output-sized
tensor more. The archive is written with `keras.export.ExportArchive` tracking both models,
which TF Serving's session-based loader (and `saved_model_cli run`) can load;
a plain `tf.saved_model.save` of a `tf.Module` holding Keras 3 models cannot.
Slices and planes go through the networks one at a time (`tf.map_fn`), so the
server's memory stays near the size of its input and output, whatever D is.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import time

from sr3d import degrade, intensity, upscaling
from sr3d import precision as sr3d_precision


def min_volume_shape(scale: int, mode: str) -> tuple[int, int, int]:
    """The smallest (D, H, W) the served graph accepts, as the CLI: >= 2 slices for 3d, and
    slices at least the receptive field (smaller ones would be all zero-padded border)."""
    from sr3d import models as sr3d_models

    side = 2 * sr3d_models.lr_halo("hw", scale)[0] + 1
    return (2 if mode == "3d" else 1, side, side)


def _serving_fns(hw_model, d_model, scale: int, beta: float = 0.0) -> dict:
    """Signature name -> the function `export_archive` saves under it (see the module docstring).

    beta: the bundle's orientation fusion (`sr3d.upscaling.orientation_fusion_beta`), a constant of
    the graph's `upscale_3d_all`."""
    import tensorflow as tf

    def checked(tensor, mode: str | None):
        """The input, after asserts that give TF Serving clients INVALID_ARGUMENT saying what is
        wrong, instead of a NaN volume, a meaningless "upscale" or an index error deep inside."""
        # The signature's rank is static, so only EnsureShape checks the rank of what is fed.
        tensor = tf.ensure_shape(tensor, [None] * (4 if mode is None else 3),
                                 name="sr3d_input_must_be_images_BHW1" if mode is None else "sr3d_volume_must_be_DHW")
        shape = tf.shape(tensor)
        checks = [tf.debugging.assert_all_finite(tensor, "sr3d: input has NaN or Inf values: replace "
                                                         "them (e.g. by the scan's minimum) before upscaling")]
        if mode is None:
            checks.append(tf.debugging.assert_positive(tf.size(tensor), message="sr3d: images are empty"))
        else:
            depth, side, _ = min_volume_shape(scale, mode)
            checks += [
                tf.debugging.assert_greater_equal(
                    shape[0], depth, message=f"sr3d: {mode} upscaling needs a volume of >= {depth} slices (D)"),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(shape[1:]), side,
                    message=f"sr3d: slices (H, W) must be >= {side} x {side} voxels, the networks' receptive "
                            f"field at scale {scale}"),
            ]
        with tf.control_dependencies(checks):
            return tf.identity(tensor)

    def run_planes(model, planes):
        """(N, h, w) normalised planes -> (N, h', w'), two planes per network call (an odd last
        plane runs beside a copy of itself): the graph's `sr3d.tiling.batched`. oneDNN takes other
        kernels for a batch of one plane (on Intel AMX a float32 layer then differs in its last bit,
        which a bf16 layer after it can turn into a visible difference), so pairs keep the served
        numbers those of the Python path, which never runs a batch of one (`sr3d.upscaling`)."""
        count = tf.shape(planes)[0]
        paired = tf.concat([planes, planes[count - count % 2:]], axis=0)
        paired = tf.reshape(paired, tf.concat([[-1, 2], tf.shape(planes)[1:]], axis=0))
        out = tf.map_fn(lambda pair: model(pair[..., None], training=False)["final"][..., 0],
                        paired, fn_output_signature=tf.TensorSpec([2, None, None], tf.float32))
        return tf.reshape(out, tf.concat([[-1], tf.shape(out)[2:]], axis=0))[:count]

    def run(normalised, mode: str):
        """`sr3d.upscaling.upscale_normalised` untiled, without ensemble: stage hw on every
        slice, then in 3d stage d on every (D, rW) plane."""
        x = run_planes(hw_model, normalised)                         # (D, rH, rW)
        if mode == "3d":
            x = tf.transpose(x, [1, 0, 2])                           # (rH, D, rW): one plane per row
            x = tf.transpose(run_planes(d_model, x), [1, 0, 2])     # (rD, rH, rW)
        return x

    def run_all(normalised):
        """planes "all": `run` with each axis once as depth (`sr3d.upscaling.orientation_passes`),
        the three outputs fused as `sr3d.upscaling.fuse_orientations` does."""
        passes = [tf.transpose(run(tf.transpose(normalised, order), "3d"), [order.index(axis) for axis in range(3)])
                  for order in upscaling.ORIENTATIONS]
        return upscaling.fuse_orientations_tf(passes, beta)

    def upscale(volume, mode: str, consistency: bool, planes: str = "dw"):
        """The steps of `sr3d.upscaling.run_in_scanner_units` in TensorFlow: normalise -> run
        (and the consistency step, as `upscale_normalised(consistency=True)`) -> denormalise ->
        clip to the input's range (the client keeps the grid: no wrap)."""
        # planes "all" takes the checks of mode 3d, as `sr3d.inference.check_upscalable` does.
        volume = checked(tf.convert_to_tensor(volume, tf.float32), mode)
        lo, hi = intensity.window_tf(volume)
        normalised = (volume - lo) / (hi - lo)
        result = run_all(normalised) if planes == "all" else run(normalised, mode)
        if consistency:
            result = degrade.make_consistent_tf(result, normalised, scale, degrade.MODE_AXES[mode])
        result = result * (hi - lo) + lo                             # denormalise
        return {"upscaled": tf.clip_by_value(result, tf.reduce_min(volume), tf.reduce_max(volume))}

    def volume_fn(mode: str, consistency: bool, planes: str = "dw"):
        return lambda volume: upscale(volume, mode, consistency, planes)

    def stage_fn(model):
        return lambda images: {"final": model(checked(images, None), training=False)["final"]}

    return {"serving_default": volume_fn("3d", True), "upscale_3d_all": volume_fn("3d", True, "all"),
            "upscale_2d": volume_fn("2d", True),
            "upscale_3d_no_consistency": volume_fn("3d", False), "upscale_2d_no_consistency": volume_fn("2d", False),
            "stage_hw": stage_fn(hw_model), "stage_d": stage_fn(d_model)}


def export_archive(bundle, path: str | os.PathLike, precision: str = "float32") -> pathlib.Path:
    """Writes the SavedModel of a `sr3d.models.ModelBundle` to `path` (atomically).

    precision: of the stage networks in the graph ("auto": of this machine, see `sr3d.precision`);
    the signatures take and return float32 either way.
    """
    import keras
    import tensorflow as tf

    path = pathlib.Path(path)
    if path.exists():
        raise ValueError(f"{path} exists already: export to a new version directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    volume_spec = tf.TensorSpec([None, None, None], tf.float32, name="volume")
    image_spec = tf.TensorSpec([None, None, None, 1], tf.float32, name="images")
    hw_model, d_model = (sr3d_precision.network(model, stage_precision) for model, stage_precision
                         in zip((bundle.hw, bundle.d), sr3d_precision.stage_precisions(precision, bundle.scale)))
    archive = keras.export.ExportArchive()
    archive.track(hw_model)
    archive.track(d_model)
    beta = upscaling.orientation_fusion_beta(bundle)
    for name, fn in _serving_fns(hw_model, d_model, bundle.scale, beta).items():
        spec = image_spec if name.startswith("stage_") else volume_spec
        archive.add_endpoint(name, fn, input_signature=[spec])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        archive.write_out(str(tmp), verbose=False)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export(bundle, export_dir: str | os.PathLike, name: str = "sr3d", version: int | None = None,
           precision: str = "float32") -> pathlib.Path:
    """Writes `<export_dir>/<name>/<version>/` for TF Serving; version defaults to a Unix timestamp."""
    if version is None:
        version = int(time.time())
    if int(version) < 0:
        raise ValueError(f"version must be a non-negative integer, got {version}")
    return export_archive(bundle, pathlib.Path(export_dir) / name / str(int(version)), precision)
