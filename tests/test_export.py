"""Tests for sr3d/export.py and the export.py script: layout, signatures, and that a fresh
process (tf.saved_model.load, tf.data, saved_model_cli) gets the Python path's numbers.

The SavedModel is exported once per module from the random-weight test bundle and run once in
a fresh Python process (`_LOADER`); the tests compare its outputs with `sr3d.inference` and the
Keras models in this process. The consistency step's first-principles check and the orientation
fusion with a nonzero beta trace the functions the export saves in this process (no second export).
"""
import dataclasses
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sr3d import degrade, export, inference, intensity, models, upscaling
from sr3d import io as sr3d_io

REPO = pathlib.Path(__file__).resolve().parents[1]
SIGNATURES = ("serving_default", "upscale_3d_all", "upscale_2d", "upscale_3d_no_consistency",
              "upscale_2d_no_consistency", "stage_hw", "stage_d")

# Runs in a fresh process: argv[1] = SavedModel directory, argv[2] = inputs .npz, argv[3] = outputs .npz.
_LOADER = """
import sys
import numpy as np
import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
inputs = np.load(sys.argv[2])
sig = loaded.signatures
batch = inputs["batch"]
mapped = tf.data.Dataset.from_tensor_slices(batch).map(
    lambda v: loaded.signatures["serving_default"](volume=v)["upscaled"])
np.savez(sys.argv[3],
         signatures=np.array(sorted(sig.keys())),
         serving_default=sig["serving_default"](volume=tf.constant(inputs["volume"]))["upscaled"].numpy(),
         upscale_3d_all=sig["upscale_3d_all"](volume=tf.constant(inputs["volume"]))["upscaled"].numpy(),
         upscale_2d=sig["upscale_2d"](volume=tf.constant(inputs["volume"]))["upscaled"].numpy(),
         upscale_3d_no_consistency=sig["upscale_3d_no_consistency"](volume=tf.constant(inputs["volume"]))["upscaled"].numpy(),
         upscale_2d_no_consistency=sig["upscale_2d_no_consistency"](volume=tf.constant(inputs["volume"]))["upscaled"].numpy(),
         stage_hw=sig["stage_hw"](images=tf.constant(inputs["images"]))["final"].numpy(),
         stage_d=sig["stage_d"](images=tf.constant(inputs["images"]))["final"].numpy(),
         mapped=np.stack([v.numpy() for v in mapped]))
"""


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    """The test bundle with its output layer amplified, so that the clip to the input range acts."""
    bundle = models.load_models(tiny_bundle_dir, scale=2)
    conv10 = bundle.d.get_layer("conv10")
    kernel, bias = conv10.get_weights()
    conv10.set_weights([kernel * 40.0, bias])
    return bundle


@pytest.fixture(scope="module")
def ct_volume(shared_data):
    """12 x 48 x 40 voxels of a real CT in Hounsfield units (air, fat, soft tissue and bone)."""
    scan = sr3d_io.load_volume(shared_data / "totalseg-ct" / "example_ct.nii.gz")
    return scan.replace(array=scan.array[50:62, 30:78, 40:80].copy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bundle, ct_volume):
    """(SavedModel path, inputs, outputs of the fresh process)."""
    root = tmp_path_factory.mktemp("export")
    path = export.export(bundle, root / "models", "sr3d", version=1)
    rng = np.random.default_rng(0)
    volume = ct_volume.array
    inputs = {
        "volume": volume,
        # tf.data batch: the crop and a second real crop of the same shape (upside down, darker).
        "batch": np.stack([volume, volume[::-1, :, ::-1] * 0.5 - 100.0]).astype(np.float32),
        "images": rng.uniform(-0.2, 1.2, size=(3, 9, 11, 1)).astype(np.float32),
    }
    np.savez(root / "inputs.npz", **inputs)
    result = _run([sys.executable, "-c", _LOADER, path, root / "inputs.npz", root / "outputs.npz"])
    assert result.returncode == 0, result.stderr
    return path, inputs, dict(np.load(root / "outputs.npz"))


def test_layout_is_what_tf_serving_polls(exported):
    path, _, _ = exported
    assert path == path.parents[1] / "sr3d" / "1"
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables" / "variables.index").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["1"], "no temporary directory is left"


def test_fresh_process_lists_the_seven_signatures(exported):
    _, _, outputs = exported
    assert sorted(outputs["signatures"]) == sorted(SIGNATURES)


@pytest.mark.parametrize("signature, mode, consistency, planes", [
    ("serving_default", "3d", True, "dw"), ("upscale_3d_all", "3d", True, "all"), ("upscale_2d", "2d", True, "dw"),
    ("upscale_3d_no_consistency", "3d", False, "dw"), ("upscale_2d_no_consistency", "2d", False, "dw"),
])
def test_served_volume_matches_python_inference(exported, bundle, ct_volume, signature, mode, consistency, planes):
    _, _, outputs = exported
    # The default signatures end with the consistency step, as `sr3d upscale`; *_no_consistency do not.
    # The test bundle has no orientation_fusion: upscale_3d_all is the three passes' mean (beta 0).
    expected = inference.upscale_volume(ct_volume, bundle, mode=mode, consistency=consistency, planes=planes).array
    data_range = float(ct_volume.array.max() - ct_volume.array.min())
    assert outputs[signature].shape == expected.shape == ((24 if mode == "3d" else 12), 96, 80)
    np.testing.assert_allclose(outputs[signature], expected, rtol=0, atol=1e-4 * data_range)
    assert outputs[signature].std() > 1e-3 * data_range, "a constant output would make the check empty"
    if mode == "3d":  # the clip to the input's range is part of what is compared
        assert expected.min() == ct_volume.array.min() and expected.max() == ct_volume.array.max()


@pytest.mark.parametrize("stage", ["hw", "d"])
def test_stage_signatures_match_the_keras_models(exported, bundle, stage):
    _, inputs, outputs = exported
    model = bundle.hw if stage == "hw" else bundle.d
    expected = model(inputs["images"], training=False)["final"].numpy()
    assert outputs[f"stage_{stage}"].shape == ((3, 18, 22, 1) if stage == "hw" else (3, 18, 11, 1))
    np.testing.assert_allclose(outputs[f"stage_{stage}"], expected, rtol=0, atol=1e-5)


def test_served_three_orientations_fuse_with_the_bundles_beta(exported, bundle, ct_volume):
    """beta 3.0 in the bundle's info: upscale_3d_all, traced here from the functions the export saves
    with the beta `export_archive` reads, against the Python path's `fuse_orientations`."""
    import tensorflow as tf

    _, _, outputs = exported
    fused = dataclasses.replace(bundle, info={**bundle.info, "orientation_fusion": {"beta": 3.0}})
    fns = export._serving_fns(fused.hw, fused.d, 2, upscaling.orientation_fusion_beta(fused))
    serve = tf.function(fns["upscale_3d_all"], input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
    served = serve(tf.constant(ct_volume.array))["upscaled"].numpy()
    expected = inference.upscale_volume(ct_volume, fused, planes="all").array
    atol = 1e-4 * float(ct_volume.array.max() - ct_volume.array.min())
    assert served.shape == expected.shape == (24, 96, 80)
    np.testing.assert_allclose(served, expected, rtol=0, atol=atol)
    # The exported graph (beta 0) is the mean: beta 3 must move the numbers well past the tolerance.
    assert np.abs(expected - outputs["upscale_3d_all"]).max() > 10 * atol


def test_signature_inside_a_tf_data_map(exported, bundle, ct_volume):
    _, inputs, outputs = exported
    for served, volume in zip(outputs["mapped"], inputs["batch"]):
        expected = inference.upscale_volume(ct_volume.replace(array=volume), bundle).array
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-4 * float(volume.max() - volume.min()))


def _smooth_ramp(n: int, first: int, last: int) -> np.ndarray:
    """0 up to sample `first`, 1 from `last` on, smootherstep between (continuous to the second derivative)."""
    t = np.clip((np.arange(n) - first) / (last - first), 0.0, 1.0)
    return t * t * t * (t * (6 * t - 15) + 10)


@pytest.mark.parametrize("signature, mode", [("serving_default", "3d"), ("upscale_3d_all", "3d"),
                                             ("upscale_2d", "2d")])
def test_served_output_downscales_to_its_input(tiny_bundle_dir, signature, mode):
    """First principles, not the Python path: the served output downscaled as the training pairs
    were (`sr3d.degrade.downscale`, float64) is the input again, to float32 round-off.

    The clip to the input's range would hide it, and random networks make it act on every input
    (their sub-pixel phases overshoot the input's extremes; 23% of the CT crop's voxels with the
    module's bundle). With networks that output zero, the output is the consistency step's alone
    (the normalised input through each axis's right inverse), which on this product of smooth
    ramps stays inside the input's range. Traced here from the functions the export saves (one
    export per module)."""
    import tensorflow as tf

    zero = models.load_models(tiny_bundle_dir, scale=2)
    for model in (zero.hw, zero.d):
        conv10 = model.get_layer("conv10")
        conv10.set_weights([np.zeros_like(w) for w in conv10.get_weights()])
    serve = tf.function(export._serving_fns(zero.hw, zero.d, 2)[signature],
                        input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
    profile = _smooth_ramp(12, 2, 9)[:, None, None] * _smooth_ramp(48, 0, 47)[:, None] * _smooth_ramp(40, 0, 39)
    volume = (-1000.0 + 1400.0 * profile).astype(np.float32)
    data_range = 1400.0
    served = serve(tf.constant(volume))["upscaled"].numpy()
    axes = degrade.MODE_AXES[mode]
    assert served.shape == tuple(2 * n if axis in axes else n for axis, n in enumerate(volume.shape))
    # The clip has nothing to do: the same step in numpy stays inside the input's range.
    window = intensity.window(volume)
    step = window.denormalise(degrade.make_consistent(np.zeros(served.shape, np.float32),
                                                      window.normalise(volume), 2, axes))
    assert volume.min() - 1e-6 * data_range <= step.min() and step.max() <= volume.max() + 1e-6 * data_range
    np.testing.assert_allclose(degrade.downscale(served, 2, axes), volume, rtol=0, atol=1e-6 * data_range)
    assert served.std() > 0.1 * data_range, "a constant output would make the check empty"


def test_export_refuses_an_existing_version(exported, bundle):
    path, _, _ = exported
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(ValueError, match=re.escape(f"{path} exists already: export to a new version directory")):
        export.export(bundle, path.parents[1], "sr3d", version=1)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before


def test_export_rejects_a_negative_version(tmp_path, bundle):
    with pytest.raises(ValueError, match="version must be a non-negative integer, got -1"):
        export.export(bundle, tmp_path, version=-1)
    assert list(tmp_path.iterdir()) == []


def _saved_model_cli() -> list[str]:
    found = shutil.which("saved_model_cli")
    return [found] if found else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


@pytest.mark.slow
def test_saved_model_cli_show_and_run(exported, tmp_path):
    """`saved_model_cli run` uses the session-based loader, as TF Serving does."""
    path, inputs, outputs = exported
    shown = _run(_saved_model_cli() + ["show", "--dir", path, "--all"])
    assert shown.returncode == 0, shown.stderr
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in shown.stdout
    np.save(tmp_path / "x.npy", inputs["volume"])
    ran = _run(_saved_model_cli() + ["run", "--dir", path, "--tag_set", "serve", "--signature_def",
                                     "serving_default", "--inputs", f"volume={tmp_path / 'x.npy'}",
                                     "--outdir", tmp_path / "out"])
    assert ran.returncode == 0, ran.stderr
    data_range = float(inputs["volume"].max() - inputs["volume"].min())
    np.testing.assert_allclose(np.load(tmp_path / "out" / "upscaled.npy"), outputs["serving_default"],
                               rtol=0, atol=1e-4 * data_range)


# ---------------------------------------------------------------------------- export.py

@pytest.mark.slow
def test_export_script_writes_a_version(tmp_path, tiny_bundle_dir):
    result = _run([sys.executable, REPO / "export.py", f"--model={tiny_bundle_dir}", "--scale=2",
                   f"--export_dir={tmp_path}", "--name=brain", "--version=3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"exported {tmp_path / 'brain' / '3'}"
    assert (tmp_path / "brain" / "3" / "saved_model.pb").is_file()


@pytest.mark.parametrize("args, message", [
    (["--model={tmp}/nowhere"], "export.py: error: {tmp}/nowhere: model directory not found"),
    (["--model={tmp}"], "export.py: error: {tmp}: not an sr3d model bundle, missing hw.keras, d.keras "
                        "(make one with sr3d.models.make_bundle)"),
    (["--model={bundle}", "--scale=3"], "export.py: error: {bundle}: the model upscales by 2, not by 3"),
])
def test_export_script_errors_are_one_line(tmp_path, tiny_bundle_dir, args, message):
    args = [a.format(tmp=tmp_path, bundle=tiny_bundle_dir) for a in args]
    result = _run([sys.executable, REPO / "export.py", f"--export_dir={tmp_path / 'out'}", *args])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [message.format(tmp=tmp_path, bundle=tiny_bundle_dir)]
    assert not (tmp_path / "out").exists()


def test_export_script_rejects_stray_arguments(tmp_path, tiny_bundle_dir):
    result = _run([sys.executable, REPO / "export.py", f"--model={tiny_bundle_dir}",
                   f"--export_dir={tmp_path}", "extra"])
    assert result.returncode != 0
    assert "unexpected arguments: ['extra']" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- bad input in the served graph

def _bad_volumes(good: np.ndarray) -> dict:
    """name -> (input, words of the error): what the CLI refuses, the served graph refuses too."""
    nan = good.copy()
    nan[3, 10, 10] = np.nan
    inf = good.copy()
    inf[0, 0, 0] = -np.inf
    return {
        "one_nan_voxel": (nan, "NaN or Inf"),
        "one_inf_voxel": (inf, "NaN or Inf"),
        "single_slice": (good[:1], ">= 2 slices"),
        "2x2x2": (good[:2, :2, :2], "receptive"),
        "thin_slices": (good[:, :12, :], "receptive"),
        "narrow_slices": (good[:, :, :12], "receptive"),
        "empty": (good[:0], ">= 2 slices"),
        "empty_rows": (good[:, :0, :], "receptive"),
    }


@pytest.mark.parametrize("case", ["one_nan_voxel", "one_inf_voxel", "single_slice", "2x2x2", "thin_slices",
                                  "empty", "empty_rows"])
def test_served_graph_refuses_bad_volumes_with_invalid_argument(exported, case):
    import tensorflow as tf

    path, inputs, _ = exported
    volume, words = _bad_volumes(inputs["volume"])[case]
    loaded = tf.saved_model.load(str(path))
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(words)):
        loaded.signatures["serving_default"](volume=tf.constant(volume))


@pytest.mark.parametrize("case, message", [
    ("single_slice", "sr3d: 3d upscaling needs a volume of >= 2 slices (D)"),
    ("thin_slices", "sr3d: slices (H, W) must be >= 17 x 17 voxels"),
    ("narrow_slices", "sr3d: slices (H, W) must be >= 17 x 17 voxels"),
])
def test_served_three_orientations_refuse_what_the_python_path_refuses(exported, bundle, ct_volume, case, message):
    """Each axis is depth in one pass, but planes "all" is held to the limits of one 3D pass, as in
    `sr3d.inference.check_upscalable`: D >= 2 and H, W at least the receptive field (the CT crop's
    12 slices pass in both, see the parity test above)."""
    import tensorflow as tf

    path, inputs, _ = exported
    volume, _ = _bad_volumes(inputs["volume"])[case]
    with pytest.raises(ValueError, match="3D upscaling needs at least 2 slices|receptive field"):
        inference.upscale_volume(ct_volume.replace(array=volume), bundle, planes="all")
    loaded = tf.saved_model.load(str(path))
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        loaded.signatures["upscale_3d_all"](volume=tf.constant(volume))


def test_served_2d_signature_accepts_one_slice_but_not_nan(exported):
    import tensorflow as tf

    path, inputs, _ = exported
    loaded = tf.saved_model.load(str(path))
    one = inputs["volume"][:1]
    out = loaded.signatures["upscale_2d"](volume=tf.constant(one))["upscaled"].numpy()
    assert out.shape == (1, 2 * one.shape[1], 2 * one.shape[2]) and np.all(np.isfinite(out))
    nan = one.copy()
    nan[0, 5, 5] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        loaded.signatures["upscale_2d"](volume=tf.constant(nan))
    images = np.full((1, 9, 9, 1), np.nan, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        loaded.signatures["stage_hw"](images=tf.constant(images))


def test_served_graph_refuses_a_2d_array(exported):
    import tensorflow as tf

    path, inputs, _ = exported
    loaded = tf.saved_model.load(str(path))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sr3d_volume_must_be_DHW|\[48,40\] is not compatible"):
        loaded.signatures["serving_default"](volume=tf.constant(inputs["volume"][0]))


def test_min_volume_shape_is_the_cli_limit():
    # stage hw at x2 sees 6 + ceil(4 / 2) = 8 LR pixels per side: 17 x 17 slices at least.
    assert export.min_volume_shape(2, "3d") == (2, 17, 17)
    assert export.min_volume_shape(4, "2d") == (1, 15, 15)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["one_nan_voxel", "2x2x2", "single_slice"])
def test_saved_model_cli_run_reports_bad_volumes(exported, tmp_path, case):
    """The session-based loader (TF Serving's) gets the same INVALID_ARGUMENT and message."""
    path, inputs, _ = exported
    volume, words = _bad_volumes(inputs["volume"])[case]
    np.save(tmp_path / "x.npy", volume)
    ran = _run(_saved_model_cli() + ["run", "--dir", path, "--tag_set", "serve", "--signature_def",
                                     "serving_default", "--inputs", f"volume={tmp_path / 'x.npy'}",
                                     "--outdir", tmp_path / "out"])
    assert ran.returncode != 0
    assert "InvalidArgument" in ran.stderr and words in ran.stderr, ran.stderr[-3000:]
    assert not (tmp_path / "out" / "upscaled.npy").exists()
