"""Tests for sr3d.metrics against independent references.

IFC: golden values of the original MATLAB code (LIVE ifcvec.m run in Octave; the table in ../shared/docs/metrics.md).
SSIM, PSNR: scikit-image and hand arithmetic, on real MRI and CT slices.
"""
import math

import cv2
import nibabel as nib
import numpy as np
import pytest
import skimage.data
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr3d import metrics

CT_WINDOW_HU = (-1024.0, 3071.0)


def _down_up(image: np.ndarray, scale: int, interpolation: int) -> np.ndarray:
    """du() of docs/metrics.md: cv2.resize down by `scale` and back, rounded, clipped to 0..255."""
    height, width = image.shape
    small = cv2.resize(image, (width // scale, height // scale), interpolation=interpolation)
    restored = cv2.resize(small, (width, height), interpolation=interpolation)
    return np.clip(np.round(restored), 0, 255)


def _camera() -> np.ndarray:
    return skimage.data.camera().astype(np.float64)


def _phantom() -> np.ndarray:
    return np.clip(skimage.data.shepp_logan_phantom() * 255, 0, 255)


@pytest.fixture(scope="module")
def ixi_slices(ixi_files) -> np.ndarray:
    """16 central axial slices of a real T1 MRI, float64 (16, 120, 120), scanner units."""
    volume = np.moveaxis(nib.load(ixi_files[-1]).get_fdata(), 2, 0)
    middle = volume.shape[0] // 2
    return volume[middle - 8:middle + 8]


@pytest.fixture(scope="module")
def ct_slices(shared_data) -> np.ndarray:
    """16 central slices of a real abdominal CT, float64 (16, 122, 101), Hounsfield units."""
    volume = nib.load(shared_data / "totalseg-ct" / "example_ct.nii.gz").get_fdata()
    volume = np.moveaxis(volume, 2, 0)
    middle = volume.shape[0] // 2
    return volume[middle - 8:middle + 8]


def _distort(stack: np.ndarray, kind: str, data_range: float) -> np.ndarray:
    """Blurred, noisy, or downscaled-upscaled copy of a (D, H, W) stack."""
    if kind == "blur":
        return ndimage.gaussian_filter(stack, sigma=(0, 1.2, 1.2))
    if kind == "noise":
        return stack + np.random.default_rng(0).normal(0.0, 0.03 * data_range, stack.shape)
    height, width = stack.shape[1:]
    small = [cv2.resize(s, (width // 2, height // 2), interpolation=cv2.INTER_AREA) for s in stack]
    return np.stack([cv2.resize(s, (width, height), interpolation=cv2.INTER_CUBIC) for s in small])


def _real_pair(request, dataset: str, kind: str) -> tuple[np.ndarray, np.ndarray, float]:
    if dataset == "ixi":
        reference = request.getfixturevalue("ixi_slices")
        data_range = float(reference.max() - reference.min())
    else:
        reference = request.getfixturevalue("ct_slices")
        data_range = CT_WINDOW_HU[1] - CT_WINDOW_HU[0]
    return reference, _distort(reference, kind, data_range), data_range


# --- IFC ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_pair, expected", [
    (lambda: (_camera(), _down_up(_camera(), 2, cv2.INTER_CUBIC)), 4.4733045911),
    (lambda: (_camera(), _down_up(_camera(), 4, cv2.INTER_LANCZOS4)), 1.0635287652),
    (lambda: (_camera()[3:254, 10:320], _down_up(_camera(), 2, cv2.INTER_CUBIC)[3:254, 10:320]),
     4.6719083047),
    (lambda: (_phantom(), _down_up(_phantom(), 2, cv2.INTER_CUBIC)), 1.9283544865),
    (lambda: (_camera(), 0.7 * cv2.GaussianBlur(_camera(), (0, 0), 1.5) + 20), 3.5331718857),
], ids=["camera-cubic-x2", "camera-lanczos-x4", "camera-odd-crop", "phantom-cubic-x2",
        "camera-blur-gain-offset"])
def test_ifc_matches_matlab_golden_values(make_pair, expected):
    reference, test = make_pair()
    np.testing.assert_allclose(metrics.ifc(reference, test), expected, rtol=1e-6, atol=0)


def test_ifc_is_largest_for_identical_and_falls_with_blur(ixi_slices):
    reference = ixi_slices[8]
    values = [metrics.ifc(reference, ndimage.gaussian_filter(reference, sigma) if sigma else reference)
              for sigma in (0.0, 0.5, 1.0, 2.0, 3.0)]
    assert np.all(np.isfinite(values))
    assert np.all(np.diff(values) < 0), f"IFC should fall as blur grows, got {values}"


def test_ifc_accepts_72_pixels_and_refuses_smaller():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.uniform(0, 255, (72, 90)), 1.0)
    noisy = image + rng.normal(0, 5, image.shape)
    assert metrics.ifc(image, noisy) > 0
    with pytest.raises(ValueError, match=">= 72"):
        metrics.ifc(image[:71], noisy[:71])
    with pytest.raises(ValueError, match=">= 72"):
        metrics.ifc(image[:, :71], noisy[:, :71])


def test_ifc_of_an_edge_image_is_finite_and_a_constant_reference_is_refused():
    """A vertical edge makes some subband covariances singular, where ifcvec.m gives NaN."""
    edge = np.zeros((96, 120))
    edge[:, 60:] = 200.0
    blurred = ndimage.gaussian_filter(edge, 2.0)
    exact, degraded = metrics.ifc(edge, edge), metrics.ifc(edge, blurred)
    assert np.isfinite(exact) and exact > degraded > 0
    with pytest.raises(ValueError, match="constant"):
        metrics.ifc(np.full((80, 80), 3.0), blurred[:80, :80])


def test_ifc_refuses_volumes_and_mismatched_shapes():
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 1, (2, 80, 80))
    with pytest.raises(ValueError, match="2D"):
        metrics.ifc(volume, volume)
    with pytest.raises(ValueError, match="same shape"):
        metrics.ifc(volume[0], volume[0, :79])


# --- SSIM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["ixi", "ct"])
@pytest.mark.parametrize("kind", ["blur", "noise", "down-up"])
def test_ssim_matches_scikit_image_on_real_slices(request, dataset, kind):
    reference, test, data_range = _real_pair(request, dataset, kind)
    wang = [structural_similarity(r, t, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for r, t in zip(reference, test)]
    uniform = [structural_similarity(r, t, data_range=data_range) for r, t in zip(reference, test)]

    np.testing.assert_allclose(metrics.ssim(reference, test, data_range), np.mean(wang),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics.ssim(reference, test, data_range, gaussian=False),
                               np.mean(uniform), rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics.ssim(reference[3], test[3], data_range), wang[3],
                               rtol=0, atol=1e-6)


def test_ssim_crop_border_equals_scoring_the_cropped_slice(ixi_slices):
    reference = ixi_slices[5]
    test = ndimage.gaussian_filter(reference, 1.0)
    data_range = float(reference.max())
    expected = structural_similarity(reference[4:-4, 4:-4], test[4:-4, 4:-4], data_range=data_range,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    np.testing.assert_allclose(metrics.ssim(reference, test, data_range, crop_border=4), expected,
                               rtol=0, atol=1e-6)


def test_ssim_of_identical_images_is_one_and_small_images_are_refused(ct_slices):
    np.testing.assert_allclose(metrics.ssim(ct_slices, ct_slices, 4095.0), 1.0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(ct_slices[0, :10, :50], ct_slices[0, :10, :50], 4095.0)
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(ct_slices, ct_slices, 0.0)


# --- PSNR --------------------------------------------------------------------------------------

def test_psnr_hand_arithmetic_and_volume_mse():
    reference = np.zeros((2, 10, 10))
    test = reference.copy()
    test[0] += 1.0  # slice MSE 1
    test[1] += 2.0  # slice MSE 4: volume MSE (1 + 4) / 2 = 2.5, not the mean of per-slice PSNR
    np.testing.assert_allclose(metrics.psnr(reference, test, 255.0), 10 * math.log10(255 ** 2 / 2.5),
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(metrics.psnr(reference[0], test[0], 1.0), 0.0, rtol=0, atol=1e-12)


def test_psnr_matches_scikit_image_on_real_ct(ct_slices):
    test = _distort(ct_slices, "noise", 4095.0)
    np.testing.assert_allclose(metrics.psnr(ct_slices, test, 4095.0),
                               peak_signal_noise_ratio(ct_slices, test, data_range=4095.0),
                               rtol=1e-12, atol=0)


def test_psnr_crop_border_and_identical_images():
    reference = np.zeros((12, 12))
    test = reference.copy()
    test[:2, :] = 7.0  # errors only in the two top rows
    assert metrics.psnr(reference, test, 255.0, crop_border=2) == math.inf
    np.testing.assert_allclose(metrics.psnr(reference, test, 255.0),
                               10 * math.log10(255 ** 2 / (49.0 * 24 / 144)), rtol=1e-12, atol=0)


def test_psnr_refuses_bad_input():
    image = np.ones((8, 8))
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(image, image, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(image, image[:7], 1.0)
    with pytest.raises(ValueError, match="crop_border"):
        metrics.psnr(image, image, 1.0, crop_border=4)
    with pytest.raises(ValueError, match="NaN"):
        metrics.psnr(image, np.full((8, 8), np.nan), 1.0)


# --- per_slice ---------------------------------------------------------------------------------

def test_per_slice_along_each_axis_matches_scikit_image(ct_slices):
    test = _distort(ct_slices, "blur", 4095.0)
    for axis in (0, 1, 2):
        expected = [peak_signal_noise_ratio(np.take(ct_slices, i, axis), np.take(test, i, axis),
                                            data_range=4095.0) for i in range(ct_slices.shape[axis])]
        values = metrics.per_slice(metrics.psnr, ct_slices, test, axis=axis, data_range=4095.0)
        assert values.shape == (ct_slices.shape[axis],)
        np.testing.assert_allclose(values, expected, rtol=1e-12, atol=0)
    expected_ssim = [structural_similarity(r, t, data_range=4095.0) for r, t in zip(ct_slices, test)]
    np.testing.assert_allclose(
        metrics.per_slice(metrics.ssim, ct_slices, test, data_range=4095.0, gaussian=False),
        expected_ssim, rtol=0, atol=1e-6)


# --- protocols ---------------------------------------------------------------------------------

def test_protocols_validate_their_fields():
    with pytest.raises(ValueError, match="data_range"):
        metrics.Protocol(name="float")
    with pytest.raises(ValueError, match="lo < hi"):
        metrics.float_protocol((100.0, 100.0))
    with pytest.raises(ValueError, match="takes no data_range"):
        metrics.Protocol(name="paper", data_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="'float' or 'paper'"):
        metrics.Protocol(name="hu")
    with pytest.raises(ValueError, match="crop_border"):
        metrics.paper_protocol(crop_border=-1)
    protocol = metrics.float_protocol((-1024, 3071), crop_border=4)
    assert protocol.data_range == (-1024.0, 3071.0)
    assert protocol == metrics.Protocol("float", (-1024.0, 3071.0), 4, True)


def test_describe_states_range_averaging_crop_and_ssim_variant():
    float_text = metrics.float_protocol((-1024, 3071), crop_border=4).describe()
    for fact in ("[-1024, 3071]", "[0, 1]", "L = 1", "all voxels", "Gaussian", "constant", "4 px"):
        assert fact in float_text, f"{fact!r} missing from {float_text!r}"
    paper_text = metrics.paper_protocol(with_ifc=False).describe()
    for fact in ("8 bits", "min/max", "255", "100 dB", "7x7 uniform", "no IFC", "no border crop"):
        assert fact in paper_text, f"{fact!r} missing from {paper_text!r}"


def _volume_with_background_slice(ixi_slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6 real slices, the second all zero (background); the test blurred, with overshoot."""
    reference = ixi_slices[5:11].copy()
    reference[1] = 0.0
    test = ndimage.gaussian_filter(reference, sigma=(0, 1.0, 1.0)) * 1.1 - 50.0
    return reference, test


def test_score_volume_float_protocol(ixi_slices):
    reference, test = _volume_with_background_slice(ixi_slices)
    lo, hi = 0.0, 4000.0  # narrower than the data: clipping is exercised on both volumes
    result = metrics.score_volume(reference, test, metrics.float_protocol((lo, hi), crop_border=2))

    ref01 = np.clip((reference - lo) / (hi - lo), 0, 1)[:, 2:-2, 2:-2]
    test01 = np.clip((test - lo) / (hi - lo), 0, 1)[:, 2:-2, 2:-2]
    kept = [0, 2, 3, 4, 5]
    expected_ssim = [structural_similarity(ref01[i], test01[i], data_range=1.0, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False) for i in kept]
    expected_psnr = [peak_signal_noise_ratio(ref01[i], test01[i], data_range=1.0) for i in kept]
    # IFC itself is pinned by the golden values above; here only the averaging is checked.
    expected_ifc = [metrics.ifc(ref01[i], test01[i]) for i in kept]

    assert result["n_slices"] == 5 and result["slice_indices"] == kept
    np.testing.assert_allclose(result["psnr"], peak_signal_noise_ratio(ref01, test01, data_range=1.0),
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["per_slice"]["psnr"], expected_psnr, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["per_slice"]["ssim"], expected_ssim, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["ssim"], np.mean(expected_ssim), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["per_slice"]["ifc"], expected_ifc, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["ifc"], np.mean(expected_ifc), rtol=1e-12, atol=0)
    assert result["protocol"] == metrics.float_protocol((lo, hi), crop_border=2).describe()


def _authors_8bit(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(np.round((image - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def test_score_volume_paper_protocol_matches_the_authors_recipe(ixi_slices):
    reference, test = _volume_with_background_slice(ixi_slices)
    test[3] = reference[3]  # an exact slice: infinite PSNR, reported as 100 dB
    result = metrics.score_volume(reference, test, metrics.paper_protocol())

    kept = [0, 2, 3, 4, 5]
    expected_psnr, expected_ssim, expected_ifc = [], [], []
    for i in kept:
        low, high = reference[i].min(), reference[i].max()
        ref8, test8 = _authors_8bit(reference[i], low, high), _authors_8bit(test[i], low, high)
        value = peak_signal_noise_ratio(ref8, test8, data_range=255) if i != 3 else 100.0
        expected_psnr.append(value)
        expected_ssim.append(structural_similarity(ref8, test8))  # uint8: skimage's defaults, L = 255
        expected_ifc.append(metrics.ifc(ref8.astype(np.float64), test8.astype(np.float64)))

    assert result["n_slices"] == 5 and result["slice_indices"] == kept
    np.testing.assert_allclose(result["per_slice"]["psnr"], expected_psnr, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["psnr"], np.mean(expected_psnr), rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["per_slice"]["ssim"], expected_ssim, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["ssim"], np.mean(expected_ssim), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["ifc"], np.mean(expected_ifc), rtol=1e-12, atol=0)


def test_score_volume_without_ifc_on_many_slices(ct_slices):
    """36 slices, one of them air only: slices are processed in groups, indices must survive."""
    reference = np.concatenate([ct_slices, ct_slices[::-1], ct_slices[:4]]).astype(np.float32)
    reference[20] = -1024.0
    test = _distort(reference.astype(np.float64), "down-up", 4095.0).astype(np.float32)
    result = metrics.score_volume(reference, test, metrics.float_protocol(CT_WINDOW_HU, with_ifc=False))

    lo, hi = CT_WINDOW_HU
    ref01 = np.clip((reference.astype(np.float64) - lo) / (hi - lo), 0, 1)
    test01 = np.clip((test.astype(np.float64) - lo) / (hi - lo), 0, 1)
    kept = [i for i in range(reference.shape[0]) if i != 20]
    expected_ssim = [structural_similarity(ref01[i], test01[i], data_range=1.0, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False) for i in kept]
    assert result["ifc"] is None and result["per_slice"]["ifc"] is None
    assert result["slice_indices"] == kept and result["n_slices"] == len(kept)
    np.testing.assert_allclose(result["per_slice"]["ssim"], expected_ssim, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["psnr"], peak_signal_noise_ratio(ref01, test01, data_range=1.0),
                               rtol=1e-12, atol=0)


def test_score_volume_refuses_bad_input(ct_slices):
    test = _distort(ct_slices, "down-up", 4095.0)

    with pytest.raises(ValueError, match="with_ifc=False"):
        metrics.score_volume(ct_slices[:, :70], test[:, :70], metrics.paper_protocol())
    with pytest.raises(ValueError, match="same shape"):
        metrics.score_volume(ct_slices, test[:-1], metrics.paper_protocol())
    with pytest.raises(ValueError, match="constant"):
        metrics.score_volume(np.zeros((3, 80, 80)), np.ones((3, 80, 80)), metrics.paper_protocol())
    with pytest.raises(ValueError, match="Protocol"):
        metrics.score_volume(ct_slices, test, "paper")
