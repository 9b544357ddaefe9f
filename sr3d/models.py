"""The paper's two fully convolutional networks (Georgescu et al. 2020, Figures 2-4).

`build("hw", r)` is stage 1 (upsamples height and width of a slice by r);
`build("d", r)` is stage 2 (upsamples axis 1 of a plane by r: inference feeds
planes shaped (D, W) or (D, H), depth first). Both take a single-channel image
of any size, `lr: float32 (B, h, w, 1)`, normalised intensity, and return a dict

    {"intermediate": sub-pixel layer output, "final": conv10 output}

each (B, r*h, r*w, 1) for stage "hw" and (B, r*h, w, 1) for stage "d". The
output layers are named "intermediate" and "final", so
`model.compile(loss={"intermediate": ..., "final": ...})` gives the paper's
loss L1(final) + lambda * L1(intermediate).

Architecture: conv1..conv10, 3x3, 'same' padding. conv1..conv5 have `filters`
filters, conv6 has r*r (stage "hw") or r (stage "d"), conv7..conv9 `filters`,
conv10 one. ReLU after conv1..conv5 and conv7..conv9. Skips are additions:
conv4 takes conv1 + conv3 (short), conv6 takes conv5 + conv1 (long), conv10
takes conv7 + conv9 (short).

Decision on the two ReLUs the paper and the authors' code put on conv6 and
conv10: here both are linear by default (`conv6_relu=False`,
`output_relu=False`). A ReLU on the output clips every negative value to 0,
but normalised intensities are negative wherever the scan is below its
normalisation offset (air and fat in CT in Hounsfield units, background after
zero-mean scaling), so a clipped network cannot produce them; and when all its
pre-activations are negative, no gradient flows and training stalls. The
switches reproduce the authors' network for comparison.

Ablations of the paper's Table 2: `second_block=False` gives the ESPCN-like
network without conv7..conv10; its sub-pixel output is the final output, so
"intermediate" and "final" carry the same values ("final" is an identity of
"intermediate"; both keys are kept so training code needs no special case).
`short_skips=False` removes both short skips and `long_skip=False` the long
one. The intermediate loss and the blur sigma are training options.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import pathlib
import sys
import zipfile

import numpy as np


@contextlib.contextmanager
def _native_stderr_silenced():
    """Drops what C++ code writes to file descriptor 2 meanwhile: TensorFlow's absl logging
    prints "oneDNN custom operations are on ..." at import whatever TF_CPP_MIN_LOG_LEVEL says,
    which would break `sr3d`'s one-line messages. Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with _native_stderr_silenced():
    import keras

from sr3d import files as sr3d_files  # noqa: E402
from sr3d import layers as sr3d_layers  # noqa: E402

STAGES = ("hw", "d")
MODEL_FILES = {"hw": "hw.keras", "d": "d.keras"}
BUNDLE_JSON = "bundle.json"
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent / "data_files" / "models"

# Convolutions (3x3, each reaching 1 px further per side) before and after the
# sub-pixel layer; they fix the halo that tiled inference needs.
_CONVS_BEFORE_UPSAMPLING = 6
_CONVS_AFTER_UPSAMPLING = 4


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"sr3d/models.py: stage must be one of {STAGES}, got {stage!r}")
    return stage


def _check_positive_int(value: int, what: str, minimum: int) -> int:
    # numbers.Integral accepts NumPy integers (scales often come from arrays).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"sr3d/models.py: {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _conv(filters: int, name: str, relu: bool) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu" if relu else None,
                               name=name)


def build(stage: str, scale: int, filters: int = 32, *, second_block: bool = True,
          short_skips: bool = True, long_skip: bool = True, conv6_relu: bool = False,
          output_relu: bool = False, name: str | None = None) -> keras.Model:
    """Build the stage-1 ("hw") or stage-2 ("d") network for upscale factor `scale`.

    Input `lr`: float32 (B, h, w, 1), any h and w. Output: dict with
    "intermediate" and "final", each (B, r*h, r*w, 1) for "hw" or (B, r*h, w, 1)
    for "d". `output_relu` acts on conv10, so it has no effect when
    `second_block=False` (then `conv6_relu` decides the output's ReLU).
    """
    _check_stage(stage)
    scale = _check_positive_int(scale, "scale", 2)
    filters = _check_positive_int(filters, "filters", 1)

    lr = keras.Input((None, None, 1), name="lr")
    conv1 = _conv(filters, "conv1", relu=True)(lr)
    conv2 = _conv(filters, "conv2", relu=True)(conv1)
    conv3 = _conv(filters, "conv3", relu=True)(conv2)
    x = keras.layers.Add(name="short_skip_1_3")([conv1, conv3]) if short_skips else conv3
    conv4 = _conv(filters, "conv4", relu=True)(x)
    conv5 = _conv(filters, "conv5", relu=True)(conv4)
    x = keras.layers.Add(name="long_skip_1_5")([conv5, conv1]) if long_skip else conv5
    if stage == "hw":
        conv6 = _conv(scale * scale, "conv6", relu=conv6_relu)(x)
        upsampled = sr3d_layers.SubPixel2D(scale, name="subpixel")(conv6)
    else:
        conv6 = _conv(scale, "conv6", relu=conv6_relu)(x)
        upsampled = sr3d_layers.SubPixel1D(scale, axis=1, name="subpixel")(conv6)

    if second_block:
        conv7 = _conv(filters, "conv7", relu=True)(upsampled)
        conv8 = _conv(filters, "conv8", relu=True)(conv7)
        conv9 = _conv(filters, "conv9", relu=True)(conv8)
        x = keras.layers.Add(name="short_skip_7_9")([conv7, conv9]) if short_skips else conv9
        final = _conv(1, "conv10", relu=output_relu)(x)
    else:
        final = upsampled

    outputs = {
        "intermediate": keras.layers.Identity(name="intermediate")(upsampled),
        "final": keras.layers.Identity(name="final")(final),
    }
    return keras.Model(lr, outputs, name=name or f"sr3d_{stage}_x{scale}")


def lr_halo(stage: str, scale: int) -> tuple[int, int]:
    """Overlap per side, in LR pixels (rows, cols), that makes tiled inference exact.

    An HR output pixel depends on LR input pixels at most this far from the LR
    pixel it lies in, so tiles of the LR input extended by this halo on each
    side (cut at LR pixel boundaries), then trimmed by r times the halo along
    upsampled axes (the halo itself along the other), reproduce untiled
    inference. The six convs before the sub-pixel layer reach 6 LR px; the four
    after it reach 4 HR px, which is ceil(4 / r) LR px. An axis that is not
    upsampled (stage "d", cols) sees all ten convs: 10 px.
    """
    _check_stage(stage)
    scale = _check_positive_int(scale, "scale", 2)
    upsampled_axis = _CONVS_BEFORE_UPSAMPLING + math.ceil(_CONVS_AFTER_UPSAMPLING / scale)
    if stage == "hw":
        return (upsampled_axis, upsampled_axis)
    return (upsampled_axis, _CONVS_BEFORE_UPSAMPLING + _CONVS_AFTER_UPSAMPLING)


def load(path) -> keras.Model:
    """A saved stage network (.keras, custom layers registered), without optimizer state;
    ValueError naming the file and what is wrong with it if it cannot be read."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path}: model file not found")
    if path.is_file() and path.suffix == ".keras":
        # Keras says "File not found" for any .keras file that is not a whole zip archive.
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a readable Keras model: not a complete .keras zip archive "
                             f"({path.stat().st_size} bytes: truncated or corrupt); save or copy it again")
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            damaged = f"({error})"
        if damaged is not None:
            raise ValueError(f"{path}: not a readable Keras model: damaged member {damaged} in the "
                             ".keras archive (corrupt file); save or copy it again")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types (ValueError, BadZipFile, KeyError, ...)
        raise ValueError(f"{path}: not a readable Keras model: {error}") from error


def stage_scale(model, stage: str) -> int | None:
    """The factor a model upsamples a 4x4 probe by, if it is a stage `stage` network, else None."""
    probe = np.zeros((1, 4, 4, 1), np.float32)
    try:
        shape = tuple(model(probe, training=False)["final"].shape)
    except Exception:  # noqa: BLE001  (any model that cannot take the probe is the wrong model)
        return None
    r = shape[1] // 4
    expected = (1, 4 * r, 4 * r, 1) if stage == "hw" else (1, 4 * r, 4, 1)
    return r if r >= 2 and shape == expected else None


# ---------------------------------------------------------------- model bundles

@dataclasses.dataclass
class ModelBundle:
    """The two stage networks for one scale factor (Keras models)."""

    hw: object
    d: object
    scale: int
    info: dict = dataclasses.field(default_factory=dict)


def shipped_model_dir(scale: int) -> pathlib.Path:
    return SHIPPED_DIR / f"x{scale}"


def load_models(model_dir: str | pathlib.Path | None = None, scale: int = 2) -> ModelBundle:
    """Loads a model bundle directory (hw.keras, d.keras, bundle.json); None = the shipped one."""
    directory = pathlib.Path(model_dir) if model_dir is not None else shipped_model_dir(scale)
    # The directory is checked before any network is read, so a wrong path fails fast.
    if not directory.is_dir():
        if model_dir is None:
            raise ValueError(f"no shipped model for scale {scale}: available scales are "
                             f"{available_scales()}; pass --model DIR for others")
        raise FileNotFoundError(f"{directory}: model directory not found")
    missing = [name for name in MODEL_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory}: not an sr3d model bundle, missing {', '.join(missing)} "
                         "(make one with sr3d.models.make_bundle)")
    info = {}
    if (directory / BUNDLE_JSON).exists():
        try:
            info = json.loads((directory / BUNDLE_JSON).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{directory / BUNDLE_JSON}: not valid JSON ({error}); rewrite or remove it") from None
        if not isinstance(info, dict):
            raise ValueError(f"{directory / BUNDLE_JSON}: not a bundle description (a JSON object is expected)")
    fusion = info.get("orientation_fusion", {"beta": 0.0})
    beta = fusion.get("beta") if isinstance(fusion, dict) else None
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 100:
        raise ValueError(f"{directory / BUNDLE_JSON}: orientation_fusion must be {{\"beta\": a number in [0, 100)}}, "
                         f"got {fusion!r}")
    if model_dir is not None and "scale" in info and int(info["scale"]) != scale:
        raise ValueError(f"{directory}: the model upscales by {info['scale']}, not by {scale}")
    hw, d = (load(directory / MODEL_FILES[stage]) for stage in ("hw", "d"))
    bundle_scale = _bundle_scale(hw, d, directory, info.get("scale"))
    if model_dir is not None and scale != bundle_scale:
        raise ValueError(f"{directory}: the model upscales by {bundle_scale}, not by {scale}")
    return ModelBundle(hw=hw, d=d, scale=bundle_scale, info=info)


def _bundle_scale(hw_model, d_model, where, declared=None) -> int:
    """The common scale of the two stage models; ValueError naming `where` if they do not fit."""
    r_hw, r_d = stage_scale(hw_model, "hw"), stage_scale(d_model, "d")
    if r_hw is None or r_d is None:
        wrong = "hw" if r_hw is None else "d"
        raise ValueError(f"{where}: the {wrong} model is not an sr3d stage-{wrong} network "
                         f"(built by sr3d.models.build('{wrong}', r))")
    if r_hw != r_d or (declared is not None and int(declared) != r_hw):
        raise ValueError(f"{where}: the stages upscale by {r_hw} (hw) and {r_d} (d)"
                         + (f", the bundle says {declared}" if declared is not None else ""))
    return r_hw


def available_scales() -> list[int]:
    return sorted(int(p.name[1:]) for p in SHIPPED_DIR.glob("x*") if (p / MODEL_FILES["hw"]).exists())


def make_bundle(hw_model_path, d_model_path, out_dir, scale: int, info: dict | None = None) -> pathlib.Path:
    """Assembles a bundle directory from the `model.keras` of two training runs (compile=False copies)."""
    hw, d = load(hw_model_path), load(d_model_path)
    _bundle_scale(hw, d, f"{hw_model_path} + {d_model_path}", scale)
    return save_bundle(ModelBundle(hw=hw, d=d, scale=scale, info=dict(info or {})), out_dir)


def save_bundle(bundle: ModelBundle, out_dir) -> pathlib.Path:
    """Writes an in-memory bundle (e.g. adapted by `sr3d.adapt`) as a bundle directory."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stage in ("hw", "d"):
        with sr3d_files.atomic_path(out / MODEL_FILES[stage]) as tmp:
            getattr(bundle, stage).save(tmp)
    sr3d_files.write_json(out / BUNDLE_JSON, {"scale": bundle.scale, **{k: v for k, v in bundle.info.items()
                                                                      if k != "scale"}})
    return out
