"""Tests for sr3d.baselines: cv2 interpolation baselines on (D, H, W) volumes.

Golden values come from np.repeat, closed forms (constants, linear ramps),
kernel weights written out by hand, and direct cv2.resize calls on 2D slices
and (D, W) planes; the real-scan test checks the ordering the paper reports.
"""
import cv2
import nibabel as nib
import numpy as np
import pytest

from sr3d import baselines, degrade

_CV2_FLAGS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
              "lanczos": cv2.INTER_LANCZOS4}


def _volume(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_nearest_repeats_each_voxel(scale):
    lr = _volume((3, 4, 5))
    expected = np.repeat(np.repeat(np.repeat(lr, scale, 0), scale, 1), scale, 2)
    np.testing.assert_array_equal(baselines.upscale(lr, scale, "nearest", "3d"), expected)
    np.testing.assert_array_equal(baselines.upscale(lr, scale, "nearest", "2d"),
                                  np.repeat(np.repeat(lr, scale, 1), scale, 2))
    # cv2 INTER_NEAREST (src = floor(i / r)) agrees for integer scales.
    np.testing.assert_array_equal(
        cv2.resize(lr[1], (5 * scale, 4 * scale), interpolation=cv2.INTER_NEAREST),
        expected[scale])


@pytest.mark.parametrize("method", baselines.METHODS)
@pytest.mark.parametrize("mode", degrade.MODES)
def test_constants_are_preserved_and_shapes_are_exact(method, mode):
    lr = np.full((5, 6, 7), -321.5, np.float32)
    out = baselines.upscale(lr, 3, method, mode)
    assert out.shape == ((15, 18, 21) if mode == "3d" else (5, 18, 21))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, -321.5, rtol=1e-6)


def _ramp(shape):
    d, h, w = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    return 0.5 * d + 2.0 * h - 1.0 * w + 3.0


def _sources(n, scale):
    """cv2 source coordinates of the scale * n outputs: (i + 0.5) / scale - 0.5."""
    return (np.arange(scale * n) + 0.5) / scale - 0.5


@pytest.mark.parametrize("scale", [2, 3])
def test_bilinear_linear_ramp_is_exact_in_the_interior(scale):
    # Linear interpolation reproduces a linear function wherever both taps
    # (floor(src), floor(src) + 1) are inside; replicated borders bend the
    # ramp elsewhere. (cv2's Keys a = -0.75 cubic does not reproduce ramps:
    # only a = -0.5 does, so bicubic is checked by its weights below.)
    shape = (6, 7, 8)
    out = baselines.upscale(_ramp(shape).astype(np.float32), scale, "bilinear", "3d")
    src = [_sources(n, scale) for n in shape]
    inside = [(s >= 0) & (np.floor(s) + 1 <= n - 1) for s, n in zip(src, shape)]
    sd, sh, sw = np.meshgrid(*(s[m] for s, m in zip(src, inside)), indexing="ij")
    expected = 0.5 * sd + 2.0 * sh - 1.0 * sw + 3.0
    np.testing.assert_allclose(out[np.ix_(*inside)], expected, rtol=0, atol=1e-5)


def _keys(x, a):
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1,
                    np.where(x < 2, a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a, 0.0))


def _lanczos4(x):
    return np.sinc(x) * np.sinc(x / 4)


@pytest.mark.parametrize("method, kernel, taps", [
    ("bicubic", lambda x: _keys(x, -0.75), 2),   # cv2 INTER_CUBIC: Keys a = -0.75
    ("lanczos", _lanczos4, 4),                   # cv2 INTER_LANCZOS4: a = 4, normalised
])
def test_kernel_weights_by_hand(method, kernel, taps):
    lr = np.random.default_rng(1).normal(size=20).astype(np.float32)
    out = baselines.upscale_axes(lr, 2, method, axes=(0,))
    for i in (12, 13):                       # interior outputs, both phases
        src = (i + 0.5) / 2 - 0.5
        j = np.arange(np.floor(src) - taps + 1, np.floor(src) + taps + 1).astype(int)
        weights = kernel(src - j)
        expected = np.sum(weights / weights.sum() * lr[j].astype(np.float64))
        np.testing.assert_allclose(out[i], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos"])
def test_2d_equals_cv2_resize_of_each_slice(method):
    lr = _volume((4, 9, 11))
    out = baselines.upscale(lr, 3, method, "2d")
    expected = np.stack([cv2.resize(s, (33, 27), interpolation=_CV2_FLAGS[method]) for s in lr])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos"])
def test_depth_axis_equals_cv2_resize_of_each_dw_plane(method):
    # Independent computation: for every row h, cv2.resize of the (D, W)
    # plane along D only. cv2's SIMD and scalar column paths round cubic and
    # Lanczos sums differently (by 1 float32 ulp, measured), and which path a
    # column takes depends on the image width, so allow 2 ulp of the data.
    lr = _volume((10, 6, 13), seed=2)
    out = baselines.upscale_axes(lr, 2, method, axes=(0,))
    expected = np.stack([cv2.resize(np.ascontiguousarray(lr[:, h, :]), (13, 20),
                                    interpolation=_CV2_FLAGS[method]) for h in range(6)], axis=1)
    assert out.shape == (20, 6, 13)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2 * np.spacing(np.abs(expected).max()))


def test_3d_is_slices_then_depth():
    lr = _volume((5, 8, 7), seed=3)
    flag = cv2.INTER_LANCZOS4
    in_plane = np.stack([cv2.resize(s, (14, 16), interpolation=flag) for s in lr])
    expected = np.stack([cv2.resize(np.ascontiguousarray(in_plane[:, h, :]), (14, 10),
                                    interpolation=flag) for h in range(16)], axis=1)
    # 2 ulp: see test_depth_axis_equals_cv2_resize_of_each_dw_plane.
    np.testing.assert_allclose(baselines.upscale(lr, 2, "lanczos", "3d"), expected,
                               rtol=0, atol=2 * np.spacing(np.abs(expected).max()))


def test_upscale_axes_other_axes_and_dtype():
    lr = _volume((3, 4, 5), seed=4).astype(np.float64)
    out = baselines.upscale_axes(lr, 2, "bilinear", axes=(2,))
    assert out.shape == (3, 4, 10) and out.dtype == np.float32
    expected = np.stack([cv2.resize(s.astype(np.float32), (10, 4), interpolation=cv2.INTER_LINEAR)
                         for s in lr])
    np.testing.assert_array_equal(out, expected)


def test_rejects_bad_arguments():
    lr = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="nearest.*bilinear.*bicubic.*lanczos"):
        baselines.upscale(lr, 2, "spline")
    with pytest.raises(ValueError, match="2d.*3d"):
        baselines.upscale(lr, 2, "bicubic", mode="1d")
    with pytest.raises(ValueError, match="scale must be an integer"):
        baselines.upscale(lr, 1.5, "bicubic")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        baselines.upscale(lr[0], 2, "bicubic")
    with pytest.raises(ValueError, match="out of range"):
        baselines.upscale_axes(lr, 2, "bicubic", axes=(3,))


def _psnr(hr, sr):
    peak = float(hr.max())
    mse = np.mean((hr.astype(np.float64) - sr.astype(np.float64)) ** 2)
    return 10 * np.log10(peak ** 2 / mse)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_real_scans_rank_lanczos_bicubic_bilinear_nearest(ixi_files, mode, scale):
    # The ordering of the paper's baselines on real T1 MRI (volume PSNR, peak =
    # max of the HR, no border shave). Seen at 2x: lanczos leads bicubic by
    # 0.15-0.25 dB, bicubic bilinear by 0.7-1.0 dB, bilinear nearest by 0.1-0.3 dB.
    assert len(ixi_files) == 8
    for path in ixi_files:
        volume = nib.load(path).get_fdata(dtype=np.float32).transpose(2, 1, 0)
        hr, lr = degrade.simulate_lr(volume, scale, mode)
        psnr = {m: _psnr(hr, baselines.upscale(lr, scale, m, mode)) for m in baselines.METHODS}
        assert psnr["lanczos"] > psnr["bicubic"] > psnr["bilinear"] > psnr["nearest"], (path, psnr)
