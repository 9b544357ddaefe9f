"""Tests for sr3d/scripting.py through the real scripts: --help exits 0, export.py is quiet."""
import pathlib
import subprocess
import sys

import pytest

from sr3d import scripting

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("script, flag", [("train.py", "--stage"), ("evaluate.py", "--data"),
                                          ("export.py", "--export_dir")])
def test_help_exits_zero_and_lists_the_flags(script, flag):
    result = _run(REPO / script, "--help")
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout


def test_a_bad_flag_still_fails():
    result = _run(REPO / "export.py", "--no_such_flag")
    assert result.returncode == 1
    assert "Unknown command line flag 'no_such_flag'" in result.stderr


def test_help_flags_are_recognised_only_before_the_end_of_flags():
    assert scripting.asked_for_help(["--scale=2", "--helpfull"])
    assert scripting.asked_for_help(["-?"])
    assert not scripting.asked_for_help(["--", "--help"])
    assert not scripting.asked_for_help(["--helper"])


@pytest.mark.slow
def test_export_is_quiet_unless_verbose(tmp_path, tiny_bundle_dir):
    args = [REPO / "export.py", f"--model={tiny_bundle_dir}", "--scale=2", f"--export_dir={tmp_path}"]
    quiet = _run(*args, "--version=1", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout == f"exported {tmp_path / 'sr3d' / '1'}\n"
    verbose = _run(*args, "--version=2", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    # The SavedModel writer's INFO lines (the C++ startup lines depend on the CPU and build).
    assert "Writing fingerprint" in verbose.stderr
