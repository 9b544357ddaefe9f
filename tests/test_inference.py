"""Tests for sr3d/inference.py: tiling, self-ensemble, the 3D pipeline, geometry, bundles, errors.

Golden values come from the stage networks called directly through Keras on hand-transformed
inputs (`_hand_*` below), written from the definitions in the module docstring, never from
sr3d.inference itself. The models are random-weight networks with 4 filters (the shipped ones
are trained separately); what is checked here is the plumbing around them.
"""
import json
import re

import keras
import nibabel as nib
import numpy as np
import pytest

import sr3d
from sr3d import degrade, inference, intensity, models
from sr3d import io as sr3d_io

CROP = (slice(40, 50), slice(40, 80), slice(40, 76))   # 10 x 40 x 36 voxels (D, H, W) of an IXI T1


def _bundle(scale: int, seed: int = 0) -> models.ModelBundle:
    keras.utils.set_random_seed(seed)
    return models.ModelBundle(models.build("hw", scale, filters=4), models.build("d", scale, filters=4), scale)


@pytest.fixture(scope="module")
def bundles():
    return {2: _bundle(2), 3: _bundle(3)}


@pytest.fixture(scope="module")
def ixi_volume(ixi_files, scan_crop):
    """A 10 x 40 x 36 crop of a real IXI T1 scan with the crop's own affine (origin moved)."""
    return scan_crop(ixi_files[0], CROP)


@pytest.fixture(scope="module")
def ixi_normalised(ixi_volume):
    return intensity.window(ixi_volume.array).normalise(ixi_volume.array)


# ---------------------------------------------------------------------------- hand computations

def _net(model, images: np.ndarray) -> np.ndarray:
    """Keras model on a (N, h, w) batch -> (N, h', w')."""
    return model(np.ascontiguousarray(images[..., None], np.float32), training=False)["final"].numpy()[..., 0]


# The 8 symmetries of the square on axes (1, 2) of a (N, h, w) batch, each with its inverse.
_DIHEDRAL = [
    (lambda a: a, lambda a: a),
    (lambda a: np.rot90(a, 1, (1, 2)), lambda a: np.rot90(a, -1, (1, 2))),
    (lambda a: np.rot90(a, 2, (1, 2)), lambda a: np.rot90(a, 2, (1, 2))),
    (lambda a: np.rot90(a, 3, (1, 2)), lambda a: np.rot90(a, 1, (1, 2))),
    (lambda a: a[:, ::-1, :], lambda a: a[:, ::-1, :]),
    (lambda a: a[:, :, ::-1], lambda a: a[:, :, ::-1]),
    (lambda a: a.transpose(0, 2, 1), lambda a: a.transpose(0, 2, 1)),
    (lambda a: a[:, ::-1, ::-1].transpose(0, 2, 1), lambda a: a[:, ::-1, ::-1].transpose(0, 2, 1)),
]
# The 4 flips of a (N, d, w) batch of depth planes: they keep the depth axis 1 in place.
_DEPTH_FLIPS = [lambda a: a, lambda a: a[:, ::-1, :], lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, ::-1]]


def _hand_hw(model, slices: np.ndarray, ensemble: bool) -> np.ndarray:
    if not ensemble:
        return _net(model, slices)
    return np.median([inverse(_net(model, forward(slices))) for forward, inverse in _DIHEDRAL], axis=0)


def _hand_d(model, planes: np.ndarray, ensemble: bool) -> np.ndarray:
    if not ensemble:
        return _net(model, planes)
    return np.median([flip(_net(model, flip(planes))) for flip in _DEPTH_FLIPS], axis=0)


def _hand_3d(bundle, x: np.ndarray, ensemble: bool = False, planes: str = "dw") -> np.ndarray:
    """Stage hw on every (H, W) slice, then stage d on every (D, rW) plane (and (D, rH) plane)."""
    hw = _hand_hw(bundle.hw, x, ensemble)                                          # (D, rH, rW)
    # Plane y of the batch is hw[:, y, :], of shape (D, rW); its output is row y of the result.
    per_row = _hand_d(bundle.d, hw.transpose(1, 0, 2), ensemble).transpose(1, 0, 2)
    if planes == "dw":
        return per_row
    # Plane x of the batch is hw[:, :, x], of shape (D, rH); its output is column x of the result.
    per_col = _hand_d(bundle.d, hw.transpose(2, 0, 1), ensemble).transpose(1, 2, 0)
    return (per_row + per_col) / 2


def _consistent(y: np.ndarray, lr: np.ndarray, scale: int, axes) -> np.ndarray:
    """Golden for the consistency step, computed another way than sr3d.degrade.make_consistent:
    y plus the Moore-Penrose pseudo-inverse (numpy, by SVD) of each axis's degradation matrix
    applied to the LR residual; the residual from the float64 downscale."""
    residual = np.asarray(lr, np.float64) - degrade.downscale(np.asarray(y, np.float64), scale, axes)
    for axis in axes:
        pinv = np.linalg.pinv(degrade._imresize_weights(y.shape[axis], scale))
        residual = np.moveaxis(np.tensordot(pinv, residual, axes=([1], [axis])), 0, axis)
    return y + residual


class _Bands:
    """Progress callback that remembers what was reported, per unit."""

    def __init__(self):
        self.calls = []

    def __call__(self, step):
        self.calls.append((step.unit, step.done, step.total))

    def counts(self, unit):
        return [done for u, done, _ in self.calls if u == unit]

    def totals(self, unit):
        return {total for u, _, total in self.calls if u == unit}

    @property
    def total(self):
        """The number of bands: reported as 0 before the first and after each."""
        band_calls = self.counts("bands")
        assert band_calls == list(range(len(band_calls)))
        return band_calls[-1]


# ---------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("scale", [2, 3])
def test_tiled_equals_untiled(bundles, ixi_normalised, scale, mode, ensemble):
    bundle = bundles[scale]
    bands = _Bands()
    tiled = inference.upscale_normalised(ixi_normalised, bundle, mode=mode, ensemble=ensemble,
                                         tile_mb=0.2, progress=bands)
    whole = inference.upscale_normalised(ixi_normalised, bundle, mode=mode, ensemble=ensemble, tile_mb=None)
    assert 2 < bands.total < ixi_normalised.shape[1], "the budget should give several multi-row bands"
    d, h, w = ixi_normalised.shape
    assert whole.shape == ((scale * d if mode == "3d" else d), scale * h, scale * w)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)


def test_one_row_bands_equal_untiled(bundles, ixi_normalised):
    bands = _Bands()
    tiled = inference.upscale_normalised(ixi_normalised, bundles[2], tile_mb=1e-6, batch_size=3, progress=bands)
    assert bands.total == ixi_normalised.shape[1]
    np.testing.assert_allclose(tiled, inference.upscale_normalised(ixi_normalised, bundles[2], tile_mb=None),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, planes, ensemble", [("3d", "dw", False), ("3d", "both", True), ("2d", "dw", False)])
def test_progress_counts_slices_and_planes_to_their_totals(bundles, ixi_normalised, mode, planes, ensemble):
    d, h, w = ixi_normalised.shape
    calls = _Bands()
    inference.upscale_normalised(ixi_normalised, bundles[2], mode=mode, planes=planes, ensemble=ensemble,
                                 tile_mb=0.2 if planes == "dw" else None, batch_size=3, progress=calls)
    n_bands = calls.total
    # Stage hw runs the band's rows of every slice, in network calls of at most 3 slices.
    expected = {"slices": d * n_bands}
    if mode == "3d":  # stage d: one (D, rW) plane per output row, and with "both" one (D, rH) per column
        expected["planes"] = 2 * h + (2 * w if planes == "both" else 0)
    assert {u for u, _, _ in calls.calls} == {"bands", *expected}
    for unit, total in expected.items():
        counts = calls.counts(unit)
        assert calls.totals(unit) == {total}
        assert counts[-1] == total
        steps = np.diff([0] + counts)
        assert steps.min() >= 1 and steps.max() <= 3, f"{unit}: one call per batch of at most 3 planes"
    assert n_bands > 1 if planes == "dw" else n_bands == 1, "the dw cases should run several bands"


# ---------------------------------------------------------------------------- pipeline and ensemble

def test_3d_pipeline_equals_hand_composition(bundles, ixi_normalised):
    x = ixi_normalised[:4, :12, :10]
    expected = _hand_3d(bundles[2], x)
    assert expected.shape == (8, 24, 20)
    np.testing.assert_allclose(inference.upscale_normalised(x, bundles[2]), expected, rtol=0, atol=1e-5)


def test_2d_mode_is_stage_hw_on_every_slice(bundles, ixi_normalised):
    expected = _net(bundles[3].hw, ixi_normalised)
    out = inference.upscale_normalised(ixi_normalised, bundles[3], mode="2d", tile_mb=0.2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_self_ensemble_2d_is_median_of_8_dihedral_transforms(bundles, ixi_normalised):
    x = ixi_normalised[:3]
    expected = _hand_hw(bundles[2].hw, x, ensemble=True)
    out = inference.upscale_normalised(x, bundles[2], mode="2d", ensemble=True)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    plain = inference.upscale_normalised(x, bundles[2], mode="2d")
    assert np.abs(out - plain).max() > 1e-3, "the ensemble should change a random network's output"


def test_self_ensemble_3d_uses_4_depth_flips_in_stage_d(bundles, ixi_normalised):
    x = ixi_normalised[:4, :10, :12]
    expected = _hand_3d(bundles[2], x, ensemble=True)
    out = inference.upscale_normalised(x, bundles[2], ensemble=True)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_planes_both_averages_dw_and_dh_passes(bundles, ixi_normalised):
    x = ixi_normalised[:4, :10, :12]
    both = inference.upscale_normalised(x, bundles[2], planes="both")
    np.testing.assert_allclose(both, _hand_3d(bundles[2], x, planes="both"), rtol=0, atol=1e-5)
    dw = inference.upscale_normalised(x, bundles[2], planes="dw")
    assert np.abs(both - dw).max() > 1e-3


def test_planes_all_averages_the_cascade_over_three_orientations(bundles, ixi_normalised):
    # Golden: the hand-composed cascade with each axis once as depth, moved back and averaged.
    x = ixi_normalised[:6, :10, :8]
    passes = [_hand_3d(bundles[2], np.ascontiguousarray(x.transpose(order))).transpose(np.argsort(order))
              for order in ((0, 1, 2), (1, 0, 2), (2, 0, 1))]
    expected = (passes[0] + passes[1] + passes[2]) / 3
    out = inference.upscale_normalised(x, bundles[2], planes="all")
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert out.shape == (12, 20, 16) and np.abs(out - passes[0]).max() > 1e-3
    calls = _Bands()
    tiled = inference.upscale_normalised(x, bundles[2], planes="all", tile_mb=0.05, batch_size=2, progress=calls)
    np.testing.assert_allclose(tiled, out, rtol=0, atol=1e-5)
    for unit in ("slices", "planes"):   # one bar over the three passes: fractions rise to 1
        fractions = [done / total for u, done, total in calls.calls if u == unit]
        assert np.all(np.diff(fractions) >= 0) and fractions[-1] == 1.0


def test_orientation_fusion_weighs_each_direction_by_the_passes_that_resolved_it():
    # Golden, by hand: three passes that agree but for one plane wave each, exactly periodic on the
    # grid. Pass j ran stage d along axis j; a wave along axis a has share 1 on a and 0 elsewhere,
    # so its weight in pass j is e^-beta / (e^-beta + 2) if a == j, else 1 / (e^-beta + 2). A wave
    # along the (1, 1, 1) diagonal with equal shares gets 1/3 in every pass.
    beta = 2.5
    shape = (8, 12, 16)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    base = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    along = [np.cos(2 * np.pi * 2 * grid[0] / 8), np.cos(2 * np.pi * 3 * grid[1] / 12),
             np.sin(2 * np.pi * 2 * grid[2] / 16)]
    diagonal = np.cos(2 * np.pi * (2 * grid[0] / 8 + 3 * grid[1] / 12 + 4 * grid[2] / 16))  # 1/4 cycle on each
    passes = [(base + along[0] + 0.5 * along[1] + 0.3 * diagonal).astype(np.float32),
              (base + along[1]).astype(np.float32), (base - 0.7 * along[2]).astype(np.float32)]
    own, other = np.exp(-beta) / (np.exp(-beta) + 2), 1 / (np.exp(-beta) + 2)
    expected = (base + own * along[0] + (0.5 * other + own) * along[1] - 0.7 * own * along[2]
                + 0.3 / 3 * diagonal)
    fused = inference.fuse_orientations(iter(passes), beta)
    np.testing.assert_allclose(fused, expected, rtol=0, atol=2e-5)
    assert fused.dtype == np.float32 and fused.shape == shape
    # beta 0 is the plain mean, to the bit; passes that agree pass unchanged at any beta.
    np.testing.assert_array_equal(inference.fuse_orientations(iter(passes), 0.0),
                                  (passes[0] + passes[1] + passes[2]) / np.float32(3))
    np.testing.assert_allclose(inference.fuse_orientations(iter([base] * 3), beta), base, rtol=0, atol=2e-5)


def test_planes_all_fuses_with_the_bundles_beta(tmp_path, tiny_bundle_dir, ixi_normalised):
    # Golden: the hand-composed passes (as above) fused by fuse_orientations with the bundle.json beta.
    x = ixi_normalised[:6, :10, :8]
    for name in ("hw.keras", "d.keras"):
        (tmp_path / name).write_bytes((tiny_bundle_dir / name).read_bytes())
    (tmp_path / "bundle.json").write_text(json.dumps({"scale": 2, "orientation_fusion": {"beta": 3.0}}))
    bundle = models.load_models(tmp_path, scale=2)
    passes = [_hand_3d(bundle, np.ascontiguousarray(x.transpose(order))).transpose(np.argsort(order))
              for order in ((0, 1, 2), (1, 0, 2), (2, 0, 1))]
    out = inference.upscale_normalised(x, bundle, planes="all")
    np.testing.assert_allclose(out, inference.fuse_orientations(iter(passes), 3.0), rtol=0, atol=1e-5)
    assert np.abs(out - (passes[0] + passes[1] + passes[2]) / 3).max() > 1e-4
    for bad in ({"beta": -1}, {"beta": "2"}, {"beta": True}, [2.5], {}):
        (tmp_path / "bundle.json").write_text(json.dumps({"scale": 2, "orientation_fusion": bad}))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bundle.json'}: orientation_fusion must be")):
            models.load_models(tmp_path, scale=2)


def test_the_shipped_fusion_beats_the_plain_mean_on_a_real_scan(shared_data, scan_crop):
    # Golden: the 1 mm truth of a stroke T1 (a site the shipped models never trained on), downscaled
    # x2 along every axis as in evaluate.py; the shipped x2 beta was chosen on other scans
    # (experiments/orientation_fusion.py, train and validation split).
    from sr3d import metrics

    truth = scan_crop(shared_data / "stroke-t1-t2-flair" / "T1.nii.gz", np.s_[60:84, 50:98, 40:88]).array
    lr = degrade.downscale(truth, 2, axes=(0, 1, 2))
    window = intensity.window(lr)
    shipped = models.load_models(None, 2)
    beta = inference.orientation_fusion_beta(shipped)
    assert beta > 0
    passes = list(inference.orientation_passes(window.normalise(lr), shipped))
    scores = {}
    for b in (0.0, beta):
        out = window.denormalise(inference.fuse_orientations(iter(passes), b))
        scores[b] = metrics.psnr(truth, np.clip(out, truth.min(), truth.max()), data_range=float(truth.max() - truth.min()))
    assert scores[beta] > scores[0.0] + 0.02, scores


def test_planes_all_beats_one_pass_on_a_real_scan(shared_data, scan_crop):
    # Golden: the 1 mm truth of a stroke T1 (a site the shipped models never trained on),
    # downscaled x2 along every axis as in evaluate.py.
    from sr3d import degrade, metrics

    truth = scan_crop(shared_data / "stroke-t1-t2-flair" / "T1.nii.gz", np.s_[60:84, 50:98, 40:88]).array
    lr = degrade.downscale(truth, 2, axes=(0, 1, 2))
    window = intensity.window(lr)
    shipped = models.load_models(None, 2)
    scores = {}
    for planes in ("dw", "all"):
        out = window.denormalise(inference.upscale_normalised(window.normalise(lr), shipped, planes=planes))
        scores[planes] = metrics.psnr(truth, np.clip(out, truth.min(), truth.max()),
                                      data_range=float(truth.max() - truth.min()))
    assert scores["all"] > scores["dw"] + 0.05, scores


# ---------------------------------------------------------------------------- volumes

@pytest.fixture(scope="module")
def loud_bundle():
    """A 2x bundle whose output layer is scaled up, so its outputs overshoot the input range."""
    bundle = _bundle(2, seed=1)
    conv10 = bundle.d.get_layer("conv10")
    kernel, bias = conv10.get_weights()
    conv10.set_weights([kernel * 40.0, bias])
    return bundle


def test_upscale_volume_units_clip_and_shape(loud_bundle, ixi_volume):
    result = inference.upscale_volume(ixi_volume, loud_bundle, tile_mb=0.2, consistency=False)
    assert result.array.shape == (20, 80, 72)
    window = intensity.window(ixi_volume.array)
    raw = _hand_3d(loud_bundle, window.normalise(ixi_volume.array)) * (window.hi - window.lo) + window.lo
    low, high = float(ixi_volume.array.min()), float(ixi_volume.array.max())
    assert raw.min() < low and raw.max() > high, "the test needs outputs outside the input range"
    # float32 round-off grows with the magnitude of the (amplified) network output.
    np.testing.assert_allclose(result.array, np.clip(raw, low, high), rtol=0, atol=1e-5 * np.abs(raw).max())
    assert result.array.min() == low and result.array.max() == high


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_upscaled_nifti_overlays_the_input(tmp_path, bundles, ixi_volume, mode):
    result = inference.upscale_volume(ixi_volume, bundles[2], mode=mode)
    written_in = nib.load(sr3d_io.save_volume(ixi_volume, tmp_path / "in.nii.gz"))
    written_out = nib.load(sr3d_io.save_volume(result, tmp_path / "out.nii.gz"))
    factors = np.array([2, 2, 2 if mode == "3d" else 1])             # NIfTI (i, j, k) = (W, H, D)
    assert written_out.shape == tuple(np.array(written_in.shape) * factors)
    np.testing.assert_allclose(written_out.header.get_zooms(), np.array(written_in.header.get_zooms()) / factors,
                               rtol=1e-6)
    np.testing.assert_allclose(written_out.affine[:3, :3], written_in.affine[:3, :3] / factors, rtol=0, atol=1e-6)
    # The field of view: the outer corners of the first and the last voxel, in world mm.
    for image_in_corner, image_out_corner in [(-0.5, -0.5), (np.array(written_in.shape) - 0.5,
                                                             np.array(written_out.shape) - 0.5)]:
        world_in = written_in.affine @ np.append(np.broadcast_to(image_in_corner, 3), 1.0)
        world_out = written_out.affine @ np.append(np.broadcast_to(image_out_corner, 3), 1.0)
        np.testing.assert_allclose(world_out, world_in, rtol=0, atol=1e-4)
    # The first output voxel centre lies a quarter of an input voxel inside the first input voxel.
    quarter = np.where(factors == 2, -0.25, 0.0)
    np.testing.assert_allclose(written_out.affine @ [0, 0, 0, 1], written_in.affine @ np.append(quarter, 1.0),
                               rtol=0, atol=1e-4)


def test_sr3d_upscale_from_a_nifti_path(tmp_path, tiny_bundle_dir, ixi_volume):
    path = sr3d_io.save_volume(ixi_volume, tmp_path / "crop.nii.gz")
    result = sr3d.upscale(path, scale=2, model=tiny_bundle_dir, planes="dw")  # the golden is one pass
    bundle = models.load_models(tiny_bundle_dir, scale=2)
    window = intensity.window(ixi_volume.array)
    normalised = window.normalise(ixi_volume.array)
    for array, consistency in ((result.array, True),
                               (sr3d.upscale(path, scale=2, model=tiny_bundle_dir, consistency=False,
                                             planes="dw").array, False)):
        out = _hand_3d(bundle, normalised)
        if consistency:  # the default: made consistent with the input
            out = _consistent(out, normalised, 2, (0, 1, 2))
        expected = np.clip(out * (window.hi - window.lo) + window.lo, ixi_volume.array.min(), ixi_volume.array.max())
        # float32 round-off of the normalised output (about 1e-6 with the step's sums) times the window.
        np.testing.assert_allclose(array, expected, rtol=0, atol=1e-6 * (window.hi - window.lo) if consistency else 1e-3)
    assert result.report["consistency"] is True
    np.testing.assert_allclose(result.spacing, np.array(ixi_volume.spacing) / 2)


@pytest.mark.parametrize("mode, planes", [("3d", "dw"), ("3d", "all"), ("2d", "dw"), ("d", "dw"), ("w", "dw")])
def test_consistency_is_one_projection_after_the_passes(bundles, mode, planes):
    """With consistency the output, downscaled as the training pairs were, is the input again;
    it is the networks' output (planes "all": the mean of the three passes) plus the least-norm
    change (golden: `_consistent`); off by default at this level (the served graph's numbers)."""
    lr = np.random.default_rng(3).uniform(0.0, 1.0, (6, 10, 8)).astype(np.float32)
    plain = inference.upscale_normalised(lr, bundles[2], mode=mode, planes=planes)
    made = inference.upscale_normalised(lr, bundles[2], mode=mode, planes=planes, consistency=True)
    axes = degrade.MODE_AXES[mode]
    np.testing.assert_allclose(made, _consistent(plain, lr, 2, axes), rtol=0, atol=2e-5)
    np.testing.assert_allclose(degrade.downscale(made.astype(np.float64), 2, axes), lr, rtol=0, atol=2e-5)
    assert np.abs(degrade.downscale(plain.astype(np.float64), 2, axes) - lr).max() > 1e-2  # it had work to do


# ---------------------------------------------------------------------------- bundles

def test_load_models_reads_a_bundle(tiny_bundle_dir):
    bundle = models.load_models(tiny_bundle_dir, scale=2)
    assert bundle.scale == 2
    assert bundle.info == {"note": "random weights, for tests", "scale": 2}
    assert json.loads((tiny_bundle_dir / "bundle.json").read_text())["scale"] == 2


def test_load_models_without_bundle_json_probes_the_scale(tmp_path, tiny_bundle_dir):
    for name in ("hw.keras", "d.keras"):
        (tmp_path / name).write_bytes((tiny_bundle_dir / name).read_bytes())
    assert models.load_models(tmp_path, scale=2).scale == 2
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: the model upscales by 2, not by 4")):
        models.load_models(tmp_path, scale=4)


def test_load_models_errors_name_the_directory(tmp_path, tiny_bundle_dir):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: model directory not found")):
        models.load_models(tmp_path / "nowhere")
    (tmp_path / "d.keras").write_bytes((tiny_bundle_dir / "d.keras").read_bytes())
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: not an sr3d model bundle, missing hw.keras")):
        models.load_models(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tiny_bundle_dir}: the model upscales by 2, not by 3")):
        models.load_models(tiny_bundle_dir, scale=3)


def test_load_models_rejects_unreadable_and_swapped_models(tmp_path, tiny_bundle_dir):
    (tmp_path / "hw.keras").write_text("not a model")
    (tmp_path / "d.keras").write_bytes((tiny_bundle_dir / "d.keras").read_bytes())
    with pytest.raises(ValueError, match="hw.keras: not a readable Keras model"):
        models.load_models(tmp_path)
    # Stage d saved as hw.keras and the other way round.
    (tmp_path / "hw.keras").write_bytes((tiny_bundle_dir / "d.keras").read_bytes())
    (tmp_path / "d.keras").write_bytes((tiny_bundle_dir / "hw.keras").read_bytes())
    with pytest.raises(ValueError, match="the hw model is not an sr3d stage-hw network"):
        models.load_models(tmp_path)


def test_make_bundle_checks_the_declared_scale(tmp_path):
    keras.utils.set_random_seed(0)
    models.build("hw", 3, filters=2).save(tmp_path / "hw3.keras")
    models.build("d", 3, filters=2).save(tmp_path / "d3.keras")
    models.build("d", 2, filters=2).save(tmp_path / "d2.keras")
    with pytest.raises(ValueError, match="the stages upscale by 3 .hw. and 3 .d., the bundle says 2"):
        models.make_bundle(tmp_path / "hw3.keras", tmp_path / "d3.keras", tmp_path / "b", scale=2)
    with pytest.raises(ValueError, match="the stages upscale by 3 .hw. and 2 .d."):
        models.make_bundle(tmp_path / "hw3.keras", tmp_path / "d2.keras", tmp_path / "b", scale=3)
    assert not (tmp_path / "b").exists()
    out = models.make_bundle(tmp_path / "hw3.keras", tmp_path / "d3.keras", tmp_path / "b", scale=3)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "d.keras", "hw.keras"]
    assert models.load_models(out, scale=3).scale == 3


def test_upscale_rejects_a_bundle_of_another_scale(bundles, ixi_volume):
    with pytest.raises(ValueError, match="the model upscales by 3, not by 2"):
        inference.upscale(ixi_volume, scale=2, model=bundles[3])


# ---------------------------------------------------------------------------- errors

def test_3d_needs_two_slices_and_2d_does_not(bundles, ixi_volume):
    one_slice = ixi_volume.replace(array=ixi_volume.array[:1], source="one.nii.gz")
    with pytest.raises(ValueError, match="one.nii.gz: 3D upscaling needs at least 2 slices, got 1; use mode='2d'"):
        inference.upscale_volume(one_slice, bundles[2])
    assert inference.upscale_volume(one_slice, bundles[2], mode="2d").array.shape == (1, 80, 72)


@pytest.mark.parametrize("options, message", [
    ({"mode": "2.5d"}, r"mode must be one of \('3d', '2d', 'd', 'h', 'w'\), got '2.5d'"),
    ({"planes": "dh"}, r"planes must be one of \('dw', 'both', 'all'\), got 'dh'"),
    ({"planes": "all", "mode": "2d"}, "planes='all' applies to mode 3d"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"tile_mb": 0}, "tile_mb must be a positive number of megabytes or None, got 0"),
])
def test_bad_options(bundles, ixi_normalised, options, message):
    with pytest.raises(ValueError, match=message):
        inference.upscale_normalised(ixi_normalised, bundles[2], **options)


@pytest.mark.parametrize("spacing, mode, axis, ratio", [
    ((8.0, 1.0, 1.0), "3d", "D", "8.0x"),      # thick axial slices
    ((0.9, 0.9, 2.25), "3d", "W", "2.5x"),     # the threshold itself, on another axis
    ((2.4, 1.0, 1.0), "3d", None, None),       # below 2.5x
    ((8.0, 1.0, 1.0), "2d", None, None),       # in-plane only: nothing to suggest
])
def test_anisotropy_note(spacing, mode, axis, ratio):
    note = inference.anisotropy_note(spacing, mode)
    if axis is None:
        assert note is None
    else:
        assert f"{ratio} thicker along {axis}" in note and "--axes 2d" in note and "--self-supervised" in note
