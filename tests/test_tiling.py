import numpy as np
import pytest

from sr3d import tiling


def _row_sums(window: np.ndarray) -> np.ndarray:
    """A predictor with a receptive field of one row each side: the sum of rows y-1..y+1 (zero
    beyond the edges), each output row repeated twice (2 output rows per input row)."""
    padded = np.pad(window, ((0, 0), (1, 1), (0, 0)))
    sums = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return np.repeat(sums, 2, axis=1).astype(np.float32)


def test_batched_runs_every_plane_once_in_order_with_ticks():
    planes = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)
    calls, ticks = [], []

    def predictor(batch):
        calls.append(batch.shape[0])
        return batch * 2

    out = tiling.batched(planes, predictor, 3, ticks.append)
    np.testing.assert_array_equal(out, planes * 2)
    assert calls == [3, 3, 1] and ticks == [3, 3, 1]


@pytest.mark.parametrize("height, rows, expected", [(7, 3, [(0, 3), (3, 6), (6, 7)]), (4, 4, [(0, 4)]),
                                                    (3, 5, [(0, 3)])])
def test_bands_cover_the_rows_once(height, rows, expected):
    assert tiling.bands(height, rows) == expected


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9])
def test_banded_with_the_receptive_field_as_halo_equals_one_call(rows):
    volume = np.random.default_rng(0).random((2, 9, 4)).astype(np.float32)
    progress = []
    out = tiling.banded(volume, rows, lambda window, keep: _row_sums(window)[:, keep.start * 2:keep.stop * 2],
                        halo=1, progress=lambda step: progress.append((step.unit, step.done, step.total, str(step))))
    np.testing.assert_array_equal(out, _row_sums(volume))
    n = len(tiling.bands(9, rows))
    assert progress == [("bands", i, n, f"{i}/{n} bands") for i in range(1, n + 1)]


def test_banded_without_halo_differs_at_band_edges():
    volume = np.ones((1, 4, 2), np.float32)
    out = tiling.banded(volume, 2, lambda window, keep: _row_sums(window)[:, keep.start * 2:keep.stop * 2])
    assert out.shape == (1, 8, 2)
    np.testing.assert_array_equal(out[0, :, 0], [2, 2, 2, 2, 2, 2, 2, 2])  # every band sees only itself
