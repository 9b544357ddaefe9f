"""sr3d: 3D super-resolution of CT and MRI scans with a two-stage CNN.

    import sr3d
    result = sr3d.upscale("scan.nii.gz", scale=2)      # -> sr3d.io.Volume

`import sr3d` stays light: TensorFlow is imported only when a network is used.
"""
__version__ = "0.1.0"


def upscale(volume_or_path, scale: int = 2, ensemble: bool = False, model=None, **options):
    """Upscale a scan (sr3d.io.Volume or a NIfTI/NRRD/DICOM path) by `scale` on every axis.

    model: None for the shipped model, a model bundle directory, or a ModelBundle.
    options: mode ("3d" or "2d"), planes, batch_size, tile_mb, progress (see sr3d.inference).
    """
    from sr3d import inference

    return inference.upscale(volume_or_path, scale=scale, ensemble=ensemble, model=model, **options)
