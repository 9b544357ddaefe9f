"""Tests for sr3d/cli.py: `sr3d upscale` end to end on real NIfTI and DICOM input, and its errors.

Two runs go through `python -m sr3d` in a subprocess (the real command, exit status and
stderr); the rest call `sr3d.cli.main([...])` in this process. Models: the random-weight
test bundle (tests/conftest.py), so only geometry, files and messages are checked here.
"""
import io
import json
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from sr3d import cli, inference, models
from sr3d import io as sr3d_io
from sr3d.progress import Step

DICOM_FILES = [f"brain_{i:03d}.dcm" for i in range(5, 11)]   # 6 consecutive slices, 256 x 256


def _sr3d(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sr3d", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.append(np.asarray(index, float), 1.0))[:3]


@pytest.fixture(scope="module")
def nifti_crop(tmp_path_factory, ixi_files, scan_crop):
    """A 6 x 24 x 20 (D, H, W) crop of a real IXI T1 scan written as NIfTI, origin moved with it."""
    return sr3d_io.save_volume(scan_crop(ixi_files[1], np.s_[40:46, 48:72, 50:70]),
                               tmp_path_factory.mktemp("nifti") / "crop.nii.gz")


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory, shared_data):
    """Six slices of a real oblique DICOM series (gaps between slices) in their own directory."""
    directory = tmp_path_factory.mktemp("dicom") / "series"
    directory.mkdir()
    for name in DICOM_FILES:
        shutil.copyfile(shared_data / "oblique-pd-dicom" / name, directory / name)
    return directory


def _fov_corners(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates of the outer corners of the first and the last voxel."""
    return np.array([_world(affine, [-0.5] * 3), _world(affine, np.asarray(shape) - 0.5)])


@pytest.mark.slow
def test_upscale_nifti_subprocess(tmp_path, nifti_crop, tiny_bundle_dir):
    out = tmp_path / "crop_x2.nii.gz"
    # --precision float32: compared below with the library's float32 result (the CLI's default is auto).
    # --planes dw: one pass, whose progress totals are checked below (the default, auto, may run three).
    result = _sr3d("upscale", nifti_crop, out, "--model", tiny_bundle_dir, "--scale", "2", "--precision", "float32",
                   "--planes", "dw")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The progress bar (stderr is not a terminal: plain lines) ends with the totals of a 6 x 24 x 20 scan.
    assert "upscale 100% | band 1/1 | stage hw 6/6 slices | stage d 48/48 planes" in result.stderr
    assert _tensorflow_lines(result.stderr) == [], "TensorFlow's startup lines are hidden without --verbose"
    written_in, written_out = nib.load(nifti_crop), nib.load(out)
    assert written_in.shape == (20, 24, 6)                                 # NIfTI (i, j, k) = (W, H, D)
    assert written_out.shape == (40, 48, 12)
    np.testing.assert_allclose(_fov_corners(written_out.affine, written_out.shape),
                               _fov_corners(written_in.affine, written_in.shape), rtol=0, atol=1e-4)
    np.testing.assert_allclose(written_out.header.get_zooms(), np.array(written_in.header.get_zooms()) / 2)
    # The command writes what the library computes.
    expected = inference.upscale_volume(sr3d_io.load_volume(nifti_crop),
                                        models.load_models(tiny_bundle_dir, scale=2)).array
    np.testing.assert_allclose(np.asarray(written_out.dataobj).transpose(2, 1, 0), expected, rtol=0, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop_x2.json", "crop_x2.nii.gz"]  # + the report
    assert json.loads((tmp_path / "crop_x2.json").read_text())["consistency"] is True


def test_upscale_no_consistency_writes_the_networks_output_alone(tmp_path, nifti_crop, tiny_bundle_dir):
    out = tmp_path / "plain.nii.gz"
    assert cli.main(["upscale", str(nifti_crop), str(out), "--model", str(tiny_bundle_dir), "--precision", "float32",
                     "--no-consistency", "--no-self-check"]) == 0
    volume, bundle = sr3d_io.load_volume(nifti_crop), models.load_models(tiny_bundle_dir, scale=2)
    written = sr3d_io.load_volume(out).array
    np.testing.assert_allclose(written, inference.upscale_volume(volume, bundle, consistency=False).array,
                               rtol=0, atol=1e-3)
    # ... which the default changes (the random bundle is far from consistent with its input).
    assert np.abs(written - inference.upscale_volume(volume, bundle).array).max() > 1.0
    assert json.loads((tmp_path / "plain.json").read_text())["consistency"] is False


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _run_bar(tty: bool, seconds_per_call: float):
    """Feeds a bar the calls of a 3D upscale of 40 slices and 200 planes, one call every `seconds_per_call`."""
    clock, stream = _Clock(), _Stream(tty)
    bar = cli._ProgressBar("upscale", stream=stream, weights={"slices": 0.25, "planes": 0.75}, clock=clock)
    calls = [("bands", 0, 1)] + [("slices", i, 40) for i in range(1, 41)] + [("planes", i, 200) for i in range(1, 201)]
    calls.append(("bands", 1, 1))
    for call in calls:
        clock.now += seconds_per_call
        bar(Step(*call))
    return stream.getvalue(), len(calls) * seconds_per_call


def test_progress_plain_lines_are_throttled_and_end_with_the_totals():
    text, _ = _run_bar(tty=False, seconds_per_call=0.5)   # 120 s of work
    lines = text.splitlines()
    assert "\r" not in text
    # At most one line per 2 s, and only after 10% more of the work (or 30 s): 10 lines for 0-100%.
    assert 5 <= len(lines) <= 11, lines
    percents = [int(re.match(r"upscale +(\d+)%", line).group(1)) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100
    assert lines[-1].startswith("upscale 100% | band 1/1 | stage hw 40/40 slices | stage d 200/200 planes | 120 s")


def test_progress_on_a_terminal_is_one_updating_line():
    text, _ = _run_bar(tty=True, seconds_per_call=0.1)
    assert text.count("\n") == 1 and text.endswith("\n")
    redraws = text.split("\r")[1:]
    assert 40 <= len(redraws) <= 50, "at most one redraw per 0.5 s over 24 s (+ the last)"
    assert "stage d 200/200 planes" in redraws[-1]


def test_progress_without_weights_shows_each_phase():
    clock, stream = _Clock(), _Stream(False)
    bar = cli._ProgressBar("study", stream=stream, clock=clock)
    for unit, n in (("scans read", 3), ("scans reconstructed", 2)):
        for i in range(1, n + 1):
            clock.now += 5
            bar(Step(unit, i, n))
    assert stream.getvalue().splitlines()[-1].startswith("study 100% | 2/2 scans reconstructed")
    assert "study 100% | 3/3 scans read" in stream.getvalue()


def _tensorflow_lines(stderr: str) -> list[str]:
    """The lines TensorFlow's C++ runtime writes at startup (absl log lines such as
    "I0000 00:00:... port.cc:153] oneDNN custom operations are on", and absl's preamble)."""
    return [line for line in stderr.splitlines()
            if re.match(r"[IWEF]\d{4} \d\d:\d\d:", line) or "absl::InitializeLog" in line]


@pytest.mark.slow
def test_upscale_verbose_shows_tensorflow_startup_lines(tmp_path, nifti_crop, tiny_bundle_dir):
    result = _sr3d("upscale", nifti_crop, tmp_path / "out.nii.gz", "--model", tiny_bundle_dir, "--verbose",
                   "--no-self-check")
    assert result.returncode == 0, result.stderr
    assert any("oneDNN custom operations" in line for line in _tensorflow_lines(result.stderr)), result.stderr


def _dicom_voxel_centres_ras(directory) -> np.ndarray:
    """World RAS+ mm of the 8 extreme voxel centres of a DICOM series, from the headers alone."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(directory.iterdir())]
    row_cos, col_cos = (np.array(datasets[0].ImageOrientationPatient[i:i + 3], float) for i in (0, 3))
    normal = np.cross(row_cos, col_cos)
    positions = sorted((np.array(ds.ImagePositionPatient, float) for ds in datasets), key=lambda p: p @ normal)
    row_spacing, col_spacing = map(float, datasets[0].PixelSpacing)   # between rows, between columns
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    corners = [position + c * col_spacing * row_cos + r * row_spacing * col_cos
               for position in (positions[0], positions[-1]) for r in (0, rows - 1) for c in (0, cols - 1)]
    return np.array(corners) * [-1.0, -1.0, 1.0]                          # LPS -> RAS


@pytest.mark.slow
def test_upscale_dicom_series_subprocess(tmp_path, dicom_dir, tiny_bundle_dir):
    out = tmp_path / "series_x2.nii"
    result = _sr3d("upscale", dicom_dir, out, "--model", tiny_bundle_dir, "--scale", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"upscale 100% \| band (\d+)/\1 \| stage hw 6/6 slices \| stage d 512/512 planes",
                     result.stderr), result.stderr
    written = nib.load(out)
    assert written.shape == (512, 512, 12)
    # Input voxel n sits at output index 2n + 0.5 on every axis: the grids overlay in world space.
    upscaled = [_world(written.affine, (i, j, k)) for k in (0.5, 10.5) for j in (0.5, 510.5) for i in (0.5, 510.5)]
    expected = _dicom_voxel_centres_ras(dicom_dir)
    np.testing.assert_allclose(np.array(sorted(map(tuple, upscaled))), np.array(sorted(map(tuple, expected))),
                               rtol=0, atol=1e-3)
    assert written.get_data_dtype() == np.int16, "the input's dtype is kept"


def test_upscale_2d_in_process(tmp_path, nifti_crop, tiny_bundle_dir, capsys):
    out = tmp_path / "crop_2d.nii.gz"
    status = cli.main(["upscale", str(nifti_crop), str(out), "--model", str(tiny_bundle_dir), "--axes", "2d",
                       "--tile-mb", "0.01", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "(2d)" in err and re.search(r"upscale 100% \| band (\d+)/\1 \| stage hw 6/6 slices \| \d+ s\n", err)
    written_in, written_out = nib.load(nifti_crop), nib.load(out)
    assert written_out.shape == (40, 48, 6)
    np.testing.assert_allclose(written_out.header.get_zooms(), np.array(written_in.header.get_zooms()) / [2, 2, 1])
    np.testing.assert_allclose(_fov_corners(written_out.affine, written_out.shape),
                               _fov_corners(written_in.affine, written_in.shape), rtol=0, atol=1e-4)


@pytest.mark.parametrize("planes", ["both", "all"])
def test_upscale_planes_is_the_api_result(tmp_path, nifti_crop, tiny_bundle_dir, capsys, planes):
    out = tmp_path / f"crop_{planes}.nii.gz"
    status = cli.main(["upscale", str(nifti_crop), str(out), "--model", str(tiny_bundle_dir), "--planes", planes,
                       "--precision", "float32"])
    assert status == 0, capsys.readouterr().err
    volume = sr3d_io.load_volume(nifti_crop)
    bundle = models.load_models(tiny_bundle_dir, 2)
    expected = inference.upscale_volume(volume, bundle, planes=planes).array
    dw = inference.upscale_volume(volume, bundle, planes="dw").array
    written = sr3d_io.load_volume(out).array
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    assert np.abs(written - dw).max() > 1e-2 * np.abs(dw).max()  # it is not the default path
    sidecar = json.loads(out.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["planes"] == planes
    # The test bundle has no orientation_fusion in its bundle.json: the plain mean of the passes.
    assert sidecar.get("orientation_fusion_beta") == (0.0 if planes == "all" else None)


def test_bundle_command(tmp_path, tiny_bundle_dir, capsys):
    out = tmp_path / "bundle"
    status = cli.main(["bundle", "--hw", str(tiny_bundle_dir / "hw.keras"), "--d", str(tiny_bundle_dir / "d.keras"),
                       "--scale", "2", "--out", str(out), "--note", "copy"])
    assert status == 0, capsys.readouterr().err
    bundle = models.load_models(out, scale=2)
    assert bundle.info == {"note": "copy", "scale": 2}


# ---------------------------------------------------------------------------- errors

@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan\n")
    (tmp_path / "text.nii.gz").write_text("not a scan either\n")
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.mark.parametrize("input_name, output_name, extra, named", [
    ("missing.nii.gz", "out/x.nii.gz", [], "missing.nii.gz"),
    ("notes.txt", "out/x.nii.gz", [], "notes.txt: unsupported file type"),
    ("text.nii.gz", "out/x.nii.gz", [], "text.nii.gz: not a readable NIfTI file"),
    ("CROP", "nowhere/x.nii.gz", [], "x.nii.gz: output directory"),
    ("CROP", "out/x.nrrd", [], "x.nrrd: output must be a NIfTI file ending in .nii or .nii.gz"),
    ("CROP", "out/x.nii.gz", ["--scale", "1"], "--scale must be an integer >= 2, got 1"),
    ("CROP", "out/x.nii.gz", ["--model", "DIR"], "not an sr3d model bundle, missing hw.keras, d.keras"),
    ("CROP", "out/x.nii.gz", ["--scale", "3"], "the model upscales by 2, not by 3"),
    ("CROP", "out/x.nii.gz", ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    ("CROP", "out/x.nii.gz", ["--tile-mb", "-1"], "--tile-mb must be a positive number of megabytes, got -1"),
    ("CROP", "out/x.nii.gz", ["--axes", "2d", "--planes", "both"], "--planes applies only with --axes 3d"),
    ("CROP", "out/x.nii.gz", ["--axes", "2d", "--planes", "all"], "--planes applies only with --axes 3d"),
])
def test_upscale_errors_in_process(bad_inputs, nifti_crop, tiny_bundle_dir, capsys, input_name, output_name,
                                   extra, named):
    source = nifti_crop if input_name == "CROP" else bad_inputs / input_name
    extra = [str(bad_inputs) if a == "DIR" else a for a in extra]
    model = [] if "--model" in extra else ["--model", str(tiny_bundle_dir)]
    status = cli.main(["upscale", str(source), str(bad_inputs / output_name), *model, *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("sr3d upscale: error: ") and named in lines[0], lines
    assert list((bad_inputs / "out").iterdir()) == [], "no output or temporary file is left"


@pytest.mark.parametrize("case", ["missing input", "not a bundle"])
def test_upscale_errors_subprocess(bad_inputs, nifti_crop, case):
    if case == "missing input":
        args, named = [bad_inputs / "missing.nii.gz", bad_inputs / "out" / "x.nii.gz"], "missing.nii.gz"
    else:
        args, named = [nifti_crop, bad_inputs / "out" / "x.nii.gz", "--model", bad_inputs], str(bad_inputs)
    result = _sr3d("upscale", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sr3d upscale: error: ") and named in lines[0], result.stderr
    assert list((bad_inputs / "out").iterdir()) == []


@pytest.mark.parametrize("axes", ["3d", "2d"])
def test_thick_slice_scan_in_3d_gets_a_note(tmp_path, nifti_crop, tiny_bundle_dir, capsys, axes):
    crop = nib.load(nifti_crop)
    affine = crop.affine.copy()
    affine[:3, 2] *= 4                                   # NIfTI k = D: 8 mm slices of 2 x 2 mm pixels
    thick = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), affine), thick)
    out = tmp_path / "thick_x2.nii.gz"
    status = cli.main(["upscale", str(thick), str(out), "--model", str(tiny_bundle_dir), "--axes", axes,
                       "--no-self-check"])
    err = capsys.readouterr().err
    assert status == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    report = json.loads((tmp_path / "thick_x2.json").read_text())
    if axes == "2d":
        assert notes == [] and "anisotropy_note" not in report
        return
    assert len(notes) == 1 and "4.0x thicker along D" in notes[0], err
    assert "--axes 2d" in notes[0] and "--self-supervised" in notes[0]
    assert report["anisotropy_note"] == notes[0]


def test_upscale_default_precision_is_auto(tmp_path, nifti_crop, tiny_bundle_dir, capsys):
    """Without --precision the command writes the library's precision="auto" result: bf16 on CPUs
    with native bf16, float32 elsewhere (sr3d.precision.resolve)."""
    out = tmp_path / "crop_auto.nii.gz"
    assert cli.main(["upscale", str(nifti_crop), str(out), "--model", str(tiny_bundle_dir)]) == 0, \
        capsys.readouterr().err
    volume = sr3d_io.load_volume(nifti_crop)
    bundle = models.load_models(tiny_bundle_dir, 2)
    planes = json.loads(out.with_suffix("").with_suffix(".json").read_text())["planes"]  # the default: auto's pick
    expected = inference.upscale_volume(volume, bundle, precision="auto", planes=planes).array
    written = sr3d_io.load_volume(out).array
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert cli.parser().parse_args(["upscale-batch", "a", "b"]).precision == "auto"
