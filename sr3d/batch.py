"""Upscaling every scan of a directory, resumably: `sr3d upscale-batch IN_DIR OUT_DIR`.

Progress is recorded in `OUT_DIR/manifest.json` (written atomically after
every scan): a rerun skips scans marked done whose output exists, and redoes
scans that were running when the process died, failed, or lost their output.
Outputs are written under a temporary name and renamed, so OUT_DIR never holds
a half-written scan under its final name; the temporary file of a scan whose
writer was killed is deleted when the scan is redone. A bad scan is recorded with its reason and the batch goes
on; the caller gets the list of failures at the end.

One scan is upscaled by `load_scan`, `upscale_loaded` and `write_scan` (with `ScanOptions`), the
steps that `sr3d.beam` runs as separate pipeline stages on many machines: the two paths share
them so they cannot drift.

Concurrent runs on one OUT_DIR split the work: a scan is taken under an flock on
`OUT_DIR/.<output>.lock` and the manifest is updated entry by entry under
`OUT_DIR/.manifest.json.lock` (lock files are removed on release; the kernel drops
the lock of a killed run). OUT_DIR may equal IN_DIR: outputs listed in the manifest
are then not taken as inputs on the next run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sr3d import inference
from sr3d import files as sr3d_files
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume
from sr3d.progress import Progress, Step

if TYPE_CHECKING:  # sr3d.models imports Keras
    from sr3d.models import ModelBundle

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class BatchResult:
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]   # scan name -> reason
    manifest: pathlib.Path
    busy: list[str] = dataclasses.field(default_factory=list)     # being upscaled by another run
    ignored: list[str] = dataclasses.field(default_factory=list)  # sr3d outputs found among the inputs


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """How every scan of a batch is upscaled (`upscale-batch` and `upscale-beam`).

    precision: "auto", "float32" or "bfloat16" (`sr3d.precision`). self_check: score the CNN
    against Lanczos on the scan (`sr3d.selfcheck`; its result goes in the report).
    format: "nifti", or "dicom" for a new series directory per scan (`sr3d.dicom_out`).
    tile_mb: memory budget of one band of rows; it changes memory, not the result.
    consistency: make each output consistent with its scan (`sr3d.inference.upscale_volume`).
    """

    scale: int = 2
    mode: str = "3d"
    ensemble: bool = False
    regularize: bool = False
    precision: str = "float32"
    self_check: bool = False
    format: str = "nifti"
    tile_mb: float | None = 256
    consistency: bool = True

    def __post_init__(self):
        from sr3d import precision as sr3d_precision

        if self.scale < 2:
            raise ValueError(f"--scale must be an integer >= 2, got {self.scale}")
        if self.mode not in inference.SCAN_MODES:
            raise ValueError(f"mode must be one of {inference.SCAN_MODES}, got {self.mode!r}")
        sr3d_precision.check(self.precision)
        if self.format not in ("nifti", "dicom"):
            raise ValueError(f"format must be 'nifti' or 'dicom', got {self.format!r}")
        if self.tile_mb is not None and not self.tile_mb > 0:
            raise ValueError(f"--tile-mb must be a positive number of megabytes, got {self.tile_mb:g}")

    def key(self) -> dict:
        """The options that change an output: a scan made with another key is redone."""
        return {"scale": self.scale, "mode": self.mode, "ensemble": self.ensemble,
                "regularize": self.regularize, "precision": self.precision, "self_check": self.self_check,
                "format": self.format, "consistency": self.consistency}


def output_name(scan: pathlib.Path, scale: int, format: str = "nifti") -> str:
    """scan.nii.gz (or a series directory `scan`) -> scan_x2.nii.gz; with format "dicom" the
    series directory scan_x2."""
    stem = f"{sr3d_files.volume_stem(scan.name)}_x{scale}"
    return stem if format == "dicom" else f"{stem}.nii.gz"


def load_scan(scan, options: ScanOptions) -> sr3d_volume.Volume:
    """Step 1 of a scan: read it (a local file or DICOM series directory)."""
    return sr3d_io.load_volume(scan, regularize=options.regularize)


def upscale_loaded(volume: sr3d_volume.Volume, bundle: ModelBundle, options: ScanOptions) -> sr3d_volume.Volume:
    """Step 2: upscale with `bundle` (tiled, `options.tile_mb`); the result's `report` says how
    (and holds the self-check when `options.self_check`)."""
    if bundle.scale != options.scale:
        raise ValueError(f"the model upscales by {bundle.scale}, not by {options.scale}")
    result, _ = inference.upscale_checked(volume, bundle, mode=options.mode, ensemble=options.ensemble,
                                          self_check=options.self_check, planes="dw", tile_mb=options.tile_mb,
                                          precision=options.precision, consistency=options.consistency)
    if volume.assumptions:
        result.report["assumptions"] = list(volume.assumptions)
    return result


def write_scan(result: sr3d_volume.Volume, target, options: ScanOptions) -> pathlib.Path:
    """Step 3: write atomically to `target` (a local NIfTI file, or a new series directory)."""
    report = result.report or {}
    note = f"sr3d x{report.get('scale', options.scale)} {report.get('mode', options.mode)}: {report.get('method', 'cnn')}"
    return sr3d_io.save_volume(result, target, format=options.format, note=note)


def error_line(error: BaseException) -> str:
    """One line for a scan that failed: the message of a bad-input error (it names the file), or
    the type, message and place of any other."""
    if isinstance(error, (ValueError, OSError)):
        return str(error)
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


@contextlib.contextmanager
def _lock(path: pathlib.Path, wait: bool) -> Iterator[bool]:
    """An exclusive flock on the file `path`, created for it and removed when released; yields
    False, without waiting, if another process holds it and `wait` is false. The kernel drops
    the lock of a killed process, so a lock can never go stale, only its file (removed next time)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:  # the previous holder may have removed the file we opened: then it guards nothing
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _read_manifest(path: pathlib.Path, settings: dict) -> dict:
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


class _Manifest:
    """OUT_DIR/manifest.json, shared by concurrent runs: each change is a read-modify-write of
    one scan's entry under a lock, so no run overwrites what another recorded."""

    def __init__(self, path: pathlib.Path, settings: dict):
        self.path, self.settings = path, settings
        self.lock_path = path.with_name(f".{path.name}.lock")
        with _lock(self.lock_path, wait=True):
            sr3d_files.remove_stale_temporaries(path)
            self.scans = _read_manifest(path, settings)["scans"]

    def reload(self) -> dict:
        with _lock(self.lock_path, wait=True):
            self.scans = _read_manifest(self.path, self.settings)["scans"]
        return self.scans

    def set(self, key: str, entry: dict) -> None:
        with _lock(self.lock_path, wait=True):
            manifest = _read_manifest(self.path, self.settings)
            manifest["scans"][key] = entry
            sr3d_files.write_json(self.path, manifest)
            self.scans = manifest["scans"]


def _same_dir(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def upscale_batch(input_dir, output_dir, scale: int = 2, model=None, *, ensemble: bool = False,
                  mode: str = "3d", log: Progress = print, overwrite: bool = False,
                  regularize: bool = False, precision: str = "float32", tile_mb: float | None = 256,
                  consistency: bool = True) -> BatchResult:
    """Upscales every scan in `input_dir` (files and DICOM series subdirectories) into `output_dir`.

    OUT_DIR may be IN_DIR or inside it: sr3d's own outputs there (and OUT_DIR itself) are not
    taken as inputs. Several runs on the same OUT_DIR share the work: each scan is upscaled by
    the run that takes its lock, the others skip it. An output that exists but is not listed in
    the manifest (not made by this batch) is replaced only with `overwrite`; otherwise that
    scan fails with a message saying so.
    regularize: resample DICOM series with missing slices or irregular spacing (see `load_volume`).
    precision: "auto", "float32" or "bfloat16" (`sr3d.precision`).
    consistency: each output made consistent with its scan (`sr3d.inference.upscale_volume`); recorded in
        the manifest (a manifest of an earlier sr3d, without it, belongs to another output directory).
    log: gets one `sr3d.progress.Step` per event, counting the scans handled (`print` shows the lines).
    """
    options = ScanOptions(scale=scale, mode=mode, ensemble=ensemble, regularize=regularize, precision=precision,
                          tile_mb=tile_mb, consistency=consistency)
    out = pathlib.Path(output_dir)
    scans = [s for s in sr3d_files.scans_in(input_dir) if not _same_dir(s, out)]
    if not scans:
        raise ValueError(f"{input_dir}: no scans found (NIfTI/NRRD files or DICOM series directories)")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"{out}: output directory is not writable")
    settings = {"scale": scale, "mode": mode, "ensemble": ensemble,
                "model": str(pathlib.Path(model).resolve()) if isinstance(model, (str, os.PathLike)) else "shipped"}
    if regularize:  # only when set, so manifests written before the option still match
        settings["regularize"] = True
    if precision != "float32":  # likewise
        settings["precision"] = precision
    settings["consistency"] = consistency  # always: it changed the default outputs when it came
    manifest = _Manifest(out / MANIFEST, settings)
    from sr3d import models as sr3d_models

    bundle = model if isinstance(model, sr3d_models.ModelBundle) else sr3d_models.load_models(model, scale)
    if bundle.scale != scale:
        raise ValueError(f"the model upscales by {bundle.scale}, not by {scale}")

    def say(handled: int, line: str) -> None:  # one line of the scan being handled; `handled` scans done
        log(Step("scans", handled, len(scans), line))

    done, skipped, failed, busy, ignored = [], [], {}, [], []
    in_place = _same_dir(pathlib.Path(input_dir), out)
    for index, scan in enumerate(scans, 1):
        key = scan.name
        where = f"[{index}/{len(scans)}] {key}"
        if in_place and any(e.get("output") == key for e in manifest.scans.values()):
            ignored.append(key)
            say(index, f"{where}: an output of this batch, not an input: ignored")
            continue
        target = out / output_name(scan, scale)
        with _lock(target.with_name(f".{target.name}.lock"), wait=False) as mine:
            if not mine:
                busy.append(key)
                say(index, f"{where}: being upscaled by another run, skipped")
                continue
            entry = manifest.reload().get(key, {})  # another run may have finished it meanwhile
            if entry.get("status") == "done" and target.exists():
                skipped.append(key)
                say(index, f"{where}: done already, skipped")
                continue
            if (target.exists() or target.is_symlink()) and entry.get("output") != target.name and not overwrite:
                reason = (f"{target}: exists already and is not an output of this batch (not in "
                          f"{manifest.path.name}): pass --overwrite to replace it")
                manifest.set(key, {"status": "failed", "error": reason, "seconds": 0.0})
                failed[key] = reason
                say(index, f"{where}: FAILED: {reason}")
                continue
            # A run killed while writing this scan left its temporary file: not ours to keep.
            for stale in sr3d_files.remove_stale_temporaries(target):
                say(index - 1, f"{where}: removed {stale.name}, left by an interrupted run")
            manifest.set(key, {"status": "running", "output": target.name, "started": time.time()})
            start = time.perf_counter()
            try:
                write_scan(upscale_loaded(load_scan(scan, options), bundle, options), target, options)
            except Exception as error:  # noqa: BLE001  (one bad scan must not stop the batch)
                reason = error_line(error)
            else:
                reason = None
            seconds = time.perf_counter() - start
            if reason is None:
                manifest.set(key, {"status": "done", "output": target.name, "seconds": round(seconds, 3)})
                done.append(key)
                say(index, f"{where} -> {target.name} ({seconds:.1f} s)")
            else:
                # "output" stays: a rerun may replace what this run left under that name.
                manifest.set(key, {"status": "failed", "output": target.name, "error": reason,
                                   "seconds": round(seconds, 3)})
                failed[key] = reason
                say(index, f"{where}: FAILED: {reason}")
    return BatchResult(done=done, skipped=skipped, failed=failed, manifest=manifest.path, busy=busy,
                       ignored=ignored)
