"""Tests for sr3d/models.py: shapes, parameter counts, skips, ReLU switches, halo, save/load."""
import keras
import numpy as np
import pytest

from sr3d import models
from sr3d.layers import SubPixel1D, SubPixel2D


def _conv_params(kernel_inputs: int, filters: int) -> int:
    """A 3x3 conv: 9 weights per input channel per filter, plus one bias per filter."""
    return 9 * kernel_inputs * filters + filters


def _paper_params(conv6_filters: int, filters: int = 32, second_block: bool = True) -> int:
    """The paper's layer arithmetic (Section III-A), independent of the model code."""
    block1 = (_conv_params(1, filters)                       # conv1
              + 4 * _conv_params(filters, filters)           # conv2..conv5
              + _conv_params(filters, conv6_filters))        # conv6
    block2 = (_conv_params(1, filters)                       # conv7 (sub-pixel output has 1 channel)
              + 2 * _conv_params(filters, filters)           # conv8, conv9
              + _conv_params(filters, 1))                    # conv10
    return block1 + (block2 if second_block else 0)


def _parent(model: keras.Model, layer_name: str) -> list[str]:
    """Names of the layers feeding `layer_name`."""
    inputs = model.get_layer(layer_name).input
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return sorted(t._keras_history.operation.name for t in inputs)


def _predict(model: keras.Model, lr: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model(lr[None, ..., None]).items()}


def test_param_count_hw_r2_f32_written_out():
    # conv1 9*1*32+32, conv2..5 4*(9*32*32+32), conv6 9*32*4+4,
    # conv7 9*1*32+32, conv8..9 2*(9*32*32+32), conv10 9*32+1
    expected = 320 + 4 * 9248 + 1156 + 320 + 2 * 9248 + 289
    assert expected == 57573
    assert models.build("hw", 2).count_params() == expected


@pytest.mark.parametrize("second_block", [True, False])
@pytest.mark.parametrize("stage, scale, conv6_filters", [("hw", 2, 4), ("hw", 4, 16), ("d", 2, 2), ("d", 4, 4)])
def test_param_count_matches_paper_arithmetic(stage, scale, conv6_filters, second_block):
    model = models.build(stage, scale, second_block=second_block)
    assert model.count_params() == _paper_params(conv6_filters, second_block=second_block)


def test_param_count_with_other_filters():
    assert models.build("d", 3, filters=8).count_params() == _paper_params(3, filters=8)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("stage", models.STAGES)
def test_output_shapes_non_square(stage, scale):
    model = models.build(stage, scale, filters=4)
    lr = np.random.default_rng(0).normal(size=(2, 5, 7, 1)).astype(np.float32)
    out = model(lr)
    assert sorted(out) == ["final", "intermediate"]
    expected = (2, 5 * scale, 7 * scale, 1) if stage == "hw" else (2, 5 * scale, 7, 1)
    assert tuple(out["intermediate"].shape) == expected
    assert tuple(out["final"].shape) == expected
    assert model.input_shape == (None, None, None, 1)
    assert sorted(model.output_names) == ["final", "intermediate"]


@pytest.mark.parametrize("stage, layer_type, axis", [("hw", SubPixel2D, None), ("d", SubPixel1D, 1)])
def test_layer_names_and_upsampling_layer(stage, layer_type, axis):
    model = models.build(stage, 3)
    names = {layer.name for layer in model.layers}
    assert {f"conv{i}" for i in range(1, 11)} | {"subpixel", "intermediate", "final"} <= names
    subpixel = model.get_layer("subpixel")
    assert type(subpixel) is layer_type and subpixel.scale == 3
    if axis is not None:
        assert subpixel.axis == axis
    assert _parent(model, "intermediate") == ["subpixel"]
    assert _parent(model, "final") == ["conv10"]


def test_skips_in_full_model():
    model = models.build("hw", 2)
    assert _parent(model, "conv4") == ["short_skip_1_3"]
    assert _parent(model, "short_skip_1_3") == ["conv1", "conv3"]
    assert _parent(model, "conv6") == ["long_skip_1_5"]
    assert _parent(model, "long_skip_1_5") == ["conv1", "conv5"]
    assert _parent(model, "conv10") == ["short_skip_7_9"]
    assert _parent(model, "short_skip_7_9") == ["conv7", "conv9"]


def test_ablation_short_skips_off():
    model = models.build("hw", 2, short_skips=False)
    names = {layer.name for layer in model.layers}
    assert "short_skip_1_3" not in names and "short_skip_7_9" not in names
    assert _parent(model, "conv4") == ["conv3"]
    assert _parent(model, "conv10") == ["conv9"]
    assert _parent(model, "long_skip_1_5") == ["conv1", "conv5"]
    assert model.count_params() == _paper_params(4)  # additions have no weights


def test_ablation_long_skip_off():
    model = models.build("d", 2, long_skip=False)
    assert "long_skip_1_5" not in {layer.name for layer in model.layers}
    assert _parent(model, "conv6") == ["conv5"]
    assert _parent(model, "conv4") == ["short_skip_1_3"]


def test_ablation_without_second_block_is_espcn_like():
    model = models.build("hw", 2, second_block=False)
    names = {layer.name for layer in model.layers}
    assert not names & {"conv7", "conv8", "conv9", "conv10", "short_skip_7_9"}
    assert _parent(model, "final") == ["subpixel"]
    out = _predict(model, np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32))
    np.testing.assert_array_equal(out["final"], out["intermediate"])


def test_skip_switches_change_outputs():
    lr = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32)
    outputs = []
    for kwargs in [{}, {"short_skips": False}, {"long_skip": False}]:
        keras.utils.set_random_seed(0)  # same weights: only the wiring differs
        outputs.append(_predict(models.build("hw", 2, filters=8, **kwargs), lr)["final"])
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-4
    assert np.abs(outputs[0] - outputs[2]).max() > 1e-4


def _set_constant_conv(model: keras.Model, name: str, bias: float) -> None:
    kernel, old_bias = model.get_layer(name).get_weights()
    model.get_layer(name).set_weights([np.zeros_like(kernel), np.full_like(old_bias, bias)])


@pytest.mark.parametrize("stage", models.STAGES)
def test_default_output_can_be_negative_output_relu_cannot(stage):
    lr = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    linear = models.build(stage, 2, filters=8)
    clipped = models.build(stage, 2, filters=8, output_relu=True)
    # conv10 = 0 * x - 1: the target -1 everywhere (e.g. air in normalised CT).
    _set_constant_conv(linear, "conv10", -1.0)
    _set_constant_conv(clipped, "conv10", -1.0)
    hr_shape = (1, 10, 12, 1) if stage == "hw" else (1, 10, 6, 1)
    np.testing.assert_allclose(_predict(linear, lr)["final"], np.full(hr_shape, -1.0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_predict(clipped, lr)["final"], np.zeros(hr_shape), rtol=0, atol=0)


def test_output_relu_clips_random_network():
    lr = np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32)
    keras.utils.set_random_seed(1)
    linear = _predict(models.build("hw", 2, filters=8), lr)
    keras.utils.set_random_seed(1)
    clipped = _predict(models.build("hw", 2, filters=8, conv6_relu=True, output_relu=True), lr)
    assert linear["final"].min() < 0 and linear["intermediate"].min() < 0
    assert clipped["final"].min() >= 0 and clipped["intermediate"].min() >= 0
    # Same weights: the ReLU on conv6 is the only difference on the intermediate output.
    np.testing.assert_allclose(clipped["intermediate"], np.maximum(linear["intermediate"], 0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stage", models.STAGES)
def test_keras_save_load_round_trip(stage, tmp_path):
    keras.utils.set_random_seed(0)
    model = models.build(stage, 3, filters=8)
    path = tmp_path / f"{stage}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("subpixel")) is type(model.get_layer("subpixel"))
    lr = np.random.default_rng(4).normal(size=(5, 7)).astype(np.float32)
    before, after = _predict(model, lr), _predict(loaded, lr)
    for key in ("intermediate", "final"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [
    lambda: models.build("dh", 2),
    lambda: models.build("hw", 1),
    lambda: models.build("hw", 2.0),
    lambda: models.build("d", True),
    lambda: models.build("d", 2, filters=0),
    lambda: models.lr_halo("xy", 2),
    lambda: models.lr_halo("hw", 0),
])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError, match="sr3d/models.py"):
        bad()


def test_unknown_stage_lists_valid_ones():
    with pytest.raises(ValueError, match=r"\('hw', 'd'\).*got 'z'"):
        models.build("z", 2)


def test_numpy_integer_scale_accepted():
    assert models.build("hw", np.int64(2), filters=4).get_layer("subpixel").scale == 2


@pytest.mark.parametrize("stage, scale, halo", [
    # 6 LR px before the sub-pixel layer + ceil(4 HR px / r) after it; 10 on an axis not upsampled.
    ("hw", 2, (8, 8)), ("hw", 3, (8, 8)), ("hw", 4, (7, 7)), ("hw", 5, (7, 7)),
    ("d", 2, (8, 10)), ("d", 3, (8, 10)), ("d", 4, (7, 10)),
])
def test_lr_halo_values(stage, scale, halo):
    assert models.lr_halo(stage, scale) == halo


@pytest.mark.parametrize("stage, scale", [("hw", 2), ("hw", 3), ("hw", 4), ("d", 2), ("d", 4)])
def test_lr_halo_is_exact_receptive_field(stage, scale):
    """Perturbing one LR pixel changes the HR block of the centre LR pixel iff it is within the halo."""
    halo = models.lr_halo(stage, scale)
    size = 2 * max(halo) + 7  # the centre's cone stays clear of the zero-padded borders
    centre = size // 2
    keras.utils.set_random_seed(0)
    model = models.build(stage, scale, filters=16)
    base = np.random.default_rng(6).normal(size=(size, size)).astype(np.float32)
    batch, offsets = [base], []
    for axis in (0, 1):
        for offset in range(-halo[axis] - 2, halo[axis] + 3):
            lr = base.copy()
            position = [centre, centre]
            position[axis] += offset
            lr[tuple(position)] += 50.0  # large, so the faint reach at the cone's edge stands out
            batch.append(lr)
            offsets.append((axis, offset))
    final = model(np.stack(batch)[..., None])["final"].numpy()[..., 0]
    row_block = slice(centre * scale, (centre + 1) * scale)
    col_block = row_block if stage == "hw" else slice(centre, centre + 1)
    blocks = final[:, row_block, col_block]
    change = np.abs(blocks[1:] - blocks[:1]).max(axis=(1, 2))
    inside = np.array([abs(offset) <= halo[axis] for axis, offset in offsets])
    # Outside: unchanged (exactly 0 here; the bound leaves room for conv
    # algorithms that mix neighbouring inputs at round-off level). Inside: the
    # edge of the cone is reached through a product of ten weights, so its
    # change is small but orders of magnitude above round-off.
    assert change[~inside].max() <= 1e-6, [o for o, c in zip(offsets, change) if c > 1e-6]
    assert change[inside].min() >= 1e-5, [o for o, c in zip(offsets, change) if c < 1e-5]


@pytest.mark.parametrize("stage, scale", [("hw", 2), ("d", 3)])
def test_tiling_with_halo_equals_whole_image(stage, scale):
    """Two-by-two tiles extended by the halo, trimmed after upsampling, reproduce the untiled output."""
    halo = models.lr_halo(stage, scale)
    factor = (scale, scale) if stage == "hw" else (scale, 1)
    keras.utils.set_random_seed(0)
    model = models.build(stage, scale, filters=8)
    lr = np.random.default_rng(7).normal(size=(23, 26)).astype(np.float32)
    whole = _predict(model, lr)["final"][0, ..., 0]
    tiled = np.full_like(whole, np.nan)
    splits = [(0, 11, 23), (0, 13, 26)]  # tile core boundaries in LR pixels, per axis
    for i in range(2):
        for j in range(2):
            core = [(splits[a][t], splits[a][t + 1]) for a, t in ((0, i), (1, j))]
            padded = [(max(lo - halo[a], 0), min(hi + halo[a], lr.shape[a])) for a, (lo, hi) in enumerate(core)]
            out = _predict(model, lr[padded[0][0]:padded[0][1], padded[1][0]:padded[1][1]])["final"][0, ..., 0]
            keep = tuple(slice((lo - plo) * f, (hi - plo) * f)
                         for (lo, hi), (plo, _), f in zip(core, padded, factor))
            target = tuple(slice(lo * f, hi * f) for (lo, hi), f in zip(core, factor))
            tiled[target] = out[keep]
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
