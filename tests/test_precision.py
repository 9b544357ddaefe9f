"""Tests for sr3d/precision.py and the precision option of inference and export.

The CPU detection is simulated (a fake /proc/cpuinfo, or `cpu_flags` patched), so these tests
pass on CPUs with and without bf16. bf16 against float32 is checked on a real IXI crop with the
shipped 2x model: the quality guard on whole test scans is benchmarks/precision_quality.py.
"""
import numpy as np
import pytest
import tensorflow as tf

from sr3d import export, inference, intensity, models, precision
from sr3d import io as sr3d_io

CROP = (slice(40, 50), slice(40, 80), slice(40, 76))   # 10 x 40 x 36 voxels (D, H, W) of an IXI T1
# bf16 keeps 8 significant bits: on the crop (normalised, outputs in about [0, 2.4]) the shipped
# model, its thin layers in float32 (precision.FLOAT32_LAYERS), measured a max difference of 0.0080
# (3D; 0.0076 2D) and an RMS of 0.0011 against float32 (with every conv in bf16: 0.019 and 0.0024).
BF16_MAX_ABS = 0.016
BF16_RMS = 0.002

_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f {extra}
"""


@pytest.fixture(scope="module")
def ixi_normalised(ixi_files):
    array = sr3d_io.load_volume(ixi_files[0]).array[CROP]
    return intensity.window(array).normalise(array)


@pytest.fixture(scope="module")
def shipped_x2():
    return models.load_models(None, 2)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_bundle_dir):
    return models.load_models(tiny_bundle_dir, scale=2)


@pytest.mark.parametrize("extra, native", [("", []), ("avx512_bf16", ["avx512_bf16"]),
                                           ("amx_tile amx_bf16", ["amx_bf16"])])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path, extra, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_CPUINFO.format(extra=extra))
    flags = precision.cpu_flags(cpuinfo)
    assert {"avx2", "avx512f"} <= flags
    assert precision.native_bf16(flags) == native
    assert precision.resolve("auto", flags) == ("bfloat16" if native else "float32")


def test_no_cpuinfo_means_no_flags(tmp_path):
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()
    assert precision.resolve("auto", frozenset()) == "float32"


@pytest.mark.parametrize("value", ["float32", "bfloat16"])
def test_explicit_precisions_ignore_the_cpu(value):
    assert precision.resolve(value, frozenset()) == value
    assert precision.resolve(value, frozenset({"avx512_bf16"})) == value


@pytest.mark.parametrize("value, scale, mode, expected", [
    ("auto", 2, "3d", ("bfloat16", "bfloat16")),       # within the guard since the thin layers stay float32
    ("auto", 2, "2d", ("bfloat16", "bfloat16")),
    ("auto", 4, "2d", ("bfloat16", "bfloat16")),
    ("auto", 4, "3d", ("bfloat16", "bfloat16")),       # within the guard since the x4 retrain
    ("bfloat16", 4, "3d", ("bfloat16", "bfloat16")),   # an explicit choice is obeyed
    ("float32", 2, "3d", ("float32", "float32"))])
def test_auto_keeps_the_stages_that_failed_the_guard_in_float32(value, scale, mode, expected):
    assert precision.stage_precisions(value, scale, mode, frozenset({"avx512_bf16"})) == expected
    assert precision.stage_precisions(value, scale, mode, frozenset()) == (
        ("float32", "float32") if value == "auto" else expected)


def test_auto_keeps_float32_for_a_stage_listed_as_failing_the_guard(monkeypatch):
    monkeypatch.setattr(precision, "AUTO_FLOAT32_STAGES", {(4, "3d"): ("d",)})
    bf16 = frozenset({"avx512_bf16"})
    assert precision.stage_precisions("auto", 4, "3d", bf16) == ("bfloat16", "float32")
    assert precision.stage_precisions("bfloat16", 4, "3d", bf16) == ("bfloat16", "bfloat16")
    assert precision.stage_precisions("auto", 4, "2d", bf16) == ("bfloat16", "bfloat16")


def test_bad_precision_is_refused(tiny_bundle, ixi_normalised):
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'float32', 'bfloat16'\), got 'fp16'"):
        inference.upscale_normalised(ixi_normalised, tiny_bundle, precision="fp16")
    with pytest.raises(ValueError, match="needs a resolved precision"):
        precision.network(tiny_bundle.hw, "auto")


def test_bf16_network_is_bf16_inside_and_float32_outside(tiny_bundle):
    net = precision.network(tiny_bundle.hw, "bfloat16")
    assert precision.network(tiny_bundle.hw, "bfloat16") is net, "one copy per model"
    assert precision.network(tiny_bundle.hw, "float32") is tiny_bundle.hw
    assert net.get_layer("conv5").compute_dtype == "bfloat16"
    # The layers that read the input image or write the output stay float32.
    assert {name: net.get_layer(name).compute_dtype for name in ("conv1", "conv6", "conv7", "conv10")} == {
        "conv1": "float32", "conv6": "bfloat16", "conv7": "bfloat16", "conv10": "float32"}
    outputs = net(np.zeros((1, 9, 9, 1), np.float32), training=False)
    assert {name: value.dtype for name, value in outputs.items()} == {"intermediate": tf.float32,
                                                                     "final": tf.float32}
    for original, copied in zip(tiny_bundle.hw.get_weights(), net.get_weights()):
        np.testing.assert_array_equal(copied, original)


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_bf16_agrees_with_float32_on_a_real_crop(shipped_x2, ixi_normalised, mode):
    fp32 = inference.upscale_normalised(ixi_normalised, shipped_x2, mode=mode, precision="float32")
    bf16 = inference.upscale_normalised(ixi_normalised, shipped_x2, mode=mode, precision="bfloat16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    difference = bf16 - fp32
    assert 0 < np.abs(difference).max() < BF16_MAX_ABS, "bf16 must change the numbers, a little"
    assert np.sqrt(np.mean(difference ** 2)) < BF16_RMS


def test_auto_is_float32_without_native_bf16(monkeypatch, tiny_bundle, ixi_normalised):
    monkeypatch.setattr(precision, "cpu_flags", lambda *args: frozenset({"avx2", "avx512f"}))
    auto = inference.upscale_normalised(ixi_normalised, tiny_bundle, precision="auto")
    np.testing.assert_array_equal(auto, inference.upscale_normalised(ixi_normalised, tiny_bundle))


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_auto_is_bf16_with_native_bf16(monkeypatch, tiny_bundle, ixi_normalised, mode):
    monkeypatch.setattr(precision, "cpu_flags", lambda *args: frozenset({"avx512f", "avx512_bf16"}))
    auto = inference.upscale_normalised(ixi_normalised, tiny_bundle, mode=mode, precision="auto")
    np.testing.assert_array_equal(auto, inference.upscale_normalised(ixi_normalised, tiny_bundle, mode=mode,
                                                                     precision="bfloat16"))


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_bf16_tiled_equals_untiled_exactly(shipped_x2, ixi_normalised, mode):
    whole = inference.upscale_normalised(ixi_normalised, shipped_x2, mode=mode, tile_mb=None, precision="bfloat16")
    for tile_mb, batch_size in ((0.2, 8), (1e-6, 3)):
        tiled = inference.upscale_normalised(ixi_normalised, shipped_x2, mode=mode, tile_mb=tile_mb,
                                             batch_size=batch_size, precision="bfloat16")
        np.testing.assert_array_equal(tiled, whole)


def test_bf16_saved_model_serves_the_python_bf16_numbers(tmp_path, tiny_bundle, ixi_files):
    volume = sr3d_io.load_volume(ixi_files[0])
    volume = volume.replace(array=volume.array[CROP].copy())
    path = export.export(tiny_bundle, tmp_path, "sr3d", version=1, precision="bfloat16")
    served = tf.saved_model.load(str(path)).signatures["serving_default"](volume=tf.constant(volume.array))
    served = served["upscaled"].numpy()
    bf16 = inference.upscale_volume(volume, tiny_bundle, precision="bfloat16").array  # as served
    fp32 = inference.upscale_volume(volume, tiny_bundle, precision="float32").array
    data_range = float(volume.array.max() - volume.array.min())
    np.testing.assert_allclose(served, bf16, rtol=0, atol=1e-5 * data_range)
    assert np.abs(served - fp32).max() > 1e-4 * data_range, "the served graph must run in bf16"


def test_cli_precision_flag_writes_the_bf16_result(tmp_path, tiny_bundle, tiny_bundle_dir, ixi_files, capsys):
    from sr3d import cli

    volume = sr3d_io.load_volume(ixi_files[0])
    crop = sr3d_io.save_volume(volume.replace(array=volume.array[CROP].copy(), source=None), tmp_path / "crop.nii.gz")
    out = tmp_path / "crop_bf16.nii.gz"
    status = cli.main(["upscale", str(crop), str(out), "--model", str(tiny_bundle_dir), "--precision", "bfloat16",
                       "--planes", "dw"])  # one pass, as the goldens below
    assert status == 0, capsys.readouterr().err
    written = sr3d_io.load_volume(out).array
    expected = inference.upscale_volume(sr3d_io.load_volume(crop), tiny_bundle, precision="bfloat16").array
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    fp32 = inference.upscale_volume(sr3d_io.load_volume(crop), tiny_bundle).array
    assert np.abs(written - fp32).max() > 1e-4 * np.abs(fp32).max(), "the flag must reach the networks"
