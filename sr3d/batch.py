"""Upscaling every scan of a directory, resumably: `sr3d upscale-batch IN_DIR OUT_DIR`.

Progress is recorded in `OUT_DIR/manifest.json` (written atomically after
every scan): a rerun skips scans marked done whose output exists, and redoes
scans that were running when the process died, failed, or lost their output.
Outputs are written under a temporary name and renamed, so OUT_DIR never holds
a half-written scan under its final name; the temporary file of a scan whose
writer was killed is deleted when the scan is redone. A bad scan is recorded with its reason and the batch goes
on; the caller gets the list of failures at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
import traceback
from typing import Callable

from sr3d import inference
from sr3d import io as sr3d_io

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class BatchResult:
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]   # scan name -> reason
    manifest: pathlib.Path


def output_name(scan: pathlib.Path, scale: int) -> str:
    name = scan.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}_x{scale}.nii.gz"


def _load_manifest(path: pathlib.Path, settings: dict) -> dict:
    if not path.exists():
        return {"settings": settings, "scans": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: unreadable manifest ({error}); delete it to start over") from None
    if manifest.get("settings") != settings:
        raise ValueError(f"{path.parent} holds outputs made with other settings "
                         f"({manifest.get('settings')}): use another output directory")
    return manifest


def upscale_batch(input_dir, output_dir, scale: int = 2, model=None, *, ensemble: bool = False,
                  mode: str = "3d", log: Callable[[str], None] = print, **options) -> BatchResult:
    """Upscales every scan in `input_dir` (files and DICOM series subdirectories) into `output_dir`."""
    scans = sr3d_io.scans_in(input_dir)
    if not scans:
        raise ValueError(f"{input_dir}: no scans found (NIfTI/NRRD files or DICOM series directories)")
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"{out}: output directory is not writable")
    settings = {"scale": scale, "mode": mode, "ensemble": ensemble,
                "model": str(pathlib.Path(model).resolve()) if isinstance(model, (str, os.PathLike)) else "shipped"}
    manifest_path = out / MANIFEST
    sr3d_io.remove_stale_temporaries(manifest_path)
    manifest = _load_manifest(manifest_path, settings)
    bundle = model if isinstance(model, inference.ModelBundle) else inference.load_models(model, scale)
    if bundle.scale != scale:
        raise ValueError(f"the model upscales by {bundle.scale}, not by {scale}")

    done, skipped, failed = [], [], {}
    for index, scan in enumerate(scans, 1):
        key = scan.name
        target = out / output_name(scan, scale)
        entry = manifest["scans"].get(key, {})
        if entry.get("status") == "done" and target.exists():
            skipped.append(key)
            log(f"[{index}/{len(scans)}] {key}: done already, skipped")
            continue
        # A run killed while writing this scan left its temporary file: not ours to keep.
        for stale in sr3d_io.remove_stale_temporaries(target):
            log(f"[{index}/{len(scans)}] {key}: removed {stale.name}, left by an interrupted run")
        manifest["scans"][key] = {"status": "running", "output": target.name, "started": time.time()}
        sr3d_io.write_json(manifest_path, manifest)
        start = time.perf_counter()
        try:
            volume = sr3d_io.load_volume(scan)
            result = inference.upscale_volume(volume, bundle, mode=mode, ensemble=ensemble, **options)
            sr3d_io.save_volume(result, target)
        except (ValueError, OSError) as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001  (one bad scan must not stop the batch)
            reason = f"{type(error).__name__}: {error} ({traceback.format_exc(limit=1).strip().splitlines()[-1]})"
        else:
            reason = None
        seconds = time.perf_counter() - start
        if reason is None:
            manifest["scans"][key] = {"status": "done", "output": target.name, "seconds": round(seconds, 3)}
            done.append(key)
            log(f"[{index}/{len(scans)}] {key} -> {target.name} ({seconds:.1f} s)")
        else:
            manifest["scans"][key] = {"status": "failed", "error": reason, "seconds": round(seconds, 3)}
            failed[key] = reason
            log(f"[{index}/{len(scans)}] {key}: FAILED: {reason}")
        sr3d_io.write_json(manifest_path, manifest)
    return BatchResult(done=done, skipped=skipped, failed=failed, manifest=manifest_path)
