"""sr3d: 3D super-resolution of CT and MRI scans with a two-stage CNN.

    import sr3d
    result = sr3d.upscale("scan.nii.gz", scale=2)      # -> sr3d.io.Volume

`import sr3d` stays light: TensorFlow is imported only when a network is used.
"""
__version__ = "0.1.0"


def upscale(volume_or_path, scale: int = 2, ensemble: bool = False, model=None, **options):
    """Upscale a scan (sr3d.io.Volume, a NIfTI/NRRD/DICOM path, or a (D, H, W) numpy array with
    spacing=(d, h, w) mm) by `scale` on every axis (mode="2d": in-plane only).

    model: None for the shipped model, a model bundle directory, or a ModelBundle.
    Every call runs the self-check (the CNN against Lanczos on the scan downscaled once more,
    noise-matched; `sr3d.selfcheck`): its scores are in the result's `report`, and a warning
    says when the CNN loses. self_check=False skips it; fallback="lanczos" returns the Lanczos
    result when the CNN loses; adapt=True (or an sr3d.adapt.AdaptConfig) fine-tunes the
    networks on the scan first (`sr3d.adapt`).
    options: mode, spacing, self_check, fallback, adapt, planes, batch_size, tile_mb, precision,
    progress (see sr3d.inference.upscale). planes defaults to "auto" in 3D (the self-check picks one
    pass or three orientations; "dw" without the self-check or with adapt: `inference.default_planes`).
    """
    from sr3d import inference

    return inference.upscale(volume_or_path, scale=scale, ensemble=ensemble, model=model, **options)
