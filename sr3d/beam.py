"""Upscaling thousands of scans on Apache Beam: `sr3d upscale-beam` (`pip install "sr3d[beam]"`).

The pipeline is `scans -> plan -> load -> upscale (RunInference) -> write`:

- scans: the files matched by a glob (`FileSystems` syntax: local paths, gs://, s3://, hdfs://
  ...; `**/` is zero or more folders, as in a shell with globstar, and a relative local glob
  such as `**/*.nii.gz` is relative to the working directory), or the lines of a manifest
  file. A NIfTI/NRRD file is one scan; a DICOM file stands for its folder, one series (so
  `scans/**` finds both kinds).
- plan: the output is named from the input's path below the glob's fixed prefix (or the
  manifest's folder), `p1/t1.nii.gz -> OUT/p1/t1_x2.nii.gz`, with its record
  `OUT/p1/t1_x2.json`. A scan whose record says done with the same model hash and options, and
  whose output exists, is skipped: a rerun does no work for it.
- load, upscale, write: `sr3d.batch.load_scan`, `upscale_loaded` and `write_scan`, the steps
  `sr3d upscale-batch` runs too. The upscale step is RunInference with `BundleModelHandler`,
  which loads the bundle once per worker process and upscales one volume per call (batches of
  one: a volume is already tiled into bands inside, and two would double the memory).

Exactly once in practice: the record is written "running" before the output and "done" after
it, both atomically (a temporary file renamed; on object stores an upload appears whole), so a
bundle that Beam retries, or a rerun after a kill, rewrites the same deterministic name and never
leaves a partial or duplicate output. An output that exists without a record is not sr3d's and
is never replaced unless `overwrite`.

Every scan ends as one JSON line in `OUT/_sr3d_run.jsonl` (done, skipped or failed, with
timings); a bad scan is a failed record, never a pipeline failure, and one line in the dead-letter
file `OUT/_sr3d_errors.txt` ("input: reason", like the CLI's errors). Both files are this run's.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import posixpath
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from sr3d import batch
from sr3d import models as sr3d_models
from sr3d import files as sr3d_files
from sr3d import volume as sr3d_volume

RUN_LOG = "_sr3d_run.jsonl"
ERRORS = "_sr3d_errors.txt"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_WILDCARDS = "*?["


@dataclasses.dataclass(frozen=True)
class BeamJob:
    """One run of the pipeline. input: a glob of scans; manifest: a text file of scan paths, one a
    line (relative ones are relative to its folder); exactly one of the two. output: a folder
    (local or any Beam filesystem). model: a bundle directory, None for the shipped one."""

    output: str
    options: batch.ScanOptions
    input: str | None = None
    manifest: str | None = None
    model: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if (self.input is None) == (self.manifest is None):
            raise ValueError("give the scans as --input GLOB or --manifest FILE (one of the two)")


@dataclasses.dataclass(frozen=True)
class Scan:
    """A scan and where its output and record go (paths or URLs)."""

    input: str
    output: str
    record: str


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def _join(*parts: str) -> str:
    return FileSystems.join(*parts) if not _is_local(parts[0]) else os.path.join(*parts)


def scan_of(path: str) -> str | None:
    """The scan a matched file belongs to: a NIfTI/NRRD file itself, a DICOM file (.dcm, or no
    suffix) its folder; None for other files (.json, .txt, a detached header's data, hidden files)."""
    name = posixpath.basename(path.rstrip("/")).lower()
    if name.startswith("."):  # hidden: a temporary being written (.x.tmp-PID-...), never a scan
        return None
    if name.endswith(sr3d_files.VOLUME_SUFFIXES):
        return path
    if name.endswith(DICOM_SUFFIXES) or ("." not in name and not name.startswith(".")):
        return posixpath.dirname(path) if not _is_local(path) else os.path.dirname(path)
    return None


def match_patterns(pattern: str) -> list[str]:
    """The Beam globs that match what `pattern` means in a shell with globstar: `**/` stands for
    zero or more folders (Beam's `**` needs at least one), and a local pattern is made absolute
    (Beam's local filesystem matches nothing for a pattern without a folder, e.g. `**/*.nii.gz`)."""
    return sorted(set(_globstar_variants(_absolute(pattern))))


def _absolute(pattern: str) -> str:
    """A local path or glob made absolute (relative to the working directory); others as they are."""
    return os.path.abspath(pattern) if _is_local(pattern) else pattern


def _globstar_variants(pattern: str) -> list[str]:
    """`pattern` with each `/**/` kept or replaced by `/` (2**n patterns for n of them)."""
    head, globstar, tail = pattern.partition("/**/")
    if not globstar:
        return [pattern]
    rests = _globstar_variants(tail)
    return [f"{head}/**/{rest}" for rest in rests] + [f"{head}/{rest}" for rest in rests]


def glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: outputs mirror the paths below it."""
    cut = min((pattern.find(c) for c in _WILDCARDS if c in pattern), default=len(pattern))
    head = pattern[:cut]
    return head[: head.rfind("/") + 1] if "/" in head else ""


def relative_name(scan: str, root: str) -> str:
    """`scan` below `root`; a scan elsewhere keeps its whole path (scheme and leading / dropped),
    so two scans never get the same output name."""
    scan, root = scan.rstrip("/"), root.rstrip("/")
    if _is_local(scan):
        scan, root = os.path.abspath(scan), os.path.abspath(root or ".")
    if root and scan.startswith(root + "/"):
        return scan[len(root) + 1:]
    return scan.split("://", 1)[-1].lstrip("/")


def plan_scan(scan: str, root: str, output: str, options: batch.ScanOptions) -> Scan:
    relative = relative_name(scan, root)
    folder, name = posixpath.split(relative)
    out_name = batch.output_name(pathlib.PurePosixPath(name), options.scale, options.format)
    record_name = f"{sr3d_files.volume_stem(out_name)}.json"
    where = _join(output, folder) if folder else output
    return Scan(input=scan, output=_join(where, out_name), record=_join(where, record_name))


def model_sha256(model: str | None, scale: int) -> str:
    """sha256 of the bundle's files (hw.keras, d.keras, bundle.json when present), in that order."""
    directory = model if model is not None else str(sr3d_models.shipped_model_dir(scale))
    digest = hashlib.sha256()
    for name in (*sr3d_models.MODEL_FILES.values(), sr3d_models.BUNDLE_JSON):
        path = _join(directory, name)
        if not FileSystems.exists(path):
            if name == sr3d_models.BUNDLE_JSON:
                continue
            raise ValueError(f"{directory}: not an sr3d model bundle, missing {name}")
        digest.update(name.encode())
        with FileSystems.open(path, compression_type="uncompressed") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_record(path: str) -> dict | None:
    """The record at `path`, None if there is none (or it is unreadable: then it is redone)."""
    try:
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path, compression_type="uncompressed") as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _write_bytes(path: str, payload: bytes) -> None:
    """Writes a whole file atomically: renamed from a temporary beside it on local disk; on an
    object store (gs://, s3://) an upload appears whole when it is closed."""
    if _is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with sr3d_files.atomic_path(path) as temporary:
            temporary.write_bytes(payload)
        return
    with FileSystems.create(path, mime_type="application/octet-stream", compression_type="uncompressed") as stream:
        stream.write(payload)


def write_record(path: str, record: dict) -> None:
    _write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode("utf-8"))


def _copy_in(source: str, directory: str) -> str:
    """A local copy of a remote scan (a file, or every file of a series folder) in `directory`."""
    name = posixpath.basename(source.rstrip("/"))
    if FileSystems.match([source.rstrip("/") + "/*"])[0].metadata_list:  # a folder: one DICOM series
        local = os.path.join(directory, name)
        os.makedirs(local)
        for item in FileSystems.match([source.rstrip("/") + "/*"])[0].metadata_list:
            _download(item.path, os.path.join(local, posixpath.basename(item.path)))
        return local
    local = os.path.join(directory, name)
    _download(source, local)
    return local


def _download(source: str, local: str) -> None:
    with FileSystems.open(source, compression_type="uncompressed") as stream, open(local, "wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)


def _upload(local: str, destination: str) -> None:
    """Copies a written output (a file, or a series folder's files) to a remote destination."""
    if os.path.isdir(local):
        for name in sorted(os.listdir(local)):
            _write_bytes(FileSystems.join(destination, name), pathlib.Path(local, name).read_bytes())
    else:
        _write_bytes(destination, pathlib.Path(local).read_bytes())


def _failed(scan: Scan, error: BaseException | str, **fields) -> dict:
    reason = error if isinstance(error, str) else batch.error_line(error)
    return {"input": scan.input, "output": scan.output, "status": "failed", "error": reason, **fields}


class PlanScans(beam.DoFn):
    """Scan path -> Scan to do (main output), or its record when it is done already or must not
    be touched ("finished" output)."""

    FINISHED = "finished"

    def __init__(self, job: BeamJob, root: str, key: dict):
        self.job, self.root, self.key = job, root, key

    def process(self, path: str):
        scan = None
        try:
            scan = plan_scan(path, self.root, self.job.output, self.job.options)
            record = read_record(scan.record)
            exists = FileSystems.exists(scan.output)
            if (record and record.get("status") == "done" and record.get("options") == self.key and exists):
                yield beam.pvalue.TaggedOutput(self.FINISHED, {**record, "status": "skipped"})
                return
            if exists and record is None and not self.job.overwrite:
                yield beam.pvalue.TaggedOutput(self.FINISHED, _failed(
                    scan, f"{scan.output}: exists already and has no sr3d record ({scan.record}): pass "
                          "--overwrite to replace it"))
                return
            yield scan
        except Exception as error:  # noqa: BLE001  (a bad scan is a record, never a failed pipeline)
            yield beam.pvalue.TaggedOutput(self.FINISHED, _failed(scan or Scan(path, "", ""), error))


class LoadScans(beam.DoFn):
    """Scan -> (Scan, Volume, seconds), or a failed record ("failed" output)."""

    FAILED = "failed"

    def __init__(self, options: batch.ScanOptions, key: dict):
        self.options, self.key = options, key

    def process(self, scan: Scan):
        start = time.perf_counter()
        try:
            if _is_local(scan.input):
                volume = batch.load_scan(scan.input, self.options)
            else:
                with tempfile.TemporaryDirectory(prefix="sr3d-in-") as directory:
                    volume = batch.load_scan(_copy_in(scan.input, directory), self.options)
                    volume = volume.replace(source=scan.input)
        except Exception as error:  # noqa: BLE001
            record = _failed(scan, error, options=self.key, load_s=round(time.perf_counter() - start, 3))
            try:
                write_record(scan.record, record)
            except Exception:  # noqa: BLE001  (the run log and the dead letters still say it)
                pass
            yield beam.pvalue.TaggedOutput(self.FAILED, record)
            return
        yield scan, volume, time.perf_counter() - start


class BundleModelHandler(ModelHandler):
    """RunInference's model: an sr3d bundle, loaded once per worker process; each call upscales
    one volume (`sr3d.batch.upscale_loaded`). Elements: (Scan, Volume, load seconds); inferences:
    (upscaled Volume or None, error line or None, seconds)."""

    def __init__(self, model: str | None, options: batch.ScanOptions):
        # One volume per batch: it is tiled into bands already, and a second would double the memory.
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.model, self.options = model, options

    def load_model(self) -> sr3d_models.ModelBundle:
        if self.model is None or _is_local(self.model):
            return sr3d_models.load_models(self.model, self.options.scale)
        local = tempfile.mkdtemp(prefix="sr3d-model-")  # kept for the worker's life: Keras reads it once
        for name in (*sr3d_models.MODEL_FILES.values(), sr3d_models.BUNDLE_JSON):
            if FileSystems.exists(FileSystems.join(self.model, name)):
                _download(FileSystems.join(self.model, name), os.path.join(local, name))
        return sr3d_models.load_models(local, self.options.scale)

    def run_inference(self, batch_of_scans: Sequence, model: sr3d_models.ModelBundle,
                      inference_args=None) -> Iterable[PredictionResult]:
        for element in batch_of_scans:
            _, volume, _ = element
            start = time.perf_counter()
            try:
                result, error = batch.upscale_loaded(volume, model, self.options), None
            except Exception as caught:  # noqa: BLE001  (one bad scan must not stop the pipeline)
                result, error = None, batch.error_line(caught)
            yield PredictionResult(element, (result, error, time.perf_counter() - start))

    def get_num_bytes(self, batch_of_scans: Sequence) -> int:
        return sum(volume.array.nbytes for _, volume, _ in batch_of_scans)  # not a pickle of the volumes

    def get_metrics_namespace(self) -> str:
        return "sr3d"


class WriteScans(beam.DoFn):
    """PredictionResult -> the scan's record, written beside its output (done or failed)."""

    def __init__(self, job: BeamJob, key: dict, model_hash: str):
        self.job, self.key, self.model_hash = job, key, model_hash

    def process(self, prediction: PredictionResult):
        (scan, volume, load_s), (result, error, upscale_s) = prediction.example, prediction.inference
        record = {"input": scan.input, "output": scan.output, "scale": self.job.options.scale,
                  "options": self.key, "model_sha256": self.model_hash, "model": self.job.model or "shipped",
                  "input_shape": list(volume.shape), "input_spacing_mm": list(volume.spacing),
                  "load_s": round(load_s, 3), "upscale_s": round(upscale_s, 3)}
        if error is not None:
            yield self._finish(scan, {**record, "status": "failed", "error": error})
            return
        start = time.perf_counter()
        try:
            write_record(scan.record, {**record, "status": "running", "started": time.time()})
            self._write_output(result, scan)
        except Exception as caught:  # noqa: BLE001
            yield self._finish(scan, {**record, "status": "failed", "error": batch.error_line(caught)})
            return
        report = result.report or {}
        record.update(status="done", output_shape=list(result.shape), output_spacing_mm=list(result.spacing),
                      method=report.get("method"), self_check=report.get("self_check"),
                      write_s=round(time.perf_counter() - start, 3))
        if "assumptions" in report:
            record["assumptions"] = report["assumptions"]
        yield self._finish(scan, record)
        print(f"{scan.input} -> {scan.output} ({load_s + upscale_s + record['write_s']:.1f} s)",
              file=sys.stderr, flush=True)

    def _finish(self, scan: Scan, record: dict) -> dict:
        try:
            write_record(scan.record, record)
        except Exception as caught:  # noqa: BLE001  (the run log still says what happened)
            record = {**record, "status": "failed", "error": batch.error_line(caught)}
        return record

    def _write_output(self, result: sr3d_volume.Volume, scan: Scan) -> None:
        options = self.job.options
        if not _is_local(scan.output):
            with tempfile.TemporaryDirectory(prefix="sr3d-out-") as directory:
                local = os.path.join(directory, posixpath.basename(scan.output))
                batch.write_scan(result, local, options)
                _upload(local, scan.output)
            return
        target = pathlib.Path(scan.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        stale = (sr3d_files.remove_stale_temporaries(target) if options.format == "nifti"
                 else remove_stale_series(target))
        for path in [*stale, *sr3d_files.remove_stale_temporaries(scan.record)]:
            print(f"{scan.input}: removed {path.name}, left by an interrupted run", file=sys.stderr)
        if options.format == "dicom" and target.exists():
            # Ours (a record exists, else the plan refused it): a retry or rerun replaces it whole.
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.replace(target, old)
            try:
                batch.write_scan(result, target, options)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        batch.write_scan(result, target, options)


def remove_stale_series(target: pathlib.Path) -> list[pathlib.Path]:
    """Deletes the folders a killed writer of the DICOM series `target` left beside it: the
    series being written (`.NAME.tmp-PID-HEX`, `sr3d.dicom_out.save_series`) and the previous
    output set aside while it was (`.NAME.old-PID-HEX`); a live process's are kept. The pid is
    this machine's: on a shared filesystem, workers of other machines must not share an output."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for candidate in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        match = pattern.fullmatch(candidate.name)
        if match is None or not candidate.is_dir() or sr3d_files.pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _error_line(record: dict) -> str:
    """The dead-letter line of a failed record: the error, which names the scan (prefixed if not)."""
    error = record["error"]
    return error if error.startswith(record["input"]) else f"{record['input']}: {error}"


def build(pipeline: beam.Pipeline, job: BeamJob, model_hash: str) -> None:
    """Adds the upscaling to `pipeline`: scans -> plan -> load -> RunInference -> write, with
    the run log and the dead-letter file in `job.output`."""
    key = {**job.options.key(), "model_sha256": model_hash}
    if job.manifest is not None:
        folder = posixpath.dirname(job.manifest) if not _is_local(job.manifest) else os.path.dirname(
            os.path.abspath(job.manifest))
        paths = (pipeline
                 | "Read manifest" >> beam.io.ReadFromText(job.manifest)
                 | "Drop blank lines" >> beam.Filter(lambda line: line.strip() and not line.startswith("#"))
                 | "Relative to the manifest" >> beam.Map(
                     lambda line, folder: line.strip() if "://" in line or line.strip().startswith("/")
                     else _join(folder, line.strip()), folder))
        root = folder
    else:
        paths = (pipeline
                 | "Globs" >> beam.Create(match_patterns(job.input))
                 # A variant may match nothing ("a/**/b.nii" -> "a/b.nii"); run() checks that one matched.
                 | "Match scans" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
                 | "Paths" >> beam.Map(lambda metadata: metadata.path))
        root = glob_root(_absolute(job.input))
    out = job.output.rstrip("/")
    scans = (paths
             | "Scan of each file" >> beam.Map(scan_of)
             | "Drop other files and outputs" >> beam.Filter(
                 lambda scan, out: scan is not None and not _inside(scan, out), out)
             | "One element per scan" >> beam.Distinct())
    planned = scans | "Plan" >> beam.ParDo(PlanScans(job, root, key)).with_outputs(PlanScans.FINISHED, main="todo")
    loaded = (planned.todo
              | "Spread over workers" >> beam.Reshuffle()
              | "Load" >> beam.ParDo(LoadScans(job.options, key)).with_outputs(LoadScans.FAILED, main="volumes"))
    written = (loaded.volumes
               | "Upscale" >> RunInference(BundleModelHandler(job.model, job.options))
               | "Write" >> beam.ParDo(WriteScans(job, key, model_hash)))
    records = (planned[PlanScans.FINISHED], loaded[LoadScans.FAILED], written) | "All records" >> beam.Flatten()
    _ = (records
         | "Record lines" >> beam.Map(lambda record: json.dumps(record, sort_keys=True))
         | "Run log" >> beam.io.WriteToText(_join(job.output, RUN_LOG), shard_name_template="", num_shards=1))
    _ = (records
         | "Failed" >> beam.Filter(lambda record: record["status"] == "failed")
         | "Error lines" >> beam.Map(_error_line)
         | "Dead letters" >> beam.io.WriteToText(_join(job.output, ERRORS), shard_name_template="", num_shards=1))


def _inside(scan: str, folder: str) -> bool:
    """Whether `scan` lies in the output folder (sr3d's own outputs are not inputs)."""
    if _is_local(scan) and _is_local(folder):
        scan, folder = os.path.abspath(scan), os.path.abspath(folder)
    return scan == folder or scan.startswith(folder.rstrip("/") + "/")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    done: list[dict]
    skipped: list[dict]
    failed: list[dict]
    run_log: str
    errors: str


def run(job: BeamJob, pipeline_args: Sequence[str] = ()) -> RunSummary:
    """Runs the pipeline with Beam options `pipeline_args` (e.g. --runner, --direct_num_workers)
    and waits for it; returns this run's records by status."""
    if _is_local(job.output):
        out = pathlib.Path(job.output)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: is a file: the output must be a directory")
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise ValueError(f"{out}: output directory is not writable")
    if job.manifest is not None and not FileSystems.exists(job.manifest):
        raise FileNotFoundError(2, "No such manifest file", job.manifest)
    if job.input is not None and not any(result.metadata_list for result in FileSystems.match(
            match_patterns(job.input))):
        raise ValueError(f"{job.input}: no files match (quote the glob so that the shell does not expand it)")
    if job.model is not None and _is_local(job.model) and not os.path.isdir(job.model):
        raise FileNotFoundError(2, "model directory not found", job.model)
    model_hash = model_sha256(job.model, job.options.scale)
    options = PipelineOptions(list(pipeline_args))
    with beam.Pipeline(options=options) as pipeline:
        build(pipeline, job, model_hash)
    run_log = _join(job.output, RUN_LOG)
    with FileSystems.open(run_log, compression_type="uncompressed") as stream:
        records = [json.loads(line) for line in stream.read().decode("utf-8").splitlines() if line.strip()]
    records.sort(key=lambda record: record["input"])
    by = {status: [r for r in records if r["status"] == status] for status in ("done", "skipped", "failed")}
    return RunSummary(done=by["done"], skipped=by["skipped"], failed=by["failed"], run_log=run_log,
                      errors=_join(job.output, ERRORS))
