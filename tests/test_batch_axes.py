"""`sr3d upscale-batch --axes d|h|w|thick`: one axis per scan with stage d alone, the thick axis
chosen per scan, the same result as `sr3d upscale --axes` on each scan."""
import json

import numpy as np
import pytest
from scipy import ndimage

from sr3d import cli
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume


def _scan(path, shape, spacing, seed):
    rng = np.random.default_rng(seed)
    array = (ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 400 + 600).astype(np.float32)
    sr3d_io.save_volume(sr3d_volume.Volume(array=array, spacing=spacing, affine=np.diag(list(spacing) + [1.0])), path)


@pytest.fixture
def two_scans(tmp_path):
    directory = tmp_path / "in"
    directory.mkdir()
    _scan(directory / "thick_d.nii.gz", (6, 20, 20), (3.0, 1.0, 1.0), 0)   # thickest axis D
    _scan(directory / "thick_w.nii.gz", (20, 20, 6), (1.0, 1.0, 3.0), 1)   # thickest axis W
    return directory


@pytest.mark.parametrize("axes, expected", [
    ("thick", {"thick_d": ((12, 20, 20), (1.5, 1.0, 1.0)), "thick_w": ((20, 20, 12), (1.0, 1.0, 1.5))}),
    ("d", {"thick_d": ((12, 20, 20), (1.5, 1.0, 1.0)), "thick_w": ((40, 20, 6), (0.5, 1.0, 3.0))}),
])
def test_batch_upscales_one_axis_per_scan(axes, expected, two_scans, tiny_bundle_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["upscale-batch", str(two_scans), str(out), "--model", str(tiny_bundle_dir),
                     "--axes", axes]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["mode"] == axes
    for name, (shape, spacing) in expected.items():
        image = sr3d_io.load_volume(out / f"{name}_x2.nii.gz")
        assert image.shape == shape
        np.testing.assert_allclose(image.spacing, spacing, rtol=1e-5)
        # The single-scan command gives the same voxels.
        single = tmp_path / f"{name}_single.nii.gz"
        assert cli.main(["upscale", str(two_scans / f"{name}.nii.gz"), str(single), "--model", str(tiny_bundle_dir),
                         "--axes", axes, "--no-self-check"]) == 0
        np.testing.assert_allclose(image.array, sr3d_io.load_volume(single).array, rtol=1e-5, atol=1e-3)


def test_batch_refuses_an_unknown_axis(two_scans, tiny_bundle_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["upscale-batch", str(two_scans), str(tmp_path / "out"), "--model", str(tiny_bundle_dir),
                  "--axes", "x"])
    assert "invalid choice" in capsys.readouterr().err
