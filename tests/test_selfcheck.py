"""The self-check (sr3d.selfcheck), the Lanczos fallback and test-time adaptation (sr3d.adapt).

Golden values come from first principles: a Gaussian of known sigma for the noise estimate,
a "CNN" that is Lanczos itself (margin exactly 0) or nearest neighbour (it must lose), and
the baseline's own Lanczos output for the fallback.
"""
import functools
import json

import nibabel as nib
import numpy as np
import pytest

import sr3d

from sr3d import adapt, baselines, cli, degrade, inference, models, selfcheck, upscaling
from sr3d import io as sr3d_io


@pytest.fixture(scope="module")
def t2_crop(shared_data, tmp_path_factory):
    """A 16 x 96 x 64 crop of the real stroke T2 scan (1 mm), as a NIfTI file."""
    path = tmp_path_factory.mktemp("selfcheck") / "t2_crop.nii.gz"
    nib.load(shared_data / "stroke-t1-t2-flair" / "T2.nii.gz").slicer[40:104, 30:126, 50:66].to_filename(path)
    return path


def test_noise_sigma_of_white_noise_and_of_smooth_images():
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.1, (4, 96, 96)).astype(np.float32)
    assert selfcheck.noise_sigma(noise) == pytest.approx(0.1, rel=0.05)
    # Immerkaer's kernel is blind to planes: a ramp plus noise gives the noise alone.
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32)
    assert selfcheck.noise_sigma(noise + 0.01 * yy + 0.02 * xx) == pytest.approx(0.1, rel=0.05)
    # Exact-zero background is ignored, not counted as noise-free.
    padded = np.zeros((4, 192, 96), np.float32)
    padded[:, :96] = noise
    assert selfcheck.noise_sigma(padded) == pytest.approx(0.1, rel=0.08)
    assert selfcheck.noise_sigma(np.zeros((2, 32, 32), np.float32)) == 0.0


def test_noise_matched_input_carries_the_scans_noise(t2_crop):
    # A real scan made noisy, as thin-slice CT is: white noise of sigma 0.05 (window units).
    clean = sr3d_io.load_volume(t2_crop).array / 500.0
    scan = (clean + np.random.default_rng(3).normal(0, 0.05, clean.shape)).astype(np.float32)
    target, lr, s = selfcheck.noise_matched_pair(scan, 2, (0, 1, 2), seed=0)
    assert s > 0
    assert selfcheck.noise_sigma(lr) == pytest.approx(selfcheck.noise_sigma(scan), rel=0.15)
    np.testing.assert_allclose(degrade.downscale_float32(target, 2, (0, 1, 2)), lr, atol=2e-5)


def test_fast_downscale_equals_the_degradation():
    x = np.random.default_rng(1).random((8, 20, 12)).astype(np.float32)
    np.testing.assert_allclose(degrade.downscale_float32(x, 2, (0, 1, 2)), degrade.downscale(x, 2, (0, 1, 2)),
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_self_check_of_lanczos_is_a_tie_and_nearest_loses(t2_crop, mode):
    array = sr3d_io.load_volume(t2_crop).array
    tie = selfcheck.self_check(array, lambda x: baselines.upscale(x, 2, "lanczos", mode), 2, mode)
    assert tie.margin_db == pytest.approx(0.0, abs=1e-9) and tie.ssim_margin == pytest.approx(0.0, abs=1e-12)
    assert not tie.cnn_loses
    worse = selfcheck.self_check(array, lambda x: baselines.upscale(x, 2, "nearest", mode), 2, mode)
    assert worse.margin_db < -0.5 and worse.cnn_loses
    assert "self-check on this scan (downscaled x2" in worse.line()


def test_self_check_skipped_on_too_small_scans():
    assert selfcheck.self_check(np.ones((4, 20, 20), np.float32), lambda x: x, 2, "2d", min_side=15) is None
    assert "receptive field" in selfcheck.check_size((4, 20, 20), 2, "2d", 15)


def test_fallback_writes_exactly_the_lanczos_result(tmp_path, t2_crop, tiny_bundle_dir, capsys):
    out = tmp_path / "out.nii.gz"
    # --no-consistency: the random bundle's output made consistent with its input is near the least-norm
    # interpolation, which need not lose to Lanczos; the networks' output alone does (by 16 dB).
    code = cli.main(["upscale", str(t2_crop), str(out), "--model", str(tiny_bundle_dir), "--fallback", "lanczos",
                     "--no-consistency"])
    assert code == 0
    err = capsys.readouterr().err
    assert "self-check on this scan (downscaled x2, 3d): CNN -" in err and "writing the Lanczos result" in err
    volume = sr3d_io.load_volume(t2_crop)
    expected = np.clip(baselines.upscale(volume.array, 2, "lanczos", "3d"), volume.array.min(), volume.array.max())
    written = sr3d_io.load_volume(out)
    np.testing.assert_array_equal(written.array, np.rint(expected).astype(np.float32)
                                  if volume.source_dtype.startswith(("int", "uint")) else expected)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["self_check"]["cnn_loses"] is True and report["method"].startswith("lanczos")
    assert report["self_check"]["margin_db"] < 0
    header_notes = [e.get_content().decode() for e in nib.load(out).header.extensions]
    assert any("self-check" in note and "lanczos" in note for note in header_notes)


def test_without_fallback_the_cnn_is_written_with_a_warning(tmp_path, t2_crop, tiny_bundle_dir, capsys):
    out = tmp_path / "cnn.nii.gz"
    # --precision float32: compared below with the library's float32 result (the CLI's default is auto).
    assert cli.main(["upscale", str(t2_crop), str(out), "--model", str(tiny_bundle_dir), "--precision", "float32",
                     "--no-consistency"]) == 0  # as above
    assert "warning: on this scan's self-check the CNN scores below Lanczos" in capsys.readouterr().err
    volume = sr3d_io.load_volume(t2_crop)
    bundle = models.load_models(tiny_bundle_dir, 2)
    planes = json.loads((tmp_path / "cnn.json").read_text())["planes"]   # chosen by the default, planes auto
    expected = inference.upscale_volume(volume, bundle, consistency=False, planes=planes).array
    np.testing.assert_array_equal(sr3d_io.load_volume(out).array, np.asarray(
        sr3d_io.load_volume(out).array))  # the file reads back
    np.testing.assert_allclose(sr3d_io.load_volume(out).array, np.rint(expected)
                               if volume.source_dtype.startswith(("int", "uint")) else expected, atol=0.5)
    assert json.loads((tmp_path / "cnn.json").read_text())["method"] == "cnn"


def test_no_self_check_and_its_conflicts(tmp_path, t2_crop, tiny_bundle_dir, capsys):
    out = tmp_path / "quiet.nii.gz"
    assert cli.main(["upscale", str(t2_crop), str(out), "--model", str(tiny_bundle_dir), "--no-self-check"]) == 0
    assert "self-check" not in capsys.readouterr().err
    assert "self_check" not in json.loads((tmp_path / "quiet.json").read_text())
    assert cli.main(["upscale", str(t2_crop), str(tmp_path / "x.nii.gz"), "--model", str(tiny_bundle_dir),
                     "--no-self-check", "--fallback", "lanczos"]) == 2
    assert "--fallback needs the self-check" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_api_warns_and_reports(t2_crop, tiny_bundle_dir):
    import sr3d

    with pytest.warns(UserWarning, match="CNN scores below Lanczos"):
        result = sr3d.upscale(str(t2_crop), model=str(tiny_bundle_dir), mode="2d")
    assert result.report["self_check"]["mode"] == "2d" and result.report["method"] == "cnn"


def test_api_takes_a_numpy_array_with_spacing(t2_crop, tiny_bundle_dir):
    import sr3d

    array = sr3d_io.load_volume(t2_crop).array
    result = sr3d.upscale(array, model=str(tiny_bundle_dir), spacing=(3.0, 1.0, 0.5), self_check=False)
    assert result.shape == (32, 192, 128)
    np.testing.assert_allclose(result.spacing, (1.5, 0.5, 0.25))
    with pytest.raises(ValueError, match="spacing"):
        sr3d.upscale(array, model=str(tiny_bundle_dir))


def test_adapt_keeps_only_what_helps_on_held_out_rows(t2_crop, tiny_bundle_dir):
    bundle = models.load_models(tiny_bundle_dir, 2)
    array = sr3d_io.load_volume(t2_crop).array
    before = [w.copy() for w in bundle.hw.get_weights()]
    result = adapt.adapt(array, bundle, "3d", adapt.AdaptConfig(steps=6, batch_size=16))
    assert result.steps["hw"] + result.steps["d"] == 6 and result.steps["d"] >= 1
    gain = result.adapted_psnr - result.original_psnr
    needed = result.original_psnr < result.lanczos_psnr
    enough = needed and gain > 0
    assert result.kept == (enough and result.adapted_ssim >= result.original_ssim)
    assert (result.bundle is bundle) == (not result.kept)
    # The bundle it started from is never changed in place.
    for w, b in zip(bundle.hw.get_weights(), before):
        np.testing.assert_array_equal(w, b)
    assert "held-out rows" in result.line()


def test_adapt_steps_are_reproducible(t2_crop, tiny_bundle_dir):
    bundle = models.load_models(tiny_bundle_dir, 2)
    array = sr3d_io.load_volume(t2_crop).array
    config = adapt.AdaptConfig(steps=4, batch_size=16)
    a, b = adapt.adapt(array, bundle, "2d", config), adapt.adapt(array, bundle, "2d", config)
    assert a.adapted_psnr == b.adapted_psnr and a.steps == b.steps == {"hw": 4}


def test_cli_adapt_writes_report_and_saves_the_kept_bundle(tmp_path, t2_crop, tiny_bundle_dir, capsys):
    out, saved = tmp_path / "a.nii.gz", tmp_path / "adapted"
    assert cli.main(["upscale", str(t2_crop), str(out), "--model", str(tiny_bundle_dir), "--axes", "2d",
                     "--adapt", "--adapt-steps", "40", "--save-model", str(saved)]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["adaptation"]["steps"] == {"hw": 40} and "adaptation (40 + 0 steps" in err
    if report["adaptation"]["kept"]:
        reloaded = models.load_models(saved, 2)
        assert reloaded.info.get("adapted") is True
    else:
        assert not saved.exists() and "not writing" in err
    assert cli.main(["upscale", str(t2_crop), str(tmp_path / "b.nii.gz"), "--adapt-steps", "3"]) == 2
    assert "--adapt-seconds and --adapt-steps apply only with --adapt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- planes "auto"

def test_planes_auto_takes_the_pass_that_wins_the_self_check(t2_crop, tiny_bundle_dir):
    volume = sr3d_io.load_volume(t2_crop)
    bundle = models.load_models(tiny_bundle_dir, 2)
    checks = {planes: selfcheck.self_check(volume.array, functools.partial(
        upscaling.upscale_normalised, models=bundle, mode="3d", planes=planes, consistency=True), 2, "3d")
        for planes in ("dw", "all")}
    assert None not in checks.values(), "the crop should be big enough for the 3D self-check"
    chosen = max(checks, key=lambda p: checks[p].margin_db)
    lines = []
    result, _ = inference.upscale_checked(volume, bundle, planes="auto", log=lines.append)
    assert result.report["planes"] == chosen and result.report["planes_choice"]["chosen"] == chosen
    assert result.report["planes_choice"]["dw_self_check_margin_db"] == round(checks["dw"].margin_db, 4)
    assert result.report["self_check"]["margin_db"] == round(checks[chosen].margin_db, 4)
    assert lines[0].startswith("planes auto: ")
    np.testing.assert_array_equal(result.array, inference.upscale_volume(volume, bundle, planes=chosen).array)


def test_auto_is_the_default_planes_in_3d_with_the_self_check(t2_crop, tiny_bundle_dir, tmp_path, capsys):
    """sr3d upscale and sr3d.upscale choose the planes by the self-check unless told otherwise;
    without the self-check, with adaptation and outside mode 3d they run one pass (dw)."""
    volume = sr3d_io.load_volume(t2_crop)
    bundle = models.load_models(tiny_bundle_dir, 2)
    explicit, _ = inference.upscale_checked(volume, bundle, planes="auto", precision="float32")
    default = sr3d.upscale(volume, model=bundle, precision="float32")
    assert default.report["planes_choice"] == explicit.report["planes_choice"]
    np.testing.assert_array_equal(default.array, explicit.array)
    out = tmp_path / "default.nii.gz"
    assert cli.main(["upscale", str(t2_crop), str(out), "--model", str(tiny_bundle_dir), "--precision", "float32"]) == 0
    assert "planes auto: " in capsys.readouterr().err
    assert json.loads((tmp_path / "default.json").read_text())["planes_choice"] == explicit.report["planes_choice"]
    quiet = sr3d.upscale(volume, model=bundle, self_check=False)
    assert quiet.report["planes"] == "dw" and "planes_choice" not in quiet.report
    assert "planes" not in sr3d.upscale(volume, model=bundle, mode="2d").report
    assert [inference.default_planes(m, c, a) for m, c, a in [
        ("3d", True, None), ("3d", False, None), ("3d", True, object()), ("2d", True, None), ("d", True, None)]] \
        == ["auto", "dw", "dw", "dw", "dw"]


def test_planes_auto_falls_back_to_one_pass_on_a_scan_too_small_to_check(tiny_bundle_dir):
    volume = inference.as_volume(np.random.default_rng(0).random((3, 24, 24)).astype(np.float32), spacing=1.0)
    result, _ = inference.upscale_checked(volume, models.load_models(tiny_bundle_dir, 2), planes="auto")
    assert result.report["planes"] == "dw" and "too small" in result.report["planes_choice"]["why"]


@pytest.mark.parametrize("options, message", [
    ({"mode": "2d"}, "planes 'auto' chooses between the 3D passes"),
    ({"self_check": False}, "planes 'auto' is chosen by the self-check"),
    ({"adapt": "config"}, "planes 'auto' with adaptation"),
])
def test_planes_auto_refuses_what_it_cannot_decide(t2_crop, tiny_bundle_dir, options, message):
    if options.get("adapt") == "config":
        options = {"adapt": adapt.AdaptConfig()}
    with pytest.raises(ValueError, match=message):
        inference.upscale_checked(sr3d_io.load_volume(t2_crop), models.load_models(tiny_bundle_dir, 2),
                                  planes="auto", **options)


def test_cli_planes_auto_with_no_self_check_is_one_line(tmp_path, t2_crop, tiny_bundle_dir, capsys):
    out = tmp_path / "auto.nii.gz"
    assert cli.main(["upscale", str(t2_crop), str(out), "--model", str(tiny_bundle_dir), "--planes", "auto",
                     "--no-self-check"]) == 2
    assert "planes 'auto' is chosen by the self-check" in capsys.readouterr().err
    assert not out.exists()
