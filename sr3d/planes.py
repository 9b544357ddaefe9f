"""Planes of a volume as radiologists name and show them, from its affine (not the array order).

A Volume's affine maps voxel (d, h, w) to world RAS+ mm (spec.md). The plane normal to an
array axis is axial, coronal or sagittal as that axis runs mostly along S/I, A/P or R/L
(nibabel's `aff2axcodes` reads the same thing). Drawn the radiological way: superior up
(anterior up in an axial plane), the patient's right on the viewer's left in axial and
coronal planes, anterior on the left in a sagittal plane.
"""
from __future__ import annotations

import dataclasses

import numpy as np

PLANE_OF_WORLD_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}   # normal along R/L, A/P, S/I
POSITIVE, NEGATIVE = "RAS", "LPI"


def world_axis(affine: np.ndarray, axis: int) -> tuple[int, int]:
    """(world axis 0/1/2 = R/A/S, sign +1/-1) that array `axis` mostly runs along."""
    direction = np.asarray(affine, float)[:3, axis]
    world = int(np.argmax(np.abs(direction)))
    return world, 1 if direction[world] > 0 else -1


def rows_point_up(affine: np.ndarray, axis: int) -> bool:
    """Whether array `axis` runs mostly towards anterior or superior, so that images with that
    axis as rows are drawn upside down unless flipped (superior or anterior goes up)."""
    world, sign = world_axis(affine, axis)
    return world in (1, 2) and sign > 0


def plane_name(affine: np.ndarray, normal_axis: int) -> str:
    """"axial", "coronal" or "sagittal": the plane of the array normal to `normal_axis`."""
    return PLANE_OF_WORLD_AXIS[world_axis(affine, normal_axis)[0]]


@dataclasses.dataclass(frozen=True)
class Shown:
    """A plane ready for imshow(origin="upper") and the patient directions at its edges."""

    image: np.ndarray
    name: str
    top: str
    bottom: str
    left: str
    right: str


def show(volume: np.ndarray, affine: np.ndarray, normal_axis: int, index: int | None = None) -> Shown:
    """The plane `index` (default: the middle one) normal to `normal_axis` of a (D, H, W) array,
    transposed and flipped so that it is drawn the radiological way (module docstring)."""
    index = volume.shape[normal_axis] // 2 if index is None else index
    return display(np.take(volume, index, axis=normal_axis), affine, normal_axis)


def display(image: np.ndarray, affine: np.ndarray, normal_axis: int) -> Shown:
    """`show` for a plane already taken: `image` is (the other two array axes in order), e.g. a
    (H, W) slice for normal_axis 0."""
    axes = [a for a in range(3) if a != normal_axis]              # the image's (row, col) array axes
    worlds = {a: world_axis(affine, a) for a in axes}
    name = plane_name(affine, normal_axis)
    # Vertical: S/I if it is in the plane, else A/P (axial). Horizontal: the other one.
    vertical_world = 1 if name == "axial" else 2
    vertical = next((a for a in axes if worlds[a][0] == vertical_world), axes[0])
    horizontal = axes[1] if vertical == axes[0] else axes[0]
    if vertical != axes[0]:
        image = image.T
    # Row 0 at the top is superior/anterior, column 0 on the left is right (axial, coronal) or
    # anterior (sagittal): the positive RAS direction of both axes, so flip where the index grows
    # towards it.
    if worlds[vertical][1] > 0:
        image = image[::-1]
    if worlds[horizontal][1] > 0:
        image = image[:, ::-1]
    v, h = worlds[vertical][0], worlds[horizontal][0]
    return Shown(image=np.ascontiguousarray(image), name=name, top=POSITIVE[v], bottom=NEGATIVE[v],
                 left=POSITIVE[h], right=NEGATIVE[h])


def label_edges(ax, shown: Shown, fontsize: int = 9, color: str = "yellow") -> None:
    """Writes the patient directions at the four edges of a matplotlib Axes showing `shown`."""
    style = dict(color=color, fontsize=fontsize, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.98, shown.top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, shown.bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, shown.left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, shown.right, ha="right", va="center", **style)
