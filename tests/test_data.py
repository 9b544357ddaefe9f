"""Tests for sr3d.data: aligned patches, blur augmentation, determinism, tf.data pipeline.

Samplers are built as production builds them: from plane stacks (`_sampler`, as sr3d.training
and sr3d.selfsup feed `PatchSampler`), except where a test checks the `volumes` shortcut itself.
"""
import cv2
import numpy as np
import pytest

from sr3d import data, degrade, selfsup


def _volume(shape=(6, 20, 24), seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape).astype(np.float32)


def _sampler(volumes, config: data.PatchConfig) -> data.PatchSampler:
    """The sampler sr3d.training.train builds: no volumes, the plane stacks of every volume."""
    stacks = [stack for volume in volumes for stack in data.plane_stacks(volume, config.stage, config.scale)]
    return data.PatchSampler([], config, stacks=stacks)


def _find(stack: np.ndarray, patch: np.ndarray):
    """All (i, y, x) where `patch` sits in `stack` (N, h, w), by brute force."""
    n, h, w = stack.shape
    p, q = patch.shape
    hits = []
    for i in range(n):
        for y in range(h - p + 1):
            for x in range(w - q + 1):
                if np.array_equal(stack[i, y:y + p, x:x + q], patch):
                    hits.append((i, y, x))
    return hits


def test_plane_stacks_shapes_and_degradation():
    vol = _volume((6, 20, 24))
    (hw,) = data.plane_stacks(vol, "hw", 2)
    assert hw.lr.shape == (6, 10, 12) and hw.hr.shape == (6, 20, 24)
    np.testing.assert_array_equal(hw.lr, degrade.downscale(vol, 2, axes=(1, 2)))
    rows, cols = data.plane_stacks(vol, "d", 3)
    # D cropped to 6 (divisible by 3); planes are depth first.
    assert rows.lr.shape == (20, 2, 24) and rows.hr.shape == (20, 6, 24)
    assert cols.lr.shape == (24, 2, 20) and cols.hr.shape == (24, 6, 20)
    np.testing.assert_array_equal(rows.hr[5], vol[:, 5, :])
    np.testing.assert_array_equal(cols.hr[7], vol[:, :, 7])


def _assert_aligned(lr: np.ndarray, hr: np.ndarray, stacks, ry: int, rx: int):
    """Each HR patch (B, p*ry, p*rx, 1) is the HR twin of its LR patch (B, p, p, 1) in one of the stacks."""
    p = lr.shape[1]
    for k in range(lr.shape[0]):
        found = False
        for stack in stacks:
            for i, y, x in _find(stack.lr, lr[k, ..., 0]):
                if np.array_equal(stack.hr[i, y * ry:(y + p) * ry, x * rx:(x + p) * rx], hr[k, ..., 0]):
                    found = True
        assert found, f"patch {k}: HR target is not the HR twin of its LR patch"


@pytest.mark.parametrize("stage,scale", [("hw", 2), ("hw", 3), ("d", 2), ("d", 4)])
def test_patches_are_aligned(stage, scale):
    vol = _volume((16, 20, 20))
    cfg = data.PatchConfig(stage=stage, scale=scale, patch_size=4, batch_size=6, blur="none",
                           min_contrast=0.0, seed=1)
    sampler = _sampler([vol], cfg)
    lr, hr = sampler.batch(0, 0)
    ry, rx = (scale, scale) if stage == "hw" else (scale, 1)
    assert lr.shape == (6, 4, 4, 1) and hr.shape == (6, 4 * ry, 4 * rx, 1)
    _assert_aligned(lr, hr, data.plane_stacks(vol, stage, scale), ry, rx)


@pytest.mark.parametrize("profile", ["box", "gaussian"])
def test_patches_of_self_supervised_stacks_are_aligned(profile):
    # sr3d.selfsup's planes: in-plane slices degraded by a slice profile along one axis (LR
    # (D, h, w), HR (D, h * r, w)), fed to the sampler as they are, in the way selfsup.train does.
    vol = _volume((3, 24, 28), seed=2)
    plan = selfsup.plan_for((4.0, 1.0, 1.0), factor=4)
    stacks = selfsup.training_stacks(vol, plan, profile)
    assert [s.lr.shape for s in stacks] == [(3, 6, 28), (3, 7, 24)]
    cfg = data.PatchConfig(stage="d", scale=4, patch_size=4, batch_size=8, blur="none", min_contrast=0.0, seed=5)
    lr, hr = data.PatchSampler([], cfg, stacks=stacks).batch(0, 0)
    assert lr.shape == (8, 4, 4, 1) and hr.shape == (8, 16, 4, 1)
    _assert_aligned(lr, hr, stacks, 4, 1)


@pytest.mark.parametrize("stage,scale", [("hw", 3), ("d", 2)])
def test_volumes_shortcut_is_the_sampler_of_their_plane_stacks(stage, scale):
    vols = [_volume((12, 20, 24), 0), _volume((10, 30, 18), 1)]
    cfg = data.PatchConfig(stage=stage, scale=scale, patch_size=5, batch_size=16, flip_rotate=True,
                           noise_probability=0.5, max_noise=0.05, seed=4)
    shortcut, stacked = data.PatchSampler(vols, cfg), _sampler(vols, cfg)
    assert shortcut.patches_per_epoch == stacked.patches_per_epoch
    for epoch, step in ((0, 0), (1, 3)):
        for a, b in zip(shortcut.batch_with_sigmas(epoch, step), stacked.batch_with_sigmas(epoch, step), strict=True):
            np.testing.assert_array_equal(a, b)


def test_stacks_whose_hr_is_not_the_lr_times_the_scale_are_refused():
    (stack,) = data.plane_stacks(_volume((4, 20, 20)), "hw", 2)
    cfg = data.PatchConfig(stage="hw", scale=2, patch_size=4)
    with pytest.raises(ValueError, match=r"plane stack HR shape \(4, 20, 19\) is not its LR shape \(4, 10, 10\) "
                                         r"times \(2, 2\) \(stage 'hw'\)"):
        data.PatchSampler([], cfg, stacks=[data.PlaneStack(stack.lr, stack.hr[:, :, :19])])
    with pytest.raises(ValueError, match=r"times \(2, 1\) \(stage 'd'\)"):
        data.PatchSampler([], data.PatchConfig(stage="d", scale=2, patch_size=4), stacks=[stack])


@pytest.mark.parametrize("stage,count", [("hw", 8), ("d", 4)])
def test_flip_rotate_applies_one_valid_transform_to_both_patches(stage, count):
    vol = _volume((16, 24, 24))
    cfg = data.PatchConfig(stage=stage, scale=2, patch_size=5, batch_size=64, min_contrast=0.0, seed=3)
    plain_lr, plain_hr, plain_sigmas = _sampler([vol], cfg).batch_with_sigmas(1, 2)
    turned = _sampler([vol], data.dataclasses.replace(cfg, flip_rotate=True))
    lr, hr, sigmas = turned.batch_with_sigmas(1, 2)
    np.testing.assert_array_equal(sigmas, plain_sigmas)  # same patches and blur, only turned
    # The transforms, written out independently of sr3d.transforms: (B, h, w) -> (B, h', w').
    if stage == "hw":
        candidates = [lambda x, k=k, f=f: (np.flip(x, 2) if f else x).swapaxes(1, 2) if k else
                      (np.flip(x, 2) if f else x) for k in (0, 1) for f in (0, 1)]
        candidates += [lambda x, g=g: np.flip(g(x), (1, 2)) for g in list(candidates)]
    else:
        candidates = [lambda x, a=a: np.flip(x, a) if a else x for a in (None, 1, 2, (1, 2))]
    assert len(candidates) == count
    used = set()
    for i in range(cfg.batch_size):
        matches = [j for j, t in enumerate(candidates)
                   if np.array_equal(t(plain_lr[i:i + 1, ..., 0]), lr[i:i + 1, ..., 0])
                   and np.array_equal(t(plain_hr[i:i + 1, ..., 0]), hr[i:i + 1, ..., 0])]
        assert matches, f"patch {i}: LR and HR are not one valid transform of the plain pair"
        used.update(matches)
    assert len(used) == count, f"only transforms {sorted(used)} of {count} were drawn in 64 patches"
    again = _sampler([vol], data.dataclasses.replace(cfg, flip_rotate=True)).batch(1, 2)
    np.testing.assert_array_equal(again[0], lr)


def test_flat_fraction_keeps_that_share_of_flat_patches():
    vol = np.zeros((12, 40, 40), np.float32)
    vol[:, 10:30, 10:30] = _volume((12, 20, 20))  # structure in the middle, flat zeros around it
    cfg = data.PatchConfig(stage="hw", scale=2, patch_size=4, batch_size=20, blur="none", seed=2)
    for fraction, flat_expected in ((0.0, 0), (0.25, 5), (0.5, 10)):
        sampler = _sampler([vol], data.dataclasses.replace(cfg, flat_fraction=fraction))
        for step in range(3):
            hr = sampler.batch(0, step)[1][..., 0]
            span = hr.max(axis=(1, 2)) - hr.min(axis=(1, 2))
            assert hr.shape[0] == 20 and int(np.sum(span < cfg.min_contrast)) == flat_expected
    with pytest.raises(ValueError, match="flat_fraction"):
        data.PatchConfig(stage="hw", scale=2, flat_fraction=1.0)


def test_blur_matches_opencv_gaussian():
    rng = np.random.default_rng(0)
    halo = rng.random((3, 12, 12)).astype(np.float32)
    sigmas = np.array([0.0, 0.3, 0.5])
    out = data.blur_patches(halo, sigmas)
    assert out.shape == (3, 10, 10)
    np.testing.assert_allclose(out[0], halo[0, 1:-1, 1:-1], rtol=0, atol=0)
    for k in (1, 2):
        expected = cv2.GaussianBlur(halo[k].astype(np.float64), (3, 3), sigmas[k])[1:-1, 1:-1]
        np.testing.assert_allclose(out[k], expected, rtol=0, atol=1e-6)


def test_blur_probability_and_sigma_range():
    vol = _volume((4, 40, 40))
    cfg = data.PatchConfig(stage="hw", scale=2, patch_size=5, batch_size=2000, min_contrast=0.0, seed=3)
    lr, _, sigmas = _sampler([vol], cfg).batch_with_sigmas(0, 0)
    none = _sampler([vol], data.dataclasses.replace(cfg, blur="none")).batch(0, 0)[0]
    blurred = sigmas > 0
    # p = 0.5 over 2000 draws: 5 standard deviations is +-0.056.
    assert 0.44 < blurred.mean() < 0.56
    assert sigmas.max() <= 0.5
    # sigma ~ U(0, 0.5): mean 0.25, standard error 0.0032 over ~1000 draws.
    np.testing.assert_allclose(sigmas[blurred].mean(), 0.25, atol=0.02)
    np.testing.assert_array_equal(lr[~blurred], none[~blurred])
    visibly = sigmas > 0.3  # side weight exp(-1/(2 sigma^2)) > 0.004
    assert np.all(np.any(lr[visibly] != none[visibly], axis=(1, 2, 3)))
    fixed = _sampler([vol], data.dataclasses.replace(cfg, blur="fixed")).batch_with_sigmas(0, 0)[2]
    assert set(np.unique(fixed)) == {0.0, 0.5}


def test_background_patches_are_skipped():
    vol = np.zeros((4, 40, 40), np.float32)
    vol[:, 20:, 20:] = _volume((4, 20, 20))
    cfg = data.PatchConfig(stage="hw", scale=2, patch_size=3, batch_size=256, blur="none", seed=0)
    _, hr = _sampler([vol], cfg).batch(0, 0)
    span = hr.max(axis=(1, 2, 3)) - hr.min(axis=(1, 2, 3))
    assert np.all(span >= cfg.min_contrast)


def test_same_seed_same_batches_any_order():
    vols = [_volume((12, 20, 24), 0), _volume((10, 30, 18), 1)]
    cfg = data.PatchConfig(stage="d", scale=2, patch_size=5, batch_size=16, seed=7)
    a, b = _sampler(vols, cfg), _sampler(vols, cfg)
    later = b.batch(2, 5)
    for step in range(3):
        np.testing.assert_array_equal(a.batch(0, step)[0], b.batch(0, step)[0])
    np.testing.assert_array_equal(a.batch(2, 5)[1], later[1])
    other = _sampler(vols, data.dataclasses.replace(cfg, seed=8))
    assert not np.array_equal(other.batch(0, 0)[0], a.batch(0, 0)[0])
    assert not np.array_equal(a.batch(0, 1)[0], a.batch(0, 0)[0])


def test_dataset_yields_dict_targets_in_plan_order():
    vol = _volume((6, 20, 24))
    cfg = data.PatchConfig(stage="hw", scale=2, patch_size=4, batch_size=8, seed=0)
    sampler = _sampler([vol], cfg)
    batches = list(data.dataset(sampler, [(0, 1, 3), (1, 0, 1)]).as_numpy_iterator())
    assert len(batches) == 3
    expected = [sampler.batch(0, 1), sampler.batch(0, 2), sampler.batch(1, 0)]
    for (lr, targets), (lr_e, hr_e) in zip(batches, expected):
        np.testing.assert_array_equal(lr, lr_e)
        np.testing.assert_array_equal(targets["final"], hr_e)
        np.testing.assert_array_equal(targets["intermediate"], hr_e)


def test_epoch_size_covers_each_lr_voxel_once():
    vol = _volume((10, 28, 28))
    cfg = data.PatchConfig(stage="hw", scale=2, patch_size=7, batch_size=4)
    sampler = _sampler([vol], cfg)
    assert sampler.patches_per_epoch == 10 * 14 * 14 // 49
    assert sampler.steps_per_epoch() == 10


@pytest.mark.parametrize("bad", [dict(stage="xy"), dict(scale=1), dict(blur="sometimes"), dict(patch_size=0),
                                 dict(noise_probability=1.5, max_noise=0.1), dict(max_noise=-0.1),
                                 dict(noise_probability=0.5)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        data.PatchConfig(**{"stage": "hw", "scale": 2, **bad})


def test_planes_too_small_for_patches():
    with pytest.raises(ValueError, match="large enough"):
        _sampler([_volume((4, 6, 6))], data.PatchConfig(stage="hw", scale=2, patch_size=7))


def _keys_weights(scale: int) -> np.ndarray:
    """Interior taps of MATLAB's imresize(1/scale, 'bicubic') from first principles: Keys' cubic
    (a = -0.5) stretched by `scale`, at integer offsets from an output centre that falls halfway
    between input pixels for even scales, normalised to sum 1."""
    def keys(t):
        t = np.abs(t)
        return np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1, np.where(t <= 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0))
    offsets = np.arange(-2 * scale - 1, 2 * scale + 2) - (0.5 * scale - 0.5) % 1
    weights = keys(offsets / scale)
    return weights / weights.sum()


@pytest.mark.parametrize("stage,scale", [("hw", 2), ("hw", 4), ("d", 2), ("d", 4)])
def test_degraded_noise_is_the_degraded_copy_of_a_whole_noisy_plane(stage, scale):
    # Embed the HR noise region the function drew in a large plane of zeros, degrade the whole
    # plane, and cut the LR patch's place: the margin must make the two the same.
    p, m, count = 5, data.NOISE_MARGIN, 3
    lr, hr = data.degraded_noise(count, np.ones(count), stage, scale, p, np.random.default_rng(7))
    side = p + 2 + 2 * m
    if stage == "hw":
        region = np.random.default_rng(7).standard_normal((count, side * scale, side * scale))
        plane = np.zeros((count, (side + 8) * scale, (side + 8) * scale))
        plane[:, 4 * scale:(4 + side) * scale, 4 * scale:(4 + side) * scale] = region
        low = degrade.downscale(plane, scale, axes=(1, 2))[:, 4 + m:4 + m + p + 2, 4 + m:4 + m + p + 2]
        hr_place = region[:, (m + 1) * scale:(m + 1 + p) * scale, (m + 1) * scale:(m + 1 + p) * scale]
    else:
        region = np.random.default_rng(7).standard_normal((count, side * scale, p + 2))
        plane = np.zeros((count, (side + 8) * scale, p + 2))
        plane[:, 4 * scale:(4 + side) * scale] = region
        low = degrade.downscale_axis(plane, scale, axis=1)[:, 4 + m:4 + m + p + 2]
        hr_place = region[:, (m + 1) * scale:(m + 1 + p) * scale, 1:1 + p]
    np.testing.assert_allclose(lr, low, atol=1e-5)
    np.testing.assert_array_equal(hr, hr_place.astype(np.float32))


@pytest.mark.parametrize("stage,scale", [("hw", 2), ("d", 2), ("hw", 4)])
def test_degraded_noise_has_the_level_that_degrading_white_noise_gives(stage, scale):
    sigma = 0.03
    lr, hr = data.degraded_noise(4000, np.full(4000, sigma), stage, scale, 5, np.random.default_rng(0))
    gain = np.sqrt(np.sum(_keys_weights(scale) ** 2))     # one degraded axis
    expected_lr = sigma * gain ** (2 if stage == "hw" else 1)
    assert abs(hr.std() / sigma - 1) < 0.01
    assert abs(lr.std() / expected_lr - 1) < 0.02


def test_noise_goes_to_contrast_patches_only_and_leaves_the_rest_of_the_batch_as_it_was():
    vol = _volume((6, 40, 40), seed=3)
    vol[:, :, :16] = 0.25   # a flat region, so the batch has flat patches
    base = dict(stage="hw", scale=2, patch_size=5, batch_size=64, flat_fraction=0.25, blur="none", seed=1)
    clean = _sampler([vol], data.PatchConfig(**base))
    noisy = _sampler([vol], data.PatchConfig(**base, noise_probability=1.0, max_noise=0.05))
    lr0, hr0 = clean.batch(2, 3)
    lr1, hr1 = noisy.batch(2, 3)
    n_flat = 16
    np.testing.assert_array_equal(lr1[-n_flat:], lr0[-n_flat:])
    np.testing.assert_array_equal(hr1[-n_flat:], hr0[-n_flat:])
    added = (hr1 - hr0)[:-n_flat].reshape(64 - n_flat, -1)
    assert np.all(added.std(axis=1) > 0) and np.all(added.std(axis=1) < 0.05 * 1.5)
    # The LR change is the degraded HR change: its level is the degradation's gain times sigma.
    lr_added = (lr1 - lr0)[:-n_flat].reshape(64 - n_flat, -1)
    ratio = lr_added.std() / added.std()
    assert abs(ratio / np.sum(_keys_weights(2) ** 2) - 1) < 0.1
    # Seeded: the same batch again.
    np.testing.assert_array_equal(noisy.batch(2, 3)[1], hr1)
