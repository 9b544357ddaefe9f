"""Fault injection (issue 12): `sr3d upscale` and `sr3d upscale-batch` killed with SIGKILL or
SIGTERM while loading, computing and writing. Nothing may be lost or left behind: the input
and the user's other files stay byte for byte, no half-written output appears under its final
name, SIGTERM unwinds like Ctrl-C (exit status 143, temporaries removed), and after SIGKILL a
rerun removes the killed writer's temporary and finishes. Models: the random-weight test bundle.
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
SENTINEL = "keep_me.txt"
pytestmark = pytest.mark.slow


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A synthetic 40 x 80 x 80 scan of float32 noise at 2 mm (noise compresses badly, so the .nii.gz
    write takes a moment). Only files, exit statuses and signals are checked: no real scan needed."""
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    data = np.random.default_rng(0).normal(500, 100, (80, 80, 40)).astype(np.float32)  # (i, j, k) = (W, H, D)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def _start(args, stderr_path):
    return subprocess.Popen([sys.executable, "-m", "sr3d", *map(str, args)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(stderr_path, "w"))


def _wait_for(proc, ready, timeout=600.0):
    """Polls `ready()` until it holds (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the process neither reached the phase nor ended")


def _hidden(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*"))


def _phase_ready(phase, out_dir, stderr_path, started):
    if phase == "loading":
        return lambda: time.time() - started > 0.5
    if phase == "computing":
        return lambda: "upscal" in stderr_path.read_text() and not _hidden(out_dir)
    return lambda: any(".tmp-" in name and name.endswith(".nii.gz") for name in _hidden(out_dir))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("phase", ["loading", "computing", "writing"])
def test_killed_upscale_loses_nothing_and_leaves_nothing(phase, sig, scan, tiny_bundle_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / SENTINEL).write_text("the user's file")
    out = out_dir / "result.nii.gz"
    before = _digest(scan)
    for attempt in range(3):  # the write phase is short: try again if it was missed
        stderr_path = tmp_path / f"stderr{attempt}.txt"
        proc = _start(["upscale", scan, out, "--model", tiny_bundle_dir], stderr_path)
        reached = _wait_for(proc, _phase_ready(phase, out_dir, stderr_path, time.time()))
        if reached:
            break
        proc.wait()
        for leftover in out_dir.iterdir():  # it finished first: start again from the same state
            if leftover.name != SENTINEL:
                leftover.unlink()
    else:
        pytest.fail(f"never caught sr3d upscale while {phase}")
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
    err = stderr_path.read_text()
    assert "Traceback" not in err, err
    assert _digest(scan) == before and (out_dir / SENTINEL).read_text() == "the user's file"
    assert not out.exists(), "no output under its final name"
    if sig == signal.SIGTERM:
        # Before main() installs its handler (interpreter start-up) the default action kills it.
        assert code in (128 + signal.SIGTERM, -signal.SIGTERM), err
        if code == 128 + signal.SIGTERM:
            assert "terminated by SIGTERM" in err.strip().splitlines()[-1], err
        assert _hidden(out_dir) == [], "SIGTERM removes the temporary file"
    else:
        assert code == -signal.SIGKILL
        assert all(".tmp-" in name for name in _hidden(out_dir))
        rerun = subprocess.run([sys.executable, "-m", "sr3d", "upscale", str(scan), str(out), "--model",
                                str(tiny_bundle_dir)], env=ENV, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert _hidden(out_dir) == [], "the rerun removed the killed writer's temporary"
        assert nib.load(out).shape == (160, 160, 80)
    assert _digest(scan) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("phase", ["computing", "writing"])
def test_killed_batch_resumes_and_leaves_nothing(phase, sig, scan, tiny_bundle_dir, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(scan, source / name)
    before = {p.name: _digest(p) for p in source.iterdir()}
    out = tmp_path / "out"
    for attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        stderr_path = tmp_path / f"stderr{attempt}.txt"
        proc = _start(["upscale-batch", source, out, "--model", tiny_bundle_dir], stderr_path)

        def running():
            try:
                manifest = json.loads((out / "manifest.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return False
            return any(e["status"] == "running" for e in manifest["scans"].values())

        ready = running if phase == "computing" else (lambda: out.is_dir() and any(
            ".tmp-" in n and n.endswith(".nii.gz") for n in _hidden(out)))
        if _wait_for(proc, ready):
            break
        proc.wait()
    else:
        pytest.fail(f"never caught sr3d upscale-batch while {phase}")
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
    err = stderr_path.read_text()
    assert "Traceback" not in err, err
    assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL), err
    if sig == signal.SIGTERM:
        assert [n for n in _hidden(out) if ".tmp-" in n] == [], "SIGTERM removes the temporary file"
    finished = [p.name for p in out.glob("*_x2.nii.gz")]
    for name in finished:  # whatever is there under a final name is complete
        assert nib.load(out / name).shape == (160, 160, 80)
    rerun = subprocess.run([sys.executable, "-m", "sr3d", "upscale-batch", str(source), str(out), "--model",
                            str(tiny_bundle_dir)], env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.nii.gz", "b_x2.nii.gz", "manifest.json"]
    assert {p.name: _digest(p) for p in source.iterdir()} == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: e["status"] for k, e in manifest["scans"].items()} == {"a.nii.gz": "done", "b.nii.gz": "done"}


def test_two_batches_on_one_output_directory_split_the_work(scan, tiny_bundle_dir, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        shutil.copy(scan, source / name)
    out = tmp_path / "out"
    procs = [_start(["upscale-batch", source, out, "--model", tiny_bundle_dir], tmp_path / f"err{k}.txt")
             for k in range(2)]
    codes = [p.wait(timeout=1800) for p in procs]
    errs = [(tmp_path / f"err{k}.txt").read_text() for k in range(2)]
    assert codes == [0, 0], errs
    upscaled = [line for err in errs for line in err.splitlines() if " -> " in line]
    # Each scan is upscaled exactly once, by whichever run took its lock first.
    assert sorted(line.split("] ")[1].split(" ->")[0] for line in upscaled) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.nii.gz", "b_x2.nii.gz", "c_x2.nii.gz", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {e["status"] for e in manifest["scans"].values()} == {"done"} and len(manifest["scans"]) == 3
