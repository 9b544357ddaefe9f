"""Tests for sr3d.degrade: MATLAB imresize(1/r, 'bicubic'), the HR -> LR simulation, and the
slice-profile model of thick slices (box and Gaussian profiles, simulated thick scans).

Golden values come from hand arithmetic (Keys a = -0.5 weights written out as
fractions, box profiles as voxel fractions), closed forms (constants, linear ramps,
sums, a Gaussian's half maximum) and Pillow's independent antialiased bicubic resize.
"""
import numpy as np
import pytest
from PIL import Image

from sr3d import degrade
from sr3d import volume as sr3d_volume

# MATLAB bicubic (Keys a = -0.5) for scale 1/2: h(x) = cubic(x / 2) / 2 at the
# 8 tap distances 3.5, 2.5, 1.5, 0.5 (and mirror), i.e. cubic(1.75), cubic(1.25),
# cubic(0.75), cubic(0.25) = -3/128, -9/128, 29/128, 111/128 (they sum to 1, so
# the normalisation changes nothing), each divided by 2.
_HAND_WEIGHTS_X2 = np.array([-3, -9, 29, 111, 111, 29, -9, -3]) / 256


def test_interior_sample_matches_hand_weights_scale2():
    x = np.random.default_rng(0).normal(size=16)
    out = degrade.downscale_axis(x, 2, axis=0)
    # Output 3 is centred at input coordinate 3.5 * 2 - 0.5 = 6.5: taps 3..10.
    expected = sum(w * x[j] for w, j in zip(_HAND_WEIGHTS_X2, range(3, 11)))
    np.testing.assert_allclose(out[3], expected, rtol=1e-13)
    assert out.shape == (8,)


def test_border_sample_mirrors_like_matlab_scale2():
    x = np.random.default_rng(1).normal(size=16)
    out = degrade.downscale_axis(x, 2, axis=0)
    # Output 0 is centred at 0.5: taps -3..4, which MATLAB's symmetric
    # extension [x0 .. x15, x15 .. x0] maps to 2, 1, 0, 0, 1, 2, 3, 4.
    expected = sum(w * x[j] for w, j in zip(_HAND_WEIGHTS_X2, (2, 1, 0, 0, 1, 2, 3, 4)))
    np.testing.assert_allclose(out[0], expected, rtol=1e-13)
    # Last output, centred at 14.5: taps 11..18 -> 11, 12, 13, 14, 15, 15, 14, 13.
    expected = sum(w * x[j] for w, j in zip(_HAND_WEIGHTS_X2, (11, 12, 13, 14, 15, 15, 14, 13)))
    np.testing.assert_allclose(out[-1], expected, rtol=1e-13)


@pytest.mark.parametrize("scale", [2, 3, 4, 5])
def test_constant_stays_constant_including_borders(scale):
    volume = np.full((2 * scale, 3 * scale, 4 * scale), 3.75, np.float32)
    out = degrade.downscale(volume, scale, axes=(0, 1, 2))
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out, 3.75, rtol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_linear_ramp_maps_to_box_centres(scale):
    n_out = 12
    x = 0.5 * np.arange(n_out * scale) + 2.0
    out = degrade.downscale_axis(x, scale, axis=0)
    # The kernel reaches 2 * scale input px (2 output px) each side: beyond
    # that the ramp sees no mirrored border and an odd-symmetric normalised
    # kernel returns the ramp at the output centre (i + 0.5) * scale - 0.5.
    i = np.arange(2, n_out - 2)
    np.testing.assert_allclose(out[i], 0.5 * ((i + 0.5) * scale - 0.5) + 2.0, rtol=1e-13)


@pytest.mark.parametrize("scale", [2, 3, 4, 5])
def test_sum_is_preserved_like_matlab(scale):
    # mean(out) == mean(in), i.e. sum(out) * scale == sum(in), exactly in exact
    # arithmetic for ANY signal: the Keys kernel is a partition of unity, so
    # each input sample's weights over all outputs sum to 1 / scale, and the
    # symmetric extension (n divisible by scale) makes the mirrored output
    # grid symmetric too. The tolerance is float64 rounding.
    rng = np.random.default_rng(2)
    t = np.linspace(0, 1, 24 * scale)
    smooth = np.sin(7 * t) + 3 * t ** 2
    rough = rng.normal(size=24 * scale)
    for x in (smooth, rough):
        out = degrade.downscale_axis(x, scale, axis=0)
        np.testing.assert_allclose(out.sum() * scale, x.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_interior_matches_pillow_bicubic(scale):
    # Pillow's bicubic is also Keys a = -0.5, antialiased, same pixel centres;
    # it clips and renormalises the kernel at borders where MATLAB mirrors, so
    # only outputs whose support (2 output px each side) is inside compare.
    # Pillow stores float32 between passes: tolerance ~ float32 rounding.
    image = np.random.default_rng(3).random((16 * scale, 12 * scale)).astype(np.float32)
    pil = Image.fromarray(image).resize((12, 16), Image.BICUBIC, reducing_gap=None)
    ours = degrade.downscale(image, scale, axes=(0, 1))
    np.testing.assert_allclose(ours[2:-2, 2:-2], np.asarray(pil)[2:-2, 2:-2], rtol=0, atol=1e-6)


def test_downscale_axis_works_along_every_axis():
    # A trilinear ramp checks that each axis is shrunk with its own centres.
    d, h, w = np.meshgrid(np.arange(24.0), np.arange(16.0), np.arange(20.0), indexing="ij")
    volume = 0.5 * d - 2.0 * h + 0.25 * w + 1.0
    for axis, shape in ((0, (12, 16, 20)), (1, (24, 8, 20)), (2, (24, 16, 10)), (-1, (24, 16, 10))):
        out = degrade.downscale_axis(volume, 2, axis=axis)
        assert out.shape == shape
    out = degrade.downscale(volume, 2, axes=(0, 1, 2))
    i, j, k = np.meshgrid(np.arange(2, 10), np.arange(2, 6), np.arange(2, 8), indexing="ij")
    expected = (0.5 * (2 * i + 0.5) - 2.0 * (2 * j + 0.5) + 0.25 * (2 * k + 0.5) + 1.0)
    np.testing.assert_allclose(out[2:10, 2:6, 2:8], expected, rtol=1e-12, atol=1e-12)


def test_dtypes():
    base = np.random.default_rng(4).random((4, 6, 8))
    assert degrade.downscale_axis(base.astype(np.float32), 2, 1).dtype == np.float32
    assert degrade.downscale_axis(base, 2, 1).dtype == np.float64
    assert degrade.downscale((base * 255).astype(np.uint8), 2, (1, 2)).dtype == np.float32
    # float32 output is the float64 computation rounded once.
    np.testing.assert_allclose(degrade.downscale(base.astype(np.float32), 2, (0, 1, 2)),
                               degrade.downscale(base.astype(np.float32).astype(np.float64), 2,
                                                 (0, 1, 2)), rtol=1e-7)


def test_crop_to_multiple_crops_the_end():
    array = np.arange(7 * 10 * 9).reshape(7, 10, 9)
    np.testing.assert_array_equal(degrade.crop_to_multiple(array, 4), array[:4, :8, :8])
    np.testing.assert_array_equal(degrade.crop_to_multiple(array, 3, axes=(1, 2)), array[:, :9, :9])
    with pytest.raises(ValueError, match="shorter than the scale"):
        degrade.crop_to_multiple(array, 8, axes=(0,))


def test_simulate_lr_shapes_and_ground_truth():
    hr = np.random.default_rng(5).random((9, 14, 11)).astype(np.float32)
    hr3, lr3 = degrade.simulate_lr(hr, 2, "3d")
    assert lr3.shape == (4, 7, 5) and lr3.dtype == np.float32
    np.testing.assert_array_equal(hr3, hr[:8, :14, :10])
    hr2, lr2 = degrade.simulate_lr(hr, 2, mode="2d")
    assert lr2.shape == (9, 7, 5) and lr2.dtype == np.float32
    np.testing.assert_array_equal(hr2, hr[:, :14, :10])
    # The ground truth is a copy: editing it leaves the input alone.
    hr2[0, 0, 0] = -1.0
    assert hr[0, 0, 0] >= 0.0


def test_simulate_lr_3d_interior_of_a_ramp():
    d, h, w = np.meshgrid(np.arange(33.0), np.arange(24.0), np.arange(25.0), indexing="ij")
    hr = (2.0 * d + h - 0.5 * w).astype(np.float32)
    hr_cropped, lr = degrade.simulate_lr(hr, 4, "3d")
    assert hr_cropped.shape == (32, 24, 24) and lr.shape == (8, 6, 6)
    centre = (np.arange(2, 4) + 0.5) * 4 - 0.5
    cd, ch, cw = np.meshgrid(centre, centre, centre, indexing="ij")
    np.testing.assert_allclose(lr[2:4, 2:4, 2:4], 2.0 * cd + ch - 0.5 * cw, rtol=1e-5)


@pytest.mark.parametrize("scale", [1, 0, -2, 2.0, 2.5, True, "2", None])
def test_simulate_lr_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be an integer >= 2"):
        degrade.simulate_lr(np.zeros((8, 8, 8), np.float32), scale)


def test_simulate_lr_accepts_numpy_integer_scale():
    _, lr = degrade.simulate_lr(np.ones((8, 8, 8), np.float32), np.int64(2))
    np.testing.assert_allclose(lr, 1.0, rtol=1e-6)


def test_simulate_lr_rejects_bad_mode_and_short_axes():
    volume = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        degrade.simulate_lr(volume, 2, mode="4d")
    with pytest.raises(ValueError, match="shorter than the scale"):
        degrade.simulate_lr(volume, 2, mode="3d")
    _, lr = degrade.simulate_lr(volume, 2, mode="2d")
    assert lr.shape == (1, 4, 4)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        degrade.simulate_lr(np.zeros((8, 8), np.float32), 2)


def test_downscale_axis_rejects_indivisible_length_and_bad_axis():
    with pytest.raises(ValueError, match="does not divide"):
        degrade.downscale_axis(np.zeros((4, 7)), 2, axis=1)
    with pytest.raises(ValueError, match="out of range"):
        degrade.downscale_axis(np.zeros((4, 8)), 2, axis=2)
    with pytest.raises(ValueError, match="repeated axis"):
        degrade.downscale(np.zeros((4, 8)), 2, axes=(1, -1))


# ---------------------------------------------------------------------------- slice profiles (thick slices)

def test_box_profile_sums_to_one_with_the_slice_width():
    np.testing.assert_allclose(degrade.slice_profile(3, "box"), [1 / 3] * 3, rtol=1e-12)
    np.testing.assert_allclose(degrade.slice_profile(4, "box"), [0.25] * 4, rtol=1e-12)
    # Width 2.5 fine voxels centred on a voxel: outer taps see 0.75 of their voxel.
    np.testing.assert_allclose(degrade.slice_profile(2.5, "box", factor=3), [0.3, 0.4, 0.3], rtol=1e-12)
    # Width 3 centred between two voxels (even factor): 0.5 + 1 + 1 + 0.5.
    np.testing.assert_allclose(degrade.slice_profile(3, "box", factor=2), [1 / 6, 1 / 3, 1 / 3, 1 / 6], rtol=1e-12)


def test_gaussian_profile_has_the_slice_width_as_fwhm():
    # A Gaussian with full width at half maximum F falls to 1/2 at F/2: g(x)/g(0) = 2^-(2x/F)^2.
    odd = degrade.slice_profile(3, "gaussian")
    assert odd.size % 2 == 1
    centre = odd.size // 2
    offsets = np.arange(odd.size) - centre
    np.testing.assert_allclose(odd / odd[centre], 0.5 ** ((2 * offsets / 3) ** 2), rtol=1e-12)
    np.testing.assert_allclose(odd.sum(), 1.0, rtol=1e-12)
    even = degrade.slice_profile(4, "gaussian")
    assert even.size % 2 == 0  # the centre of an even factor's thick voxel lies between two fine voxels
    offsets = np.arange(even.size) - (even.size - 1) / 2
    np.testing.assert_allclose(even / even[even.size // 2], 0.5 ** ((2 * offsets / 4) ** 2 - (2 * 0.5 / 4) ** 2),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="profile"):
        degrade.slice_profile(3, "sinc")


@pytest.mark.parametrize("profile", ["box", "gaussian"])
@pytest.mark.parametrize("factor", [3, 4])
def test_degrade_along_keeps_a_constant(profile, factor):
    planes = np.full((3, 12, 24), 3.7, np.float32)  # both in-plane lengths divide by 3 and 4
    for axis in (1, 2):
        lr = degrade.degrade_along(planes, factor, axis, profile)
        assert lr.shape[axis] == planes.shape[axis] // factor
        np.testing.assert_allclose(lr, 3.7, rtol=1e-6)


def test_degrade_along_box_means_of_a_ramp():
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32)[None, :, None], (2, 12, 3))
    # Thick voxel i is the mean of fine voxels 3i, 3i+1, 3i+2.
    np.testing.assert_allclose(degrade.degrade_along(ramp, 3, axis=1)[0, :, 0], [1, 4, 7, 10], rtol=1e-6)
    ramp16 = np.arange(16, dtype=np.float64).reshape(1, 16)
    np.testing.assert_allclose(degrade.degrade_along(ramp16, 4, axis=1)[0], [1.5, 5.5, 9.5, 13.5], rtol=1e-12)
    # Along the last axis of a 3D stack: same numbers.
    np.testing.assert_allclose(degrade.degrade_along(ramp.transpose(0, 2, 1), 3, axis=2)[1, 2], [1, 4, 7, 10],
                               rtol=1e-6)


def test_degrade_along_gaussian_keeps_a_ramp_away_from_the_borders():
    # A symmetric kernel maps a linear function to itself at the thick voxel centres 3i + 1.
    ramp = np.arange(30, dtype=np.float64)[None, :]
    lr = degrade.degrade_along(ramp, 3, axis=1, profile="gaussian")[0]
    half = degrade.slice_profile(3, "gaussian").size // 2
    inner = [i for i in range(10) if 3 * i + 1 - half >= 0 and 3 * i + 1 + half < 30]
    assert len(inner) >= 6
    np.testing.assert_allclose(lr[inner], 3 * np.array(inner) + 1, rtol=1e-12)


def test_degrade_along_rejects_bad_input():
    with pytest.raises(ValueError, match="does not divide"):
        degrade.degrade_along(np.zeros((2, 10, 4)), 3, axis=1)
    with pytest.raises(ValueError, match="parity"):
        degrade.degrade_along(np.zeros((2, 12, 4)), 3, axis=1, profile=np.full(4, 0.25))


def test_simulated_thick_scan_overlays_the_truth():
    fine = sr3d_volume.Volume(array=np.random.default_rng(0).random((13, 5, 6)), spacing=(1.0, 0.9, 0.8),
                              affine=np.diag([1.0, 0.9, 0.8, 1.0]) @ np.array(
                              [[1, 0, 0, 4], [0, 1, 0, -2], [0, 0, 1, 7], [0, 0, 0, 1.0]]))
    truth, thick = degrade.simulate_thick_slices(fine, 4)
    assert truth.shape == (12, 5, 6) and thick.shape == (3, 5, 6)
    np.testing.assert_allclose(thick.spacing, (4.0, 0.9, 0.8), rtol=1e-12)
    # The thick scan's D edges are the truth's: continuous index -0.5 and n - 0.5.
    np.testing.assert_allclose((thick.affine @ [-0.5, 2, 3, 1])[:3], (truth.affine @ [-0.5, 2, 3, 1])[:3], atol=1e-9)
    np.testing.assert_allclose((thick.affine @ [2.5, 2, 3, 1])[:3], (truth.affine @ [11.5, 2, 3, 1])[:3], atol=1e-9)
    np.testing.assert_allclose(thick.array[1, 2, 3], truth.array[4:8, 2, 3].mean(), rtol=1e-6)


def test_slice_profile_functions_stay_importable_from_selfsup():
    from sr3d import selfsup

    for name in ("PROFILES", "slice_profile", "degrade_along", "simulate_thick_slices"):
        assert getattr(selfsup, name) is getattr(degrade, name), name


# ---------------------------------------------------------------------------- consistency with the LR

CONSISTENCY_CASES = [((0, 1, 2), 2), ((1, 2), 2), ((0,), 4), ((2,), 2), ((0, 1, 2), 3)]


def _least_norm_golden(axes, scale):
    """(hr, lr, hr + delta): delta the minimum-norm solution of A delta = lr - A hr from a dense
    least-squares solve (numpy lstsq, SVD), A the degradation's matrix built by degrading each unit volume."""
    rng = np.random.default_rng(0)
    shape = tuple(4 * scale if axis in axes else 3 for axis in range(3))
    hr = rng.normal(size=shape).astype(np.float32)
    lr = degrade.downscale(rng.normal(size=shape), scale, axes).astype(np.float32)
    units = np.eye(hr.size).reshape((hr.size,) + shape)
    matrix = np.stack([degrade.downscale(u, scale, axes).ravel() for u in units], axis=1)
    delta = np.linalg.lstsq(matrix, lr.ravel().astype(np.float64) - matrix @ hr.ravel(), rcond=None)[0]
    return hr, lr, (hr.ravel() + delta).reshape(shape)


@pytest.mark.parametrize("axes, scale", CONSISTENCY_CASES)
def test_make_consistent_is_the_least_norm_change_to_the_lr(axes, scale):
    hr, lr, expected = _least_norm_golden(axes, scale)
    out = degrade.make_consistent(hr.copy(), lr, scale, axes, rows_per_band=2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(degrade.downscale(out.astype(np.float64), scale, axes), lr, rtol=0, atol=2e-6)


@pytest.mark.parametrize("axes, scale", CONSISTENCY_CASES)
def test_make_consistent_tf_is_the_least_norm_change_with_lengths_known_at_run_time(axes, scale):
    import tensorflow as tf

    hr, lr, expected = _least_norm_golden(axes, scale)
    spec = tf.TensorSpec([None, None, None], tf.float32)  # as in the served graph
    traced = tf.function(lambda h, l: degrade.make_consistent_tf(h, l, scale, axes), input_signature=[spec, spec])
    np.testing.assert_allclose(traced(hr, lr).numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tf_weights_equal_the_numpy_ones(scale):
    """The graph's imresize weights for a length known when it runs are `_imresize_weights`, and
    its right inverse (solved in float64, kept in float32) is one: W @ W+ = I."""
    import tensorflow as tf

    traced = tf.function(lambda n: (degrade.imresize_weights_tf(n, scale), degrade.consistency_weights_tf(n, scale)),
                         input_signature=[tf.TensorSpec([], tf.int32)])
    for n in (scale, 3 * scale, 5 * scale + 1, 17 * scale, 64 * scale, 255 * scale):  # odd multiples included
        weights, inverse = (t.numpy() for t in traced(tf.constant(n)))
        assert weights.shape == (n // scale, n) and inverse.shape == (n, n // scale)
        np.testing.assert_allclose(weights, degrade._imresize_weights(n, scale), rtol=0, atol=1e-12)
        np.testing.assert_allclose(degrade._imresize_weights(n, scale) @ inverse, np.eye(n // scale),
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(inverse, degrade._consistency_weights(n, scale), rtol=0, atol=1e-7)


def test_make_consistent_works_in_place_and_leaves_a_consistent_volume_alone():
    rng = np.random.default_rng(1)
    hr = rng.normal(size=(8, 12, 10)).astype(np.float32)
    lr = degrade.downscale(hr, 2, (0, 1, 2))
    out = hr.copy()
    assert degrade.make_consistent(out, lr, 2, (0, 1, 2)) is out
    np.testing.assert_allclose(out, hr, rtol=0, atol=1e-5)
    # A flat residual is a flat change (the weights' rows sum to one).
    out = degrade.make_consistent(hr.copy(), lr + np.float32(3.0), 2, (0, 1, 2))
    np.testing.assert_allclose(out - hr, 3.0, rtol=0, atol=1e-5)


def test_make_consistent_rejects_mismatched_shapes_and_dtypes():
    hr = np.zeros((8, 12, 10), np.float32)
    with pytest.raises(ValueError, match="is not lr"):
        degrade.make_consistent(hr, np.zeros((4, 6, 4), np.float32), 2, (0, 1, 2))
    with pytest.raises(ValueError, match="writeable float32"):
        degrade.make_consistent(hr.astype(np.float64), np.zeros((4, 6, 5), np.float32), 2, (0, 1, 2))
