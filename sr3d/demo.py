"""The README's main job: upscale the bundled real scan with the shipped model and show the result.

Two things are written to the output directory:
1. `studyforrest_t1_x{r}.nii.gz`: the bundled 2 mm scan upscaled r times on every
   axis (real use: no ground truth; it overlays the input in any viewer).
2. `comparison_x{r}.png` and `report.json`: the bundled scan taken as ground
   truth, its simulated r-times coarser version upscaled back by Lanczos and by
   the CNN, with PSNR and SSIM of each (float protocol, range 0..max of the scan).
"""
from __future__ import annotations

import pathlib
import time

import numpy as np

from sr3d import baselines, degrade, inference, metrics
from sr3d import files as sr3d_files
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume

BUNDLED_SCAN = pathlib.Path(__file__).resolve().parent / "data_files" / "studyforrest_t1_2mm.nii.gz"


def _figure(hr: np.ndarray, lr_nearest: np.ndarray, lanczos: np.ndarray, cnn: np.ndarray, scores: dict,
            path: pathlib.Path, scale: int, affine: np.ndarray) -> None:
    """Rows: the axial, coronal and sagittal middle planes (named from the affine, drawn the
    radiological way with the patient directions at the edges, `sr3d.planes`); columns: input,
    Lanczos, CNN, ground truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sr3d import planes

    columns = [(f"input ({scale}x coarser)", lr_nearest),
               (f"Lanczos\nPSNR {scores['lanczos']['psnr']:.2f} dB, SSIM {scores['lanczos']['ssim']:.3f}", lanczos),
               (f"sr3d CNN\nPSNR {scores['cnn']['psnr']:.2f} dB, SSIM {scores['cnn']['ssim']:.3f}", cnn),
               ("ground truth", hr)]
    order = {"axial": 0, "coronal": 1, "sagittal": 2}
    normals = sorted(range(3), key=lambda axis: order[planes.plane_name(affine, axis)])
    vmax = float(np.percentile(hr, 99.5))
    fig, axes = plt.subplots(3, len(columns), figsize=(4.2 * len(columns), 4.4 * 3), constrained_layout=True)
    for row, normal in enumerate(normals):
        for col, (title, volume) in enumerate(columns):
            shown = planes.show(volume, affine, normal)
            ax = axes[row, col]
            ax.imshow(shown.image, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            planes.label_edges(ax, shown, fontsize=11)
            if row == 0:
                ax.set_title(title, fontsize=12)
            if col == 0:
                ax.set_ylabel(shown.name, fontsize=13)
    fig.suptitle(f"{scale}x 3D super-resolution of a real 2 mm T1 scan (PSNR / SSIM over the volume)", fontsize=14)
    with sr3d_files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def run(out_dir: pathlib.Path, scale: int = 2, scan: pathlib.Path = BUNDLED_SCAN) -> str:
    """Runs the demo; returns a short text report."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from sr3d import models as sr3d_models

    bundle = sr3d_models.load_models(None, scale)
    volume = sr3d_io.load_volume(scan)

    start = time.perf_counter()
    upscaled = inference.upscale_volume(volume, bundle)
    seconds = time.perf_counter() - start
    result_path = sr3d_io.save_volume(upscaled, out_dir / f"studyforrest_t1_x{scale}.nii.gz")

    hr, lr = degrade.simulate_lr(volume.array, scale, mode="3d")
    lr_volume = sr3d_volume.Volume(lr, tuple(s * scale for s in volume.spacing),
                                   sr3d_volume.downscaled_affine(volume.affine, scale),
                                   source_dtype="float32")
    cnn = inference.upscale_volume(lr_volume, bundle).array
    lanczos = baselines.upscale(lr, scale, "lanczos", mode="3d")
    protocol = metrics.float_protocol((0.0, float(hr.max())), with_ifc=False)
    scores = {name: {k: metrics.score_volume(hr, up, protocol)[k] for k in ("psnr", "ssim")}
              for name, up in (("lanczos", lanczos), ("cnn", cnn))}
    nearest = baselines.upscale(lr, scale, "nearest", mode="3d")
    figure = out_dir / f"comparison_x{scale}.png"
    _figure(hr, nearest, lanczos, cnn, scores, figure, scale, volume.affine)
    report = {"scan": str(scan), "scale": scale, "input_shape": list(volume.array.shape),
              "output_shape": list(upscaled.array.shape), "output": str(result_path),
              "upscale_seconds": seconds, "comparison": scores, "protocol": protocol.describe(),
              "model": bundle.info}
    sr3d_files.write_json(out_dir / "report.json", report)
    return (f"upscaled {scan.name} {volume.array.shape} -> {upscaled.array.shape} in {seconds:.1f} s: "
            f"{result_path}\n"
            f"simulated {scale}x: CNN PSNR {scores['cnn']['psnr']:.2f} dB SSIM {scores['cnn']['ssim']:.4f} | "
            f"Lanczos PSNR {scores['lanczos']['psnr']:.2f} dB SSIM {scores['lanczos']['ssim']:.4f}\n"
            f"figure: {figure}")
