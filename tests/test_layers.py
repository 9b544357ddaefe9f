"""Tests for sr3d/layers.py: exact pixel order of the sub-pixel layers."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sr3d.layers import SubPixel1D, SubPixel2D


def _depth_to_space_loops(x: np.ndarray, r: int) -> np.ndarray:
    """The depth_to_space definition written as loops: channel (di*r + dj)*C + c -> (i*r+di, j*r+dj, c)."""
    batch, height, width, channels = x.shape
    out_channels = channels // (r * r)
    out = np.zeros((batch, height * r, width * r, out_channels), x.dtype)
    for i in range(height):
        for j in range(width):
            for di in range(r):
                for dj in range(r):
                    for c in range(out_channels):
                        out[:, i * r + di, j * r + dj, c] = x[:, i, j, (di * r + dj) * out_channels + c]
    return out


def _one_axis_loops(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Figure 4 written as loops: channel k*C + c at position i -> position i*r + k along `axis`."""
    batch, height, width, channels = x.shape
    out_channels = channels // r
    shape = (batch, height * r, width, out_channels) if axis == 1 else (batch, height, width * r, out_channels)
    out = np.zeros(shape, x.dtype)
    for i in range(height):
        for j in range(width):
            for k in range(r):
                for c in range(out_channels):
                    target = (i * r + k, j) if axis == 1 else (i, j * r + k)
                    out[:, target[0], target[1], c] = x[:, i, j, k * out_channels + c]
    return out


def test_subpixel2d_r2_by_hand():
    x = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)
    expected = np.array([[0, 1, 4, 5],
                         [2, 3, 6, 7],
                         [8, 9, 12, 13],
                         [10, 11, 14, 15]], np.float32).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(SubPixel2D(2)(x).numpy(), expected)


@pytest.mark.parametrize("scale, channels", [(3, 1), (3, 2), (2, 3)])
def test_subpixel2d_matches_definition_and_depth_to_space(scale, channels):
    x = np.random.default_rng(0).normal(size=(2, 3, 4, scale * scale * channels)).astype(np.float32)
    out = SubPixel2D(scale)(x).numpy()
    np.testing.assert_array_equal(out, _depth_to_space_loops(x, scale))
    np.testing.assert_array_equal(out, tf.nn.depth_to_space(x, scale).numpy())


def test_subpixel1d_r2_by_hand_both_axes():
    # x[0, i, j, k] = (3 * i + j) * 2 + k
    x = np.arange(12, dtype=np.float32).reshape(1, 2, 3, 2)
    rows = np.array([[0, 2, 4],
                     [1, 3, 5],
                     [6, 8, 10],
                     [7, 9, 11]], np.float32).reshape(1, 4, 3, 1)
    cols = np.array([[0, 1, 2, 3, 4, 5],
                     [6, 7, 8, 9, 10, 11]], np.float32).reshape(1, 2, 6, 1)
    np.testing.assert_array_equal(SubPixel1D(2, axis=1)(x).numpy(), rows)
    np.testing.assert_array_equal(SubPixel1D(2, axis=2)(x).numpy(), cols)


def test_subpixel1d_default_axis_is_rows():
    assert SubPixel1D(2).axis == 1


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("scale, channels", [(3, 1), (3, 2), (4, 1)])
def test_subpixel1d_matches_definition(scale, channels, axis):
    x = np.random.default_rng(1).normal(size=(2, 3, 5, scale * channels)).astype(np.float32)
    np.testing.assert_array_equal(SubPixel1D(scale, axis=axis)(x).numpy(), _one_axis_loops(x, scale, axis))


@pytest.mark.parametrize("axis", [1, 2])
def test_subpixel1d_is_depth_to_space_restricted_to_one_axis(axis):
    # Put the one-axis channels at the sub-pixel offsets of one axis only and
    # zeros at the others: depth_to_space's output, sampled every r pixels
    # along the other axis, must be the one-axis output.
    scale, channels = 3, 2
    x = np.random.default_rng(2).normal(size=(1, 4, 5, scale * channels)).astype(np.float32)
    full = np.zeros(x.shape[:3] + (scale * scale * channels,), np.float32)
    for k in range(scale):
        offset = (k * scale) if axis == 1 else k  # (di, dj) = (k, 0) for rows, (0, k) for columns
        full[..., offset * channels:(offset + 1) * channels] = x[..., k * channels:(k + 1) * channels]
    both = tf.nn.depth_to_space(full, scale).numpy()
    expected = both[:, :, ::scale] if axis == 1 else both[:, ::scale, :]
    np.testing.assert_array_equal(SubPixel1D(scale, axis=axis)(x).numpy(), expected)


@pytest.mark.parametrize("layer, channels_in", [(SubPixel2D(2), 8), (SubPixel1D(2, axis=1), 4),
                                                (SubPixel1D(3, axis=2), 6)])
def test_dynamic_shapes_in_tf_function(layer, channels_in):
    channels_out = 2
    run = tf.function(layer.__call__,
                      input_signature=[tf.TensorSpec([None, None, None, channels_in], tf.float32)])
    # The channel dimension stays static even with unknown batch and spatial size.
    assert run.get_concrete_function().structured_outputs.shape.as_list() == [None, None, None, channels_out]
    rng = np.random.default_rng(3)
    for shape in [(1, 2, 3), (3, 5, 4)]:
        x = rng.normal(size=shape + (channels_in,)).astype(np.float32)
        if isinstance(layer, SubPixel2D):
            expected = _depth_to_space_loops(x, layer.scale)
        else:
            expected = _one_axis_loops(x, layer.scale, layer.axis)
        np.testing.assert_array_equal(run(x).numpy(), expected)


@pytest.mark.parametrize("layer, input_shape, output_shape", [
    (SubPixel2D(3), (None, None, 5, 18), (None, None, 15, 2)),
    (SubPixel1D(2, axis=1), (None, 4, None, 2), (None, 8, None, 1)),
    (SubPixel1D(4, axis=2), (2, 3, 5, 8), (2, 3, 20, 2)),
])
def test_symbolic_output_shape(layer, input_shape, output_shape):
    symbolic = keras.KerasTensor(input_shape)
    assert layer.compute_output_shape(input_shape) == output_shape
    assert tuple(layer(symbolic).shape) == output_shape


@pytest.mark.parametrize("layer", [SubPixel2D(3, name="up"), SubPixel1D(4, axis=2, name="up")])
def test_config_round_trip(layer):
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"].startswith("sr3d>")
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
    x = np.random.default_rng(4).normal(size=(1, 2, 3, 72)).astype(np.float32)
    np.testing.assert_array_equal(restored(x).numpy(), layer(x).numpy())


@pytest.mark.parametrize("make", [lambda: SubPixel2D(1), lambda: SubPixel2D(2.0),
                                  lambda: SubPixel1D(True), lambda: SubPixel1D(2, axis=3),
                                  lambda: SubPixel1D(2, axis=0)])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError, match="sr3d/layers.py"):
        make()


@pytest.mark.parametrize("layer, channels", [(SubPixel2D(2), 6), (SubPixel1D(3), 4)])
def test_indivisible_channels_raise(layer, channels):
    with pytest.raises(ValueError, match=f"got {channels} channels"):
        layer(np.zeros((1, 2, 2, channels), np.float32))
