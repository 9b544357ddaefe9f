"""Tests for sr3d.beam and `sr3d upscale-beam`: the pipeline on the DirectRunner over small real
scans, a rerun after a writer killed mid-write, globs, and Beam staying an optional extra."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from sr3d import batch, cli
from sr3d import io as sr3d_io

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
GOOD = ["scan0.nii.gz", "scan1.nii.gz", "sub/scan2.nii.gz"]


def _beam():
    """sr3d.beam; CI installs the [test] extra, which has apache-beam, so there it must import."""
    if not os.environ.get("CI"):
        pytest.importorskip("apache_beam")
    from sr3d import beam as sr3d_beam
    return sr3d_beam


@pytest.fixture(scope="module")
def scans(tmp_path_factory, ixi_files, scan_crop):
    """scans/: three 32 x 32 x 8 crops of real IXI T1 scans (one in a subfolder) and a truncated file."""
    root = tmp_path_factory.mktemp("beam") / "scans"
    (root / "sub").mkdir(parents=True)
    for name, f in zip(GOOD, ixi_files):
        sr3d_io.save_volume(scan_crop(f, np.s_[40:48, 34:66, 30:62]), root / name)
    data = (root / "scan0.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    return root


def _job(sr3d_beam, scans, out, model, **options):
    return sr3d_beam.BeamJob(output=str(out), input=str(scans / "**"), model=str(model),
                             options=batch.ScanOptions(scale=2, **options))


def _outputs(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _check_geometry(scan, output):
    """The x2 output against first principles: shape doubled, voxel axes halved, and the first
    voxel centre a quarter of an input voxel inside the first input voxel (same field of view)."""
    lr, hr = nib.load(scan), nib.load(output)
    assert hr.shape == tuple(2 * n for n in lr.shape)
    np.testing.assert_allclose(hr.affine[:3, :3], lr.affine[:3, :3] / 2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(hr.affine[:3, 3], lr.affine[:3, :3] @ [-0.25, -0.25, -0.25] + lr.affine[:3, 3],
                               rtol=0, atol=1e-4)


def test_pipeline_writes_each_good_scan_once_and_a_rerun_does_no_work(tmp_path, scans, tiny_bundle_dir):
    sr3d_beam = _beam()
    out = tmp_path / "out"
    job = _job(sr3d_beam, scans, out, tiny_bundle_dir)
    first = sr3d_beam.run(job, ["--runner", "DirectRunner"])
    assert sorted(r["input"] for r in first.done) == [str(scans / n) for n in GOOD]
    assert [r["input"] for r in first.failed] == [str(scans / "broken.nii.gz")] and first.skipped == []
    written = [n.replace(".nii.gz", "_x2.nii.gz") for n in GOOD]
    records = [n.replace(".nii.gz", ".json") for n in written]
    assert _outputs(out) == sorted([*written, *records, "broken_x2.json", sr3d_beam.ERRORS, sr3d_beam.RUN_LOG])
    for name, output in zip(GOOD, written):
        _check_geometry(scans / name, out / output)
        record = json.loads((out / output.replace(".nii.gz", ".json")).read_text())
        assert record["status"] == "done" and record["output"] == str(out / output)
        assert record["model_sha256"] == sr3d_beam.model_sha256(str(tiny_bundle_dir), 2)
    errors = (out / sr3d_beam.ERRORS).read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"{scans / 'broken.nii.gz'}: ")
    mtimes = {n: (out / n).stat().st_mtime_ns for n in [*written, *records]}

    again = sr3d_beam.run(job, ["--runner", "DirectRunner"])
    assert again.done == [] and sorted(r["input"] for r in again.skipped) == [str(scans / n) for n in GOOD]
    assert [r["input"] for r in again.failed] == [str(scans / "broken.nii.gz")]
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes
    run_log = [json.loads(line) for line in (out / sr3d_beam.RUN_LOG).read_text().splitlines()]
    assert sorted(r["status"] for r in run_log) == ["failed", "skipped", "skipped", "skipped"]


# The pipeline in a process that dies (os._exit, as under SIGKILL: no cleanup runs) while it
# writes scan1's output: half a file under the atomic writer's temporary name, record "running".
_KILLED_MID_WRITE = textwrap.dedent("""
    import os, pathlib, sys
    from sr3d import batch, beam, files as sr3d_files

    real_write = batch.write_scan
    def write_scan(result, target, options):
        if pathlib.Path(target).name == "scan1_x2.nii.gz":
            with sr3d_files.atomic_path(target) as temporary:
                real_write(result, temporary.with_name("whole.nii.gz"), options)
                temporary.write_bytes(temporary.with_name("whole.nii.gz").read_bytes()[:2000])
                temporary.with_name("whole.nii.gz").unlink()
                os._exit(137)
        return real_write(result, target, options)
    batch.write_scan = write_scan
    scans, out, model = sys.argv[1:]
    job = beam.BeamJob(output=out, input=scans + "/**", model=model, options=batch.ScanOptions(scale=2))
    beam.run(job, ["--runner", "DirectRunner"])
""")


def test_rerun_after_a_kill_mid_write_leaves_no_partial_or_duplicate_output(tmp_path, scans, tiny_bundle_dir):
    sr3d_beam = _beam()
    good = tmp_path / "scans"
    shutil.copytree(scans, good, ignore=shutil.ignore_patterns("broken*"))
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(good), str(out), str(tiny_bundle_dir)],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    stale = [p.name for p in out.iterdir() if p.name.startswith(".scan1_x2.tmp-")]
    assert len(stale) == 1 and not (out / "scan1_x2.nii.gz").exists()
    assert json.loads((out / "scan1_x2.json").read_text())["status"] == "running"

    rerun = sr3d_beam.run(_job(sr3d_beam, good, out, tiny_bundle_dir), ["--runner", "DirectRunner"])
    assert rerun.failed == [] and len(rerun.done) + len(rerun.skipped) == 3
    assert str(good / "scan1.nii.gz") in [r["input"] for r in rerun.done]
    written = [n.replace(".nii.gz", "_x2.nii.gz") for n in GOOD]
    assert _outputs(out) == sorted([*written, *(n.replace(".nii.gz", ".json") for n in written),
                                    sr3d_beam.ERRORS, sr3d_beam.RUN_LOG])  # no temporary, no second copy
    assert (out / sr3d_beam.ERRORS).read_text() == ""
    for name, output in zip(GOOD, written):
        _check_geometry(good / name, out / output)
        assert json.loads((out / output.replace(".nii.gz", ".json")).read_text())["status"] == "done"


def test_globstar_matches_zero_or_more_folders_and_relative_globs(monkeypatch, scans):
    sr3d_beam = _beam()
    from apache_beam.io.filesystems import FileSystems

    def matched(pattern):
        return sorted({m.path for p in sr3d_beam.match_patterns(pattern)
                       for m in FileSystems.match([p])[0].metadata_list})

    monkeypatch.chdir(scans.parent)
    everything = [str(scans / n) for n in sorted(["broken.nii.gz", *GOOD])]
    assert matched("scans/**/*.nii.gz") == everything
    assert matched("**/*.nii.gz") == everything
    assert matched("scans/**/sub/*.nii.gz") == [str(scans / "sub/scan2.nii.gz")]
    monkeypatch.chdir(scans)
    assert matched("*.nii.gz") == [str(scans / n) for n in ("broken.nii.gz", "scan0.nii.gz", "scan1.nii.gz")]
    assert sr3d_beam.match_patterns("gs://b/x/**/*.dcm") == ["gs://b/x/**/*.dcm", "gs://b/x/*.dcm"]
    assert sr3d_beam.glob_root(str(scans / "**/*.nii.gz")) == f"{scans}/"


def test_stale_dicom_series_of_a_dead_writer_are_removed(tmp_path):
    sr3d_beam = _beam()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60)
    target = tmp_path / "scan0_x2"
    pid = int(gone.stdout)
    dead = [tmp_path / f".scan0_x2.tmp-{pid}-0badc0de", tmp_path / f".scan0_x2.old-{pid}-00c0ffee"]
    live = tmp_path / f".scan0_x2.tmp-{os.getpid()}-12345678"
    other = tmp_path / f".scan0_x2b.tmp-{pid}-0badc0de"  # another output's
    for folder in (*dead, live, other):
        folder.mkdir()
        (folder / "000001.dcm").write_bytes(b"half")
    assert sr3d_beam.remove_stale_series(target) == sorted(dead)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_import_sr3d_does_not_import_beam():
    code = ("import sys, sr3d, sr3d.cli, sr3d.batch; "
            "print(sorted(m for m in sys.modules if m.startswith('apache_beam')))")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_upscale_beam_without_beam_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    import sr3d

    monkeypatch.setitem(sys.modules, "apache_beam", None)  # what `import apache_beam` sees when it is not installed
    monkeypatch.delitem(sys.modules, "sr3d.beam", raising=False)
    monkeypatch.delattr(sr3d, "beam", raising=False)
    code = cli.main(["upscale-beam", "--input", str(tmp_path / "*.nii.gz"), "--output", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == ['sr3d upscale-beam: error: upscale-beam needs Apache Beam: pip install "sr3d[beam]"']
