"""One rule for what a path names, in every command (sr3d/files.py `expand_scans`, `scans_in`):
a file is a scan; a directory of NIfTI/NRRD files is one scan per file; any other directory is
one DICOM series. Checked for `sr3d study make`, train.py/evaluate.py's `expand_scans`,
`upscale-batch`'s `scans_in` and `sr3d upscale`'s single input.
"""
import json
import shutil

import numpy as np
import pytest

from sr3d import cli
from sr3d import files as sr3d_files
from sr3d import io as sr3d_io


@pytest.fixture(scope="module")
def nifti_dir(tmp_path_factory, ixi_files, scan_crop):
    """Two real IXI T1 crops (8 x 48 x 48 mid-brain) as NIfTI files in one directory."""
    directory = tmp_path_factory.mktemp("niftis")
    for k, path in enumerate(ixi_files[:2]):
        sr3d_io.save_volume(scan_crop(path, np.s_[40:48, 36:84, 36:84]), directory / f"scan{k}.nii.gz")
    return directory


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory, shared_data):
    directory = tmp_path_factory.mktemp("dicom") / "series"
    directory.mkdir()
    for name in ("brain_008.dcm", "brain_009.dcm"):
        shutil.copyfile(shared_data / "oblique-pd-dicom" / name, directory / name)
    return directory


def test_list_and_batch_forms_agree(nifti_dir, dicom_dir):
    files = [str(nifti_dir / "scan0.nii.gz"), str(nifti_dir / "scan1.nii.gz")]
    assert list(sr3d_files.expand_scans([nifti_dir])) == files
    assert [str(p) for p in sr3d_files.scans_in(nifti_dir)] == files
    assert sr3d_files.expand_scans([dicom_dir]) == (str(dicom_dir),)
    assert sr3d_io.load_volume(dicom_dir).shape == (2, 256, 256)


def test_study_make_takes_a_directory_of_nifti_files(nifti_dir, tmp_path, capsys):
    out = tmp_path / "study"
    status = cli.main(["study", "make", "--scans", str(nifti_dir), "--methods", "bicubic,lanczos",
                       "--n", "4", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    key = json.loads((out / "key.json").read_text())
    assert sorted(key["scans"]) == [str(nifti_dir / "scan0.nii.gz"), str(nifti_dir / "scan1.nii.gz")]


def test_upscale_names_the_rule_for_a_directory_of_nifti_files(nifti_dir):
    with pytest.raises(ValueError, match="holds 2 NIfTI/NRRD files, not a DICOM series: pass one of them"):
        sr3d_io.load_volume(nifti_dir)
    np.testing.assert_equal(sr3d_io.load_volume(nifti_dir / "scan0.nii.gz").shape, (8, 48, 48))
