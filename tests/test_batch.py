"""Tests for sr3d.batch and `sr3d upscale-batch`: manifest, failures, resume after a kill."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from sr3d import batch
from sr3d import io as sr3d_io

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_dir):
    return tiny_bundle_dir


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory, ixi_files, shared_data, scan_crop):
    """Four real NIfTI crops, one DICOM series subdirectory and one truncated file."""
    root = tmp_path_factory.mktemp("in")
    for k, f in enumerate(ixi_files[:4]):
        sr3d_io.save_volume(scan_crop(f, np.s_[30:46, 20:100, 20:100]), root / f"scan{k}.nii.gz")
    series = root / "series_pd"
    series.mkdir()
    for name in sorted((shared_data / "oblique-pd-dicom").glob("brain_0[01][0-9].dcm"))[2:6]:
        shutil.copy(name, series / name.name)
    data = (root / "scan0.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    return root


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "sr3d", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_batch_upscales_good_scans_and_lists_the_bad_one(tmp_path, input_dir, bundle_dir):
    lines = []
    result = batch.upscale_batch(input_dir, tmp_path / "out", 2, bundle_dir, log=lines.append)
    assert sorted(result.done) == ["scan0.nii.gz", "scan1.nii.gz", "scan2.nii.gz", "scan3.nii.gz", "series_pd"]
    assert list(result.failed) == ["broken.nii.gz"]
    assert "broken.nii.gz" in result.failed["broken.nii.gz"]
    out = nib.load(tmp_path / "out" / "scan1_x2.nii.gz")
    assert out.shape == (160, 160, 32)
    series = nib.load(tmp_path / "out" / "series_pd_x2.nii.gz")
    assert series.shape == (512, 512, 8)
    assert not (tmp_path / "out" / "broken_x2.nii.gz").exists()
    manifest = json.loads(result.manifest.read_text())
    assert manifest["scans"]["broken.nii.gz"]["status"] == "failed"
    assert manifest["scans"]["scan0.nii.gz"]["status"] == "done"
    assert any("FAILED" in line for line in lines) and len(lines) == 6

    again = batch.upscale_batch(input_dir, tmp_path / "out", 2, bundle_dir, log=lines.append)
    assert sorted(again.skipped) == sorted(result.done)
    assert again.done == [] and list(again.failed) == ["broken.nii.gz"]


def test_other_settings_in_the_same_output_dir_are_refused(tmp_path, input_dir, bundle_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / batch.MANIFEST).write_text(json.dumps({"settings": {"scale": 4}, "scans": {}}))
    with pytest.raises(ValueError, match="other settings"):
        batch.upscale_batch(input_dir, tmp_path / "out", 2, bundle_dir, log=lambda _: None)


def test_empty_input_dir_is_a_clear_error(tmp_path, bundle_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no scans"):
        batch.upscale_batch(tmp_path / "empty", tmp_path / "out", 2, bundle_dir)


def test_half_done_scan_is_redone_and_its_temporary_removed(tmp_path, input_dir, bundle_dir):
    good = tmp_path / "in"
    good.mkdir()
    for name in ("scan0.nii.gz", "scan1.nii.gz"):
        shutil.copy(input_dir / name, good / name)
    out = tmp_path / "out"
    first = batch.upscale_batch(good, out, 2, bundle_dir, log=lambda _: None)
    assert sorted(first.done) == ["scan0.nii.gz", "scan1.nii.gz"]
    clean = np.asarray(nib.load(out / "scan1_x2.nii.gz").dataobj)
    # What a kill while writing scan1 leaves: its entry "running", no output, a half-written
    # temporary of a process that is gone.
    manifest = json.loads((out / batch.MANIFEST).read_text())
    manifest["scans"]["scan1.nii.gz"] = {"status": "running", "output": "scan1_x2.nii.gz", "started": 0}
    (out / batch.MANIFEST).write_text(json.dumps(manifest))
    half = (out / "scan1_x2.nii.gz").read_bytes()[:1000]
    (out / "scan1_x2.nii.gz").unlink()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60)
    stale = out / f".scan1_x2.tmp-{int(gone.stdout)}-0badc0de.nii.gz"
    stale.write_bytes(half)
    lines = []
    again = batch.upscale_batch(good, out, 2, bundle_dir, log=lines.append)
    assert again.skipped == ["scan0.nii.gz"] and again.done == ["scan1.nii.gz"] and not again.failed
    assert any(stale.name in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == [batch.MANIFEST, "scan0_x2.nii.gz", "scan1_x2.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(out / "scan1_x2.nii.gz").dataobj), clean)
    assert json.loads((out / batch.MANIFEST).read_text())["scans"]["scan1.nii.gz"]["status"] == "done"


@pytest.mark.slow
def test_killed_batch_resumes_to_the_same_outputs(tmp_path, input_dir, bundle_dir):
    good = tmp_path / "in"
    good.mkdir()
    for f in input_dir.glob("scan*.nii.gz"):
        shutil.copy(f, good / f.name)
    clean = _cli("upscale-batch", good, tmp_path / "clean", "--model", bundle_dir)
    assert clean.returncode == 0, clean.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sr3d", "upscale-batch", str(good), str(killed),
                             "--model", str(bundle_dir)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            manifest = json.loads((killed / batch.MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            manifest = {"scans": {}}
        if any(e["status"] == "done" for e in manifest["scans"].values()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the batch finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    statuses = [e["status"] for e in json.loads((killed / batch.MANIFEST).read_text())["scans"].values()]
    assert "done" in statuses and len([s for s in statuses if s == "done"]) < 4

    rerun = _cli("upscale-batch", good, killed, "--model", bundle_dir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "skipped" in rerun.stderr
    names = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert sorted(p.name for p in killed.iterdir()) == names  # no temporary files left behind
    for name in names:
        if name.endswith(".nii.gz"):
            a = np.asarray(nib.load(tmp_path / "clean" / name).dataobj)
            b = np.asarray(nib.load(killed / name).dataobj)
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_cli_batch_exit_code_and_failure_list(tmp_path, input_dir, bundle_dir):
    result = _cli("upscale-batch", input_dir, tmp_path / "out", "--model", bundle_dir)
    assert result.returncode == 1
    assert "failed: broken.nii.gz:" in result.stderr
    assert "5 upscaled" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_scan_locked_by_another_run_is_left_to_it(tmp_path, input_dir, bundle_dir):
    good = tmp_path / "in"
    good.mkdir()
    for name in ("scan0.nii.gz", "scan1.nii.gz"):
        shutil.copy(input_dir / name, good / name)
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    # This process plays the other run: it holds scan0's lock while the batch runs.
    with batch._lock(out / ".scan0_x2.nii.gz.lock", wait=False) as taken:
        assert taken
        result = batch.upscale_batch(good, out, 2, bundle_dir, log=lines.append)
    assert result.busy == ["scan0.nii.gz"] and result.done == ["scan1.nii.gz"] and not result.failed
    assert "[1/2] scan0.nii.gz: being upscaled by another run, skipped" in lines
    assert sorted(p.name for p in out.iterdir()) == [batch.MANIFEST, "scan1_x2.nii.gz"]  # lock files removed
    again = batch.upscale_batch(good, out, 2, bundle_dir, log=lines.append)
    assert again.done == ["scan0.nii.gz"] and again.skipped == ["scan1.nii.gz"]


def test_manifest_entries_of_concurrent_runs_are_merged(tmp_path):
    settings = {"scale": 2}
    first = batch._Manifest(tmp_path / batch.MANIFEST, settings)
    second = batch._Manifest(tmp_path / batch.MANIFEST, settings)
    first.set("a.nii.gz", {"status": "done", "output": "a_x2.nii.gz"})
    second.set("b.nii.gz", {"status": "running", "output": "b_x2.nii.gz"})  # second never saw a's entry
    on_disk = json.loads((tmp_path / batch.MANIFEST).read_text())
    assert on_disk == {"settings": settings, "scans": {"a.nii.gz": {"status": "done", "output": "a_x2.nii.gz"},
                                                       "b.nii.gz": {"status": "running", "output": "b_x2.nii.gz"}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [batch.MANIFEST]


def test_lock_is_released_and_retaken(tmp_path):
    path = tmp_path / ".x.lock"
    with batch._lock(path, wait=False) as mine:
        assert mine and path.exists()
        with batch._lock(path, wait=False) as again:  # a second open file description: flock refuses it
            assert again is False
    assert not path.exists()
    with batch._lock(path, wait=False) as mine:
        assert mine
