"""The flips and 90-degree rotations of batches of planes, shared by training and inference.

A batch is a (B, h, w) array. Stage `hw` planes are axial slices, so all 8
transforms of the square (the dihedral group) are valid. Stage `d` planes
hold the depth axis on axis 1: only the 4 flips keep it there (a rotation
would swap depth with a spatial axis).
"""
from __future__ import annotations

import numpy as np

COUNT = {"hw": 8, "d": 4}


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """Transform k of 8 on the (1, 2) axes of a (B, h, w) batch: rot90 k%4 times, flipped if k >= 4."""
    y = np.rot90(x, k % 4, axes=(1, 2))
    return y[:, :, ::-1] if k >= 4 else y


def dihedral_inverse(y: np.ndarray, k: int) -> np.ndarray:
    """Undoes `dihedral(., k)`."""
    x = y[:, :, ::-1] if k >= 4 else y
    return np.rot90(x, -(k % 4), axes=(1, 2))


def flip(x: np.ndarray, k: int) -> np.ndarray:
    """Transform k of the 4 that keep axis 1 (depth) in place: flips of axes 1 and/or 2 (self-inverse)."""
    if k & 1:
        x = x[:, ::-1, :]
    if k & 2:
        x = x[:, :, ::-1]
    return x


def forward(x: np.ndarray, k: int, stage: str) -> np.ndarray:
    """Transform k of the ones valid for `stage` planes (see COUNT)."""
    return dihedral(x, k) if stage == "hw" else flip(x, k)


def inverse(y: np.ndarray, k: int, stage: str) -> np.ndarray:
    return dihedral_inverse(y, k) if stage == "hw" else flip(y, k)
