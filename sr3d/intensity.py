"""Intensity normalisation: scanner units <-> the network's unit range.

The networks see intensities mapped by a per-volume window (lo, hi) to roughly
[0, 1]: lo and hi are low and high percentiles of the volume, so the same
model serves MR (arbitrary units) and CT (Hounsfield units) and a few hot
voxels (metal in CT, vessels in MR) do not squash the range. Values outside
the window are not clipped on the way in: the networks are fully
convolutional and see them as slightly negative or above one.

The window is computed from a strided subsample of the voxels (at most
`MAX_SAMPLES`), sorted, and read at an exact index (no interpolation), so
the numpy path here and the TensorFlow path inside exported SavedModels
(`window_tf`) give bit-identical windows.
"""
from __future__ import annotations

import dataclasses

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
MAX_SAMPLES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Window:
    """Scanner-unit interval mapped to [0, 1]."""

    lo: float
    hi: float

    def normalise(self, array: np.ndarray) -> np.ndarray:
        """Scanner units -> network units (float32)."""
        return ((np.asarray(array, np.float32) - np.float32(self.lo))
                / np.float32(self.hi - self.lo)).astype(np.float32)

    def denormalise(self, array: np.ndarray, in_place: bool = False) -> np.ndarray:
        """Network units -> scanner units (float32). in_place rescales a float32 array itself,
        with the same arithmetic, so a big output is not copied."""
        if in_place:
            array *= np.float32(self.hi - self.lo)
            array += np.float32(self.lo)
            return array
        return (np.asarray(array, np.float32) * np.float32(self.hi - self.lo)
                + np.float32(self.lo)).astype(np.float32)


def _stride(size: int) -> int:
    return max(1, -(-size // MAX_SAMPLES))


def _indices(count: int) -> tuple[int, int]:
    return (int(LOW_PERCENTILE / 100.0 * (count - 1)), int(HIGH_PERCENTILE / 100.0 * (count - 1)))


def window(array: np.ndarray) -> Window:
    """The normalisation window of a volume: (0.5th, 99.5th) percentiles of a subsample.

    A constant volume gets a unit-wide window so normalisation never divides by zero.
    """
    flat = np.asarray(array, np.float32).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot normalise an empty array")
    sample = np.sort(flat[:: _stride(flat.size)])
    i_lo, i_hi = _indices(sample.size)
    lo, hi = float(sample[i_lo]), float(sample[i_hi])
    if not hi > lo:
        hi = lo + 1.0
    return Window(lo, hi)


def window_tf(volume):
    """TensorFlow twin of `window` for graphs: returns (lo, hi) float32 scalars."""
    import tensorflow as tf

    flat = tf.reshape(tf.cast(volume, tf.float32), [-1])
    size = tf.size(flat)
    stride = tf.maximum(1, (size + MAX_SAMPLES - 1) // MAX_SAMPLES)
    sample = tf.sort(flat[::stride])
    count = tf.cast(tf.size(sample), tf.float64)
    # Same arithmetic as _indices: int() truncation of a float64 product.
    i_lo = tf.cast(tf.floor(LOW_PERCENTILE / 100.0 * (count - 1.0)), tf.int32)
    i_hi = tf.cast(tf.floor(HIGH_PERCENTILE / 100.0 * (count - 1.0)), tf.int32)
    lo = tf.reshape(tf.gather(sample, i_lo), [])
    hi = tf.reshape(tf.gather(sample, i_hi), [])
    hi = tf.where(hi > lo, hi, lo + 1.0)
    return lo, hi
