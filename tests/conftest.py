"""Shared fixtures: paths to the real scans in ../shared/data, crops of them, a tiny model bundle."""
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("SR3D_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that take more than a few seconds")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real scans not found at {SHARED_DATA}: check out ../shared beside the repo "
                    "or set SR3D_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ixi_files(shared_data):
    return sorted((shared_data / "ixi-t1-2mm").glob("*.nii.gz"))


@pytest.fixture(scope="session")
def scan_crop():
    """scan_crop(scan, box) -> Volume: voxels `box` ((D, H, W) slices with starts, e.g.
    np.s_[40:46, 48:72, 50:70]) of a real scan (a path, read with sr3d.io.load_volume, or a
    Volume), float32 in scanner units, with its own affine: the origin moved to the first voxel
    kept, so the crop overlays the scan. Tests that need a file write it with
    sr3d.io.save_volume (float32: the scan's source dtype when it is scaled, as IXI is)."""
    from sr3d import io as sr3d_io
    from sr3d import volume as sr3d_volume

    def crop(scan, box) -> sr3d_volume.Volume:
        if not isinstance(scan, sr3d_volume.Volume):
            scan = sr3d_io.load_volume(scan)
        affine = scan.affine.copy()
        affine[:3, 3] = scan.affine[:3, :3] @ np.array([s.start for s in box], float) + scan.affine[:3, 3]
        return sr3d_volume.Volume(scan.array[box].copy(), scan.spacing, affine, source_dtype=scan.source_dtype)

    return crop


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """A 2x model bundle directory of random-weight stage networks (4 filters, seed 0): fast
    stand-ins for the shipped models in inference, export and CLI tests."""
    import keras

    from sr3d import models

    keras.utils.set_random_seed(0)
    runs = tmp_path_factory.mktemp("tiny_runs")
    for stage in models.STAGES:
        models.build(stage, 2, filters=4).save(runs / f"{stage}.keras")
    return models.make_bundle(runs / "hw.keras", runs / "d.keras", runs / "bundle_x2", scale=2,
                              info={"note": "random weights, for tests"})
