"""What a stage learns from and is validated on: the (LR, HR) plane stacks of the scans.

Stage `d` learns, as in the paper, from HR planes degraded along depth only,
or, given `hw_model` (cascade training), from what it gets in the 3D
pipeline: the scan degraded on all three axes with its slices upscaled by
that stage-hw network, so it also learns to correct stage hw's errors.
`validation_psnr` scores a model on held-out stacks against Lanczos.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from sr3d import baselines, data, degrade, intensity, tiling
from sr3d import io as sr3d_io
from sr3d.training.config import TrainConfig


def load_normalised(paths: Sequence[str]) -> list[np.ndarray]:
    """Each scan as a (D, H, W) float32 array in network units (its own intensity window)."""
    volumes = []
    for path in paths:
        volume = sr3d_io.load_volume(path)
        volumes.append(intensity.window(volume.array).normalise(volume.array))
    return volumes


def predict_planes(model, planes: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The `final` output of a stage model on (N, h, w) planes -> (N, h', w') float32."""
    return tiling.batched(planes, lambda batch: np.asarray(model(batch[..., None], training=False)["final"])[..., 0],
                          batch_size).astype(np.float32)


def load_hw_model(path: str, scale: int):
    """A stage-hw network for cascade training; ValueError naming the file if it is not one for `scale`."""
    from sr3d import models

    model = models.load(path)
    found = models.stage_scale(model, "hw")
    if found != scale:
        raise ValueError(f"{path}: not a stage-hw network for scale {scale} "
                         + ("(not a stage-hw network at all)" if found is None else f"(it upscales by {found})"))
    return model


def cascade_stacks(volume: np.ndarray, hw_model, scale: int) -> list[data.PlaneStack]:
    """Stage-d planes as the 3D pipeline feeds them: the normalised (D, H, W) volume cropped and
    degraded on all three axes, each slice upscaled by `hw_model` -> (D/r, H, W), cut into (D, W)
    planes per row and (D, H) planes per column, paired with the same planes of the HR volume."""
    hr = degrade.crop_to_multiple(volume, scale, axes=(0, 1, 2)).astype(np.float32)
    in_plane = predict_planes(hw_model, degrade.downscale(hr, scale, axes=(0, 1, 2)).astype(np.float32))
    return [data.PlaneStack(np.ascontiguousarray(in_plane.transpose(order)), np.ascontiguousarray(hr.transpose(order)))
            for order in ((1, 0, 2), (2, 0, 1))]


def stage_stacks(volumes: Sequence[np.ndarray], config: TrainConfig, hw_model=None) -> list[list[data.PlaneStack]]:
    """The (LR, HR) planes of each volume the stage learns from (and is validated on)."""
    if config.hw_model is None:
        return [data.plane_stacks(volume, config.stage, config.scale) for volume in volumes]
    hw_model = hw_model or load_hw_model(config.hw_model, config.scale)
    return [cascade_stacks(volume, hw_model, config.scale) for volume in volumes]


def validation_psnr(model, stacks_per_volume: Sequence[Sequence[data.PlaneStack]], stage: str,
                    scale: int) -> tuple[float, float]:
    """Mean over held-out volumes (each given as its `stage_stacks`) of the volume PSNR
    (normalised units, peak 1) of the stage output and of Lanczos on the same LR planes:
    (network dB, Lanczos dB)."""
    axes = (1, 2) if stage == "hw" else (1,)
    net_db, lanczos_db = [], []
    for stacks in stacks_per_volume:
        net_se = lanczos_se = count = 0.0
        for stack in stacks:
            net = predict_planes(model, stack.lr)
            lanczos = baselines.upscale_axes(stack.lr, scale, "lanczos", axes=axes)
            net_se += float(np.sum((net.astype(np.float64) - stack.hr) ** 2))
            lanczos_se += float(np.sum((lanczos.astype(np.float64) - stack.hr) ** 2))
            count += stack.hr.size
        net_db.append(10 * math.log10(count / max(net_se, 1e-20)))
        lanczos_db.append(10 * math.log10(count / max(lanczos_se, 1e-20)))
    return float(np.mean(net_db)), float(np.mean(lanczos_db))
