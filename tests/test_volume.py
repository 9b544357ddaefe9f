"""sr3d/volume.py: spacing and affine checked together, and the coarse grid of `downscaled_affine`."""
import numpy as np
import pytest

from sr3d.volume import Volume, downscaled_affine, downscaled_volume, spacing_from_affine, upscaled_affine

# An oblique grid: 20 degrees about x, voxels 2 x 1 x 0.5 mm (d, h, w), origin off zero.
_C, _S = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
OBLIQUE = np.array([[0.0, 0.0, 0.5, -40.0],
                    [2.0 * -_S, 1.0 * _C, 0.0, 12.5],
                    [2.0 * _C, 1.0 * _S, 0.0, 7.0],
                    [0.0, 0.0, 0.0, 1.0]])


def test_spacing_must_be_the_affines_column_lengths():
    array = np.zeros((4, 4, 4), np.float32)
    assert Volume(array, (2.0, 1.0, 0.5), OBLIQUE).spacing == pytest.approx((2.0, 1.0, 0.5), rel=1e-12)
    Volume(array, (2.0 * (1 + 1e-9), 1.0, 0.5), OBLIQUE)  # round-off is not a geometry
    # An LR array wrapped with the HR affine and the LR spacing: both are named in the error.
    with pytest.raises(ValueError, match=r"spacing \(4, 2, 1\) mm does not match the affine's voxel sizes "
                                         r"\(2, 1, 0\.5\) mm"):
        Volume(array, (4.0, 2.0, 1.0), OBLIQUE)


def test_downscaled_affine_places_a_coarse_voxel_at_the_centre_of_the_fine_ones_it_covers():
    coarse = downscaled_affine(OBLIQUE, 2, axes=(0, 1, 2))
    # Coarse voxel (1, 2, 3) covers fine voxels 2..3, 4..5, 6..7: centre at fine index (2.5, 4.5, 6.5).
    np.testing.assert_allclose(coarse @ [1, 2, 3, 1], OBLIQUE @ [2.5, 4.5, 6.5, 1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(spacing_from_affine(coarse), (4.0, 2.0, 1.0), rtol=1e-12)
    np.testing.assert_allclose(upscaled_affine(coarse, (5, 5, 5), 2), OBLIQUE, rtol=0, atol=1e-12)
    in_plane = downscaled_affine(OBLIQUE, 3, axes=(1, 2))
    np.testing.assert_allclose(in_plane @ [1, 1, 1, 1], OBLIQUE @ [1, 4, 4, 1], rtol=0, atol=1e-12)


def test_downscaled_volume_is_consistent_and_keeps_the_other_fields():
    fine = Volume(np.ones((6, 6, 6), np.float32), (2.0, 1.0, 0.5), OBLIQUE, modality="MR", source="scan.nii.gz")
    coarse = downscaled_volume(fine, np.ones((3, 6, 3), np.float32), 2, axes=(0, 2))
    assert coarse.spacing == pytest.approx((4.0, 1.0, 1.0), rel=1e-12)
    assert coarse.modality == "MR" and coarse.source is None
    np.testing.assert_array_equal(coarse.affine, downscaled_affine(OBLIQUE, 2, axes=(0, 2)))
