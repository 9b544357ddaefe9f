"""Tests for sr3d/onnx_export.py: the shipped x2 stages as ONNX, run by onnxruntime on a real scan.

The reference is the Keras model itself (TensorFlow), on the same normalised planes; the whole
3D path is chained by hand from the two ONNX stages and compared with `sr3d.inference`.
"""
import json

import numpy as np
import pytest

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")

from sr3d import inference, intensity, models  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import onnx_export  # noqa: E402
from sr3d.demo import BUNDLED_SCAN  # noqa: E402


@pytest.fixture(scope="module")
def bundle():
    return models.load_models(None, scale=2)


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    return onnx_export.export(bundle, tmp_path_factory.mktemp("onnx"), version=1)


@pytest.fixture(scope="module")
def crop():
    """A 10 x 36 x 32 mid-brain crop of the bundled real 2 mm T1 scan, in network units."""
    volume = sr3d_io.load_volume(BUNDLED_SCAN)
    d, h, w = (n // 2 for n in volume.shape)
    array = volume.array[d - 5:d + 5, h - 18:h + 18, w - 16:w + 16]
    return intensity.window(volume.array).normalise(array)


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _onnx(session, planes: np.ndarray) -> np.ndarray:
    """(N, h, w) -> stage output (N, h', w') through onnxruntime."""
    [out] = session.run(["final"], {"planes": planes[..., None].astype(np.float32)})
    return out[..., 0]


def test_layout_and_description(exported, bundle):
    assert sorted(p.name for p in exported.iterdir()) == ["d.onnx", "hw.onnx", "onnx.json"]
    assert exported.parts[-2:] == ("sr3d", "1")
    info = json.loads((exported / "onnx.json").read_text())
    assert info["scale"] == 2 and info["opset"] == onnx_export.OPSET
    assert info["intensity"]["lo_percentile"] == intensity.LOW_PERCENTILE


@pytest.mark.parametrize("stage", onnx_export.STAGES)
def test_each_stage_matches_keras(exported, bundle, crop, stage):
    planes = crop if stage == "hw" else crop.transpose(1, 0, 2)   # (H, W) slices or (D, W) planes
    expected = np.asarray(getattr(bundle, stage)(planes[..., None], training=False)["final"])[..., 0]
    got = _onnx(_session(exported / f"{stage}.onnx"), planes)
    assert got.shape == expected.shape == ((planes.shape[0], 72, 64) if stage == "hw" else (36, 20, 32))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_chained_stages_match_the_3d_upscale(exported, bundle, crop):
    hw, d = _session(exported / "hw.onnx"), _session(exported / "d.onnx")
    slices = _onnx(hw, crop)                                              # (D, 2H, 2W)
    volume = _onnx(d, slices.transpose(1, 0, 2)).transpose(1, 0, 2)      # d on the (D, W) plane of every row
    expected = inference.upscale_normalised(crop, bundle, mode="3d", tile_mb=None)
    assert volume.shape == expected.shape == (20, 72, 64)
    np.testing.assert_allclose(volume, expected, rtol=0, atol=1e-4)


def test_refuses_a_directory_that_is_not_empty(bundle, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        onnx_export.export_onnx(bundle, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_conversion_that_does_not_match_keras_is_refused(exported, bundle):
    """The export-time parity probe: the d stage's ONNX file checked as if it were stage hw (its
    output is (N, 2h, w) where hw's is (N, 2h, 2w)) is refused with the file named."""
    wrong = (exported / "d.onnx").read_bytes()
    with pytest.raises(ValueError, match=r"hw\.onnx: the converted ONNX stage gives shape"):
        onnx_export.check_stage(bundle.hw, wrong, "out/hw.onnx")
    onnx_export.check_stage(bundle.hw, (exported / "hw.onnx").read_bytes(), "out/hw.onnx")  # the right one passes
