"""The two stage networks as ONNX files (tf2onnx), for onnxruntime and other non-TensorFlow runtimes.

`export_onnx(bundle, out_dir)` writes `hw.onnx`, `d.onnx` and `onnx.json` into a new (or empty)
directory; `export(bundle, export_dir, name, version)` into `<export_dir>/<name>/<version>/`, the
layout of the SavedModel export (`export.py --format onnx`). Each file is one stage network, as sr3d's own inference calls it:

  input  "planes"  float32 [N, h, w, 1], network units: (x - lo) / (hi - lo), with lo and hi the
                   0.5th and 99.5th percentiles of the whole volume (`sr3d.intensity.window`)
  output "final"   float32; hw: [N, r h, r w, 1] ((H, W) slices); d: [N, r d, w, 1] ((D, W) planes)

Running a volume (stage hw on every slice, then stage d on every (D, W) plane, as
`sr3d.upscaling.upscale_normalised`, and the consistency step, `sr3d.degrade.make_consistent`)
stays with the caller: the chained volume model of the SavedModel export holds a TensorFlow
while-loop over planes, which is not converted here.
Needs the `onnx` extra (`pip install "sr3d[onnx]"`: tf2onnx, onnxruntime).
"""
from __future__ import annotations

import os
import pathlib
import time

from sr3d import intensity
from sr3d import files as sr3d_files

OPSET = 17
PARITY_ATOL = 1e-4  # onnxruntime vs Keras on the export-time probe (float32 sums in another order)
STAGES = ("hw", "d")
INPUT_NAME = "planes"


def stage_function(model, stage: str, scale: int):
    """Stage `stage` ("hw" or "d", factor `scale`) as a tf.function [N, h, w, 1] -> "final", as
    `sr3d.inference` runs it.

    The output is reshaped to its contract ([N, r h, r w, 1] for hw, [N, r h, w, 1] for d) from
    the input's runtime shape: tf2onnx's layout optimizer rewrites the NHWC <-> NCHW transposes
    of 1-channel tensors into Unsqueeze/Reshape/Squeeze chains, and it does so
    nondeterministically: about 1 conversion of stage hw in 8 came out with an extra leading axis
    ([1, N, ...]; it failed CI once). The explicit reshape makes the output shape independent of it."""
    import tensorflow as tf

    fh, fw = (scale, scale) if stage == "hw" else (scale, 1)

    def run(planes):
        final = model(planes, training=False)["final"]
        shape = tf.shape(planes)
        return {"final": tf.reshape(final, tf.stack([shape[0], fh * shape[1], fw * shape[2], 1]))}

    return tf.function(run, input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32, name=INPUT_NAME)])


def check_stage(model, onnx_bytes: bytes, where: str) -> None:
    """Runs the ONNX stage (onnxruntime) and the Keras stage on the same probe planes and raises
    ValueError naming `where` unless the shapes agree and the values within PARITY_ATOL."""
    import numpy as np
    import onnxruntime

    planes = np.random.default_rng(0).random((3, 11, 9, 1), dtype=np.float32)
    expected = np.asarray(model(planes, training=False)["final"])
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    [got] = session.run(["final"], {INPUT_NAME: planes})
    if got.shape != expected.shape:
        raise ValueError(f"{where}: the converted ONNX stage gives shape {got.shape}, the Keras stage "
                         f"{expected.shape}; nothing was written")
    error = float(np.max(np.abs(got - expected)))
    if error > PARITY_ATOL:
        raise ValueError(f"{where}: the converted ONNX stage differs from the Keras stage by up to {error:.2g} "
                         f"(limit {PARITY_ATOL}); nothing was written")


def stage_to_onnx(model, stage: str, scale: int, opset: int = OPSET) -> bytes:
    """One stage network as a serialised ONNX model."""
    try:
        import tf2onnx
    except ImportError as error:
        raise ValueError("ONNX export needs tf2onnx and onnxruntime: pip install \"sr3d[onnx]\"") from error
    function = stage_function(model, stage, scale)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=function.input_signature, opset=opset)
    return proto.SerializeToString()


def export_onnx(bundle, out_dir: str | os.PathLike, opset: int = OPSET) -> pathlib.Path:
    """Writes `hw.onnx`, `d.onnx` and `onnx.json` (scale, opset, inputs and outputs, intensity
    window) for `bundle` (a `sr3d.models.ModelBundle`) into `out_dir`; returns `out_dir`.
    Each file is written under a temporary name and renamed."""
    out = pathlib.Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out}: ONNX export needs a new (or empty) directory: it exists and is not empty")
    files = {stage: stage_to_onnx(getattr(bundle, stage), stage, bundle.scale, opset) for stage in STAGES}
    for stage, data in files.items():
        check_stage(getattr(bundle, stage), data, str(out / f"{stage}.onnx"))
    import tf2onnx

    out.mkdir(parents=True, exist_ok=True)
    for stage, data in files.items():
        with sr3d_files.atomic_path(out / f"{stage}.onnx") as temporary:
            temporary.write_bytes(data)
    r = bundle.scale
    sr3d_files.write_json(out / "onnx.json", {
        "scale": r, "opset": opset, "tf2onnx": tf2onnx.__version__, "bundle": bundle.info,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", "h", "w", 1]},
        "outputs": {"hw.onnx": {"name": "final", "shape": ["N", f"{r}h", f"{r}w", 1], "planes": "(H, W) slices"},
                    "d.onnx": {"name": "final", "shape": ["N", f"{r}d", "w", 1], "planes": "(D, W) planes"}},
        "intensity": {"units": "(x - lo) / (hi - lo)", "lo_percentile": intensity.LOW_PERCENTILE,
                      "hi_percentile": intensity.HIGH_PERCENTILE,
                      "of": "the whole LR volume, see sr3d/intensity.py"},
    })
    return out


def export(bundle, export_dir: str | os.PathLike, name: str = "sr3d", version: int | None = None,
           opset: int = OPSET) -> pathlib.Path:
    """`export_onnx` into `<export_dir>/<name>/<version>/` (version: Unix time by default)."""
    version = int(time.time()) if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    return export_onnx(bundle, pathlib.Path(export_dir) / name / str(version), opset=opset)
