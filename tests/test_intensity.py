"""Tests for sr3d.intensity: the normalisation window and its TensorFlow twin."""
import numpy as np
import pytest

from sr3d import intensity


def test_window_is_the_percentiles_of_the_voxels():
    rng = np.random.default_rng(0)
    vol = rng.normal(100.0, 30.0, (20, 30, 40)).astype(np.float32)
    win = intensity.window(vol)
    # Small volume: every voxel is sampled; compare with numpy's 'lower' percentile.
    np.testing.assert_allclose(win.lo, np.percentile(vol, 0.5, method="lower"), rtol=0, atol=0)
    np.testing.assert_allclose(win.hi, np.percentile(vol, 99.5, method="lower"), rtol=0, atol=0)


def test_normalise_round_trip_and_units():
    vol = np.linspace(-1000.0, 2000.0, 6000, dtype=np.float32).reshape(10, 20, 30)
    win = intensity.window(vol)
    norm = win.normalise(vol)
    assert norm.dtype == np.float32
    np.testing.assert_allclose(np.percentile(norm, [0.5, 99.5], method="lower"), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(win.denormalise(norm), vol, rtol=0, atol=1e-3)
    copy = win.denormalise(norm)
    same = win.denormalise(norm, in_place=True)
    assert same is norm
    np.testing.assert_array_equal(same, copy)


def test_constant_volume_gets_a_unit_window():
    win = intensity.window(np.full((3, 4, 5), 7.0, np.float32))
    assert (win.lo, win.hi) == (7.0, 8.0)


@pytest.mark.parametrize("shape", [(3, 4, 5), (40, 160, 200)])
def test_tensorflow_window_is_identical(shape):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    vol = (rng.gamma(2.0, 300.0, shape) - 1000).astype(np.float32)
    lo, hi = intensity.window_tf(tf.constant(vol))
    win = intensity.window(vol)
    assert (float(lo), float(hi)) == (win.lo, win.hi)
