"""The shipped models on real held-out scans, and the README's main job (`sr3d demo`)."""
import json

import nibabel as nib
import numpy as np
import pytest

from sr3d import baselines, degrade, demo, inference, metrics, models
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_bundles_load_with_their_scale(scale):
    bundle = models.load_models(None, scale)
    assert bundle.scale == scale
    assert models.available_scales() == [2, 4]


@pytest.mark.slow
def test_shipped_x2_beats_lanczos_in_3d_on_a_held_out_ixi_scan(ixi_files):
    """IXI048 was never seen in training (docs/model_card.md): PSNR and SSIM, 3D protocol."""
    volume = sr3d_io.load_volume(ixi_files[-1])
    hr, lr = degrade.simulate_lr(volume.array, 2, mode="3d")
    lr_volume = sr3d_volume.Volume(lr, tuple(2 * s for s in volume.spacing), sr3d_volume.downscaled_affine(volume.affine, 2))
    cnn = inference.upscale_volume(lr_volume, models.load_models(None, 2)).array
    lanczos = baselines.upscale(lr, 2, "lanczos", mode="3d")
    protocol = metrics.float_protocol((0.0, float(hr.max())), with_ifc=False)
    cnn_score, lanczos_score = (metrics.score_volume(hr, x, protocol) for x in (cnn, lanczos))
    assert cnn_score["psnr"] > lanczos_score["psnr"] + 0.5
    assert cnn_score["ssim"] > lanczos_score["ssim"] + 0.01


@pytest.mark.slow
def test_demo_upscales_the_bundled_scan_and_reports(tmp_path):
    text = demo.run(tmp_path, scale=2)
    report = json.loads((tmp_path / "report.json").read_text())
    src = nib.load(demo.BUNDLED_SCAN)
    out = nib.load(tmp_path / "studyforrest_t1_x2.nii.gz")
    assert out.shape == tuple(2 * n for n in src.shape)
    # Same field of view: the outer corner of the first voxel is the same world point.
    corner_in = src.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    corner_out = out.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner_out, corner_in, atol=1e-4)
    assert out.get_data_dtype() == np.int16
    scores = report["comparison"]
    assert scores["cnn"]["psnr"] > scores["lanczos"]["psnr"]
    assert scores["cnn"]["ssim"] > scores["lanczos"]["ssim"]
    assert (tmp_path / "comparison_x2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CNN PSNR" in text
