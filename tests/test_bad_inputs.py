"""A corpus of bad inputs, flags and output paths, each run through `sr3d upscale` or
`sr3d upscale-batch` (issue 12). Inputs are built from the real scans.

Every case asserts the exact behaviour: its exit status (2 for bad input, 1 for a batch whose
scans failed), one line on stderr that starts with `sr3d <command>: error:` (or `failed:` for a
batch scan), names the offending file or flag and says what is wrong, no traceback, no output
or temporary file left in the output directory, the pre-existing file there and the input
byte for byte intact. Models: the random-weight test bundle (tests/conftest.py).
"""
import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from sr3d import cli

SENTINEL = "keep_me.nii.gz"   # a file of the user's in every output directory: must survive


@dataclasses.dataclass(frozen=True)
class Case:
    argv: tuple            # "OUT" -> the output path, "OUTDIR" -> the output directory, "MODEL" -> bundle
    named: str             # what the error line must name (file or flag)
    words: tuple = ()      # and say, case-insensitively
    code: int = 2
    output: str = "result.nii.gz"


def _nifti(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _raw_nifti(path, shape, dtype=np.float32, payload=b"", magic=None, srow=None):
    """A NIfTI-1 file written byte by byte (nibabel would refuse to write some of these headers)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    if srow is not None:
        header["sform_code"] = 1
        header["srow_x"], header["srow_y"], header["srow_z"] = srow[0], srow[1], srow[2]
    block = bytearray(header.binaryblock)
    if magic is not None:
        block[344:348] = magic
    path.write_bytes(bytes(block) + bytes(4) + payload)
    return path


def _dicom_copy(files, directory, edit=None):
    directory.mkdir()
    for i, file in enumerate(files):
        if edit is None:
            shutil.copy(file, directory / file.name)
        else:
            ds = pydicom.dcmread(file)
            edit(ds, i)
            ds.save_as(directory / file.name)
    return directory


def _build(root: pathlib.Path, ixi_file: pathlib.Path, shared_data: pathlib.Path) -> dict:
    real = nib.load(ixi_file)
    data = np.asarray(real.dataobj, np.float32)[20:100, 20:100, 30:50]
    good = _nifti(root / "good.nii.gz", data, real.affine)
    raw = good.read_bytes()
    uncompressed = gzip.decompress(raw)
    g = str(good)
    cases = {}

    def upscale(path, named=None, words=(), *extra, code=2, output="result.nii.gz"):
        return Case(("upscale", str(path), "OUT", "--model", "MODEL", *extra), named or pathlib.Path(path).name,
                    tuple(words), code, output)

    # ---- NIfTI files
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated_gz"] = upscale(root / "truncated.nii.gz", None, ["truncated"])
    corrupted = bytearray(raw)
    corrupted[len(raw) // 2: len(raw) // 2 + 64] = os.urandom(64)
    (root / "corrupted.nii.gz").write_bytes(bytes(corrupted))
    cases["corrupted_gz"] = upscale(root / "corrupted.nii.gz", None, ["not a readable NIfTI"])
    (root / "notes.nii.gz").write_bytes(gzip.compress(b"this is a text file, not a NIfTI image\n" * 20))
    cases["text_in_gz"] = upscale(root / "notes.nii.gz", None, ["not a readable NIfTI"])
    (root / "plain_cut.nii").write_bytes(uncompressed[: len(uncompressed) // 3])
    cases["truncated_nii"] = upscale(root / "plain_cut.nii", None, ["truncated", "file holds"])
    (root / "empty.nii").write_bytes(b"")
    cases["empty_nii"] = upscale(root / "empty.nii", None, ["not a readable NIfTI"])
    (root / "empty.nii.gz").write_bytes(b"")
    cases["empty_gz"] = upscale(root / "empty.nii.gz", None, ["not a readable NIfTI"])
    (root / "empty_stream.nii.gz").write_bytes(gzip.compress(b""))
    cases["empty_gz_stream"] = upscale(root / "empty_stream.nii.gz", None, ["not a readable NIfTI"])
    (root / "header_only.nii").write_bytes(uncompressed[:352])
    cases["header_only"] = upscale(root / "header_only.nii", None, ["truncated"])
    _raw_nifti(root / "bad_magic.nii", (20, 20, 20), payload=bytes(32000), magic=b"xyz\0")
    cases["bad_magic"] = upscale(root / "bad_magic.nii", None, ["not a readable NIfTI"])
    (root / "random.nii").write_bytes(np.random.default_rng(0).bytes(5000))
    cases["random_bytes"] = upscale(root / "random.nii", None, ["not a readable NIfTI"])
    _raw_nifti(root / "bomb.nii", (20000,) * 3, payload=bytes(4096))
    cases["memory_bomb"] = upscale(root / "bomb.nii", None, ["20000 x 20000 x 20000", "file holds"])
    (root / "bomb.nii.gz").write_bytes(gzip.compress((root / "bomb.nii").read_bytes()))
    cases["memory_bomb_gz"] = upscale(root / "bomb.nii.gz", None, ["20000 x 20000 x 20000", "uncompressed"])
    _raw_nifti(root / "bomb1000.nii", (1000,) * 3, payload=bytes(4096))
    cases["memory_bomb_1000"] = upscale(root / "bomb1000.nii", None, ["1000 x 1000 x 1000", "file holds"])
    _raw_nifti(root / "bomb_int64.nii", (600, 600, 600), dtype=np.int64, payload=bytes(4096))
    cases["memory_bomb_int64"] = upscale(root / "bomb_int64.nii", None, ["of 8 bytes"])
    cases["4d"] = upscale(_nifti(root / "fmri.nii.gz", np.stack([data, data], axis=-1), real.affine), None, ["4D"])
    cases["5d"] = upscale(_nifti(root / "five.nii.gz", data[..., None, None].repeat(2, 4), real.affine), None,
                          ["5D"])
    cases["2d"] = upscale(_nifti(root / "flat.nii.gz", data[:, :, 0], real.affine), None, ["2D", "3D volume"])
    nan = data.copy()
    nan[5, 5, 5] = np.nan
    nan[6, 6, 6] = np.inf
    cases["nan_inf"] = upscale(_nifti(root / "nan.nii.gz", nan, real.affine), None, ["non-finite", "2 voxels"])
    cases["all_nan"] = upscale(_nifti(root / "all_nan.nii.gz", np.full((20, 20, 20), np.nan, np.float32)), None,
                               ["non-finite", "8000 voxels"])
    inf = data.copy()
    inf[0, 0, 0] = -np.inf
    cases["one_inf"] = upscale(_nifti(root / "inf.nii.gz", inf, real.affine), None, ["non-finite", "1 voxels"])
    huge = data.astype(np.float64)
    huge[1, 2, 3] = 1e300
    cases["beyond_float32"] = upscale(_nifti(root / "huge.nii.gz", huge, real.affine), None,
                                      ["beyond float32's range"])
    cases["complex"] = upscale(_nifti(root / "complex.nii.gz", data.astype(np.complex64), real.affine), None,
                               ["not a real scalar"])
    rgb = np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    cases["rgb"] = upscale(_nifti(root / "rgb.nii.gz", rgb), None, ["not a real scalar"])
    cases["single_slice"] = upscale(_nifti(root / "one_slice.nii.gz", data[:, :, :1], real.affine), None,
                                    ["shorter than 2 voxels"])
    cases["one_row"] = upscale(_nifti(root / "one_row.nii.gz", data[:, :1, :], real.affine), None,
                               ["shorter than 2 voxels"])
    cases["tiny"] = upscale(_nifti(root / "tiny.nii.gz", data[:10, :10, :6], real.affine), None, ["receptive field"])
    cases["2x2x2"] = upscale(_nifti(root / "cube2.nii.gz", data[:2, :2, :2], real.affine), None, ["receptive field"])
    cases["thin_slices"] = upscale(_nifti(root / "thin.nii.gz", data[:12, :, :], real.affine), None,
                                   ["receptive field"])
    _raw_nifti(root / "singular.nii", (20, 20, 20), payload=bytes(32000), srow=np.zeros((3, 4)))
    cases["singular_affine"] = upscale(root / "singular.nii", None, ["affine"])

    # ---- other file types
    (root / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    cases["png"] = upscale(root / "scan.png", None, ["unsupported file type"])
    (root / "notes.txt").write_text("not a scan\n")
    cases["txt"] = upscale(root / "notes.txt", None, ["unsupported file type"])
    (root / "analyze.hdr").write_bytes(uncompressed[:348])
    cases["analyze_hdr"] = upscale(root / "analyze.hdr", None, ["unsupported file type"])
    cases["missing_file"] = upscale(root / "does_not_exist.nii.gz", None, ["No such file"])
    (root / "empty_dir").mkdir()
    cases["empty_dir"] = upscale(root / "empty_dir", None, ["no DICOM images"])
    (root / "text_dir").mkdir()
    (root / "text_dir" / "readme.txt").write_text("hello\n")
    cases["dir_of_text"] = upscale(root / "text_dir", None, ["no DICOM images"])
    nested = root / "nested"
    (nested / "series").mkdir(parents=True)
    cases["dicom_one_level_down"] = upscale(nested, None, ["subdirectories are not searched"])

    # ---- NRRD
    volume = np.random.default_rng(1).normal(size=(30, 30, 30)).astype(np.float32)
    nrrd.write(str(root / "ok.nrrd"), volume, {"encoding": "raw"})
    whole = (root / "ok.nrrd").read_bytes()
    (root / "cut.nrrd").write_bytes(whole[: len(whole) // 2])
    cases["nrrd_truncated"] = upscale(root / "cut.nrrd", None, ["truncated"])
    (root / "garbage.nrrd").write_bytes(b"NRRD0004\nthis: is not\n\x00\x01")
    cases["nrrd_garbage"] = upscale(root / "garbage.nrrd", None, ["not a readable NRRD"])
    nrrd.write(str(root / "four.nrrd"), np.zeros((20, 20, 20, 2), np.float32))
    cases["nrrd_4d"] = upscale(root / "four.nrrd", None, ["4D"])
    nrrd.write(str(root / "space.nrrd"), volume, {"space": "scanner-xyz", "space directions": np.eye(3)})
    cases["nrrd_unknown_space"] = upscale(root / "space.nrrd", None, ["no known relation to RAS"])
    nrrd.write(str(root / "units.nrrd"), volume, {"space": "left-posterior-superior", "space directions": np.eye(3),
                                                  "space units": ["cm", "cm", "cm"]})
    cases["nrrd_cm_units"] = upscale(root / "units.nrrd", None, ["not millimetres"])
    (root / "bomb.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 20000 20000 20000\n"
                                     b"encoding: raw\nendian: little\n\n" + bytes(4096))
    cases["nrrd_memory_bomb"] = upscale(root / "bomb.nrrd", None, ["20000 x 20000 x 20000", "file holds"])

    # ---- DICOM
    series = sorted((shared_data / "oblique-pd-dicom").glob("brain_*.dcm"))
    cases["dicom_missing_slice"] = upscale(_dicom_copy(series[1:8] + series[9:12], root / "dicom_missing_slice"),
                                           None, ["missing slices", "--regularize"])

    other_series = pydicom.uid.generate_uid()

    def new_series(ds, k):
        if k % 2:
            ds.SeriesInstanceUID = other_series

    cases["dicom_two_series"] = upscale(_dicom_copy(series[1:7], root / "dicom_two_series", new_series), None,
                                        ["2 DICOM series"])
    truncated = _dicom_copy(series[1:6], root / "dicom_truncated_file")
    victim = truncated / series[3].name
    victim.write_bytes(victim.read_bytes()[:2000])
    cases["dicom_truncated_file"] = upscale(truncated, series[3].name, [])
    garbage = root / "dicom_garbage"
    garbage.mkdir()
    (garbage / "a.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(4000))
    cases["dicom_garbage"] = upscale(garbage, None, [])
    cases["dicom_single_file_dir"] = upscale(_dicom_copy(series[:1], root / "dicom_one"), None, ["single 2D"])
    shutil.copy(series[0], root / "lonely.dcm")
    cases["dicom_single_file"] = upscale(root / "lonely.dcm", None, ["single 2D DICOM slice"])

    def repeat_position(ds, k):
        if k == 3:
            ds.ImagePositionPatient = pydicom.dcmread(series[3], stop_before_pixels=True).ImagePositionPatient

    cases["dicom_repeated_position"] = upscale(_dicom_copy(series[1:7], root / "dicom_4d", repeat_position), None,
                                               ["same position", "4D"])

    def tilt_one(ds, k):
        if k == 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]

    cases["dicom_mixed_orientation"] = upscale(_dicom_copy(series[1:7], root / "dicom_orient", tilt_one), None,
                                               ["not one volume"])

    def respace_one(ds, k):
        if k == 2:
            ds.PixelSpacing = [0.5, 0.5]

    cases["dicom_mixed_pixel_spacing"] = upscale(_dicom_copy(series[1:7], root / "dicom_spacing", respace_one),
                                                 None, ["not one volume"])

    def no_position(ds, k):
        if k == 1:
            del ds.ImagePositionPatient

    cases["dicom_no_position"] = upscale(_dicom_copy(series[1:7], root / "dicom_noipp", no_position), None,
                                         ["no ImagePositionPatient"])

    def colour(ds, k):
        ds.SamplesPerPixel = 3

    cases["dicom_colour"] = upscale(_dicom_copy(series[1:4], root / "dicom_colour", colour), None, ["colour"])

    def off_line(ds, k):
        if k == 3:
            ds.ImagePositionPatient = [float(v) + (9.0 if i == 0 else 0.0) for i, v in enumerate(ds.ImagePositionPatient)]

    cases["dicom_off_line"] = upscale(_dicom_copy(series[1:8], root / "dicom_offline", off_line), None,
                                      ["not on a straight line"])

    def crop_pixels(ds, k):
        if k == 2:
            ds.Rows = 128

    cases["dicom_mixed_size"] = upscale(_dicom_copy(series[1:7], root / "dicom_size", crop_pixels), None,
                                        ["not one volume"])
    cases["dicom_gantry_irregular"] = upscale(shared_data / "gantry-tilt-head-ct", None,
                                              ["irregular slice spacing", "--regularize"])

    # ---- output paths
    cases["out_is_in"] = Case(("upscale", g, g, "--model", "MODEL"), "good.nii.gz", ("the same file",))
    cases["out_is_dot_in"] = Case(("upscale", g, str(good.parent / "." / good.name), "--model", "MODEL"),
                                  "good.nii.gz", ("the same file",))
    os.symlink(good, root / "link_to_good.nii.gz")
    cases["out_symlink_to_in"] = Case(("upscale", g, str(root / "link_to_good.nii.gz"), "--model", "MODEL"),
                                      "link_to_good.nii.gz", ("the same file",))
    os.link(good, root / "hard_link.nii.gz")
    cases["out_hard_link_to_in"] = Case(("upscale", g, str(root / "hard_link.nii.gz"), "--model", "MODEL",
                                         "--overwrite"), "hard_link.nii.gz", ("the same file",))
    cases["out_is_in_with_overwrite"] = Case(("upscale", g, g, "--model", "MODEL", "--overwrite"), "good.nii.gz",
                                             ("the same file",))
    cases["out_exists"] = Case(("upscale", g, "OUTDIR/" + SENTINEL, "--model", "MODEL"), SENTINEL,
                               ("exists already", "--overwrite"))
    cases["out_is_directory"] = Case(("upscale", g, "OUTDIR", "--model", "MODEL"), "out", ("is a directory",))
    cases["out_only_suffix_gz"] = Case(("upscale", g, "OUTDIR/.nii.gz", "--model", "MODEL"), ".nii.gz",
                                       ("only a suffix",))
    cases["out_only_suffix_nii"] = Case(("upscale", g, "OUTDIR/.nii", "--model", "MODEL"), ".nii",
                                        ("only a suffix",))
    cases["out_missing_directory"] = Case(("upscale", g, "OUTDIR/missing_dir/out.nii.gz", "--model", "MODEL"),
                                          "missing_dir", ("does not exist",))
    (root / "a_file").write_text("a file, not a directory")
    cases["out_parent_is_a_file"] = Case(("upscale", g, str(root / "a_file" / "out.nii.gz"), "--model", "MODEL"),
                                         "a_file", ("does not exist",))
    cases["out_png"] = Case(("upscale", g, "OUTDIR/out.png", "--model", "MODEL"), "out.png", ("NIfTI",))
    cases["out_no_suffix"] = Case(("upscale", g, "OUTDIR/result", "--model", "MODEL"), "result", ("NIfTI",))
    cases["out_nrrd"] = Case(("upscale", g, "OUTDIR/out.nrrd", "--model", "MODEL"), "out.nrrd", ("NIfTI",))

    # ---- flags
    def flags(*extra, named, words=()):
        return Case(("upscale", g, "OUT", "--model", "MODEL", *extra), named, tuple(words))

    cases["scale_1"] = flags("--scale", "1", named="--scale", words=["got 1"])
    cases["scale_0"] = flags("--scale", "0", named="--scale", words=["got 0"])
    cases["scale_negative"] = flags("--scale", "-2", named="--scale", words=["got -2"])
    cases["scale_3_with_x2_model"] = flags("--scale", "3", named="bundle", words=["upscales by 2, not by 3"])
    cases["batch_size_0"] = flags("--batch-size", "0", named="--batch-size", words=["got 0"])
    cases["tile_mb_0"] = flags("--tile-mb", "0", named="--tile-mb", words=["got 0"])
    cases["tile_mb_negative"] = flags("--tile-mb", "-1", named="--tile-mb", words=["got -1"])
    cases["tile_mb_nan"] = flags("--tile-mb", "nan", named="--tile-mb", words=["got nan"])
    cases["planes_both_2d"] = flags("--axes", "2d", "--planes", "both", named="--planes", words=["--axes 3d"])
    cases["target_spacing_alone"] = flags("--target-spacing", "1", named="--target-spacing",
                                          words=["only with --self-supervised"])
    cases["save_model_alone"] = flags("--save-model", "m.keras", named="--save-model",
                                      words=["only with --self-supervised"])
    cases["no_shipped_scale_7"] = Case(("upscale", g, "OUT", "--scale", "7"), "scale 7", ("no shipped model",))

    # ---- model bundles
    def model(directory, named, words):
        return Case(("upscale", g, "OUT", "--model", str(directory)), named, tuple(words))

    cases["model_missing"] = model(root / "no_such_bundle", "no_such_bundle", ["not found"])
    (root / "not_a_bundle").mkdir()
    cases["model_not_a_bundle"] = model(root / "not_a_bundle", "not_a_bundle", ["missing hw.keras, d.keras"])
    return good, cases


def _bundle_variants(root: pathlib.Path, bundle_dir: pathlib.Path, good: str) -> dict:
    """Broken copies of the test bundle."""
    cases = {}

    def variant(name, edit):
        directory = root / name
        shutil.copytree(bundle_dir, directory)
        edit(directory)
        return directory

    def case(directory, named, words):
        return Case(("upscale", good, "OUT", "--model", str(directory)), named, tuple(words))

    d = variant("bundle_truncated_hw", lambda p: (p / "hw.keras").write_bytes((p / "hw.keras").read_bytes()[:3000]))
    cases["model_truncated_hw"] = case(d, "hw.keras", ["truncated or corrupt"])
    d = variant("bundle_empty_d", lambda p: (p / "d.keras").write_bytes(b""))
    cases["model_empty_d"] = case(d, "d.keras", ["0 bytes"])
    d = variant("bundle_text_hw", lambda p: (p / "hw.keras").write_text("not a model"))
    cases["model_text_hw"] = case(d, "hw.keras", ["not a complete .keras zip"])

    def swap(p):
        (p / "hw.keras").rename(p / "tmp.keras")
        (p / "d.keras").rename(p / "hw.keras")
        (p / "tmp.keras").rename(p / "d.keras")

    cases["model_stages_swapped"] = case(variant("bundle_swapped", swap), "bundle_swapped",
                                         ["not an sr3d stage-hw network"])
    d = variant("bundle_says_x4", lambda p: (p / "bundle.json").write_text(json.dumps({"scale": 4})))
    cases["model_json_says_x4"] = case(d, "bundle_says_x4", ["upscales by 4, not by 2"])
    d = variant("bundle_bad_json", lambda p: (p / "bundle.json").write_text("{not json"))
    cases["model_bad_json"] = case(d, "bundle.json", ["not valid JSON"])
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ixi_files, shared_data, tiny_bundle_dir):
    root = tmp_path_factory.mktemp("corpus")
    good, cases = _build(root, ixi_files[0], shared_data)
    cases.update(_bundle_variants(root, tiny_bundle_dir, str(good)))
    return good, cases


# The kinds, listed so that pytest collects one test per kind (the corpus is built once).
KINDS = [
    "truncated_gz", "corrupted_gz", "text_in_gz", "truncated_nii", "empty_nii", "empty_gz", "empty_gz_stream",
    "header_only", "bad_magic", "random_bytes", "memory_bomb", "memory_bomb_gz", "memory_bomb_1000",
    "memory_bomb_int64", "4d", "5d", "2d", "nan_inf", "all_nan", "one_inf", "beyond_float32", "complex", "rgb",
    "single_slice", "one_row", "tiny", "2x2x2", "thin_slices", "singular_affine",
    "png", "txt", "analyze_hdr", "missing_file", "empty_dir", "dir_of_text", "dicom_one_level_down",
    "nrrd_truncated", "nrrd_garbage", "nrrd_4d", "nrrd_unknown_space", "nrrd_cm_units", "nrrd_memory_bomb",
    "dicom_missing_slice", "dicom_two_series", "dicom_truncated_file", "dicom_garbage", "dicom_single_file_dir",
    "dicom_single_file", "dicom_repeated_position", "dicom_mixed_orientation", "dicom_mixed_pixel_spacing",
    "dicom_no_position", "dicom_colour", "dicom_off_line", "dicom_mixed_size", "dicom_gantry_irregular",
    "out_is_in", "out_is_dot_in", "out_symlink_to_in", "out_hard_link_to_in", "out_is_in_with_overwrite",
    "out_exists", "out_is_directory", "out_only_suffix_gz", "out_only_suffix_nii", "out_missing_directory",
    "out_parent_is_a_file", "out_png", "out_no_suffix", "out_nrrd",
    "scale_1", "scale_0", "scale_negative", "scale_3_with_x2_model", "batch_size_0", "tile_mb_0",
    "tile_mb_negative", "tile_mb_nan", "planes_both_2d", "target_spacing_alone", "save_model_alone",
    "no_shipped_scale_7",
    "model_missing", "model_not_a_bundle", "model_truncated_hw", "model_empty_d", "model_text_hw",
    "model_stages_swapped", "model_json_says_x4",
    "model_bad_json",
]


def _digest(path: pathlib.Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*"))
                                       if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def _check_one_error_line(err: str, command: str, named: str, words) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith(f"sr3d {command}: error: ")]
    assert len(errors) == 1, err
    # Besides the error only the line announcing the input (it names the scan) and the
    # self-check's note on why it was skipped may come first.
    assert all(line in errors or "voxels (D x H x W)" in line or line.startswith("self-check skipped: ")
               for line in lines), err
    line = errors[0]
    assert named in line, line
    for word in words:
        assert word.lower() in line.lower(), line
    return line


def test_the_corpus_has_at_least_80_kinds(corpus):
    _, cases = corpus
    names = [k if isinstance(k, str) else k.values[0] for k in KINDS]
    assert sorted(cases) == sorted(names) and len(names) >= 80


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_gets_one_clear_line_and_nothing_is_lost(kind, corpus, tiny_bundle_dir, tmp_path, capsys):
    good, cases = corpus
    case = cases[kind]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    sentinel = out_dir / SENTINEL
    shutil.copy(good, sentinel)
    replace = {"OUT": str(out_dir / case.output), "OUTDIR": str(out_dir), "MODEL": str(tiny_bundle_dir)}
    argv = [replace.get(a, a.replace("OUTDIR", str(out_dir)) if a.startswith("OUTDIR/") else a)
            for a in case.argv]
    inputs = [pathlib.Path(argv[1])]
    before = {p: _digest(p) for p in inputs + [sentinel, good]}
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    _check_one_error_line(err, argv[0], case.named, case.words)
    assert sorted(p.name for p in out_dir.iterdir()) == [SENTINEL], "no output or temporary file is left"
    assert {p: _digest(p) for p in before} == before, "inputs and pre-existing files are intact"


# ---------------------------------------------------------------------------- batch

@pytest.fixture
def batch_in(tmp_path, corpus):
    good, _ = corpus
    directory = tmp_path / "in"
    directory.mkdir()
    shutil.copy(good, directory / "a.nii.gz")
    return directory


@pytest.mark.parametrize("kind", ["missing_input_dir", "empty_input_dir", "output_is_a_file", "corrupt_manifest",
                                  "other_settings", "scale_1"])
def test_bad_batch_gets_one_clear_line(kind, batch_in, tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    source, extra, named, words = str(batch_in), [], None, ()
    if kind == "missing_input_dir":
        source, named, words = str(tmp_path / "nowhere"), "nowhere", ("No such directory",)
    elif kind == "empty_input_dir":
        (tmp_path / "empty").mkdir()
        source, named, words = str(tmp_path / "empty"), "empty", ("no scans found",)
    elif kind == "output_is_a_file":
        out.write_text("a file")
        named, words = "out", ("is a file",)
    elif kind == "corrupt_manifest":
        out.mkdir()
        (out / "manifest.json").write_text("{broken")
        named, words = "manifest.json", ("unreadable manifest", "delete it")
    elif kind == "other_settings":
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"settings": {"scale": 4}, "scans": {}}))
        named, words = "out", ("other settings",)
    elif kind == "scale_1":
        extra, named, words = ["--scale", "1"], "--scale", ("got 1",)
    before = {p: _digest(p) for p in [out, batch_in]}
    code = cli.main(["upscale-batch", source, str(out), "--model", str(tiny_bundle_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    _check_one_error_line(err, "upscale-batch", named, words)
    assert {p: _digest(p) for p in before} == before


def test_batch_never_replaces_a_file_it_did_not_write(batch_in, tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x2.nii.gz").write_bytes(b"the user's own file")
    code = cli.main(["upscale-batch", str(batch_in), str(out), "--model", str(tiny_bundle_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "a_x2.nii.gz: exists already" in failed[0] and "--overwrite" in failed[0], err
    assert (out / "a_x2.nii.gz").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.nii.gz", "manifest.json"]
    code = cli.main(["upscale-batch", str(batch_in), str(out), "--model", str(tiny_bundle_dir), "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert nib.load(out / "a_x2.nii.gz").shape == (160, 160, 40)


def test_batch_into_its_own_input_directory_ignores_its_outputs(batch_in, tiny_bundle_dir, capsys):
    """`sr3d upscale-batch d d` twice: the second run must not upscale a_x2 into a_x2_x2."""
    for _ in range(2):
        assert cli.main(["upscale-batch", str(batch_in), str(batch_in), "--model", str(tiny_bundle_dir)]) == 0
    err = capsys.readouterr().err
    assert "a_x2.nii.gz: an output of this batch, not an input: ignored" in err
    assert sorted(p.name for p in batch_in.iterdir()) == ["a.nii.gz", "a_x2.nii.gz", "manifest.json"]


def test_batch_output_inside_its_input_is_not_a_series(batch_in, tiny_bundle_dir, capsys):
    out = batch_in / "results"
    for _ in range(2):
        assert cli.main(["upscale-batch", str(batch_in), str(out), "--model", str(tiny_bundle_dir)]) == 0
    err = capsys.readouterr().err
    assert "FAILED" not in err and "results" not in err.split("manifest:")[0]
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.nii.gz", "manifest.json"]


# ---------------------------------------------------------------------------- the real command

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.mark.parametrize("kind", ["memory_bomb", "out_is_in", "model_truncated_hw", "beyond_float32"])
def test_bad_input_in_a_real_process(kind, corpus, tiny_bundle_dir, tmp_path):
    good, cases = corpus
    case = cases[kind]
    argv = [{"OUT": str(tmp_path / case.output), "MODEL": str(tiny_bundle_dir)}.get(a, a) for a in case.argv]
    result = subprocess.run([sys.executable, "-m", "sr3d", *argv], capture_output=True, text=True, timeout=300,
                            env=ENV)
    assert result.returncode == case.code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sr3d upscale: error: ") and case.named in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_is_one_line(corpus, tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    from sr3d import inference

    good, _ = corpus

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.73 GiB for an array with shape (1000, 1000, 1000)")

    monkeypatch.setattr(inference, "upscale_volume", no_memory)
    code = cli.main(["upscale", str(good), str(tmp_path / "r.nii.gz"), "--model", str(tiny_bundle_dir)])
    err = capsys.readouterr().err
    assert code == 1
    line = [line for line in err.splitlines() if "error" in line]
    assert len(line) == 1 and "good.nii.gz: out of memory (Unable to allocate 3.73 GiB" in line[0], err
    assert list(tmp_path.iterdir()) == []


def test_good_scan_of_the_corpus_works(corpus, tiny_bundle_dir, tmp_path, capsys):
    good, _ = corpus
    code = cli.main(["upscale", str(good), str(tmp_path / "r.nii.gz"), "--model", str(tiny_bundle_dir)])
    assert code == 0, capsys.readouterr().err
    assert nib.load(tmp_path / "r.nii.gz").shape == (160, 160, 40)
    # Again: OUT exists now, so it is refused without --overwrite and replaced with it.
    assert cli.main(["upscale", str(good), str(tmp_path / "r.nii.gz"), "--model", str(tiny_bundle_dir)]) == 2
    assert cli.main(["upscale", str(good), str(tmp_path / "r.nii.gz"), "--model", str(tiny_bundle_dir),
                     "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.nii.gz"]  # the output and its report


def test_repaired_header_is_one_warning_line_and_recorded(tiny_bundle_dir, tmp_path, capsys):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((40, 40, 8))
    header["pixdim"][1:4] = (0.0, 1.0, 3.0)
    header["vox_offset"] = 352
    data = np.random.default_rng(0).normal(size=(40, 40, 8)).astype(np.float32)
    path = tmp_path / "pixdim0.nii"
    path.write_bytes(header.binaryblock + bytes(4) + data.tobytes(order="F"))
    out = tmp_path / "r.nii.gz"
    code = cli.main(["upscale", str(path), str(out), "--model", str(tiny_bundle_dir)])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("sr3d upscale: warning: ")]
    assert f"sr3d upscale: warning: {path}: pixdim of axis i is 0: voxel size taken as 1 mm" in warnings, err
    assert any("no orientation (sform_code and qform_code 0)" in line for line in warnings), err
    comment = b"".join(e.get_content() for e in nib.load(out).header.extensions).decode()
    assert f"assumed when reading {path}: pixdim of axis i is 0" in comment
