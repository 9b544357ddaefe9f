"""Tests for sr3d.evaluation and evaluate.py on crops of two real IXI T1 scans.

Golden values are recomputed here from the NIfTI files read with nibabel, with plain
numpy, cv2 and scikit-image following the protocol definitions (docs/metrics.md).
"""
import json
import pathlib
import subprocess
import sys

import cv2
import nibabel as nib
import numpy as np
import pytest
from scipy import stats
from skimage.metrics import structural_similarity

import sr3d
from sr3d import degrade, evaluation, metrics
from sr3d import io as sr3d_io

REPO = pathlib.Path(__file__).resolve().parents[1]
# (D, H, W) crop of the middle of each 120 x 120 x 90 scan: 96 px sides keep IFC's 72 px limit
# at every scale used here, 16 slices keep the test fast.
CROP = (16, 96, 96)
BASELINES = ("nearest", "bilinear", "bicubic", "lanczos")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def crops(ixi_files, tmp_path_factory, scan_crop):
    """Two held-out IXI scans cropped to CROP, written as float32 NIfTI; returns (paths, HR arrays)."""
    directory = tmp_path_factory.mktemp("crops")
    paths, arrays = [], []
    for source in ixi_files[-2:]:
        shape = nib.load(source).shape[::-1]  # (D, H, W)
        crop = scan_crop(source, tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(shape, CROP)))
        paths.append(str(sr3d_io.save_volume(crop, directory / source.name)))
        # Read back with nibabel, as the golden values are: (i, j, k) = (W, H, D).
        written = nib.load(paths[-1]).get_fdata(dtype=np.float32)
        arrays.append(np.ascontiguousarray(written.transpose(2, 1, 0)).astype(np.float64))  # (D, H, W)
    return paths, arrays


@pytest.fixture(scope="module")
def run_2d(crops, tmp_path_factory):
    """Baselines at 2x and 4x in 2D, both protocols, report written; returns (results, out_dir, progress)."""
    out_dir = tmp_path_factory.mktemp("eval_2d")
    messages = []
    config = evaluation.EvalConfig(scans=crops[0], scales=(2, 4), mode="2d", out_dir=str(out_dir))
    results = evaluation.evaluate(config, progress=messages.append)
    evaluation.write_report(results, out_dir)
    return results, out_dir, messages


@pytest.fixture(scope="module")
def run_3d_cnn(crops, tmp_path_factory, tiny_bundle_dir):
    """Baselines plus the tiny random-weight CNN bundle at 2x in 3D; returns (results, out_dir, bundle)."""
    out_dir = tmp_path_factory.mktemp("eval_3d")
    config = evaluation.EvalConfig(scans=crops[0], scales=(2,), mode="3d", cnn={"cnn": str(tiny_bundle_dir)},
                                   out_dir=str(out_dir))
    results = evaluation.evaluate(config)
    evaluation.write_report(results, out_dir)
    return results, out_dir, tiny_bundle_dir


def _lanczos_2d(lr: np.ndarray, scale: int) -> np.ndarray:
    """cv2 INTER_LANCZOS4 of every (H, W) slice, as the authors' baseline script."""
    return np.stack([cv2.resize(s, (s.shape[1] * scale, s.shape[0] * scale),
                                interpolation=cv2.INTER_LANCZOS4) for s in lr.astype(np.float32)])


def _lanczos_pairs(arrays, scale):
    """(cropped HR, Lanczos upscaled LR) per scan, float64, for 2D mode."""
    pairs = []
    for hr in arrays:
        hr_cropped, lr = degrade.simulate_lr(hr.astype(np.float32), scale, "2d")
        pairs.append((hr_cropped.astype(np.float64), _lanczos_2d(lr, scale).astype(np.float64)))
    return pairs


def test_json_has_every_method_scale_and_protocol(run_2d, crops):
    results, out_dir, _ = run_2d
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["sr3d_version"] == sr3d.__version__
    assert saved["config"]["scales"] == [2, 4] and saved["config"]["mode"] == "2d"
    assert saved["scans"] == crops[0]
    lo = min(a.min() for a in crops[1])
    hi = max(a.max() for a in crops[1])
    np.testing.assert_allclose(saved["data_range"], [lo, hi], rtol=1e-12, atol=0)
    assert saved["protocols"] == {"float": metrics.float_protocol((lo, hi)).describe(),
                                  "paper": metrics.paper_protocol().describe()}
    for protocol in ("float", "paper"):
        for key in ("x2", "x4"):
            assert sorted(saved["summary"][protocol][key]) == sorted(BASELINES)
            for method in BASELINES:
                cell = saved["summary"][protocol][key][method]
                assert cell["n_scans"] == 2
                assert all(np.isfinite(cell[m]) for m in ("psnr", "ssim", "ifc"))
                scans = saved["per_scan"][protocol][key][method]
                assert [s["scan"] for s in scans] == crops[0]
                for scan in scans:
                    assert len(scan["per_slice"]["psnr"]) == scan["n_slices"] == CROP[0]
                    assert len(scan["per_slice"]["ifc"]) == CROP[0]
                np.testing.assert_allclose(cell["psnr"], np.mean([s["psnr"] for s in scans]),
                                           rtol=1e-12, atol=0)
            assert sorted(saved["significance"][protocol][key]) == ["bicubic", "bilinear", "nearest"]


def test_float_protocol_cell_matches_independent_recomputation(run_2d, crops):
    results, _, _ = run_2d
    arrays = crops[1]
    lo = min(a.min() for a in arrays)
    hi = max(a.max() for a in arrays)
    psnrs, ssims = [], []
    for hr, test in _lanczos_pairs(arrays, 2):
        ref = np.clip((hr - lo) / (hi - lo), 0, 1)
        out = np.clip((test - lo) / (hi - lo), 0, 1)
        psnrs.append(10 * np.log10(1.0 / np.mean((ref - out) ** 2)))
        ssims.append(np.mean([structural_similarity(r, t, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=1.0)
                              for r, t in zip(ref, out)]))
    cell = results["summary"]["float"]["x2"]["lanczos"]
    np.testing.assert_allclose(cell["psnr"], np.mean(psnrs), rtol=1e-9, atol=0)
    np.testing.assert_allclose(cell["ssim"], np.mean(ssims), rtol=0, atol=1e-8)


def test_paper_protocol_cell_matches_independent_recomputation(run_2d, crops):
    results, _, _ = run_2d
    volume_psnrs = []
    for hr, test in _lanczos_pairs(crops[1], 4):
        slice_psnrs = []
        for r, t in zip(hr, test):
            if r.max() == r.min():
                continue
            low, gain = r.min(), 255.0 / (r.max() - r.min())
            r8 = np.clip(np.round((r - low) * gain), 0, 255)
            t8 = np.clip(np.round((t - low) * gain), 0, 255)
            mse = np.mean((r8 - t8) ** 2)
            slice_psnrs.append(100.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
        volume_psnrs.append(np.mean(slice_psnrs))
    np.testing.assert_allclose(results["summary"]["paper"]["x4"]["lanczos"]["psnr"],
                               np.mean(volume_psnrs), rtol=1e-9, atol=0)


def test_psnr_orders_lanczos_over_bilinear_over_nearest(run_2d):
    results, _, _ = run_2d
    for protocol in ("float", "paper"):
        for key in ("x2", "x4"):
            cell = results["summary"][protocol][key]
            assert cell["lanczos"]["psnr"] > cell["bilinear"]["psnr"] > cell["nearest"]["psnr"], (protocol, key)


def test_wilcoxon_p_values_match_scipy_on_the_saved_slices(run_2d):
    results, _, _ = run_2d
    for method in ("nearest", "bilinear", "bicubic"):
        cells = results["per_scan"]["float"]["x2"]
        test = np.concatenate([s["per_slice"]["psnr"] for s in cells[method]])
        reference = np.concatenate([s["per_slice"]["psnr"] for s in cells["lanczos"]])
        expected = stats.wilcoxon(test, reference, alternative="two-sided").pvalue
        got = results["significance"]["float"]["x2"][method]
        np.testing.assert_allclose(got["p_value"], expected, rtol=1e-12, atol=0)
        assert got["n_pairs"] == 2 * CROP[0]
        assert got["significant"] == (expected < evaluation.ALPHA)


def test_markdown_has_paper_layout_and_protocol_lines(run_2d, crops):
    results, out_dir, _ = run_2d
    text = (out_dir / "results.md").read_text()
    assert text == evaluation.format_markdown(results)
    lo = min(a.min() for a in crops[1])
    hi = max(a.max() for a in crops[1])
    assert f"Protocol: {metrics.float_protocol((lo, hi)).describe()}" in text
    assert f"Protocol: {metrics.paper_protocol().describe()}" in text
    header = "| Method | 2× SSIM | 2× PSNR | 2× IFC | 4× SSIM | 4× PSNR | 4× IFC |"
    assert text.count(header) == 2  # one table per protocol
    assert "# 2D super-resolution" in text
    for name in ("Nearest neighbor", "Bilinear", "Bicubic", "Lanczos"):
        assert text.count(f"| {name} |") >= 2
    for path in crops[0]:
        assert pathlib.Path(path).name in text
    assert "Mode: 2d" in text and "Crop: no border crop" in text
    # The best PSNR at 2x in the float table is bold and equals the best value in the JSON.
    best = max(v["psnr"] for v in results["summary"]["float"]["x2"].values())
    assert f"**{best:.2f}**" in text


def test_figures_are_valid_pngs(run_2d):
    import matplotlib.image

    _, out_dir, _ = run_2d
    for scale in (2, 4):
        path = out_dir / f"comparison_x{scale}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(out_dir.glob("*.tmp"))  # atomic writes leave no temporary files


def test_figure_plane_is_named_from_the_scans_affine(run_2d):
    results, _, _ = run_2d
    info = results["figures"]["x2"]
    code = nib.aff2axcodes(nib.load(info["scan"]).affine)[2]   # NIfTI k is sr3d's D, the slice normal
    assert info["plane"] == {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal"}.get(code, "sagittal")
    assert results["figure_slices"]["x2"]["affine"].shape == (4, 4)


def test_progress_names_scan_and_method(run_2d):
    _, _, messages = run_2d
    assert any(m.startswith("scan 1/2 ") and m.endswith(" x2 nearest") for m in messages)
    assert any(m.startswith("scan 2/2 ") and m.endswith(" x4 lanczos") for m in messages)


def test_cnn_row_appears_with_a_model_bundle(run_3d_cnn, crops):
    results, out_dir, bundle = run_3d_cnn
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["config"]["cnn"] == {"cnn": str(bundle)}
    assert saved["methods"] == list(BASELINES) + ["cnn"]
    for protocol in ("float", "paper"):
        scans = saved["per_scan"][protocol]["x2"]["cnn"]
        assert [s["scan"] for s in scans] == crops[0]
        assert all(np.isfinite(s["psnr"]) and np.isfinite(s["ifc"]) for s in scans)
        assert saved["significance"][protocol]["x2"]["cnn"]["n_pairs"] == 2 * CROP[0]
    text = (out_dir / "results.md").read_text()
    assert text.count("| CNN |") == 4  # results and significance tables of both protocols
    assert "# 3D super-resolution" in text
    assert (out_dir / "comparison_x2.png").read_bytes()[:8] == PNG_SIGNATURE
    assert results["figures"]["x2"]["psnr"].keys() == set(BASELINES) | {"cnn"}  # every method has a panel
    # The figure's LR panel is the LR slice over the drawn HR slice (3D: D shrunk by 2 too).
    hr, lr = degrade.simulate_lr(sr3d_io.load_volume(crops[0][-1]).array, 2, "3d")
    slices = results["figure_slices"]["x2"]
    middle = results["figures"]["x2"]["slice_index"]
    np.testing.assert_array_equal(slices["hr"], hr[middle])
    np.testing.assert_array_equal(slices["lr"], lr[middle // 2])


def test_lr_volume_affine_places_lr_voxels_over_their_hr_blocks(crops):
    volume = sr3d_io.load_volume(crops[0][0])
    _, lr = degrade.simulate_lr(volume.array, 2, "3d")
    lr_volume = evaluation.run._lr_volume(volume, lr, 2, "3d")
    # LR voxel (1, 2, 3) covers HR voxels 2..3, 4..5, 6..7: its centre is HR index (2.5, 4.5, 6.5).
    np.testing.assert_allclose(lr_volume.affine @ [1, 2, 3, 1], volume.affine @ [2.5, 4.5, 6.5, 1],
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(lr_volume.spacing, np.array(volume.spacing) * 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("changes", [{"mode": "4d"}, {"methods": ("cubic",)}, {"scales": (1,)},
                                     {"data_range": (5.0, 1.0)}, {"protocols": ("float", "float")},
                                     {"cnn": {"lanczos": None}}, {"crop_border": -1}, {"planes": "dh"},
                                     {"planes": "all", "mode": "2d"}])
def test_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        evaluation.EvalConfig(scans=("scan.nii.gz",), **changes)


def test_missing_scan_raises_before_any_work(crops, tmp_path):
    missing = str(tmp_path / "nope.nii.gz")
    config = evaluation.EvalConfig(scans=(crops[0][0], missing), data_range=(0.0, 1.0))
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        evaluation.evaluate(config)


def _run_script(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_script_missing_file_exits_with_one_line(tmp_path):
    missing = tmp_path / "missing_scan.nii.gz"
    result = _run_script("--data", str(missing), "--out_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing_scan.nii.gz" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_script_writes_and_prints_the_report(crops, tmp_path):
    out = tmp_path / "out"
    result = _run_script("--data", ",".join(crops[0]), "--scale", "2", "--mode", "2d",
                         "--methods", "nearest,lanczos", "--protocol", "float", "--no_ifc",
                         "--data_range", "0,1000", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["data_range"] == [0.0, 1000.0] and saved["data_range_source"] == "given"
    assert saved["summary"]["float"]["x2"]["lanczos"]["ifc"] is None
    assert result.stdout.strip() == (out / "results.md").read_text().strip()
    assert "| Method | 2× SSIM | 2× PSNR |" in result.stdout and "IFC |" not in result.stdout
    assert "scan 2/2" in result.stderr
