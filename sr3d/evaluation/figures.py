"""The comparison figure of an evaluation: the middle slice of the last scan, LR input, every
method, HR and the error maps, with the region of largest error magnified."""
from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np

from sr3d import planes

FIGURE_NAME = "comparison_x{scale}.png"


def figure_info(path: str, slice_index: int, methods: list[str], per_scan: dict, key: str) -> dict:
    """Scan, slice and the per-slice PSNR of each figure panel under the first protocol."""
    protocol = next(iter(per_scan))
    psnr = {}
    for method in methods:
        cell = per_scan[protocol][key][method][-1]
        indices = cell["slice_indices"]
        psnr[method] = (cell["per_slice"]["psnr"][indices.index(slice_index)]
                        if slice_index in indices else None)
    return {"scan": path, "slice_index": slice_index, "psnr_protocol": protocol, "psnr": psnr,
            "file": FIGURE_NAME.format(scale=key[1:])}


def _zoom_region(error: np.ndarray) -> tuple[int, int, int]:
    """(row, col, side) of the square where `error` sums highest: the region to magnify."""
    from scipy import ndimage

    side = max(8, min(error.shape) // 5)
    sums = ndimage.uniform_filter(error.astype(np.float64), size=side, mode="constant")
    half = side // 2
    valid = sums[half:error.shape[0] - side + half + 1, half:error.shape[1] - side + half + 1]
    row, col = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return int(row), int(col), side


def draw_figure(path: pathlib.Path, slices: dict, info: dict, labels: Mapping[str, str],
                 title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    affine = slices.get("affine", np.eye(4))

    def shown(image: np.ndarray) -> planes.Shown:  # slices are (H, W) planes, normal to D
        return planes.display(image, affine, 0)

    r = int(slices["scale"])
    # The LR input drawn on the HR grid, each LR pixel an r x r block, so the insets line up.
    lr_on_hr_grid = np.repeat(np.repeat(slices["lr"], r, axis=0), r, axis=1)[:slices["hr"].shape[0],
                                                                              :slices["hr"].shape[1]]
    edges = shown(slices["hr"])
    hr = edges.image
    panels = {m: shown(image).image for m, image in slices["panels"].items()}
    lr_on_hr_grid = shown(lr_on_hr_grid).image
    errors = {m: np.abs(image - hr) for m, image in panels.items()}
    row, col, side = _zoom_region(next(iter(errors.values())))
    vmin, vmax = float(hr.min()), float(np.percentile(hr, 99.5)) or float(hr.max())
    origin = "upper"
    # Scaled to the errors inside the scan (HR above 5% of its window), so that the maps of a dim
    # brain on a dark background are not all black; the colorbar gives the units.
    inside = hr > vmin + 0.05 * (vmax - vmin)
    error_max = max(float(np.percentile(e[inside] if inside.any() else e, 99)) for e in errors.values()) or 1.0
    n = 2 + len(panels)
    figure, axes = plt.subplots(2, n, figsize=(4.0 * n, 8.4), squeeze=False, constrained_layout=True)
    images = [(f"LR input ({r}x coarser)", lr_on_hr_grid)] + [
        (labels[m] + ("" if info["psnr"][m] is None else f"\nPSNR {info['psnr'][m]:.2f} dB"), panels[m])
        for m in panels] + [("HR (ground truth)", hr)]
    for ax, (name, image) in zip(axes[0], images):
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", origin=origin)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
        planes.label_edges(ax, edges)
        inset = ax.inset_axes([0.58, 0.58, 0.42, 0.42])
        inset.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", origin=origin)
        inset.set_xlim(col - 0.5, col + side - 0.5)
        rows = (row - 0.5, row + side - 0.5)
        inset.set_ylim(rows if origin == "lower" else rows[::-1])
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor("yellow")
        ax.indicate_inset_zoom(inset, edgecolor="yellow")
    axes[1][0].set_axis_off()
    axes[1][-1].set_axis_off()
    error_image = None
    for ax, method in zip(axes[1][1:-1], panels):
        error_image = ax.imshow(errors[method], cmap="inferno", vmin=0.0, vmax=error_max,
                                interpolation="nearest", origin=origin)
        ax.set_title(f"|{labels[method]} - HR|", fontsize=10)
        ax.set_axis_off()
        planes.label_edges(ax, edges, color="white")
    if error_image is not None:
        figure.colorbar(error_image, ax=axes[1][0], fraction=0.5,
                        label="absolute error (scanner units)")
    figure.suptitle(f"{title} ({edges.name} slice)", fontsize=11)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
