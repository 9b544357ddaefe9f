"""Tests for sr3d/planes.py: plane names from the affine (golden: nibabel.aff2axcodes) and the
radiological display, checked on volumes whose voxels hold their own world coordinates."""
import nibabel as nib
import numpy as np
import pytest

from sr3d import planes


def _affine(columns, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """Voxel (d, h, w) -> world RAS+ mm: the columns are the world steps of d, h and w."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, float).T
    affine[:3, 3] = origin
    return affine


def _rotation_x(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


AFFINES = {
    # sr3d's affine for a numpy array: d -> S, h -> A, w -> R (NIfTI RAS with k, j, i = d, h, w).
    "ras": _affine([(0, 0, 2.0), (0, 1.0, 0), (1.0, 0, 0)]),
    # A DICOM axial series in RAS: columns run to the patient's left, rows to posterior (LPS +x, +y).
    "dicom_axial": _affine([(0, 0, 3.0), (0, -0.9, 0), (-0.9, 0, 0)]),
    # Sagittal slices (d -> L), rows running inferior, columns anterior, tilted 15 degrees.
    "sagittal_oblique": _affine(((_rotation_x(15) @ np.array([(-1.2, 0, 0), (0, 0, -1.0), (0, 1.0, 0)]).T).T)),
}
SHAPE = (6, 8, 10)


def _world(affine: np.ndarray) -> np.ndarray:
    """(3, D, H, W): the world RAS coordinates of every voxel."""
    index = np.stack(np.meshgrid(*map(np.arange, SHAPE), indexing="ij"), axis=0).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape((3,) + SHAPE)


@pytest.mark.parametrize("case", sorted(AFFINES))
@pytest.mark.parametrize("normal_axis", [0, 1, 2])
def test_plane_names_and_display_follow_the_affine(case, normal_axis):
    affine = AFFINES[case]
    code = nib.aff2axcodes(affine)[normal_axis]
    expected = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "R": "sagittal", "L": "sagittal"}[code]
    assert planes.plane_name(affine, normal_axis) == expected
    world = _world(affine)
    shown = [planes.show(world[c], affine, normal_axis) for c in range(3)]   # R, A, S coordinate images
    r, a, s = (x.image for x in shown)
    labels = shown[0]
    assert all(x.name == expected for x in shown)
    vertical, horizontal = (a, r) if expected == "axial" else ((s, r) if expected == "coronal" else (s, a))
    up, left = ("A", "R") if expected == "axial" else (("S", "R") if expected == "coronal" else ("S", "A"))
    assert (labels.top, labels.left) == (up, left)
    assert (labels.bottom, labels.right) == ({"A": "P", "S": "I"}[up], {"R": "L", "A": "P"}[left])
    # Superior (anterior in axial) at the top, the patient's right (anterior in sagittal) on the left.
    assert vertical[0].mean() > vertical[-1].mean()
    assert horizontal[:, 0].mean() > horizontal[:, -1].mean()
    # The plane is the middle one along the normal axis, whatever its display.
    assert shown[0].image.size == np.prod(SHAPE) // SHAPE[normal_axis]
