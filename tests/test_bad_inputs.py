"""A corpus of bad inputs built from the real scans, each run through `sr3d upscale`.

Every case must end with exit status 2, one line on stderr that names the
offending file and says what is wrong, no traceback, and no output file
(nor a temporary one) left in the output directory.
"""
import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from sr3d import cli


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_dir):
    return tiny_bundle_dir


def _nifti(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ixi_files, shared_data):
    """name -> (input path, words the message must contain)."""
    root = tmp_path_factory.mktemp("corpus")
    real = nib.load(ixi_files[0])
    data = np.asarray(real.dataobj, np.float32)[20:100, 20:100, 30:50]
    good = _nifti(root / "good.nii.gz", data, real.affine)
    raw = good.read_bytes()
    cases = {}

    cases["truncated_nifti"] = (root / "truncated.nii.gz", ["truncated"])
    cases["truncated_nifti"][0].write_bytes(raw[: len(raw) // 2])

    corrupted = bytearray(raw)
    corrupted[len(raw) // 2: len(raw) // 2 + 64] = os.urandom(64)
    cases["corrupted_nifti"] = (root / "corrupted.nii.gz", [])
    cases["corrupted_nifti"][0].write_bytes(bytes(corrupted))

    cases["not_an_image"] = (root / "notes.nii.gz", [])
    cases["not_an_image"][0].write_bytes(gzip.compress(b"this is a text file, not a NIfTI image\n" * 20))

    cases["4d"] = (_nifti(root / "fmri.nii.gz", np.stack([data, data], axis=-1), real.affine), ["4D"])

    nan = data.copy()
    nan[5, 5, 5] = np.nan
    nan[6, 6, 6] = np.inf
    cases["nan_inf"] = (_nifti(root / "nan.nii.gz", nan, real.affine), ["non-finite"])

    cases["single_slice"] = (_nifti(root / "one_slice.nii.gz", data[:, :, :1], real.affine), [])
    cases["tiny"] = (_nifti(root / "tiny.nii.gz", data[:10, :10, :6], real.affine), ["receptive field"])

    series = sorted((shared_data / "oblique-pd-dicom").glob("brain_*.dcm"))
    missing = root / "dicom_missing_slice"
    missing.mkdir()
    for f in series[1:8] + series[9:12]:
        shutil.copy(f, missing / f.name)
    cases["dicom_missing_slice"] = (missing, ["missing"])

    two = root / "dicom_two_series"
    two.mkdir()
    for k, f in enumerate(series[1:7]):
        ds = pydicom.dcmread(f)
        if k % 2:
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(two / f.name)
    cases["dicom_two_series"] = (two, ["series"])

    truncated_dicom = root / "dicom_truncated_file"
    truncated_dicom.mkdir()
    for f in series[1:6]:
        shutil.copy(f, truncated_dicom / f.name)
    victim = truncated_dicom / series[3].name
    victim.write_bytes(victim.read_bytes()[:2000])
    cases["dicom_truncated_file"] = (truncated_dicom, [])

    garbage = root / "dicom_garbage"
    garbage.mkdir()
    (garbage / "a.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(4000))
    cases["dicom_garbage"] = (garbage, [])

    cases["missing_file"] = (root / "does_not_exist.nii.gz", [])
    return good, cases


def _run(capsys, *args):
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


CASES = ["truncated_nifti", "corrupted_nifti", "not_an_image", "4d", "nan_inf", "single_slice", "tiny",
         "dicom_missing_slice", "dicom_two_series", "dicom_truncated_file", "dicom_garbage", "missing_file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_error_and_no_output(case, corpus, bundle_dir, tmp_path, capsys):
    _, cases = corpus
    path, words = cases[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(capsys, "upscale", path, out_dir / "result.nii.gz", "--model", bundle_dir)
    assert code == 2, err
    line = _error_line(err)
    assert "Traceback" not in err
    assert path.name in line, line
    for word in words:
        assert word.lower() in line.lower(), line
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("scale,words", [("1", ["scale"]), ("3", ["upscales by 2"])])
def test_wrong_scale_factor(scale, words, corpus, bundle_dir, tmp_path, capsys):
    good, _ = corpus
    code, err = _run(capsys, "upscale", good, tmp_path / "r.nii.gz", "--scale", scale, "--model", bundle_dir)
    assert code == 2
    line = _error_line(err)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "r.nii.gz").exists()


def test_no_shipped_model_for_an_unusual_scale(corpus, tmp_path, capsys):
    good, _ = corpus
    code, err = _run(capsys, "upscale", good, tmp_path / "r.nii.gz", "--scale", "7")
    assert code == 2
    assert "scale 7" in _error_line(err)


@pytest.mark.parametrize("target", ["missing_dir/out.nii.gz", "file_as_dir/out.nii.gz", "out.png"])
def test_unwritable_output_path(target, corpus, bundle_dir, tmp_path, capsys):
    good, _ = corpus
    (tmp_path / "file_as_dir").write_text("a file, not a directory")
    code, err = _run(capsys, "upscale", good, tmp_path / target, "--model", bundle_dir)
    assert code == 2
    line = _error_line(err)
    assert target.split("/")[-1] in line or target.split("/")[0] in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file_as_dir"]


def test_good_scan_of_the_corpus_works(corpus, bundle_dir, tmp_path, capsys):
    good, _ = corpus
    code, err = _run(capsys, "upscale", good, tmp_path / "r.nii.gz", "--model", bundle_dir)
    assert code == 0, err
    assert nib.load(tmp_path / "r.nii.gz").shape == (160, 160, 40)
