"""Model-agnostic tiling: planes through a predictor a batch at a time, volumes in bands of rows.

In the manner of MONAI's `sliding_window_inference(inputs, roi_size, sw_batch_size, predictor)`:
the functions here know no network, only a predictor (numpy in, numpy out) and the sizes of its
calls, so every numpy caller (`sr3d.inference`'s stages, training's validation, the benchmarks)
writes neither loop again. A band of rows is extended by a halo on both sides and the predictor
returns the outputs of the band's own rows only, so when the halo covers the predictor's receptive
field the banded result equals the one of a single call on the whole volume.

Pure numpy, below every module that runs a network (`sr3d.training`, `sr3d.inference`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from sr3d.progress import Progress, Step

# (B, h, w) planes -> (B, h', w') outputs, one call.
Predictor = Callable[[np.ndarray], np.ndarray]
# (window, keep) -> the outputs of the window's rows `keep` (axis 1), `scale` output rows per row.
BandPredictor = Callable[[np.ndarray, slice], np.ndarray]


def batched(planes: np.ndarray, predictor: Predictor, batch_size: int,
            tick: Callable[[int], None] | None = None) -> np.ndarray:
    """`predictor` on (N, h, w) planes `batch_size` at a time -> its (N, h', w') outputs in order.

    tick: called with the number of planes done after each predictor call.
    """
    out = []
    for i in range(0, planes.shape[0], batch_size):
        out.append(predictor(planes[i:i + batch_size]))
        if tick is not None:
            tick(out[-1].shape[0])
    return np.concatenate(out)


def bands(height: int, rows: int) -> list[tuple[int, int]]:
    """(first, end) rows of the bands of `rows` rows that cover `height` rows (the last may be shorter)."""
    return [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]


def banded(volume: np.ndarray, rows: int, predictor: BandPredictor, *, halo: int = 0,
           progress: Progress | None = None) -> np.ndarray:
    """`predictor` on bands of `rows` rows (axis 1) of a (D, H, W) array -> float32 (D', sH, W').

    Each band is passed with `halo` more rows on each side where the volume has them, as
    predictor(window, keep): it returns the outputs of the rows `keep` of `window` only, s
    output rows per input row (a staged predictor drops the halo between its stages). The output
    array is allocated from the first band's output. progress: called as Step("bands", i, n) after
    each band i of n.
    """
    height = volume.shape[1]
    spans = bands(height, rows)
    out = scale = None
    for index, (y0, y1) in enumerate(spans):
        a0, a1 = max(0, y0 - halo), min(height, y1 + halo)
        band = predictor(volume[:, a0:a1, :], slice(y0 - a0, y1 - a0))
        if out is None:
            scale = band.shape[1] // (y1 - y0)
            out = np.empty((band.shape[0], height * scale, band.shape[2]), np.float32)
        out[:, y0 * scale:y1 * scale, :] = band
        if progress is not None:
            progress(Step("bands", index + 1, len(spans)))
    return out
