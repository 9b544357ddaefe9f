"""The peer's slice-profile estimate: ESPRESO, as shipped in ECLARE (Remedios et al.; `pip install eclare`,
GPL-3.0, PyTorch), run on the thick scans of the gap cases, for docs/thick_slice.md. Only the estimate is
run (ECLARE's first stage, its default settings: 100 warm-up and 2000 adversarial steps); ECLARE's own
super-resolution is not. Runs in its own environment, never imported by sr3d:

  python -m venv /tmp/eclenv && /tmp/eclenv/bin/pip install eclare          # torch CPU, ~1 GB
  python experiments/thick_slice.py --part=export_gaps --nifti_dir=/tmp/sr3d_gaps   # every gap case's thick scan
  for f in /tmp/sr3d_gaps/*.nii.gz; do        # docs/thick_slice.md runs the six cases of its table
    /tmp/eclenv/bin/python experiments/espreso_peer.py "$f" docs/thick_slice/espreso   # ~5 min each, 2 cores
  done
  python experiments/thick_slice.py --part=gaps --methods=espreso --steps=4000 --out_dir=docs/thick_slice/steps4000

Writes <out>/<scan>.json: ESPRESO's PSF (on the finest in-plane grid, as ESPRESO estimates it), its FWHM in
in-plane voxels, the slice separation ESPRESO read (in the same voxels), the wall time and the versions.
experiments/thick_slice.py's method "espreso" trains sr3d's self-supervised network on a Gaussian of that
FWHM. Seeded (torch and numpy 0), but not bit-reproducible across machines (PyTorch CPU kernels).
ESPRESO's data loader asks for 8 worker processes; on 2 cores they are set to 0 (same data, one process).
"""
import json
import pathlib
import sys
import time


def main(argv) -> int:
    if len(argv) != 3:
        print("usage: espreso_peer.py THICK_SCAN.nii.gz OUT_DIR", file=sys.stderr)
        return 2
    source, out = pathlib.Path(argv[1]), pathlib.Path(argv[2])
    if not source.is_file():
        print(f"{source}: no such file", file=sys.stderr)
        return 2
    stem = source.name.split(".nii")[0]
    target = out / f"{stem}.json"
    if target.exists():
        print(f"{target}: exists; move it away to estimate again", file=sys.stderr)
        return 1
    try:
        import random

        import numpy as np
        import torch
        import torch.utils.data
        from importlib import metadata
        from eclare import espreso
        from eclare.utils.fwhm import calc_fwhm
        from eclare.utils.parse_image_file import parse_image
        from eclare.utils.train_set import TrainSet
    except ImportError as error:
        print(f"espreso_peer.py needs ECLARE (pip install eclare) in this environment: {error}", file=sys.stderr)
        return 2

    loader = torch.utils.data.DataLoader

    def single_process_loader(*args, **kwargs):
        kwargs.update(num_workers=0, pin_memory=False)
        return loader(*args, **kwargs)

    espreso.DataLoader = single_process_loader
    torch.set_num_threads(2)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)            # ESPRESO draws patches, flips and discriminator turns from the global generators
    out.mkdir(parents=True, exist_ok=True)
    image, separation, _, lr_axis, *_ = parse_image(source, normalize_image=True)
    dataset = TrainSet(image=image, lr_axis=lr_axis, verbose=False)
    started = time.perf_counter()
    generator, _ = espreso.run_espreso(separation, dataset, torch.device("cpu"), out / f"{stem}_psf.npy",
                                       out / f"{stem}_psf.png")
    psf = generator().detach().numpy().squeeze()
    result = {"scan": source.name, "slice_separation": float(separation), "lr_axis": int(lr_axis),
              "psf": [round(float(v), 6) for v in psf], "fwhm_inplane_voxels": float(calc_fwhm(psf)[0]),
              "seconds": round(time.perf_counter() - started, 1), "numpy_seed": 0,
              "versions": {"eclare": metadata.version("eclare"), "torch": torch.__version__}}
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(target)
    for extra in (f"{stem}_psf.npy", f"{stem}_psf.png"):    # the PSF is in the JSON
        (out / extra).unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in result.items() if k != "psf"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
