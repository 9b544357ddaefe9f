"""The `sr3d` command (also `python -m sr3d`).

  sr3d upscale IN OUT [--scale 2] [--ensemble] [--model DIR] [--axes 3d|2d|d|h|w|thick]
  sr3d upscale IN OUT_DIR/ --format dicom ...   write a new DICOM series (same study when IN is DICOM)
  sr3d upscale IN OUT --self-supervised [--scale R | --target-spacing MM] [--steps N | --time-budget S]
                  [--slice-profile box|gaussian|estimate [--profile-estimate best|posterior|mixture]]
                  [--slice-thickness MM] [--save-model M.keras]
                                thick-slice scan: train stage d on the scan itself, upscale its thick axis
  sr3d upscale IN OUT --model M.keras   reuse a --save-model network (the --model form is told by what is
                                on disk: a directory is a model bundle, a .keras file a self-supervised one)
  sr3d demo [--out DIR]         upscale the bundled real scan, write the result and a comparison PNG
  sr3d upscale-batch IN_DIR OUT_DIR [--scale 2] ...   every scan of a directory, resumable
  sr3d upscale-beam --input 'scans/**' --output OUT/ [--runner R] [Beam options]   many scans on
                                Apache Beam (pip install "sr3d[beam]"; sr3d/beam.py)
  sr3d bundle --hw M --d M --scale R --out DIR   assemble two trained stages into a model bundle
  sr3d study make --scans S... --methods cnn,lanczos --scale 2 --n 100 --seed 0 --out DIR
                                write a blinded reader-study web page (Table 7) into DIR
  sr3d study tally ANSWERS... --key DIR/key.json [--out DIR]   count the readers' choices

Bad input ends with one line on stderr naming the file and the problem and
exit status 2; no partial output file is left behind (outputs are written
under a temporary name and renamed).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from sr3d.progress import Step

_TF_LOG_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ  # the user's choice wins over --verbose
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

class _ProgressBar:
    """Progress on stderr from the counts of `sr3d.progress.Step` reports: one updating line on a
    terminal, else plain lines; throttled either way, the last state always shown.

    weights: the share of the work per unit (e.g. {"slices": 0.27, "planes": 0.73} for the two
    stages, from their FLOPs) for the overall percentage; units without a weight are shown but
    not counted; None: the percentage of the latest unit.
    """

    TTY_INTERVAL_S = 0.5   # redraws of the updating line
    LINE_INTERVAL_S = 2.0  # plain lines: at most one per 2 s,
    LINE_STEP = 0.10       # and only after 10% more of the work
    LINE_QUIET_S = 30.0    # or 30 s without a line

    def __init__(self, label: str, stream=None, weights: dict | None = None, clock=time.monotonic):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.weights = weights
        self.clock = clock
        self.start = None
        self.counts: dict[str, tuple[int, int]] = {}
        self.last_time = None
        self.last_fraction = 0.0
        self.finished = False  # weighted: all the work shown done; later calls (the last band) add nothing

    def fraction(self) -> float:
        if self.weights is None:
            done, total = list(self.counts.values())[-1]
            return done / max(total, 1)
        return sum(w * self.counts[u][0] / max(self.counts[u][1], 1) for u, w in self.weights.items()
                   if u in self.counts) / sum(self.weights.values())

    def line(self, now: float) -> str:
        fraction = self.fraction()
        elapsed = now - self.start
        parts = [f"{self.label} {100 * fraction:3.0f}%"]
        names = {"slices": "stage hw", "planes": "stage d"}
        bands_done, n_bands = self.counts.get("bands", (0, 1))
        band = min(bands_done + 1, n_bands)  # bands are reported after each band: this one is in progress
        for unit, (done, total) in self.counts.items():
            if unit == "bands":
                parts.append(f"band {band}/{n_bands}")
            elif unit == "slices" and n_bands > 1:  # stage hw runs every slice once per band
                per_band = total // n_bands
                parts.append(f"stage hw {min(max(done - (band - 1) * per_band, 0), per_band)}/{per_band} slices")
            else:
                parts.append(f"{names.get(unit, '')} {done}/{total} {unit}".strip())
        timing = f"{elapsed:.0f} s"
        if 0.02 < fraction < 1:
            timing += f", ~{elapsed * (1 - fraction) / fraction:.0f} s left"
        return " | ".join(parts + [timing])

    def __call__(self, step: Step) -> None:
        if self.finished or step.total is None:  # no total: not a share of the work
            return
        unit, done, total = step.unit, step.done, step.total
        now = self.clock()
        if self.start is None:
            self.start = now
        if self.weights is None and unit not in self.counts:  # a new phase (e.g. study: read, then make)
            self.counts, self.last_time, self.last_fraction = {}, None, 0.0
        self.counts[unit] = (done, total)
        fraction = self.fraction()
        if self.weights is None:
            final = done >= total
        else:
            final = all(u in self.counts and self.counts[u][0] >= self.counts[u][1] for u in self.weights)
        if self.tty:
            due = self.last_time is None or now - self.last_time >= self.TTY_INTERVAL_S
        else:
            since = now - (self.start if self.last_time is None else self.last_time)
            due = since >= self.LINE_INTERVAL_S and (fraction - self.last_fraction >= self.LINE_STEP
                                                     or since >= self.LINE_QUIET_S)
        if not (due or final):
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.last_time, self.last_fraction = now, fraction
        self.finished = final and self.weights is not None


def _upscale_progress(volume, scale: int, mode: str) -> _ProgressBar:
    """The bar of `sr3d upscale`: stage hw slices and stage d planes, weighted by their FLOPs."""
    from sr3d import inference

    total = inference.conv_flops(volume.array.shape, scale, mode=mode)
    hw_share = inference.conv_flops(volume.array.shape, scale, mode="2d") / total
    return _ProgressBar("upscale", weights={"slices": hw_share, "planes": 1.0 - hw_share} if mode == "3d"
                        else {"slices": 1.0})


def _import_tensorflow(args) -> None:
    """TensorFlow imported quietly (`sr3d.scripting`), or with its startup log lines for --verbose."""
    from sr3d import scripting

    verbose = getattr(args, "verbose", False)
    if verbose and not _TF_LOG_LEVEL_GIVEN:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    scripting.import_tensorflow(verbose=verbose)


def _check_output_path(path: str) -> pathlib.Path:
    """OUT's name and directory, checked before any work: a bad OUT must not cost a full compute."""
    out = pathlib.Path(path)
    if out.is_dir():
        raise ValueError(f"{out}: is a directory: the output must be a NIfTI file name, e.g. {out / 'out.nii.gz'}")
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"{out}: output must be a NIfTI file ending in .nii or .nii.gz")
    if out.name.lower() in (".nii", ".nii.gz"):
        raise ValueError(f"{out}: the output name is only a suffix: give it a name, e.g. out{out.name}")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise ValueError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{out}: output directory {parent} is not writable")
    return out


def _output_path(args) -> pathlib.Path:
    """`upscale`'s checked output: a NIfTI file, or with --format dicom a new series directory."""
    if getattr(args, "format", "nifti") == "dicom":
        from sr3d import dicom_out
        return dicom_out.check_output_dir(args.output)
    return _check_output_path(args.output)


def _check_not_input(input_path, out: pathlib.Path) -> None:
    """Refuses OUT that is IN: the same file by any name (./IN, a symlink, a hard link)."""
    try:
        same = os.path.samefile(input_path, out)
    except OSError:  # one of them does not exist
        same = False
    if same:
        raise ValueError(f"{out}: is the input {input_path} (the same file): writing it would destroy "
                         "the scan; choose another output name")


def _check_upscale_paths(args) -> None:
    """`upscale`'s IN and OUT before anything is loaded: IN exists, OUT is not IN, an existing OUT
    is replaced only with --overwrite, and temporaries of killed runs for OUT are removed."""
    from sr3d import files as sr3d_files

    if not os.path.exists(args.input):
        raise FileNotFoundError(2, "No such file or directory", args.input)
    _check_not_input(args.input, pathlib.Path(args.output))
    if getattr(args, "format", "nifti") != "nifti":
        return
    out = _check_output_path(args.output)
    if (out.exists() or out.is_symlink()) and not getattr(args, "overwrite", False):
        raise ValueError(f"{out}: exists already: pass --overwrite to replace it, or choose another name")
    for stale in sr3d_files.remove_stale_temporaries(out) + sr3d_files.remove_stale_temporaries(sidecar_path(out)):
        print(f"removed {stale}, left by an interrupted run", file=sys.stderr)


def cmd_upscale(args) -> int:
    from sr3d import inference
    from sr3d import files as sr3d_files
    from sr3d import io as sr3d_io

    _check_upscale_paths(args)
    model_kind = _model_kind(args.model)
    if getattr(args, "self_supervised", False) or model_kind == "selfsup":
        return cmd_upscale_self_supervised(args)
    if args.scale is None:
        args.scale = 2
    selfsup_only = [flag for flag, value in (
        ("--slice-thickness", getattr(args, "slice_thickness", None)), ("--steps", getattr(args, "steps", None)),
        ("--seed", getattr(args, "seed", None)), ("--time-budget", getattr(args, "time_budget", None)),
        ("--init", getattr(args, "init", None)), ("--profile-estimate", getattr(args, "profile_estimate", None)))
        if value is not None]
    if selfsup_only:
        raise ValueError(f"{', '.join(selfsup_only)} apply only with --self-supervised (with --adapt: "
                         "--adapt-steps, --adapt-seconds)")
    if args.planes not in (None, "dw") and args.axes != "3d":
        raise ValueError("--planes applies only with --axes 3d (stage d's planes, or all three orientations)")
    if getattr(args, "target_spacing", None) is not None or getattr(args, "slice_profile", None):
        raise ValueError("--target-spacing and --slice-profile apply only with --self-supervised")
    adapting = getattr(args, "adapt", False)
    if getattr(args, "save_model", None) and not adapting:
        raise ValueError("--save-model applies only with --self-supervised (a .keras file) or --adapt "
                         "(a bundle directory)")
    if not adapting and (getattr(args, "adapt_seconds", None) is not None or getattr(args, "adapt_steps", None)):
        raise ValueError("--adapt-seconds and --adapt-steps apply only with --adapt")
    fallback = getattr(args, "fallback", None)
    self_check = not getattr(args, "no_self_check", False)
    if fallback and not self_check:
        raise ValueError("--fallback needs the self-check to decide: drop --no-self-check")
    out = _output_path(args)
    sidecar = sidecar_path(out)
    if sidecar.exists() and not getattr(args, "overwrite", False):
        raise ValueError(f"{sidecar}: exists already (the report written beside the output): pass --overwrite "
                         "to replace it, or choose another output name")
    save_model = pathlib.Path(args.save_model) if getattr(args, "save_model", None) else None
    if save_model is not None:
        if save_model.exists() and (not save_model.is_dir() or any(save_model.iterdir())):
            raise ValueError(f"{save_model}: --save-model with --adapt must be a new or empty directory "
                             "(the adapted model bundle)")
        if not (save_model.parent if str(save_model.parent) else pathlib.Path(".")).is_dir():
            raise ValueError(f"{save_model}: the directory it would be made in does not exist")
    adapt_config = None
    if adapting:
        from sr3d import adapt as sr3d_adapt

        seconds = args.adapt_seconds if args.adapt_seconds is not None else sr3d_adapt.AdaptConfig.seconds
        adapt_config = sr3d_adapt.AdaptConfig(seconds=seconds, steps=args.adapt_steps)
    if args.scale < 2:
        raise ValueError(f"--scale must be an integer >= 2, got {args.scale}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if not args.tile_mb > 0:
        raise ValueError(f"--tile-mb must be a positive number of megabytes, got {args.tile_mb:g}")
    volume = sr3d_io.load_volume(args.input, regularize=getattr(args, "regularize", False))
    _import_tensorflow(args)
    from sr3d import models as sr3d_models

    bundle = sr3d_models.load_models(args.model, args.scale)
    mode = args.axes
    print(f"{args.input}: {volume.array.shape[0]} x {volume.array.shape[1]} x {volume.array.shape[2]} voxels "
          f"(D x H x W) at {', '.join(f'{s:.3g}' for s in volume.spacing)} mm; upscaling x{args.scale} "
          f"({mode}{', self-ensemble' if args.ensemble else ''})", file=sys.stderr)
    anisotropy = inference.anisotropy_note(volume.spacing, mode)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if anisotropy:
        log(anisotropy)
    result, used = inference.upscale_checked(
        volume, bundle, mode=mode, ensemble=args.ensemble, self_check=self_check, fallback=fallback,
        adapt=adapt_config, log=log, planes=args.planes, tile_mb=args.tile_mb, batch_size=args.batch_size,
        progress=_upscale_progress(volume, bundle.scale, mode), precision=args.precision,
        consistency=not getattr(args, "no_consistency", False))
    report = {"input": str(args.input), "output": str(out), **(result.report or {})}
    if volume.assumptions:
        report["assumptions"] = list(volume.assumptions)  # what the reader had to guess (warned above)
    if anisotropy:
        report["anisotropy_note"] = anisotropy
    note = _report_note(report)
    sr3d_io.save_volume(result, out, format=args.format, note=note)
    sr3d_files.write_json(sidecar, report)
    print(f"wrote {out}: {' x '.join(map(str, result.array.shape))} voxels at "
          f"{', '.join(f'{s:.3g}' for s in result.spacing)} mm (report: {sidecar.name})", file=sys.stderr)
    if save_model is not None:
        if used is bundle:
            log(f"not writing {save_model}: the adapted networks were not kept")
        else:
            sr3d_models.save_bundle(used, save_model)
            log(f"wrote the adapted model bundle {save_model} (reuse it with --model)")
    return 0


def _model_kind(path) -> str | None:
    """What --model names, told by what is on disk: "bundle" (a directory: hw.keras, d.keras),
    "selfsup" (a .keras file, with the .json that --save-model writes beside it), None (no --model)."""
    if path is None:
        return None
    model = pathlib.Path(path)
    if model.is_dir():
        return "bundle"
    if model.is_file():
        if model.suffix != ".keras":
            raise ValueError(f"{model}: --model must be a model bundle directory or a self-supervised .keras "
                             "file (written by --save-model)")
        return "selfsup"
    raise FileNotFoundError(f"{model}: --model not found (no such model bundle directory or .keras file)")


def sidecar_path(out: pathlib.Path) -> pathlib.Path:
    """The JSON report beside an output: scan_x2.nii.gz -> scan_x2.json (BIDS-style); a DICOM
    output directory OUT -> OUT.json."""
    from sr3d import files as sr3d_files

    nifti = out.name.lower().endswith((".nii", ".nii.gz"))
    return out.with_name((sr3d_files.volume_stem(out.name) if nifti else out.name) + ".json")


def _report_note(report: dict) -> str:
    """One line for the output's header: how it was made and the self-check."""
    parts = [f"sr3d x{report['scale']} {report['mode']}: {report['method']}"]
    check = report.get("self_check") or {}
    if "margin_db" in check:
        parts.append(f"self-check {check['margin_db']:+.2f} dB, SSIM {check['ssim_margin']:+.4f} vs Lanczos")
    if "adaptation" in report:
        parts.append(f"adapted on the scan: {'kept' if report['adaptation']['kept'] else 'not kept'}")
    return "; ".join(parts)


def cmd_upscale_self_supervised(args) -> int:
    """`upscale --self-supervised` (or `--model M.keras`): the factor along the thick axis is
    --scale R, or slice spacing / --target-spacing rounded up, or by default slice spacing /
    in-plane spacing rounded up (one rule: `sr3d.selfsup.plan_for`); --model is a .keras file
    written by --save-model, reused instead of training. Writes OUT's .json report: plan,
    slice profile, training steps, seed and wall time."""
    from sr3d import files as sr3d_files
    from sr3d import io as sr3d_io
    from sr3d import selfsup

    out = _output_path(args)
    sidecar = sidecar_path(out)
    if sidecar.exists() and not getattr(args, "overwrite", False):
        raise ValueError(f"{sidecar}: exists already (the report written beside the output): pass --overwrite "
                         "to replace it, or choose another output name")
    if args.model and _model_kind(args.model) == "bundle":
        raise ValueError(f"{args.model}: is a model bundle directory; with --self-supervised, --model is a .keras "
                         "file written by --save-model. For the bundle's stage d on one axis: --axes d|h|w|thick "
                         "without --self-supervised")
    if args.axes != "3d":
        raise ValueError(f"--axes {args.axes} does not apply to a self-supervised network: it upscales the thick "
                         "axis (the one with the largest spacing)")
    if args.scale is not None and args.target_spacing is not None:
        raise ValueError(f"--scale {args.scale} and --target-spacing {args.target_spacing:g}: give one (the factor "
                         "along the thick axis, or the spacing wanted along it)")
    reusing = bool(args.model)
    training_flags = [flag for flag, value in (
        ("--save-model", args.save_model), ("--steps", args.steps), ("--time-budget", args.time_budget),
        ("--seed", args.seed), ("--slice-profile", args.slice_profile), ("--slice-thickness", args.slice_thickness),
        ("--init", getattr(args, "init", None)), ("--profile-estimate", getattr(args, "profile_estimate", None)))
        if value is not None]
    if reusing and training_flags:
        raise ValueError(f"{', '.join(training_flags)} with --model {args.model}: the model is trained already "
                         "(they apply when training on the scan)")
    if getattr(args, "profile_estimate", None) is not None and args.slice_profile != "estimate":
        raise ValueError(f"--profile-estimate {args.profile_estimate} applies only with --slice-profile estimate")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be an integer >= 1, got {args.steps}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")
    if args.save_model:
        save_path = pathlib.Path(args.save_model)
        if save_path.suffix != ".keras" or not (save_path.parent if str(save_path.parent) else pathlib.Path(".")).is_dir():
            raise ValueError(f"{save_path}: --save-model must be a .keras file in an existing directory")
        if save_path.with_suffix(".json").resolve() == sidecar.resolve():
            raise ValueError(f"{save_path}: its {save_path.with_suffix('.json').name} would be the output's report "
                             f"{sidecar.name}: give the model another name")
    volume = sr3d_io.load_volume(args.input, regularize=getattr(args, "regularize", False))
    _import_tensorflow(args)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = {"input": str(args.input), "output": str(out), "method": "self-supervised stage d", "mode": "thick"}
    if reusing:
        model, info = selfsup.load_model(args.model)
        target = None if args.scale is None else volume.spacing[selfsup.thick_axis(volume.spacing)] / args.scale
        plan = selfsup.plan_for_model(volume.spacing, info, args.target_spacing if target is None else target)
        report["model"] = {"path": str(args.model), "trained": info.get("training")}
    else:
        # --steps alone stops at the step count whatever the load (reproducible); --time-budget alone
        # at a wall time; both: whichever comes first; neither: the default budget.
        budget = args.time_budget if args.time_budget is not None or args.steps is not None else \
            selfsup.SelfSupConfig.time_budget_s
        config = selfsup.SelfSupConfig(factor=args.scale, target_spacing=args.target_spacing, time_budget_s=budget,
                                       max_steps=args.steps, profile=args.slice_profile or "box",
                                       slice_thickness=args.slice_thickness,
                                       estimate=getattr(args, "profile_estimate", None) or selfsup.DEFAULT_ESTIMATE,
                                       seed=args.seed if args.seed is not None else 0,
                                       init=getattr(args, "init", None) or selfsup.SelfSupConfig.init)
        plan = selfsup.plan_for(volume.spacing, args.scale, args.target_spacing)
    print(f"{args.input}: {' x '.join(map(str, volume.shape))} voxels (D x H x W) at "
          f"{', '.join(f'{s:.3g}' for s in volume.spacing)} mm; {plan.describe()}", file=sys.stderr)
    if not reusing:
        profile = selfsup.resolve_profile(volume, plan, config.profile, config.slice_thickness, config.estimate)
        log(profile.describe(plan))
        trained = selfsup.train(volume, config, progress=log, profile=profile)
        model = trained.model
        report["training"] = trained.to_json()
        if args.save_model:
            selfsup.save_model(model, args.save_model, plan, config, trained)
            log(f"wrote {args.save_model} (and {pathlib.Path(args.save_model).with_suffix('.json').name})")
            report["saved_model"] = str(args.save_model)
    result = selfsup.upscale_thick(volume, model, target_spacing=plan.target_mm, ensemble=args.ensemble,
                                   batch_size=args.batch_size, progress=log)
    report.update({"scale": plan.factor, "axis": "DHW"[plan.axis], "slice_spacing_mm": plan.thick_mm,
                   "target_spacing_mm": plan.target_mm, "resampled": plan.resample, "plan": plan.describe()})
    if volume.assumptions:
        report["assumptions"] = list(volume.assumptions)
    note = plan.describe() + ("" if reusing else "; " + trained.profile.describe(plan))
    sr3d_io.save_volume(result, out, note=note, format=args.format)
    sr3d_files.write_json(sidecar, report)
    print(f"wrote {out}: {' x '.join(map(str, result.array.shape))} voxels at "
          f"{', '.join(f'{s:.3g}' for s in result.spacing)} mm (report: {sidecar.name})", file=sys.stderr)
    return 0


def cmd_upscale_batch(args) -> int:
    from sr3d import batch

    if args.scale < 2:
        raise ValueError(f"--scale must be an integer >= 2, got {args.scale}")
    if not os.path.isdir(args.input_dir):
        raise FileNotFoundError(2, "No such directory", args.input_dir)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"{args.output_dir}: is a file: the output must be a directory")
    result = batch.upscale_batch(args.input_dir, args.output_dir, args.scale, args.model, ensemble=args.ensemble,
                                 mode=args.axes, tile_mb=args.tile_mb, overwrite=getattr(args, "overwrite", False),
                                 regularize=getattr(args, "regularize", False), precision=args.precision,
                                 consistency=not getattr(args, "no_consistency", False),
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{len(result.done)} upscaled, {len(result.skipped)} skipped (done before), "
          + (f"{len(result.busy)} left to another run, " if result.busy else "")
          + (f"{len(result.ignored)} sr3d outputs ignored, " if result.ignored else "")
          + f"{len(result.failed)} failed; manifest: {result.manifest}", file=sys.stderr)
    for name, reason in result.failed.items():
        print(f"failed: {name}: {reason}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_upscale_beam(args) -> int:
    from sr3d import batch

    try:
        from sr3d import beam as sr3d_beam
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("apache_beam"):
            raise
        raise ValueError('upscale-beam needs Apache Beam: pip install "sr3d[beam]"') from None
    options = batch.ScanOptions(scale=args.scale, mode=args.axes, ensemble=args.ensemble, regularize=args.regularize,
                                precision=args.precision, self_check=not args.no_self_check, format=args.format,
                                tile_mb=args.tile_mb, consistency=not getattr(args, "no_consistency", False))
    job = sr3d_beam.BeamJob(output=args.output, options=options, input=args.input, manifest=args.manifest,
                            model=args.model, overwrite=args.overwrite)
    summary = sr3d_beam.run(job, ["--runner", args.runner, *args.beam_args])
    print(f"{len(summary.done)} upscaled, {len(summary.skipped)} skipped (done before), {len(summary.failed)} "
          f"failed; records: {summary.run_log}; dead letters: {summary.errors}", file=sys.stderr)
    for record in summary.failed:
        print(f"failed: {record['input']}: {record['error']}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_demo(args) -> int:
    from sr3d import demo

    report = demo.run(pathlib.Path(args.out), scale=args.scale)
    print(report)
    return 0


def cmd_bundle(args) -> int:
    from sr3d import models as sr3d_models

    out = sr3d_models.make_bundle(args.hw, args.d, args.out, args.scale,
                                  info={"note": args.note} if args.note else None)
    print(f"wrote model bundle {out}", file=sys.stderr)
    return 0


def cmd_study_make(args) -> int:
    from sr3d import files as sr3d_files
    from sr3d import study

    methods = tuple(m.strip() for m in args.methods.split(","))
    # The rule of train.py and evaluate.py: a directory of NIfTI/NRRD files gives each file.
    config = study.StudyConfig(scans=sr3d_files.expand_scans(args.scans), methods=methods, scale=args.scale, n=args.n,
                               seed=args.seed, model_dir=args.model)
    out = study.make_study(config, args.out, progress=_ProgressBar("study"))
    print(f"wrote reader study {out}: open {out / 'index.html'} in a browser; send readers the "
          f"directory WITHOUT {study.KEY_FILE}, which says which side is which method", file=sys.stderr)
    return 0


def cmd_study_tally(args) -> int:
    from sr3d import study

    result = study.tally(args.answers, args.key)
    out = args.out if args.out is not None else pathlib.Path(args.key).parent
    md, js = study.write_tally(result, out)
    print(study.tally_markdown(result), end="")
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


def _add_study_parser(sub) -> None:
    study = sub.add_parser("study", help="blinded reader study (Table 7): make the page, tally the answers")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    make = study_sub.add_parser("make", help="write a self-contained reader-study web page")
    make.add_argument("--scans", nargs="+", required=True,
                      help="test scans: NIfTI/NRRD files, directories of them (every file), or DICOM "
                           "series directories (one series each)")
    make.add_argument("--methods", default="cnn,lanczos",
                      help="the two methods compared, comma-separated (cnn, nearest, bilinear, bicubic, "
                           "lanczos; default cnn,lanczos)")
    make.add_argument("--scale", type=int, default=2, help="downscaling / upscaling factor (default 2)")
    make.add_argument("--n", type=int, default=100, help="number of cases per reader (default 100)")
    make.add_argument("--seed", type=int, default=0, help="seed of the slice sampling and left/right order")
    make.add_argument("--model", default=None, help="model bundle for cnn (default: the shipped model)")
    make.add_argument("--out", required=True, help="study directory to create (must not exist or be empty)")
    make.set_defaults(func=cmd_study_make)
    tally = study_sub.add_parser("tally", help="count the readers' answers per method, with binomial tests")
    tally.add_argument("answers", nargs="+", help="answers_<reader>.json files saved from the page")
    tally.add_argument("--key", required=True, help="key.json of the study")
    tally.add_argument("--out", default=None, help="directory for tally.md and tally.json "
                                                   "(default: the key's directory)")
    tally.set_defaults(func=cmd_study_tally)


def parser() -> argparse.ArgumentParser:
    from sr3d.degrade import MODES

    p = argparse.ArgumentParser(prog="sr3d", description="3D super-resolution of CT and MRI scans.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale a NIfTI file or DICOM series directory")
    up.add_argument("input", help="NIfTI/NRRD file, DICOM series directory or multi-frame DICOM file")
    up.add_argument("output", help="output NIfTI file (.nii or .nii.gz), or with --format dicom a new directory")
    up.add_argument("--format", choices=["nifti", "dicom"], default="nifti",
                    help="nifti (default), or dicom: a new series (one file per slice) in the directory OUTPUT, "
                         "in the source's study when the input is DICOM (see sr3d/dicom_out.py)")
    up.add_argument("--overwrite", action="store_true",
                    help="replace OUTPUT if it exists (never allowed when OUTPUT is the input)")
    up.add_argument("--regularize", action="store_true",
                    help="DICOM series with missing slices or irregular spacing: resample the slices linearly "
                         "onto a regular grid of the median spacing (reported) instead of refusing them")
    up.add_argument("--scale", type=int, default=None,
                    help="upscaling factor along every upscaled axis (shipped models: 2, 4; default 2); with "
                         "--self-supervised: the factor along the thick axis (default: slice spacing / "
                         "--target-spacing, or / the in-plane spacing, rounded up)")
    up.add_argument("--ensemble", action="store_true",
                    help="self-ensemble (8 transforms, median), as the paper, at 4-5x the time. Held-out 3D x2: "
                         "+0.12 to +0.25 dB on 1 mm MRI, +0.02 on 2 mm T1, -0.17 on chest CT; --planes all gains more "
                         "on MRI for 3x (docs/model_card.md \"Self-ensemble\")")
    up.add_argument("--model", default=None,
                    help="a model bundle directory (default: the shipped model), or a .keras file written by "
                         "--self-supervised --save-model (reused on a scan of the same protocol); told apart by "
                         "what is on disk")
    up.add_argument("--axes", choices=["3d", "2d", "d", "h", "w", "thick"], default="3d",
                    help="3d: all axes; 2d: in-plane only (H, W); d, h or w: that axis only, with the bundle's "
                         "stage d (for thick-slice scans); thick: the axis with the largest spacing")
    up.add_argument("--planes", choices=["dw", "both", "all", "auto"], default=None,
                    help="3d: stage d on the (D, W) plane of every row (dw, one pass), or also on the (D, H) "
                         "plane of every column and the two averaged (both, as the authors' code; needs whole "
                         "columns in memory and twice the stage-d time), or the whole cascade three times, each "
                         "axis once as depth (axial, coronal, sagittal slices), fused per spatial frequency (all: "
                         "+0.08 to +0.39 dB over one pass on held-out MRI at 3D x2, 3x the time, 0.34 dB less on "
                         "chest CT), or auto: dw or all, whichever wins the self-check on this scan (about 3x the "
                         "time of dw when all wins, the same when dw does). Default: auto in 3d, dw with --no-self-check or --adapt and in the "
                         "other --axes (docs/model_card.md \"Three orientations\"); the exported SavedModel runs dw "
                         "(serving_default) or all (upscale_3d_all), not auto")
    up.add_argument("--no-consistency", dest="no_consistency", action="store_true",
                    help="write the networks' output as it is. By default it is then made consistent with the "
                         "input: the smallest change after which it, downscaled as the training pairs were, is the "
                         "input again (+0.04 to +0.23 dB on held-out scans for 2-9%% more time; "
                         "docs/model_card.md \"Consistency with the input\"); the exported SavedModel does it too "
                         "(its *_no_consistency signatures do not), the ONNX stage networks do not")
    up.add_argument("--tile-mb", dest="tile_mb", type=float, default=256,
                    help="memory budget of one band of rows in MB (default 256)")
    up.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="planes per network call")
    up.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="network precision (default auto: bfloat16 convolutions where the CPU has native bf16, "
                         "AVX512_BF16 or AMX, about 2x faster, within 0.05 dB of float32 (conv1 and conv10, which "
                         "read and write the one-channel image, stay float32); float32 elsewhere; "
                         "float32 gives exactly the Keras models' result, docs/benchmarks.md)")
    up.add_argument("--no-self-check", dest="no_self_check", action="store_true",
                    help="skip the self-check (by default every upscale scores the CNN against Lanczos on the scan "
                         "downscaled once more, noise-matched, prints one line and writes it to OUT's .json "
                         "report; it costs 2-12%% of the upscale)")
    up.add_argument("--fallback", choices=["lanczos"], default=None,
                    help="lanczos: write the Lanczos result instead when the CNN loses the self-check")
    up.add_argument("--adapt", action="store_true",
                    help="fine-tune the networks on pairs cut from the scan itself (the scan and its own downscaled "
                         "copy) before upscaling; kept only if they do better on held-out rows of the scan")
    up.add_argument("--adapt-seconds", dest="adapt_seconds", type=float, default=None, metavar="S",
                    help="with --adapt: fine-tuning time budget in seconds (default 120)")
    up.add_argument("--adapt-steps", dest="adapt_steps", type=int, default=None, metavar="N",
                    help="with --adapt: a fixed number of fine-tuning steps instead of a time budget (reproducible)")
    up.add_argument("--self-supervised", dest="self_supervised", action="store_true",
                    help="thick-slice scan: train stage d on the scan's own in-plane slices, then upscale the "
                         "thick axis (--scale is not used: see --target-spacing; --model: a --save-model file)")
    up.add_argument("--target-spacing", dest="target_spacing", type=float, default=None, metavar="MM",
                    help="with --self-supervised: spacing of the result along the thick axis in mm "
                         "(default: the in-plane spacing; a non-integer ratio is upsampled to the next "
                         "integer and resampled)")
    up.add_argument("--time-budget", dest="time_budget", type=float, default=None, metavar="S",
                    help="with --self-supervised: training wall time in seconds (default 180 unless --steps); "
                         "the steps it allows depend on the machine's load")
    up.add_argument("--steps", type=int, default=None, metavar="N",
                    help="with --self-supervised: train exactly N steps (no time limit unless --time-budget): "
                         "two runs on one scan with one --seed give the same network")
    up.add_argument("--seed", type=int, default=None,
                    help="with --self-supervised: seed of the network's initialisation and batches (default 0)")
    up.add_argument("--init", choices=["random", "shipped"], default=None,
                    help="with --self-supervised: start from random weights (default) or from the shipped "
                         "stage d of the same factor (x2, x4 only), fine-tuned on the scan at a 10x smaller "
                         "learning rate (measured in docs/thick_slice.md, slice gaps)")
    up.add_argument("--slice-profile", dest="slice_profile", choices=["box", "gaussian", "estimate"], default=None,
                    help="with --self-supervised: profile of a thick slice used to simulate training pairs: box "
                         "(default) or gaussian (FWHM) of the slice thickness, or estimate: kind and thickness "
                         "estimated from the scan's spectra (reported)")
    up.add_argument("--profile-estimate", dest="profile_estimate", choices=["best", "posterior", "mixture"], default=None,
                    help="with --slice-profile estimate: train on the best candidate (default), on the estimate's "
                         "posterior (posterior: the true profiles of the estimator's nearest errors on training "
                         "scans, each a share of the slices: safer where the estimate is off, docs/thick_slice.md) "
                         "or on a mixture of its nearest candidates (mixture)")
    up.add_argument("--slice-thickness", dest="slice_thickness", type=float, default=None, metavar="MM",
                    help="with --self-supervised: slice thickness in mm when the file does not say it (NIfTI, "
                         "NRRD) or says it wrongly; thinner than the slice spacing means gaps. Default: DICOM "
                         "SliceThickness, else the slice spacing")
    up.add_argument("--save-model", dest="save_model", default=None, metavar="PATH.keras",
                    help="with --self-supervised: save the trained network (and a .json beside it) to reuse "
                         "on scans of the same protocol with --model")
    up.add_argument("--verbose", action="store_true",
                    help="also show TensorFlow's startup log lines (hidden by default)")
    up.set_defaults(func=cmd_upscale)

    many = sub.add_parser("upscale-batch", help="upscale every scan of a directory (resumable)")
    many.add_argument("input_dir", help="directory of NIfTI/NRRD files and DICOM series subdirectories")
    many.add_argument("output_dir", help="directory for the outputs and manifest.json")
    many.add_argument("--scale", type=int, default=2)
    many.add_argument("--ensemble", action="store_true")
    many.add_argument("--model", default=None, help="model bundle directory (default: the shipped model)")
    many.add_argument("--axes", choices=["3d", "2d", "d", "h", "w", "thick"], default="3d",
                      help="as for upscale: d, h or w: the shipped stage d alone along that axis; thick: along "
                           "each scan's axis with the largest spacing")
    many.add_argument("--tile-mb", dest="tile_mb", type=float, default=256)
    many.add_argument("--no-consistency", dest="no_consistency", action="store_true",
                      help="write the networks' output as it is (default: made consistent with the scan, as for upscale)")
    many.add_argument("--overwrite", action="store_true",
                      help="replace outputs in OUT_DIR that this batch's manifest does not list as its own")
    many.add_argument("--regularize", action="store_true",
                      help="resample DICOM series with missing slices or irregular spacing onto a regular grid")
    many.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                      help="network precision, as for upscale (default auto)")
    many.set_defaults(func=cmd_upscale_batch)

    on_beam = sub.add_parser("upscale-beam", help="upscale many scans on Apache Beam (RunInference; sr3d/beam.py)",
                             epilog="Other options are passed to Beam (e.g. --direct_num_workers=2, --project, "
                                    "--flink_master).")
    scans = on_beam.add_mutually_exclusive_group(required=True)
    scans.add_argument("--input", help="glob of scans on any Beam filesystem, quoted ('scans/**/*.nii.gz'; **/ is "
                                       "zero or more folders): NIfTI/NRRD files; a DICOM file stands for its "
                                       "folder (one series)")
    scans.add_argument("--manifest", help="text file of scan paths (files or DICOM series folders), one a line")
    on_beam.add_argument("--output", required=True, help="output folder: outputs mirror the inputs' folders, each "
                                                         "with a .json record; _sr3d_run.jsonl, _sr3d_errors.txt")
    on_beam.add_argument("--runner", default="DirectRunner",
                         help="DirectRunner (default), PrismRunner, DataflowRunner, FlinkRunner, SparkRunner")
    on_beam.add_argument("--scale", type=int, default=2)
    on_beam.add_argument("--model", default=None, help="model bundle directory or URL (default: the shipped model)")
    on_beam.add_argument("--axes", choices=list(MODES), default="3d")
    on_beam.add_argument("--ensemble", action="store_true")
    on_beam.add_argument("--format", choices=["nifti", "dicom"], default="nifti")
    on_beam.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="float32")
    on_beam.add_argument("--tile-mb", dest="tile_mb", type=float, default=256)
    on_beam.add_argument("--no-consistency", dest="no_consistency", action="store_true",
                         help="write the networks' output as it is (default: made consistent with the scan, as for upscale)")
    on_beam.add_argument("--regularize", action="store_true")
    on_beam.add_argument("--no-self-check", dest="no_self_check", action="store_true",
                         help="skip the per-scan self-check (CNN vs Lanczos; its result goes in the record)")
    on_beam.add_argument("--overwrite", action="store_true", help="replace outputs that have no sr3d record")
    on_beam.set_defaults(func=cmd_upscale_beam)

    bundle = sub.add_parser("bundle", help="assemble a model bundle from two trained stages")
    bundle.add_argument("--hw", required=True, help="model.keras of the stage-hw run")
    bundle.add_argument("--d", required=True, help="model.keras of the stage-d run")
    bundle.add_argument("--scale", type=int, required=True)
    bundle.add_argument("--out", required=True, help="bundle directory to write")
    bundle.add_argument("--note", default="", help="free text stored in bundle.json")
    bundle.set_defaults(func=cmd_bundle)

    demo = sub.add_parser("demo", help="upscale the bundled real scan and write a comparison figure")
    demo.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    demo.add_argument("--scale", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    _add_study_parser(sub)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so every atomic write removes its temporary file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def _one_line_warnings(command: str, default):
    """showwarning that prints sr3d's own warnings (what a reader assumed) as one line each."""
    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("sr3d"):
            print(f"sr3d {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _handle_signals(handler) -> dict:
    import signal

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread (tests in threads): leave them alone
            pass
    return previous


def main(argv: list[str] | None = None) -> int:
    """Runs one command; every failure ends as one line on stderr: exit status 2 for bad input
    (files, flags), 1 for out of memory or an internal error (SR3D_DEBUG=1 shows its traceback),
    130 for Ctrl-C and 128 + N for signal N (SIGTERM 143, SIGHUP 129)."""
    import signal
    import warnings

    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and args.command != "upscale-beam":  # only upscale-beam passes options on (to Beam)
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.beam_args = rest
    name = f"sr3d {args.command}"
    previous = _handle_signals(_raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return args.func(args)
    except (ValueError, OSError) as error:  # OSError: missing, unreadable or unwritable files
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except MemoryError as error:
        scan = getattr(args, "input", None) or getattr(args, "input_dir", None) or "input"
        print(f"{name}: error: {scan}: out of memory ({error or 'MemoryError'}): try a smaller --tile-mb, "
              "--axes 2d or a machine with more memory", file=sys.stderr)
        return 1
    except _Terminated as stop:
        print(f"{name}: terminated by {signal.Signals(stop.signum).name}; nothing half-written was left",
              file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (a traceback is no answer for a user)
        if os.environ.get("SR3D_DEBUG"):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"{name}: internal error: {type(error).__name__}: {first_line} (rerun with SR3D_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
