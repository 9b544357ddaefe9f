"""Tests for sr3d.progress: one report that is both a log line and a count."""
import io
import sys

from sr3d import cli
from sr3d.progress import Step, print_line


def test_a_step_is_its_line_and_carries_its_count():
    step = Step("bands", 2, 5)
    assert step == "2/5 bands" and (step.unit, step.done, step.total) == ("bands", 2, 5)
    told = Step("steps", 100, None, "  epoch 1: step 100")
    assert told == "  epoch 1: step 100" and (told.unit, told.done, told.total) == ("steps", 100, None)
    assert Step("steps", 7, None) == "7 steps"
    assert f"upscaling the thick axis: {step}" == "upscaling the thick axis: 2/5 bands"


def test_one_call_feeds_a_log_and_the_bar(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar_stream = io.StringIO()
    bar = cli._ProgressBar("study", stream=bar_stream)
    for step in (Step("scans read", 1, 1, "read scan 1/1"), Step("steps", 3, None, "no total: the bar skips it")):
        print_line(step)
        bar(step)
    assert stderr.getvalue() == "read scan 1/1\nno total: the bar skips it\n"
    assert bar_stream.getvalue().startswith("study 100% | 1/1 scans read")
    assert bar_stream.getvalue().count("\n") == 1
