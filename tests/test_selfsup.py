"""Tests of sr3d.selfsup: thick-axis detection, the plan, and short end-to-end runs (API and
`python -m sr3d upscale --self-supervised`) on a crop of a real 6.5 mm thick-slice brain MRI.
The slice-profile degradation it trains on is tested in tests/test_degrade.py."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from sr3d import cli, models, selfsup
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume

REPO = pathlib.Path(__file__).resolve().parents[1]
THICK = 6.5
INPLANE = 0.78125


@pytest.fixture(scope="module")
def thick_scan(shared_data):
    return sr3d_io.load_volume(shared_data / "thick-slice-brain-mr" / "brain1_image.nrrd")


@pytest.fixture(scope="module")
def small_scan(thick_scan, scan_crop):
    """6 slices x 96 x 96 of the real scan around its centre, with the affine of the crop."""
    return scan_crop(thick_scan, np.s_[9:15, 80:176, 80:176])


@pytest.fixture(scope="module")
def tiny_config():
    # 6.5 mm -> 1.625 mm: a x4 network; a handful of steps is enough to exercise every path.
    # No time budget, so the run stops at max_steps whatever the machine's load: reproducible.
    return selfsup.SelfSupConfig(target_spacing=1.625, time_budget_s=None, max_steps=12, steps_per_epoch=6,
                                 batch_size=32)


@pytest.fixture(scope="module")
def tiny_model(small_scan, tiny_config):
    return selfsup.train_on_scan(small_scan, tiny_config)


def _world(affine, index):
    return (np.asarray(affine) @ np.append(np.asarray(index, np.float64), 1.0))[:3]


# ---------------------------------------------------------------------------- spacing detection

def test_thick_axis_on_real_headers(shared_data, thick_scan):
    assert thick_scan.spacing[0] == pytest.approx(THICK, rel=1e-9)
    assert selfsup.thick_axis(thick_scan.spacing) == 0
    oblique = sr3d_io.load_volume(shared_data / "oblique-pd-dicom")  # 7 mm slice spacing, 0.86 mm pixels
    assert selfsup.thick_axis(oblique.spacing) == 0
    for isotropic in ("stroke-t1-t2-flair/T1.nii.gz", "totalseg-ct/example_ct.nii.gz"):
        spacing = sr3d_io.load_volume(shared_data / isotropic).spacing
        with pytest.raises(ValueError, match="isotropic"):
            selfsup.thick_axis(spacing)
    # 0.898 x 0.898 x 1.0 mm is 11% anisotropic, just beyond the 10% tolerance: W is the thick axis.
    assert selfsup.thick_axis(sr3d_io.load_volume(shared_data / "seg3d-head-mr/head_MR.nii.gz").spacing) == 2


def test_thick_axis_any_axis_and_two_thick_axes():
    assert selfsup.thick_axis((1.0, 1.0, 3.0)) == 2
    assert selfsup.thick_axis((0.5, 5.0, 0.5)) == 1
    with pytest.raises(ValueError, match="two axes are thick"):
        selfsup.thick_axis((3.0, 3.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        selfsup.thick_axis((3.0, 0.0, 1.0))


# ---------------------------------------------------------------------------- plan and training data

def test_plan_integer_and_non_integer_ratios():
    spacing = (THICK, INPLANE, INPLANE)
    five = selfsup.plan_for(spacing, target_spacing=1.3)
    assert (five.factor, five.resample) == (5, False)
    three_and_a_quarter = selfsup.plan_for(spacing, target_spacing=2.0)
    assert (three_and_a_quarter.factor, three_and_a_quarter.resample) == (4, True)
    assert three_and_a_quarter.network_mm == pytest.approx(1.625, rel=1e-12)
    assert "resampled" in three_and_a_quarter.describe()
    isotropic = selfsup.plan_for(spacing)  # default: in-plane spacing, 8.32 -> x9
    assert (isotropic.factor, isotropic.target_mm) == (9, INPLANE)
    assert selfsup.plan_for((1.0, 1.0, 3.0), factor=3).axis == 2
    with pytest.raises(ValueError, match="finer than the in-plane"):
        selfsup.plan_for(spacing, target_spacing=0.5)
    with pytest.raises(ValueError, match="not both"):
        selfsup.plan_for(spacing, factor=4, target_spacing=1.6)


def test_training_stacks_pair_thick_lr_with_resampled_hr(small_scan):
    plan = selfsup.plan_for(small_scan.spacing, target_spacing=1.625)
    stacks = selfsup.training_stacks(small_scan.array / 1000.0, plan)
    # 96 px at 0.78125 mm = 75 mm -> 46 px at 1.625 mm, cropped to 44 (a multiple of 4).
    for stack in stacks:
        assert stack.hr.shape == (6, 44, 96)
        assert stack.lr.shape == (6, 11, 96)
    # In both directions the degraded axis is axis 1 of the plane: LR is the 4-voxel mean of HR.
    np.testing.assert_allclose(stacks[0].lr[:, 2, :], stacks[0].hr[:, 8:12, :].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stacks[1].lr[:, 5, :], stacks[1].hr[:, 20:24, :].mean(axis=1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- end to end

def test_training_is_deterministic_for_a_seed(small_scan, tiny_model, tiny_config):
    again = selfsup.train_on_scan(small_scan, tiny_config)
    for a, b in zip(again.get_weights(), tiny_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_upscale_thick_integer_factor_keeps_the_field_of_view(small_scan, tiny_model):
    lines = []
    result = selfsup.upscale_thick(small_scan, tiny_model, progress=lines.append)
    assert result.shape == (24, 96, 96)
    np.testing.assert_allclose(result.spacing, (1.625, INPLANE, INPLANE), rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(result.affine[:3, :3], axis=0), (1.625, INPLANE, INPLANE), rtol=1e-9)
    for in_index, out_index in (((-0.5, 0, 0), (-0.5, 0, 0)), ((5.5, 95, 95), (23.5, 95, 95))):
        np.testing.assert_allclose(_world(result.affine, out_index), _world(small_scan.affine, in_index), atol=1e-6)
    assert small_scan.array.min() <= result.array.min() and result.array.max() <= small_scan.array.max()
    assert lines and "bands" in lines[-1]


def test_upscale_thick_finds_the_thick_axis_anywhere(small_scan, tiny_model):
    # The same scan stored (H, W, D): the thick axis is last; the world geometry is unchanged.
    moved = sr3d_volume.Volume(array=small_scan.array.transpose(1, 2, 0), spacing=(INPLANE, INPLANE, THICK),
                               affine=small_scan.affine[:, [1, 2, 0, 3]])
    expected = selfsup.upscale_thick(small_scan, tiny_model)
    result = selfsup.upscale_thick(moved, tiny_model)
    assert result.shape == (96, 96, 24)
    np.testing.assert_allclose(result.array, expected.array.transpose(1, 2, 0), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(result.affine, expected.affine[:, [1, 2, 0, 3]], atol=1e-9)


def test_upscale_thick_non_integer_ratio_resamples_to_the_target(small_scan, tiny_model):
    result = selfsup.upscale_thick(small_scan, tiny_model, target_spacing=1.8)  # 3.61 -> x4, then resampled
    expected_slices = round(6 * THICK / 1.8)  # 21.67 -> 22
    assert result.shape == (expected_slices, 96, 96)
    assert result.spacing[0] == pytest.approx(1.8, rel=1e-12)
    np.testing.assert_allclose(np.linalg.norm(result.affine[:3, 0]), 1.8, rtol=1e-9)
    # The centre of the field of view stays where it was.
    np.testing.assert_allclose(_world(result.affine, ((expected_slices - 1) / 2, 10, 20)),
                               _world(small_scan.affine, (2.5, 10, 20)), atol=1e-6)
    with pytest.raises(ValueError, match="x5 network"):
        selfsup.upscale_thick(small_scan, tiny_model, target_spacing=1.3)


def test_saved_model_is_reused_on_the_same_protocol_only(tmp_path, small_scan, tiny_model, tiny_config):
    plan = selfsup.plan_for(small_scan.spacing, target_spacing=1.625)
    path = selfsup.save_model(tiny_model, tmp_path / "brain.keras", plan, tiny_config)
    info = json.loads((tmp_path / "brain.json").read_text())
    assert (info["factor"], info["profile"], info["thick_spacing_mm"]) == (4, "box", pytest.approx(THICK))
    model, loaded_info = selfsup.load_model(path)
    plane = np.random.default_rng(0).random((2, 5, 9, 1)).astype(np.float32)
    np.testing.assert_allclose(model(plane)["final"], tiny_model(plane)["final"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(selfsup.upscale_thick(small_scan, path).array,
                               selfsup.upscale_thick(small_scan, tiny_model).array, rtol=1e-5, atol=1e-3)
    other = small_scan.replace(affine=small_scan.affine @ np.diag([5.0 / THICK, 1, 1, 1]),
                               spacing=(5.0, INPLANE, INPLANE))
    with pytest.raises(ValueError, match="not the same protocol"):
        selfsup.plan_for_model(other.spacing, loaded_info)


@pytest.mark.slow
def test_cli_self_supervised_writes_a_valid_nifti_and_reuses_the_model(tmp_path, small_scan, capsys):
    scan = sr3d_io.save_volume(small_scan, tmp_path / "thick.nii.gz")
    out, model = tmp_path / "fine.nii.gz", tmp_path / "brain.keras"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "sr3d", "upscale", str(scan), str(out), "--self-supervised",
                          "--target-spacing", "1.625", "--time-budget", "4", "--save-model", str(model)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "epoch" in run.stderr and "x4" in run.stderr
    image = nib.load(out)
    assert image.shape == (96, 96, 24)  # NIfTI stores (W, H, D)
    np.testing.assert_allclose(image.header.get_zooms(), (INPLANE, INPLANE, 1.625), rtol=1e-6)
    # The first output slice's outer face is the input's: half a voxel of each below index 0.
    np.testing.assert_allclose(image.affine @ [0, 0, -0.5, 1], nib.load(scan).affine @ [0, 0, -0.5, 1], atol=1e-4)
    assert any(b"self-supervised" in e.get_content() for e in image.header.extensions)

    resampled = tmp_path / "fine_1p8.nii.gz"
    assert cli.main(["upscale", str(scan), str(resampled), "--self-supervised", "--model", str(model),
                     "--target-spacing", "1.8"]) == 0
    image = nib.load(resampled)
    assert image.shape == (96, 96, 22)
    np.testing.assert_allclose(image.header.get_zooms()[2], 1.8, rtol=1e-6)
    assert any(b"resampled" in e.get_content() for e in image.header.extensions)

    capsys.readouterr()
    assert cli.main(["upscale", str(scan), str(tmp_path / "x.nii.gz"), "--self-supervised", "--scale", "3",
                     "--target-spacing", "1.8"]) == 2
    assert "give one" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_cli_slice_profile_reaches_training_and_needs_self_supervised(tmp_path, small_scan, capsys):
    scan = sr3d_io.save_volume(small_scan, tmp_path / "thick.nii.gz")
    model = tmp_path / "gauss.keras"
    assert cli.main(["upscale", str(scan), str(tmp_path / "g.nii.gz"), "--self-supervised", "--target-spacing",
                     "1.625", "--time-budget", "2", "--slice-profile", "gaussian", "--save-model", str(model)]) == 0
    saved = json.loads(model.with_suffix(".json").read_text())
    assert "gaussian" in json.dumps(saved)
    capsys.readouterr()
    assert cli.main(["upscale", str(scan), str(tmp_path / "b.nii.gz"), "--slice-profile", "gaussian"]) == 2
    assert "--slice-profile" in capsys.readouterr().err
    assert not (tmp_path / "b.nii.gz").exists()


def test_cli_profile_estimate_reaches_training_and_needs_an_estimate(tmp_path, small_scan, capsys):
    scan = sr3d_io.save_volume(small_scan, tmp_path / "thick.nii.gz")
    model = tmp_path / "posterior.keras"
    assert cli.main(["upscale", str(scan), str(tmp_path / "p.nii.gz"), "--self-supervised", "--target-spacing",
                     "1.625", "--steps", "2", "--slice-profile", "estimate", "--profile-estimate", "posterior",
                     "--save-model", str(model)]) == 0
    saved = json.loads(model.with_suffix(".json").read_text())
    assert saved["training"]["config"]["estimate"] == "posterior"
    assert saved["training"]["slice_profile"]["mixture"]["basis"].startswith("error table")
    for argv, flag in ((["--self-supervised", "--slice-profile", "box", "--profile-estimate", "posterior"],
                        "--slice-profile estimate"),
                       (["--profile-estimate", "posterior"], "--self-supervised"),
                       (["--model", str(model), "--profile-estimate", "posterior"], "trained already")):
        capsys.readouterr()
        assert cli.main(["upscale", str(scan), str(tmp_path / "x.nii.gz"), *argv]) == 2
        assert flag in capsys.readouterr().err
        assert not (tmp_path / "x.nii.gz").exists()
    # The flag's choices are the library's.
    assert sorted([a for a in cli.parser()._subparsers._group_actions[0].choices["upscale"]._actions
                   if a.dest == "profile_estimate"][0].choices) == sorted(selfsup.ESTIMATES)


# ---------------------------------------------------------------------------- gaps, one axis, steps, flags

def test_dicom_slice_thickness_is_read_and_gaps_are_simulated(shared_data):
    oblique = sr3d_io.load_volume(shared_data / "oblique-pd-dicom")  # 5 mm slices every 7 mm
    assert oblique.slice_thickness_mm == pytest.approx(5.0)
    fine = sr3d_volume.Volume(array=np.arange(16, dtype=np.float64).reshape(16, 1, 1) * np.ones((1, 2, 3)),
                              spacing=(1.0, 1.0, 1.0), affine=np.eye(4))
    # 2 mm box slices every 4 mm: thick voxel i is the mean of fine voxels 4i + 1 and 4i + 2.
    _, thick = selfsup.simulate_thick_slices(fine, 4, thickness=2)
    np.testing.assert_allclose(thick.array[:, 0, 0], [1.5, 5.5, 9.5, 13.5], rtol=1e-12)
    assert thick.slice_thickness_mm == pytest.approx(2.0)
    plan = selfsup.plan_for(thick.spacing, factor=4)
    profile = selfsup.resolve_profile(thick, plan)
    assert (profile.kind, profile.thickness_mm) == ("box", 2.0) and "SliceThickness" in profile.source
    assert "gap 2 mm" in profile.describe(plan)


def test_one_axis_api_upscales_only_that_axis(small_scan):
    from sr3d import inference

    scan = small_scan.replace(array=small_scan.array[:, :40, :40])
    result = inference.upscale(scan, 2, mode="thick")
    assert result.shape == (12, 40, 40) and result.report["mode"] == "d"
    np.testing.assert_allclose(result.spacing, (THICK / 2, INPLANE, INPLANE), rtol=1e-9)
    assert "(D, W) planes (6 x 40)" in result.report["self_check"]["skipped"]  # too few slices to score
    # The same scan stored with the thick axis last, upscaled along W: the same voxels.
    moved = sr3d_volume.Volume(array=scan.array.transpose(1, 2, 0), spacing=(INPLANE, INPLANE, THICK),
                               affine=scan.affine[:, [1, 2, 0, 3]])
    along_w = inference.upscale(moved, 2, mode="w", self_check=False)
    np.testing.assert_allclose(along_w.array.transpose(2, 0, 1), result.array, rtol=1e-5, atol=1e-3)


def test_cli_axes_d_and_model_forms(tmp_path, small_scan, capsys):
    scan = sr3d_io.save_volume(small_scan.replace(array=small_scan.array[:, :40, :40]), tmp_path / "thick.nii.gz")
    out = tmp_path / "d.nii.gz"
    assert cli.main(["upscale", str(scan), str(out), "--axes", "d", "--scale", "4"]) == 0
    assert nib.load(out).shape == (40, 40, 24)
    assert json.loads((tmp_path / "d.json").read_text())["mode"] == "d"
    tall = sr3d_volume.Volume(array=np.tile(small_scan.array[:, :40, :40], (3, 1, 1)), spacing=small_scan.spacing,
                              affine=small_scan.affine)  # 18 slices: enough for the one-axis self-check
    from sr3d import inference
    check = inference.upscale(tall, 2, mode="d").report["self_check"]
    assert check["mode"] == "d" and check["scale"] == 2
    capsys.readouterr()
    shipped = str(REPO / "sr3d" / "data_files" / "models" / "x2")
    assert cli.main(["upscale", str(scan), str(tmp_path / "e.nii.gz"), "--self-supervised", "--model", shipped]) == 2
    assert "bundle directory" in capsys.readouterr().err
    assert cli.main(["upscale", str(scan), str(tmp_path / "f.nii.gz"), "--steps", "3"]) == 2
    assert "--self-supervised" in capsys.readouterr().err
    assert not (tmp_path / "e.nii.gz").exists() and not (tmp_path / "f.nii.gz").exists()


def test_cli_steps_make_two_runs_identical(tmp_path, small_scan):
    scan = sr3d_io.save_volume(small_scan, tmp_path / "thick.nii.gz")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.nii.gz"
        assert cli.main(["upscale", str(scan), str(out), "--self-supervised", "--scale", "2", "--steps", "4",
                         "--seed", "3", "--slice-thickness", "5", "--save-model", str(tmp_path / f"model_{name}.keras")]) == 0
        outs.append(out)
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["training"]["steps"] == 4 and report["training"]["seed"] == 3
        assert report["training"]["slice_profile"]["thickness_mm"] == 5.0
    np.testing.assert_array_equal(nib.load(outs[0]).get_fdata(), nib.load(outs[1]).get_fdata())
    # A saved .keras file is told apart from a bundle by what is on disk: no --self-supervised needed.
    assert cli.main(["upscale", str(scan), str(tmp_path / "c.nii.gz"), "--model", str(tmp_path / "model_a.keras")]) == 0
    np.testing.assert_allclose(nib.load(tmp_path / "c.nii.gz").get_fdata(), nib.load(outs[0]).get_fdata(),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind, width", [("box", 4.0), ("gaussian", 3.0)])
def test_estimated_profile_on_an_isotropic_volume(kind, width):
    from scipy import ndimage

    # Statistically isotropic texture (the estimator's assumption), 1 mm voxels, slices every 4 mm.
    field = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((96, 96, 96)).astype(np.float32), 1.0)
    fine = sr3d_volume.Volume(array=np.abs(ndimage.gaussian_filter(field, 0.7)) * 100 + 50, spacing=(1.0, 1.0, 1.0),
                              affine=np.eye(4))
    _, thick = selfsup.simulate_thick_slices(fine, 4, profile=kind, thickness=width)
    estimate = selfsup.estimate_profile(thick, selfsup.plan_for(thick.spacing, factor=4))
    assert estimate.kind == kind
    assert estimate.thickness_mm == pytest.approx(width, abs=0.2)


@pytest.mark.parametrize("scan", ["T2", "FLAIR"])
def test_estimated_profile_on_slices_simulated_from_real_mr(shared_data, scan):
    # Golden values: the widths the slices were simulated with (box and Gaussian, 2-6 mm every 5 mm,
    # from a real 1 mm scan). Brain anatomy is not alike along its axes at 5-20 mm periods, so the
    # estimate stays biased (docs/thick_slice.md); the shape match must be less biased than the
    # per-axis one it replaced, the prior toward contiguous slices less than the spectra alone, and
    # the default within a quarter of the spacing on average.
    fine = sr3d_io.load_volume(shared_data / "stroke-t1-t2-flair" / f"{scan}.nii.gz")
    variants = {"default": {}, "spectra alone": {"prior_weight": 0.0}, "per-axis": {"match": "per-axis", "prior_weight": 0.0}}
    errors = {name: [] for name in variants}
    for kind in selfsup.PROFILES:
        for width in (2.0, 3.0, 4.0, 6.0):
            _, thick = selfsup.simulate_thick_slices(fine, 5, profile=kind, thickness=width / fine.spacing[0])
            plan = selfsup.plan_for(thick.spacing, factor=5)
            for name, options in variants.items():
                errors[name].append(selfsup.estimate_profile(thick, plan, **options).thickness_mm - width)
    default, shape, per_axis = (np.asarray(errors[m]) for m in variants)
    assert np.abs(shape).mean() < np.abs(per_axis).mean()
    assert abs(shape.mean()) < abs(per_axis.mean())
    assert np.abs(default).mean() < np.abs(shape).mean()
    assert abs(default.mean()) < abs(shape.mean())
    assert np.abs(default).mean() <= 0.25 * 5.0


def test_estimate_profile_rejects_an_unknown_match(thick_scan):
    with pytest.raises(ValueError, match="match must be"):
        selfsup.estimate_profile(thick_scan, match="spectra")


# ---------------------------------------------------------------------------- the population reference

def _texture(seed: int, d_slope_log10: float = 0.0) -> sr3d_volume.Volume:
    """A 1 mm texture, statistically isotropic, or with d_slope_log10 more log10 power along D than
    across it at the fine Nyquist frequency (linear in frequency): anisotropic anatomy."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((96, 96, 96)).astype(np.float32), 1.0)
    gain = 10 ** (d_slope_log10 * np.abs(np.fft.fftfreq(96))[:, None, None])   # amplitude: half the log10 power
    field = np.real(np.fft.ifft(np.fft.fft(field, axis=0) * gain, axis=0)).astype(np.float32)
    return sr3d_volume.Volume(array=np.abs(ndimage.gaussian_filter(field, 0.7)) * 100 + 50, spacing=(1.0, 1.0, 1.0),
                              affine=np.eye(4))


def test_anisotropy_table_interpolates_and_the_shipped_one_covers_the_match():
    table = selfsup.AnisotropyTable((0.01, 0.02, 0.04), {"SI": (0.1, -0.2, 0.3)})
    np.testing.assert_allclose(table.correction("SI", [0.01, 0.02, 0.04]), [0.1, -0.2, 0.3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(table.correction("SI", [0.005, 0.03, 0.08]), [0.1, 0.05, 0.3], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no direction 'AP'"):
        table.correction("AP", [0.01])
    shipped = selfsup.population_table()
    assert sorted(shipped.log10_difference) == sorted(selfsup.WORLD_DIRECTIONS)
    # The match's frequencies k / (16 x spacing), k = 1..8, for slices every 3 to 7 mm.
    assert min(shipped.frequencies_cpmm) <= 1 / (16 * 7) and max(shipped.frequencies_cpmm) >= 8 / (16 * 3)
    assert selfsup.AnisotropyTable.from_json(json.loads(json.dumps(shipped.to_json()))).to_json() == shipped.to_json()
    assert selfsup.world_direction(np.eye(4), 0) == "LR"
    assert selfsup.world_direction(sr3d_volume.Volume(np.zeros((2, 2, 2), np.float32), (1, 1, 1),
                                                      np.diag([1.0, 1.0, 1.0, 1.0])[:, [2, 1, 0, 3]]).affine, 0) == "SI"


def test_population_reference_on_an_isotropic_volume_changes_nothing():
    # Golden from first principles: alike axes give a flat residual at the true profile, and a table of
    # zeros leaves every distance, so the estimate, as it was (exact: the simulated Gaussian 3 mm).
    _, thick = selfsup.simulate_thick_slices(_texture(0), 4, profile="gaussian", thickness=3.0)
    plan = selfsup.plan_for(thick.spacing, factor=4)
    frequencies, residual = selfsup.match_residual(thick, "gaussian", 3.0, plan)
    np.testing.assert_allclose(frequencies, np.arange(1, 9) / 64, rtol=1e-9)
    np.testing.assert_allclose(residual - residual.mean(), 0, atol=0.02)
    zeros = selfsup.AnisotropyTable(tuple(frequencies), {"LR": (0.0,) * 8})
    plain = selfsup.estimate_profile(thick, plan, prior_weight=0.0)
    corrected = selfsup.estimate_profile(thick, plan, prior_weight=0.0, reference=zeros)
    assert (plain.kind, plain.thickness_mm) == (corrected.kind, corrected.thickness_mm) == ("gaussian", pytest.approx(3.0))
    assert corrected.distance == pytest.approx(plain.distance, rel=1e-9)


@pytest.mark.parametrize("kind, width", [("gaussian", 3.0), ("box", 4.0)])
def test_population_reference_returns_the_profile_of_a_volume_with_the_tables_anisotropy(kind, width):
    # A texture with more fine detail along D than across it: the in-plane reference reads that as a
    # thinner profile; a table that holds exactly this anisotropy (the residual at the true profile)
    # gives the simulated profile back (golden: the simulated kind and width, both candidates).
    _, thick = selfsup.simulate_thick_slices(_texture(0, d_slope_log10=2.0), 4, profile=kind, thickness=width)
    plan = selfsup.plan_for(thick.spacing, factor=4)
    frequencies, residual = selfsup.match_residual(thick, kind, width, plan)
    table = selfsup.AnisotropyTable(tuple(frequencies), {"LR": tuple(residual)})
    plain = selfsup.estimate_profile(thick, plan, prior_weight=0.0)
    corrected = selfsup.estimate_profile(thick, plan, prior_weight=0.0, reference=table)
    assert plain.thickness_mm < width - 0.1          # thinner: gaussian 2.8 and 2.4 mm
    assert corrected.kind == kind and corrected.thickness_mm == pytest.approx(width)
    assert corrected.distance == pytest.approx(0.0, abs=1e-9)


def test_population_reference_rejects_bad_options(thick_scan):
    with pytest.raises(ValueError, match="reference must be"):
        selfsup.estimate_profile(thick_scan, reference="scan")
    with pytest.raises(ValueError, match="shrink must be"):
        selfsup.estimate_profile(thick_scan, reference="population", shrink=1.5)


# ---------------------------------------------------------------------------- starting from the shipped stage d

def test_init_shipped_starts_from_the_shipped_network(small_scan, tiny_config):
    assert (selfsup.SelfSupConfig().learning_rate, selfsup.SelfSupConfig().learning_rate_after_drop) == (1e-3, 1e-4)
    warm_defaults = selfsup.SelfSupConfig(init="shipped")
    assert (warm_defaults.learning_rate, warm_defaults.learning_rate_after_drop) == (1e-4, 1e-5)
    # A step too small to move a weight: what training starts from is left in the network.
    config = dataclasses.replace(tiny_config, init="shipped", max_steps=1, learning_rate=1e-12,
                                 learning_rate_after_drop=1e-12)
    trained = selfsup.train(small_scan, config)
    shipped = models.load(str(models.shipped_model_dir(4) / models.MODEL_FILES["d"]))
    for got, want in zip(trained.model.get_weights(), shipped.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert trained.to_json()["config"]["init"] == "shipped"
    scratch = selfsup.train(small_scan, dataclasses.replace(config, init="random"))
    assert not np.allclose(scratch.model.get_weights()[0], shipped.get_weights()[0])


def test_init_shipped_refuses_a_factor_or_width_not_shipped(small_scan, tiny_config):
    with pytest.raises(ValueError, match="no shipped stage d for x3"):
        selfsup.train(small_scan, dataclasses.replace(tiny_config, init="shipped", target_spacing=6.5 / 3))
    with pytest.raises(ValueError, match="network does not match this run's"):
        selfsup.train(small_scan, dataclasses.replace(tiny_config, init="shipped", filters=8))
    with pytest.raises(ValueError, match="init must be one of"):
        selfsup.SelfSupConfig(init="imagenet")


def test_cli_init_shipped_is_recorded_and_needs_training(tmp_path, small_scan, capsys):
    scan = sr3d_io.save_volume(small_scan, tmp_path / "thick.nii.gz")
    out = tmp_path / "warm.nii.gz"
    assert cli.main(["upscale", str(scan), str(out), "--self-supervised", "--scale", "4", "--steps", "2",
                     "--init", "shipped", "--save-model", str(tmp_path / "net.keras")]) == 0
    config = json.loads((tmp_path / "warm.json").read_text())["training"]["config"]
    assert (config["init"], config["learning_rate"]) == ("shipped", 1e-4)
    capsys.readouterr()
    assert cli.main(["upscale", str(scan), str(tmp_path / "a.nii.gz"), "--init", "shipped"]) == 2
    assert "--init" in capsys.readouterr().err
    assert cli.main(["upscale", str(scan), str(tmp_path / "b.nii.gz"), "--model", str(tmp_path / "net.keras"),
                     "--init", "shipped"]) == 2
    assert "--init" in capsys.readouterr().err
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "b.nii.gz").exists()


# ---------------------------------------------------------------------------- the estimate as a mixture of candidates

@pytest.fixture(scope="module")
def isotropic_thick():
    """Gaussian 2.5 mm slices every 4 mm simulated from a statistically isotropic 1 mm texture."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(np.random.default_rng(1).standard_normal((64, 64, 64)).astype(np.float32), 1.0)
    fine = sr3d_volume.Volume(array=np.abs(field) * 100 + 50, spacing=(1.0, 1.0, 1.0), affine=np.eye(4))
    _, thick = selfsup.simulate_thick_slices(fine, 4, profile="gaussian", thickness=2.5)
    return thick


def test_mixture_weights_are_a_softmax_of_the_relative_distances(isotropic_thick):
    plan = selfsup.plan_for(isotropic_thick.spacing, factor=4)
    mixture = selfsup.estimate_mixture(isotropic_thick, plan, temperature=0.2, top_k=3)
    assert mixture.best == selfsup.estimate_profile(isotropic_thick, plan)
    assert len(mixture.candidates) == 3
    # Golden: the three best distinct kernels of profile_candidates, weights exp(-(d / d_best - 1) / T) normalised.
    kernels, expected = [], []
    for candidate in selfsup.profile_candidates(isotropic_thick, plan):
        kernel = selfsup.slice_profile(candidate.thickness_mm / plan.network_mm, candidate.kind, 4)
        if not any(k.shape == kernel.shape and np.allclose(k, kernel, atol=1e-6) for k in kernels):
            kernels.append(kernel)
            expected.append(candidate)
    expected = expected[:3]
    assert [(c.kind, c.thickness_mm) for c in mixture.candidates] == [(c.kind, c.thickness_mm) for c in expected]
    logits = np.array([-(c.distance / expected[0].distance - 1) / 0.2 for c in expected])
    np.testing.assert_allclose(mixture.weights, np.exp(logits) / np.exp(logits).sum(), rtol=1e-12)
    assert sum(mixture.weights) == pytest.approx(1.0, abs=1e-12)
    assert mixture.weights[0] == max(mixture.weights)
    assert list(mixture.weights) == sorted(mixture.weights, reverse=True)
    # One kernel: the best profile alone, weight 1. A colder softmax gives the best more weight.
    assert selfsup.estimate_mixture(isotropic_thick, plan, top_k=1).weights == (1.0,)
    assert selfsup.estimate_mixture(isotropic_thick, plan, temperature=0.02, top_k=3).weights[0] > mixture.weights[0]
    with pytest.raises(ValueError, match="temperature"):
        selfsup.estimate_mixture(isotropic_thick, plan, temperature=0.0)
    reported = mixture.to_json()
    assert (reported["kind"], reported["thickness_mm"]) == (mixture.best.kind, round(mixture.best.thickness_mm, 4))
    assert [c["weight"] for c in reported["mixture"]["candidates"]] == [round(w, 6) for w in mixture.weights]
    assert "mixture" in mixture.describe(plan)


def test_mixture_draws_are_stratified_and_seeded():
    box, gauss = selfsup.SliceProfile("box", 2.0, "test", 1.0), selfsup.SliceProfile("gaussian", 2.5, "test", 1.1)
    mixture = selfsup.ProfileMixture((box, gauss), (0.66, 0.34), 0.1, 2)
    draws = mixture.draws(10, (0, 1))
    # 6.6 and 3.4 slices: 6 and 3 whole, the one left to the larger remainder (0.6).
    assert np.bincount(draws, minlength=2).tolist() == [7, 3]
    np.testing.assert_array_equal(draws, mixture.draws(10, (0, 1)))
    assert not np.array_equal(draws, mixture.draws(10, (0, 2))) or not np.array_equal(draws, mixture.draws(10, (1, 1)))
    with pytest.raises(ValueError, match="sum to 1"):
        selfsup.ProfileMixture((box, gauss), (0.5, 0.6), 0.1, 2)


def test_training_stacks_of_a_mixture_degrade_each_slice_by_its_draw():
    from sr3d import degrade

    plan = selfsup.plan_for((4.0, 1.0, 1.0), factor=4)
    box, gauss = selfsup.SliceProfile("box", 2.0, "test", 1.0), selfsup.SliceProfile("gaussian", 2.5, "test", 1.1)
    mixture = selfsup.ProfileMixture((box, gauss), (0.6, 0.4), 0.1, 2)
    slices = np.random.default_rng(0).random((10, 16, 12)).astype(np.float32)
    stacks = selfsup.training_stacks(slices, plan, mixture, seed=5)
    for stack, axis in zip(stacks, (1, 2)):
        which = mixture.draws(10, (5, axis))
        for i in range(10):
            profile = (box, gauss)[which[i]]
            # Independent degradation: the profile's kernel on the 1 mm grid, every 4th sample.
            kernel = degrade.slice_profile(profile.thickness_mm, profile.kind, 4)
            expected = degrade.degrade_along(slices[i], 4, axis - 1, kernel)
            np.testing.assert_allclose(stack.lr[i], expected if axis == 1 else expected.T, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(stack.hr[i], slices[i] if axis == 1 else slices[i].T)
    # The box 2 mm slices are the two-tap mean of the middle fine voxels: [0.5, 0.5].
    i = int(np.flatnonzero(mixture.draws(10, (5, 1)) == 0)[0])
    np.testing.assert_allclose(stacks[0].lr[i, 1], slices[i, 5:7].mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("estimate", ["mixture", "posterior"])
def test_mixture_training_is_deterministic_and_reported(small_scan, tiny_config, estimate):
    config = dataclasses.replace(tiny_config, profile="estimate", estimate=estimate, max_steps=4)
    first, second = selfsup.train(small_scan, config), selfsup.train(small_scan, config)
    assert isinstance(first.profile, selfsup.ProfileMixture)
    assert first.profile == second.profile
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    reported = first.to_json()["slice_profile"]
    assert sum(c["weight"] for c in reported["mixture"]["candidates"]) == pytest.approx(1.0, abs=1e-5)
    if estimate == "mixture":
        assert reported["mixture"]["temperature"] == selfsup.MIXTURE_TEMPERATURE
    else:
        assert reported["mixture"]["basis"].startswith("error table") and "temperature" not in reported["mixture"]
    # The best candidate is the spectral estimate either way.
    plan = selfsup.plan_for(small_scan.spacing, target_spacing=1.625)
    assert first.profile.best == selfsup.estimate_profile(small_scan, plan)
    with pytest.raises(ValueError, match="estimate must be"):
        dataclasses.replace(tiny_config, estimate="average")


# ---------------------------------------------------------------------------- the estimate's posterior

def test_posterior_keeps_the_nearest_rows_of_the_estimates_kind_and_pools_kernels(isotropic_thick):
    plan = selfsup.plan_for(isotropic_thick.spacing, factor=4)
    best = selfsup.estimate_profile(isotropic_thick, plan)
    f0, other = best.thickness_mm / plan.thick_mm, "box" if best.kind == "gaussian" else "gaussian"

    def row(kind, fraction, estimated_kind, estimated_fraction):
        return {"kind": kind, "fraction": fraction, "estimated_kind": estimated_kind,
                "estimated_fraction": estimated_fraction}

    table = {"rows": [row("box", 0.8, best.kind, f0), row("box", 0.8, best.kind, f0), row("gaussian", 0.6, best.kind, f0),
                      row("gaussian", 1.0, best.kind, f0 + 0.1), row("box", 0.4, best.kind, f0 - 0.1),
                      row("box", 1.2, other, f0),                       # another kind of estimate: not this one's
                      row("gaussian", 1.4, best.kind, f0 + 0.5)]}       # farther than the 4th nearest
    # Golden, by hand: 4 neighbours keep the three rows at the estimate and both at 0.1 (a tie with the 4th).
    mixture = selfsup.estimate_posterior(isotropic_thick, plan, neighbours=4, table=table)
    assert mixture.best == best
    got = {(c.kind, round(c.thickness_mm, 6)): w for c, w in zip(mixture.candidates[1:], mixture.weights[1:])}
    assert got == {("box", 3.2): pytest.approx(2 / 5), ("gaussian", 2.4): pytest.approx(1 / 5),
                   ("gaussian", 4.0): pytest.approx(1 / 5), ("box", 1.6): pytest.approx(1 / 5)}
    assert mixture.weights[0] == 0 and sum(mixture.weights) == pytest.approx(1.0, abs=1e-12)
    three = selfsup.estimate_posterior(isotropic_thick, plan, neighbours=3, table=table)
    assert [(c.kind, round(c.thickness_mm, 6), round(w, 6)) for c, w in zip(three.candidates[1:], three.weights[1:])] \
        == [("box", 3.2, round(2 / 3, 6)), ("gaussian", 2.4, round(1 / 3, 6))]
    # On a 1 mm grid with factor 4 a box of 1.2 mm and one of 2 mm are both [0.5, 0.5] (the two middle
    # voxels of four): one candidate with both rows' shares. A fraction past the candidates' range is clipped.
    pooled = selfsup.estimate_posterior(isotropic_thick, plan, neighbours=3, table={"rows": [
        row("box", 0.3, best.kind, f0), row("box", 0.5, best.kind, f0), row("gaussian", 2.0, best.kind, f0)]})
    kernels = [selfsup.slice_profile(c.thickness_mm, c.kind, 4) for c in pooled.candidates[1:]]
    np.testing.assert_allclose(kernels[0], [0.5, 0.5])
    assert pooled.weights[1:] == pytest.approx((2 / 3, 1 / 3))
    assert pooled.candidates[2].thickness_mm == pytest.approx(selfsup.ESTIMATE_FRACTIONS[-1] * 4)
    with pytest.raises(ValueError, match="neighbours"):
        selfsup.estimate_posterior(isotropic_thick, plan, neighbours=0, table=table)
    assert "error table" in mixture.to_json()["mixture"]["basis"]


def test_shipped_error_table_leaves_out_dev_and_test_scans_and_the_test_profiles():
    table = json.loads(selfsup.PROFILE_ERRORS_TABLE.read_text())
    subjects = {r["subject"] for r in table["rows"]}
    assert len(subjects) == 7 and not subjects & {"sub-01", "sub-10", "sub-19", "sub-34", "sub-40"}
    assert {r["estimated_kind"] for r in table["rows"]} <= set(selfsup.PROFILES)
    assert {r["kind"] for r in table["rows"]} == set(selfsup.PROFILES)
    # Not the test gap cases' profiles (docs/thick_slice.md): Gaussian 0.625 x the spacing at x4, box 0.8 at x5.
    assert not [r for r in table["rows"] if (r["factor"], r["fraction"]) in ((4, 0.625), (5, 0.8))]
    assert "CC0" in table["about"]["licence"]
