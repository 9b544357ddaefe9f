"""The training curve of a run (training_curve.png)."""
from __future__ import annotations

import pathlib

from sr3d import files as sr3d_files


def plot_history(history_csv: pathlib.Path, png: pathlib.Path, title: str) -> None:
    """Training curve: loss per epoch and validation PSNR against Lanczos."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(epochs, [float(r["loss"]) for r in rows], "o-", label="total loss")
    if "final_loss" in rows[0]:
        axes[0].plot(epochs, [float(r["final_loss"]) for r in rows], ".--", label="L1 final")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss (normalised units)")
    axes[0].legend()
    if rows[0].get("val_psnr"):
        axes[1].plot(epochs, [float(r["val_psnr"]) for r in rows], "o-", label="CNN")
        axes[1].plot(epochs, [float(r["val_psnr_lanczos"]) for r in rows], "k--", label="Lanczos")
        axes[1].set_ylabel("validation PSNR (dB, peak 1)")
        axes[1].legend()
    axes[1].set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    with sr3d_files.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
