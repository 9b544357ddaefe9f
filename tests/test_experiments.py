"""Tests for experiments/run_paper.py: a quick Table 2 with two rows on small crops of the IXI scans.

Checks the layout of the JSON and Markdown it writes, the ablation significance test against
scipy on the saved per-slice values, and that a rerun skips the finished training and evaluation.
"""
import contextlib
import importlib.util
import json
import pathlib
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from sr3d import io as sr3d_io

REPO = pathlib.Path(__file__).resolve().parents[1]
# (W, H, D) crop of the middle of each 120 x 120 x 90 IXI scan: small enough to train and score fast.
CROP = (40, 40, 6)
ROWS = ("espcn", "full")


@pytest.fixture(scope="module")
def run_paper():
    spec = importlib.util.spec_from_file_location("run_paper", REPO / "experiments" / "run_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_paper"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("run_paper", None)


@pytest.fixture(scope="module")
def quick_table2(run_paper, ixi_files, tmp_path_factory, scan_crop):
    """run_paper.py --budget quick --only table2 on crops of the 8 IXI scans, run twice;
    returns (out dir, runs dir, captured log of the second run)."""
    root = tmp_path_factory.mktemp("run_paper")
    shared = root / "shared"
    (shared / "ixi-t1-2mm").mkdir(parents=True)
    for source in ixi_files:
        shape = nib.load(source).shape[::-1]  # (D, H, W); CROP is (i, j, k) = (W, H, D)
        box = tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(shape, CROP[::-1]))
        sr3d_io.save_volume(scan_crop(source, box), shared / "ixi-t1-2mm" / source.name)
    argv = ["--budget", "quick", "--only", "table2", "--table2_rows", ",".join(ROWS),
            "--shared_data", str(shared), "--out", str(root / "results"), "--runs_dir", str(root / "runs")]
    run_paper.main(argv)
    log_path = root / "second_run.log"
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        run_paper.main(argv)
    return root / "results", root / "runs", log_path.read_text()


def test_json_has_the_rows_protocols_and_budget(quick_table2, ixi_files):
    out, runs, _ = quick_table2
    table = json.loads((out / "table2_ablation.json").read_text())
    assert [row["key"] for row in table["rows"]] == list(ROWS)
    assert table["budget"]["name"] == "quick"
    assert [pathlib.Path(p).name for p in table["test_scans"]] == [p.name for p in ixi_files[-2:]]
    assert [pathlib.Path(p).name for p in table["train_scans"]] == [p.name for p in ixi_files[:-2]]
    assert sorted(table["protocols"]) == ["float", "paper"]
    for row in table["rows"]:
        assert pathlib.Path(row["training"]["run_dir"]) == runs / "table2" / row["key"]
        assert row["training"]["patches_seen"] == 1 * 2 * 128  # 1 epoch x 2 steps x batch 128
        for protocol in ("float", "paper"):
            assert np.isfinite(row["scores"][protocol]["psnr"]) and -1 <= row["scores"][protocol]["ssim"] <= 1
    assert table["rows"][0]["switches"] == {"second_block": False, "intermediate_weight": 0.0,
                                            "short_skips": True, "long_skip": True, "blur": "random"}
    assert table["rows"][1]["vs_full"] is None


def test_ablation_test_matches_scipy_on_the_saved_slices(quick_table2):
    out, _, _ = quick_table2
    table = json.loads((out / "table2_ablation.json").read_text())
    saved = json.loads((out / "eval" / "table2" / "results.json").read_text())
    for protocol in ("float", "paper"):
        cells = saved["per_scan"][protocol]["x2"]
        ablated = np.concatenate([c["per_slice"]["psnr"] for c in cells["espcn"]])
        full = np.concatenate([c["per_slice"]["psnr"] for c in cells["full"]])
        assert ablated.size == 2 * CROP[2]
        expected = stats.wilcoxon(ablated - full, alternative="two-sided").pvalue
        test = table["rows"][0]["vs_full"][protocol]
        assert test["n_pairs"] == 2 * CROP[2]
        np.testing.assert_allclose(test["p_value"], expected, rtol=1e-12, atol=0)
        np.testing.assert_allclose(test["median_psnr_difference_db"], np.median(ablated - full),
                                   rtol=1e-12, atol=1e-12)


def test_markdown_has_the_paper_columns_and_protocol_lines(quick_table2):
    out, _, _ = quick_table2
    lines = (out / "table2_ablation.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Row"))
    assert [c.strip() for c in header.strip("|").split("|")][:10] == [
        "Row", "Second block", "Intermediate loss", "Short skips", "Long skip", "Variable σ",
        "SSIM (float)", "PSNR (float)", "SSIM (paper)", "PSNR (paper)"]
    start = lines.index(header)
    body = [line for line in lines[start + 2:] if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in body] == [
        "without second conv block (ESPCN-like)", "full model", "Bicubic (reference)", "Lanczos (reference)"]
    assert body[0].split("|")[2:7] == [" × ", " × ", " ✓ ", " ✓ ", " ✓ "]
    assert any(line.startswith("Protocol float: float protocol") for line in lines)
    assert any(line.startswith("Protocol paper: paper protocol") for line in lines)
    page = (out.parent / "results.md").read_text()
    assert "## Table 2 (ablation, 2D, 2x)" in page and "python experiments/run_paper.py --budget full" in page
    assert (out / "figures" / "training_table2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "eval" / "table2" / "comparison_x2.png").exists()


def test_rerun_skips_finished_training_and_evaluation(quick_table2):
    _, _, log = quick_table2
    assert log.count("finished before, skipped") == len(ROWS)
    assert "table2: unchanged, read back" in log and "evaluation table2:" not in log
    assert "training espcn: 1 epochs" not in log


def test_compare_methods_tests_any_saved_metric(quick_table2):
    from sr3d import evaluation

    out, _, _ = quick_table2
    saved = json.loads((out / "eval" / "table2" / "results.json").read_text())
    result = evaluation.compare_methods(saved, "espcn", "full", metric="ssim")
    for protocol in ("float", "paper"):
        cells = saved["per_scan"][protocol]["x2"]
        difference = (np.concatenate([c["per_slice"]["ssim"] for c in cells["espcn"]])
                      - np.concatenate([c["per_slice"]["ssim"] for c in cells["full"]]))
        test = result[protocol]["x2"]
        np.testing.assert_allclose(test["p_value"], stats.wilcoxon(difference).pvalue, rtol=1e-12, atol=0)
        np.testing.assert_allclose(test["median_difference"], np.median(difference), rtol=1e-12, atol=1e-15)
        assert "median_psnr_difference_db" not in test
    with pytest.raises(ValueError, match="no per-slice ifc"):
        evaluation.compare_methods(saved, "espcn", "full", metric="ifc")
    with pytest.raises(ValueError, match="no row 'nope'"):
        evaluation.compare_methods(saved, "nope", "full")


def test_thick_slice_reads_the_peer_estimate_in_mm_and_refuses_another_scans(tmp_path):
    """experiments/thick_slice.py's method "espreso": ESPRESO's FWHM is in voxels of the finest in-plane
    spacing, so 3 voxels at 0.9 mm are 2.7 mm (first principles); a file for slices another distance
    apart (in those voxels) is another scan's and is refused with one line."""
    import subprocess
    found = tmp_path / "case.json"
    found.write_text(json.dumps({"slice_separation": 4.0, "fwhm_inplane_voxels": 3.0, "psf": [0.25, 0.5, 0.25],
                                 "seconds": 1.0}))
    script = f"""
import importlib.util, sys, pathlib, numpy as np
spec = importlib.util.spec_from_file_location("thick_slice", {str(REPO / "experiments" / "thick_slice.py")!r})
ts = importlib.util.module_from_spec(spec); spec.loader.exec_module(ts)
from sr3d import volume
thick = volume.Volume(np.zeros((5, 6, 7), np.float32), (3.6, 0.9, 1.0), np.diag([3.6, 0.9, 1.0, 1.0]))
print(ts.espreso_profile(pathlib.Path({str(found)!r}), thick)["thickness_mm"])
other = volume.Volume(np.zeros((5, 6, 7), np.float32), (4.5, 0.9, 1.0), np.diag([4.5, 0.9, 1.0, 1.0]))
try:
    ts.espreso_profile(pathlib.Path({str(found)!r}), other)
except ts.app.UsageError as error:
    print("refused:", error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert float(lines[0]) == pytest.approx(2.7)
    assert lines[1].startswith("refused:") and "case.json" in lines[1] and "5.000" in lines[1]


def test_thick_slice_posterior_report_averages_seeds_then_cases(tmp_path):
    """experiments/thick_slice.py's posterior table: each network minus the gap-aware one, per seed, the
    mean over seeds, then the mean and worst over cases (golden: by hand from the scores written here)."""
    import subprocess

    def entry(seed, best, posterior):
        return {"seed": seed, "runs": {}, "scores": {"gap_aware": {"psnr": 30.0}, "estimated": {"psnr": 30.0 + best},
                                                     "estimated_posterior": {"psnr": 30.0 + posterior}}}

    (tmp_path / "seed1").mkdir()
    (tmp_path / "gaps.json").write_text(json.dumps({"a|g": entry(0, -0.4, -0.1), "b|g": entry(0, 0.2, 0.0)}))
    (tmp_path / "seed1" / "gaps.json").write_text(json.dumps({"a|g": entry(1, -0.2, -0.3), "b|g": entry(1, 0.0, 0.1)}))
    script = f"""
import importlib.util, pathlib
spec = importlib.util.spec_from_file_location("thick_slice", {str(REPO / "experiments" / "thick_slice.py")!r})
ts = importlib.util.module_from_spec(spec); spec.loader.exec_module(ts)
print("\\n".join(ts._posterior_report(pathlib.Path({str(tmp_path)!r}))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "case |" not in line]
    assert rows[0] == "| a, g | 0, 1 | -0.40 / -0.20 (mean -0.30) | -0.10 / -0.30 (mean -0.20) |"
    assert rows[1] == "| b, g | 0, 1 | +0.20 / +0.00 (mean +0.10) | +0.00 / +0.10 (mean +0.05) |"
    # Best: (-0.30 + 0.10) / 2 = -0.10, worst -0.30; posterior: (-0.20 + 0.05) / 2 = -0.075 -> -0.07 or -0.08.
    assert rows[2].startswith("| mean over the 2 cases | | -0.10 (worst -0.30) | -0.0")
    assert rows[2].endswith("(worst -0.20) |")
