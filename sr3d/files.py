"""Files on disk: atomic writes, the temporaries a killed writer leaves, and which paths are scans.

`atomic_path` is how sr3d writes every file (outputs, sidecars, models, figures): under a
temporary name beside the target, renamed over it when complete, so a reader never sees half a
file; `remove_stale_temporaries` clears what a killed process left. `expand_scans` and `scans_in`
are the rules of the commands that take many scans. Reading a scan is `sr3d.io`.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pathlib
import re
from collections.abc import Iterator, Sequence

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


def volume_stem(name: str) -> str:
    """A scan's file name without its volume suffix (.nii.gz, .nii, .nrrd, .nhdr, .dcm; any case)."""
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary name beside `path` to write to; renamed over `path` when the block succeeds,
    removed when it fails, so `path` is never half-written. The temporary name keeps the full
    suffix (.nii.gz, .weights.h5, .keras, .png) because writers choose the format by it."""
    path = pathlib.Path(path)
    stem, suffix = _stem_and_suffix(path)
    temporary = path.with_name(f".{stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _stem_and_suffix(path: pathlib.Path) -> tuple[str, str]:
    suffix = "".join(path.suffixes[-2:]) if len(path.suffixes) > 1 else path.suffix
    return (path.name[: len(path.name) - len(suffix)] if suffix else path.name), suffix


def remove_stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Deletes the temporaries that `atomic_path(path)` left when its process was killed
    mid-write (its pid no longer runs); returns them. A live writer's temporary is kept."""
    path = pathlib.Path(path)
    stem, suffix = _stem_and_suffix(path)
    pattern = re.compile(rf"\.{re.escape(stem)}\.tmp-(\d+)-[0-9a-f]{{8}}{re.escape(suffix)}")
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(stem)}.tmp-*"):
        match = pattern.fullmatch(candidate.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload) -> None:
    """Writes `payload` as indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def volume_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The NIfTI/NRRD files directly inside `directory`, sorted (a directory of such files is many scans)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))


def expand_scans(paths: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """Scan paths from files and directories: a directory holding NIfTI/NRRD files gives each
    file; any other directory is taken as one DICOM series. The one rule of every command that
    takes a list of scans (train.py, evaluate.py, sr3d study make); `scans_in` is its batch form."""
    out: list[str] = []
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():
            files = volume_files(p)
            out.extend(str(f) for f in files) if files else out.append(str(p))
        elif p.exists():
            out.append(str(p))
        else:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(p))
    return tuple(out)


def scans_in(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The scans of a batch directory: each NIfTI/NRRD or .dcm file in it, and each
    subdirectory (one DICOM series), sorted by name."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "No such directory", str(directory))
    entries = [p for p in sorted(directory.iterdir()) if not p.name.startswith(".")]
    return [p for p in entries if p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES + (".dcm",))]
