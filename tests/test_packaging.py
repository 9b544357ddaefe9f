"""Tests for setup.py's dependencies, read back from the installed package's metadata.

The wheel itself (shipped models and assets inside, installed alone, demo run from it) is
checked by .ci/check_wheel, which .ci/run calls after the tests.
"""
import importlib.metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PLATFORMS = {  # (platform_system, platform_machine) -> the TensorFlow distribution that has wheels there
    ("Linux", "x86_64"): "tensorflow-cpu",
    ("Windows", "AMD64"): "tensorflow-cpu",
    ("Linux", "aarch64"): "tensorflow",
    ("Darwin", "arm64"): "tensorflow",
    ("Darwin", "x86_64"): "tensorflow",
}


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in importlib.metadata.requires("sr3d")]


def _applies(requirement: Requirement, system: str, machine: str, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate(
        {"platform_system": system, "platform_machine": machine, "extra": extra})


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_exactly_one_tensorflow_per_platform(platform):
    names = [r.name for r in _requirements() if r.name.startswith("tensorflow") and _applies(r, *platform)]
    assert names == [PLATFORMS[platform]]


def test_tensorflow_and_keras_have_the_tested_upper_bounds():
    bounds = {r.name: r.specifier for r in _requirements() if r.name in ("tensorflow", "tensorflow-cpu", "keras")}
    for name in ("tensorflow", "tensorflow-cpu"):
        assert Version("2.21.0") in bounds[name] and Version("2.22.0") not in bounds[name]
    assert Version("3.15.1") in bounds["keras"] and Version("3.16.0") not in bounds["keras"]


def test_gpu_extra_pulls_tensorflow_with_cuda_on_linux_only():
    gpu = [r for r in _requirements() if "and-cuda" in r.extras]
    assert len(gpu) == 1 and gpu[0].name == "tensorflow"
    assert _applies(gpu[0], "Linux", "x86_64", extra="gpu")
    assert not _applies(gpu[0], "Linux", "x86_64", extra="")
    assert not _applies(gpu[0], "Darwin", "arm64", extra="gpu")
