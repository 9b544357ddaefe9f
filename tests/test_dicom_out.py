"""Tests for sr3d/dicom_out.py: DICOM series out, re-read by sr3d, SimpleITK, dcm2niix and pydicom.

Inputs are small crops of real series (LIDC chest CT, an oblique GE proton-density MR with gaps
between slices), put on a 2x grid by repeating voxels (`sr3d.volume.upscaled_volume`), so the
written series lies on an upscaled grid without running a network. The reference for voxels
and geometry is the same volume written as NIfTI, read by the same independent tool.
"""
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sr3d import cli
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume

# name -> (files of consecutive slices, crop (h0, h1, w0, w1))
SERIES = {
    # LIDC file names are not in slice order: these four are consecutive 1 mm slices mid-chest.
    "ct": ("lidc-chest-ct-1mm", ["000275.dcm", "000012.dcm", "000102.dcm", "000204.dcm"], (200, 232, 160, 200)),
    "mr": ("oblique-pd-dicom", [f"brain_{i:03d}.dcm" for i in range(8, 11)], (100, 130, 90, 126)),
}


def _world(affine, index) -> np.ndarray:
    return (affine @ np.append(np.asarray(index, float), 1.0))[:3]


def _corner_centres(affine, shape) -> np.ndarray:
    """World coordinates of the 8 extreme voxel centres of a grid (any axis order)."""
    return np.array([_world(affine, [i, j, k]) for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                     for k in (0, shape[2] - 1)])


@pytest.fixture(scope="module", params=sorted(SERIES))
def source(request, shared_data, tmp_path_factory):
    """(source directory, x2 volume on a cropped grid) for one real series. The slice axis is made
    exactly normal to the slices: the oblique MR's header positions, rounded, shear it by 0.003 mm
    per slice, which NIfTI's qform, SimpleITK and dcm2niix drop, each in its own way."""
    folder, files, (h0, h1, w0, w1) = SERIES[request.param]
    directory = tmp_path_factory.mktemp(request.param) / "source"
    directory.mkdir()
    for name in files:
        shutil.copyfile(shared_data / folder / name, directory / name)
    scan = sr3d_io.load_volume(directory)
    affine = scan.affine.copy()
    affine[:3, 3] = _world(scan.affine, (0, h0, w0))
    normal = np.cross(affine[:3, 1], affine[:3, 2])
    normal /= np.linalg.norm(normal)
    affine[:3, 0] = (affine[:3, 0] @ normal) * normal
    crop = scan.replace(array=scan.array[:, h0:h1, w0:w1].copy(), affine=affine)
    upscaled = np.repeat(np.repeat(np.repeat(crop.array, 2, 0), 2, 1), 2, 2)
    return directory, sr3d_volume.upscaled_volume(crop, upscaled, 2)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    """The x2 volume written as a DICOM series and as NIfTI."""
    _, volume = source
    out = tmp_path_factory.mktemp("out")
    series = sr3d_io.save_volume(volume, out / "series", format="dicom")
    nifti = sr3d_io.save_volume(volume, out / "volume.nii")
    return series, nifti


def test_sr3d_reads_back_the_same_voxels_and_grid(source, written):
    _, volume = source
    series, _ = written
    back = sr3d_io.load_volume(series)
    np.testing.assert_array_equal(back.array, volume.array)   # integer units are stored exactly
    np.testing.assert_allclose(_corner_centres(back.affine, back.shape),
                               _corner_centres(volume.affine, volume.shape), rtol=0, atol=1e-3)
    assert back.modality == volume.modality


def test_sheared_slice_positions_are_kept(source, tmp_path):
    _, volume = source
    sheared = volume.affine.copy()
    sheared[:3, 0] += 0.5 * sheared[:3, 2] / np.linalg.norm(sheared[:3, 2])   # 0.5 mm along a row per slice
    series = sr3d_io.save_volume(volume.replace(affine=sheared, spacing=sr3d_volume.spacing_from_affine(sheared)),
                                  tmp_path / "series", format="dicom")
    positions = [pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient for p in sorted(series.iterdir())]
    expected = [_world(sheared, (k, 0, 0)) * [-1, -1, 1] for k in range(volume.shape[0])]   # RAS -> LPS
    np.testing.assert_allclose(np.array(positions, float), expected, rtol=0, atol=1e-6)
    back = sr3d_io.load_volume(series)
    np.testing.assert_allclose(_corner_centres(back.affine, back.shape),
                               _corner_centres(sheared, volume.shape), rtol=0, atol=1e-3)


def test_simpleitk_reads_it_as_the_nifti_output(written):
    series, nifti = written
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    from_dicom, from_nifti = reader.Execute(), sitk.ReadImage(str(nifti))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_dicom).astype(np.float32),
                                  sitk.GetArrayFromImage(from_nifti).astype(np.float32))
    size = from_nifti.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    np.testing.assert_allclose([from_dicom.TransformIndexToPhysicalPoint(c) for c in corners],
                               [from_nifti.TransformIndexToPhysicalPoint(c) for c in corners], rtol=0, atol=1e-3)


def test_dcm2niix_converts_it_to_the_nifti_output(written, tmp_path):
    series, nifti = written
    result = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "converted", "-o", str(tmp_path), str(series)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    [converted] = tmp_path.glob("converted*.nii")
    ours, theirs = nib.as_closest_canonical(nib.load(nifti)), nib.as_closest_canonical(nib.load(converted))
    assert theirs.shape == ours.shape
    np.testing.assert_array_equal(theirs.get_fdata(), ours.get_fdata())
    np.testing.assert_allclose(_corner_centres(theirs.affine, theirs.shape),
                               _corner_centres(ours.affine, ours.shape), rtol=0, atol=1e-3)


def test_series_is_a_derived_sibling_in_the_source_study(source, written):
    directory, volume = source
    series, _ = written
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in directory.iterdir()]
    normal = np.cross(*np.reshape(np.array(originals[0].ImageOrientationPatient, float), (2, 3)))
    originals.sort(key=lambda o: np.array(o.ImagePositionPatient, float) @ normal)   # names are not in slice order
    datasets = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    first, original = datasets[0], originals[0]
    assert len(datasets) == volume.shape[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber"):
        assert first[keyword].value == original[keyword].value, keyword
    # LIDC's anonymiser gave every file its own FrameOfReferenceUID; the series keeps one of them.
    assert first.FrameOfReferenceUID in {o.FrameOfReferenceUID for o in originals}
    assert {d.FrameOfReferenceUID for d in datasets} == {first.FrameOfReferenceUID}
    assert {d.SeriesInstanceUID for d in datasets} == {first.SeriesInstanceUID}
    assert first.SeriesInstanceUID != original.SeriesInstanceUID
    sop_uids = {d.SOPInstanceUID for d in datasets}
    assert len(sop_uids) == len(datasets) and not sop_uids & {o.SOPInstanceUID for o in originals}
    assert list(first.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert first.SeriesDescription.startswith("sr3d x2")
    assert original.SeriesInstanceUID in first.DerivationDescription
    referenced = {item.ReferencedSOPInstanceUID for d in datasets for item in d.SourceImageSequence}
    assert referenced == {o.SOPInstanceUID for o in originals}
    # Output slice 2n and 2n + 1 were computed from source slice n (and its neighbour).
    assert datasets[2].SourceImageSequence[0].ReferencedSOPInstanceUID in {o.SOPInstanceUID for o in originals[:2]}
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], np.array(volume.spacing[1:]), rtol=1e-6)
    np.testing.assert_allclose(float(first.SpacingBetweenSlices), volume.spacing[0], rtol=1e-6)
    np.testing.assert_allclose(float(first.SliceThickness), volume.spacing[0], rtol=1e-6)


@pytest.mark.parametrize("source", ["ct"], indirect=True)
def test_ct_is_stored_as_int16_hounsfield_units(source, written):
    _, volume = source
    series, _ = written
    assert volume.modality == "CT"
    dataset = pydicom.dcmread(sorted(series.iterdir())[0])
    assert dataset.SOPClassUID == pydicom.uid.CTImageStorage
    assert dataset.pixel_array.dtype == np.int16 and dataset.PixelRepresentation == 1
    assert dataset.RescaleType == "HU"
    hu = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset)
    np.testing.assert_array_equal(hu, volume.array[0])
    assert hu.min() < -500, "lung air in HU (int16 holds negative values)"


def test_nifti_input_gets_a_fresh_minimal_study_and_rescaled_floats(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.uniform(-3.0, 1000.0, size=(3, 8, 10)).astype(np.float32)
    affine = np.diag([-0.9, 0.8, 2.5, 1.0])[:, [2, 1, 0, 3]]   # D superior (NIfTI k), H anterior, W left
    affine[:3, 3] = [10.0, -20.0, 30.0]
    nifti = sr3d_io.save_volume(sr3d_volume.Volume(array, sr3d_volume.spacing_from_affine(affine), affine),
                                tmp_path / "scan.nii.gz")
    volume = sr3d_io.load_volume(nifti)
    series = sr3d_io.save_volume(volume, tmp_path / "series", format="dicom", note="x2 3d CNN")
    datasets = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    first = datasets[0]
    assert first.PatientName == "SR3D^ANONYMOUS" and first.PatientID.startswith("SR3D-")
    assert pydicom.uid.UID(first.StudyInstanceUID).is_valid
    assert "SourceImageSequence" not in first
    assert first.SeriesDescription == "sr3d x2 3d CNN"
    assert "scan.nii.gz" in first.DerivationDescription
    slope = float(first.RescaleSlope)
    decoded = np.stack([pydicom.pixels.apply_modality_lut(d.pixel_array, d) for d in datasets])
    np.testing.assert_allclose(decoded, array, rtol=0, atol=slope / 2 + 1e-6)
    assert slope < 1000 / 60000
    positions = np.array([d.ImagePositionPatient for d in datasets], float)
    np.testing.assert_allclose(positions, [[-10.0, 20.0, 30.0 + 2.5 * k] for k in range(3)], atol=1e-6)


def test_refuses_a_non_empty_directory_and_leaves_nothing_on_failure(source, tmp_path):
    _, volume = source
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        sr3d_io.save_volume(volume, occupied, format="dicom")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    sheared = volume.affine.copy()
    sheared[:3, 1] += 0.1 * sheared[:3, 2]
    with pytest.raises(ValueError, match="not perpendicular"):
        sr3d_io.save_volume(volume.replace(affine=sheared, spacing=sr3d_volume.spacing_from_affine(sheared)),
                            tmp_path / "sheared", format="dicom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(list(sr3d_io.save_volume(volume, empty, format="dicom").iterdir())) == volume.shape[0]


@pytest.mark.parametrize("source", ["mr"], indirect=True)
def test_cli_upscale_writes_a_dicom_series(source, tmp_path, tiny_bundle_dir, capsys):
    directory, _ = source
    out = tmp_path / "x2"
    status = cli.main(["upscale", str(directory), str(out) + "/", "--format", "dicom",
                       "--model", str(tiny_bundle_dir), "--axes", "2d"])
    assert status == 0, capsys.readouterr().err
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(out.iterdir())]
    assert len(datasets) == 3 and (datasets[0].Rows, datasets[0].Columns) == (512, 512)
    assert datasets[0].SeriesDescription.startswith("sr3d x1x2x2")
    assert datasets[0].StudyInstanceUID == pydicom.dcmread(sorted(directory.iterdir())[0]).StudyInstanceUID
    assert cli.main(["upscale", str(directory), str(out), "--format", "dicom",
                     "--model", str(tiny_bundle_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
