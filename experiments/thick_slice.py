"""Self-supervised thick-slice upscaling (sr3d.selfsup) on real scans: numbers and figures for docs/thick_slice.md.

  python experiments/thick_slice.py --part=simulate --scans=stroke-t1 --factors=3,4   (one run ~4 min)
  python experiments/thick_slice.py --part=real --scans=brain1                        (one run ~4 min)
  python experiments/thick_slice.py --part=supervised   (adds the shipped models' rows to the simulate runs)
  python experiments/thick_slice.py --part=gaps --steps=1200   (gaps with ground truth: 4 scans x 2 configs)
  python experiments/thick_slice.py --part=report

simulate: a real isotropic scan is the ground truth; thick slices along D are
simulated from it with a box slice profile (`selfsup.simulate_thick_slices`);
the thick scan is brought back to the truth's grid by Lanczos along D
(`baselines.upscale_axes(..., axes=(0,))`), by the self-supervised stage-d
network trained on the thick scan itself within the time budget, and by the
supervised shipped stage-d network when one exists for the factor
(sr3d/data_files/models/x{r}); all are scored with `sr3d.metrics` (float
protocol, the scan's own min..max as the window, PSNR over the volume, SSIM
averaged over the (H, W) slices, no IFC).

real: the thick-slice brain MRIs (6.5 mm slices, 0.78 mm pixels) upscaled to
1.3 mm (x5) by Lanczos and by the self-supervised network; no ground truth, so
the figures show reformatted coronal and sagittal views, and two checks are
reported: data consistency (the result, degraded again by the box profile,
against the acquired slices) and the training task itself (the scan's own
in-plane slices degraded along one axis, reconstructed).

gaps: slices thinner than their spacing (a gap between them), simulated from
real ~1 mm scans of two subjects and two contrasts (GAP_SCANS) along D, with
the configurations of GAP_CONFIGS; the thick scan is brought back to the truth's
grid by Lanczos and cubic along D, the shipped stage d alone (`sr3d.upscale(...,
mode="d")`, as `sr3d upscale --axes d`; only where a model of the factor is
shipped) and three self-supervised networks trained for exactly --steps steps,
seed 0 (reproducible, whatever the load): gap-aware (told the true kind and
thickness), no-gap (told thickness = spacing, the kind right) and estimated
(`--slice-profile estimate`: the best candidate), and estimated_mixture (each
training slice degraded by one of the estimate's nearly-as-good candidates,
`selfsup.estimate_mixture`; --mixture_temperature and --mixture_top_k override
its defaults). When the estimate equals a profile already trained, that network
is reused: training is deterministic, so it would be the same network.
DEV_SCANS (ds002748 training-split subjects, --scans=dev-sub-01-t1,...) are
where the mixture's parameters are chosen; they are never in the default scans.

Every run adds its entry to docs/thick_slice/{simulated,real,gaps}.json (reruns
replace it); --part=report writes docs/thick_slice/results.md from them.
"""
import json
import os
import re
import pathlib
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from sr3d import baselines, inference, metrics, selfsup  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SR3D_SHARED_DATA", REPO.parent / "shared" / "data"))
SIMULATED_SCANS = {
    "stroke-t1": "stroke-t1-t2-flair/T1.nii.gz",
    "seg3d-head": "seg3d-head-mr/head_MR.nii.gz",
    "totalseg-ct": "totalseg-ct/example_ct.nii.gz",
}
REAL_SCANS = {
    "brain1": "thick-slice-brain-mr/brain1_image.nrrd",
    "brain2": "thick-slice-brain-mr/brain2_image.nrrd",
}
REAL_TARGET_MM = 1.3
# Real thick-slice scans shown before and after in the three radiological planes (x5 along the slices).
FIGURE_SCANS = {**REAL_SCANS, "oblique-pd": "oblique-pd-dicom"}
FIGURE_FACTOR = 5
# Real ~1 mm scans for the gap experiment: two subjects of one skull-stripped T1 study, a whole-head
# T1 of another site (seg3d), and the T2 and FLAIR of a fourth subject.
GAP_SCANS = {
    "sub-34-t1": "ds002748-t1-1mm/sub-34_T1w.nii.gz",
    "sub-40-t1": "ds002748-t1-1mm/sub-40_T1w.nii.gz",
    "seg3d-t1": "seg3d-head-mr/head_MR.nii.gz",
    "stroke-t2": "stroke-t1-t2-flair/T2.nii.gz",
    "stroke-flair": "stroke-t1-t2-flair/FLAIR.nii.gz",
}
# ds002748 subjects of the training split (runs/corpus/corpus.json: sub-01..sub-28), to choose the
# estimate's mixture on; never in the default --scans (those are test scans).
DEV_SCANS = {
    "dev-sub-01-t1": "ds002748-t1-1mm/sub-01_T1w.nii.gz",
    "dev-sub-10-t1": "ds002748-t1-1mm/sub-10_T1w.nii.gz",
    "dev-sub-19-t1": "ds002748-t1-1mm/sub-19_T1w.nii.gz",
}
# (name, profile kind, slice thickness in mm, slice spacing = factor x the scan's D spacing of ~1 mm).
GAP_CONFIGS = {
    "box4-every5": ("box", 4.0, 5),
    "gauss2.5-every4": ("gaussian", 2.5, 4),
}
GAP_METHODS = ("lanczos", "cubic", "supervised", "gap_aware", "gap_aware_shipped", "no_gap", "estimated",
               "estimated_per_axis", "estimated_mixture", "estimated_posterior")
# Methods only on request (--methods): "espreso" trains the self-supervised network on the slice profile the
# peer ECLARE's estimator ESPRESO found (a Gaussian of its FWHM), read from --espreso_dir, written by
# experiments/espreso_peer.py from the thick scans of --part=export_gaps.
PEER_METHODS = ("espreso",)
# Profile-estimation bias: simulated slices every BIAS_SPACING_MM of these kinds and widths (mm).
BIAS_SPACING_MM = 5
BIAS_WIDTHS_MM = (2.0, 3.0, 4.0, 6.0)
BIAS_MATCHES = ("per-axis", "shape")

_PART = flags.DEFINE_enum("part", "report", ["simulate", "supervised", "real", "gaps", "export_gaps", "bias", "figures",
                                             "report"], "What to run.")
_SCANS = flags.DEFINE_list("scans", None, "Scan names (default: all of the part).")
_FACTORS = flags.DEFINE_list("factors", ["3", "4"], "Simulated slice-thickness factors.")
_BUDGET = flags.DEFINE_float("budget", selfsup.SelfSupConfig().time_budget_s, "Training budget in seconds.")
_CONFIGS = flags.DEFINE_list("configs", None, "gaps: configurations of GAP_CONFIGS (default: all).")
_METHODS = flags.DEFINE_list("methods", None, f"gaps: methods among {GAP_METHODS + PEER_METHODS} (default: all "
                              f"but {PEER_METHODS}).")
_STEPS = flags.DEFINE_integer("steps", 1200, "gaps: training steps of each self-supervised network.")
_SEED = flags.DEFINE_integer("seed", 0, "gaps: seed of each self-supervised network (give each seed its own "
                             "--out_dir: a case's results are keyed by scan and configuration, and a run refuses "
                             "a case that holds another seed or number of steps).")
_TEMPERATURE = flags.DEFINE_float("mixture_temperature", None, "gaps: estimated_mixture's temperature "
                                   "(default selfsup.MIXTURE_TEMPERATURE).")
_TOP_K = flags.DEFINE_integer("mixture_top_k", None, "gaps: estimated_mixture's top k (default selfsup.MIXTURE_TOP_K).")
_GAPS_FILE = flags.DEFINE_string("gaps_file", "gaps.json", "gaps: results file in --out_dir (runs in parallel "
                                 "write to different files; the report merges gaps*.json).")
_ESPRESO_DIR = flags.DEFINE_string("espreso_dir", str(REPO / "docs" / "thick_slice" / "espreso"), "gaps, method espreso: the "
                                   "<scan>_<config>.json files of experiments/espreso_peer.py.")
_OUT_DIR = flags.DEFINE_string("out_dir", str(REPO / "docs" / "thick_slice"), "Results directory.")
_NIFTI_DIR = flags.DEFINE_string("nifti_dir", "/tmp/sr3d_thick_slice", "Where upscaled real scans are written "
                                 "(not in docs: the thick-slice scans may not be redistributed).")


def _mm(values) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values)


def _rel(path: pathlib.Path) -> str:
    """A path relative to the repository, as written into the JSON."""
    return os.path.relpath(path, REPO)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _update_json(path: pathlib.Path, key: str, entry: dict) -> None:
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = entry
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _lanczos_depth(thick: sr3d_io.Volume, factor: int) -> np.ndarray:
    """Lanczos along D, clipped to the input's range like the networks' outputs."""
    up = baselines.upscale_axes(thick.array, factor, "lanczos", axes=(0,))
    return np.clip(up, thick.array.min(), thick.array.max())


def _train(thick: sr3d_io.Volume, config: selfsup.SelfSupConfig) -> tuple[object, dict]:
    started = time.perf_counter()
    model = selfsup.train_on_scan(thick, config, progress=_log)
    return model, {"train_seconds": time.perf_counter() - started,
                   "train_steps": int(model.optimizer.iterations.numpy()),
                   "train_patches": int(model.optimizer.iterations.numpy()) * config.batch_size}


def _timed_upscale(thick, model, **options) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    array = selfsup.upscale_thick(thick, model, **options).array
    return array, time.perf_counter() - started


def run_simulated(name: str, factor: int, budget: float, out_dir: pathlib.Path) -> dict:
    volume = sr3d_io.load_volume(SHARED / SIMULATED_SCANS[name])
    truth, thick = selfsup.simulate_thick_slices(volume, factor, axis=0, profile="box")
    _log(f"{name}: {volume.shape} at {_mm(volume.spacing)} mm -> thick {thick.shape} at "
         f"{_mm(thick.spacing)} mm (box profile, x{factor})")
    data_range = (float(truth.array.min()), float(truth.array.max()))
    protocol = metrics.float_protocol(data_range, with_ifc=False)
    outputs = {"lanczos": _lanczos_depth(thick, factor)}
    config = selfsup.SelfSupConfig(factor=factor, time_budget_s=budget)
    model, training = _train(thick, config)
    outputs["selfsup"], training["infer_seconds"] = _timed_upscale(thick, model)
    outputs["selfsup_both"], _ = _timed_upscale(thick, model, planes="both")
    shipped = inference.shipped_model_dir(factor)
    if (shipped / inference.MODEL_FILES["d"]).exists():
        bundle = inference.load_models(None, factor)
        outputs["supervised"], _ = _timed_upscale(thick, bundle.d)
    scores = {}
    for method, array in outputs.items():
        score = metrics.score_volume(truth.array, array, protocol)
        scores[method] = {"psnr": score["psnr"], "ssim": score["ssim"]}
        _log(f"  {method:13s} PSNR {score['psnr']:.2f} dB  SSIM {score['ssim']:.4f}")
    figure = out_dir / f"sim_{name}_x{factor}.png"
    columns = [("ground truth", truth.array), (f"thick input ({thick.spacing[0]:.3g} mm)",
                                               np.repeat(thick.array, factor, axis=0))]
    labels = {"lanczos": "Lanczos along D", "selfsup": "self-supervised", "supervised": "supervised (shipped)"}
    columns += [(f"{labels[m]}\n{scores[m]['psnr']:.2f} dB, SSIM {scores[m]['ssim']:.3f}", outputs[m])
                for m in ("lanczos", "selfsup", "supervised") if m in outputs]
    _figure(figure, columns, truth, f"{name}: thick slices x{factor} simulated (box profile), "
            f"reformatted views; PSNR/SSIM over the volume", error_of=truth.array)
    return {"scan": _rel(SHARED / SIMULATED_SCANS[name]), "factor": factor, "profile": "box",
            "truth_shape": list(truth.shape), "thick_spacing_mm": list(thick.spacing),
            "data_range": list(data_range), "protocol": protocol.describe(),
            "supervised_model": _rel(shipped) if "supervised" in outputs else None,
            "budget_s": budget, **training, "scores": scores, "figure": figure.name}


def add_supervised(entry: dict) -> bool:
    """Scores the shipped stage-d model on a simulate entry's thick scan (the simulation is
    deterministic, so the same input); False when no model is shipped for the factor."""
    factor = entry["factor"]
    shipped = inference.shipped_model_dir(factor)
    if not (shipped / inference.MODEL_FILES["d"]).exists():
        return False
    truth, thick = selfsup.simulate_thick_slices(sr3d_io.load_volume(REPO / entry["scan"]), factor, axis=0,
                                                 profile=entry["profile"])
    array, _ = _timed_upscale(thick, inference.load_models(None, factor).d)
    score = metrics.score_volume(truth.array, array, metrics.float_protocol(entry["data_range"], with_ifc=False))
    entry["scores"]["supervised"] = {"psnr": score["psnr"], "ssim": score["ssim"]}
    entry["supervised_model"] = _rel(shipped)
    return True


def _in_plane_task(thick: sr3d_io.Volume, model, plan: selfsup.ThickSlicePlan) -> dict:
    """PSNR (normalised units, peak 1) on the scan's own in-plane slices degraded along H, as in
    training: the network vs Lanczos. Seen in training, so an optimistic, self-consistency check."""
    from sr3d import intensity, training

    normalised = intensity.window(thick.array).normalise(thick.array)
    stack = selfsup.training_stacks(normalised, plan)[0]
    net = training.predict_planes(model, stack.lr, batch_size=4)
    lanczos = baselines.upscale_axes(stack.lr, plan.factor, "lanczos", axes=(1,))
    return {name: metrics.psnr(np.clip(stack.hr, 0, 1), np.clip(out, 0, 1), data_range=1.0)
            for name, out in (("selfsup", net), ("lanczos", lanczos))}


def run_real(name: str, budget: float, out_dir: pathlib.Path, nifti_dir: pathlib.Path) -> dict:
    thick = sr3d_io.load_volume(SHARED / REAL_SCANS[name])
    config = selfsup.SelfSupConfig(target_spacing=REAL_TARGET_MM, time_budget_s=budget)
    plan = selfsup.plan_for(thick.spacing, target_spacing=REAL_TARGET_MM)
    _log(f"{name}: {thick.shape} at {_mm(thick.spacing)} mm; {plan.describe()}")
    model, training = _train(thick, config)
    started = time.perf_counter()
    result = selfsup.upscale_thick(thick, model, target_spacing=REAL_TARGET_MM)
    training["infer_seconds"] = time.perf_counter() - started
    nifti_dir.mkdir(parents=True, exist_ok=True)
    sr3d_io.save_volume(result, nifti_dir / f"{name}_selfsup_{REAL_TARGET_MM}mm.nii.gz", note=plan.describe())
    lanczos = _lanczos_depth(thick, plan.factor)
    data_range = (float(thick.array.min()), float(thick.array.max()))
    consistency = {}
    for method, array in (("lanczos", lanczos), ("selfsup", result.array)):
        again = selfsup.degrade_along(array, plan.factor, axis=0, profile="box")
        consistency[method] = metrics.psnr(thick.array, np.clip(again, *data_range),
                                           data_range=data_range[1] - data_range[0])
    in_plane = _in_plane_task(thick, model, plan)
    _log(f"  data consistency PSNR: {consistency}; in-plane task PSNR: {in_plane}")
    columns = [(f"acquired ({thick.spacing[0]:.3g} mm slices)", np.repeat(thick.array, plan.factor, axis=0)),
               (f"Lanczos along D (x{plan.factor})", lanczos), (f"self-supervised (x{plan.factor})", result.array)]
    figure = out_dir / f"real_{name}.png"
    _figure(figure, columns, result, f"{name}: real {thick.spacing[0]:.3g} mm slices, {_mm(thick.spacing[1:])} "
            f"mm pixels -> {REAL_TARGET_MM} mm; reformatted views (no ground truth)", window=(1, 98))
    return {"scan": _rel(SHARED / REAL_SCANS[name]), "shape": list(thick.shape),
            "spacing_mm": list(thick.spacing), "target_mm": REAL_TARGET_MM, "factor": plan.factor,
            "budget_s": budget, **training, "data_consistency_psnr_db": consistency,
            "data_consistency_note": "the output degraded again along D by the box profile vs the acquired "
                                     "slices; scan units, peak = the scan's max - min",
            "in_plane_task_psnr_db": in_plane,
            "in_plane_task_note": "in-plane slices degraded along H as in training (seen in training: "
                                  "optimistic); normalised units clipped to [0, 1], peak 1",
            "figure": figure.name}


def _gap_case(name: str, config_name: str):
    """(truth, thick scan, profile kind, thickness mm, factor) of one gap case; deterministic."""
    kind, thickness_mm, factor = GAP_CONFIGS[config_name]
    volume = sr3d_io.load_volume(SHARED / {**GAP_SCANS, **DEV_SCANS}[name])
    truth, thick = selfsup.simulate_thick_slices(volume, factor, axis=0, profile=kind,
                                                 thickness=thickness_mm / volume.spacing[0])
    return truth, thick, kind, thickness_mm, factor


def espreso_profile(path: pathlib.Path, thick: sr3d_io.Volume) -> dict:
    """What ESPRESO (experiments/espreso_peer.py) found for this thick scan: its PSF's FWHM in mm (ESPRESO's
    kernel is on the finest in-plane grid, so FWHM voxels x the smallest in-plane spacing), checked against
    the scan's own slice spacing, which ESPRESO read from the same file."""
    if not path.exists():
        raise app.UsageError(f"{path}: no ESPRESO estimate; run --part=export_gaps, then experiments/espreso_peer.py")
    found = json.loads(path.read_text())
    inplane = min(float(v) for v in thick.spacing[1:])
    if abs(found["slice_separation"] - thick.spacing[0] / inplane) > 1e-2:
        raise app.UsageError(f"{path}: ESPRESO ran on slices {found['slice_separation']} in-plane voxels apart, "
                             f"this case's are {thick.spacing[0] / inplane:.3f}: not this scan")
    return {"thickness_mm": round(found["fwhm_inplane_voxels"] * inplane, 4), "file": _rel(path)}   # PSF: in the file


def export_gaps(name: str, config_name: str, nifti_dir: pathlib.Path) -> pathlib.Path:
    """Writes one gap case's thick scan as NIfTI (for a peer tool); never overwrites a different file."""
    _, thick, *_ = _gap_case(name, config_name)
    nifti_dir.mkdir(parents=True, exist_ok=True)
    path = nifti_dir / f"{name}_{config_name}.nii.gz"
    if path.exists():
        old = sr3d_io.load_volume(path)
        if old.shape != thick.shape or not np.allclose(old.array, thick.array, atol=1e-3):
            raise app.UsageError(f"{path}: exists and holds another scan; move it away first")
        return path
    sr3d_io.save_volume(thick, path)
    return path


def _score(truth: np.ndarray, array: np.ndarray, data_range) -> dict:
    score = metrics.score_volume(truth, array, metrics.float_protocol(data_range, with_ifc=False))
    return {"psnr": score["psnr"], "ssim": score["ssim"]}


def run_gaps(name: str, config_name: str, methods, steps: int, path: pathlib.Path, seed: int = 0) -> dict:
    """Scores `methods` on one gap case and stores each in gaps.json as soon as it is done."""
    import sr3d

    truth, thick, kind, thickness_mm, factor = _gap_case(name, config_name)
    key = f"{name}|{config_name}"
    entry = json.loads(path.read_text()).get(key, {}) if path.exists() else {}
    held = (entry.get("steps"), entry.get("seed", 0))     # entries before --seed were all seed 0
    if entry.get("scores") and held != (steps, seed):
        raise app.UsageError(f"{path}: {key} holds networks of {held[0]} steps, seed {held[1]}, not {steps} and "
                             f"{seed}: give this run its own --out_dir or --gaps_file")
    data_range = (float(truth.array.min()), float(truth.array.max()))
    entry.update({"scan": _rel(SHARED / {**GAP_SCANS, **DEV_SCANS}[name]), "profile": kind, "thickness_mm": thickness_mm,
                  "factor": factor, "spacing_mm": list(thick.spacing), "truth_shape": list(truth.shape),
                  "data_range": list(data_range), "steps": steps, "seed": seed,
                  "protocol": metrics.float_protocol(data_range, with_ifc=False).describe()})
    entry.setdefault("scores", {})
    entry.setdefault("runs", {})
    _log(f"{key}: {truth.shape} truth, thick {thick.shape} at {_mm(thick.spacing)} mm, {kind} {thickness_mm:g} mm "
         f"slices every {thick.spacing[0]:.3g} mm")
    trained = {}  # profile (kind, thickness rounded) -> network output, to reuse identical trainings

    def selfsup_run(method: str, match: str = "shape", init: str = "random", **profile) -> None:
        config = selfsup.SelfSupConfig(factor=factor, time_budget_s=None, max_steps=steps, seed=seed, init=init,
                                       **profile)
        started = time.perf_counter()
        plan = selfsup.plan_for(thick.spacing, factor=factor)
        if config.profile == "estimate" and config.estimate == "posterior":
            resolved = selfsup.estimate_posterior(thick, plan)
        elif config.profile == "estimate" and config.estimate == "mixture":
            resolved = selfsup.estimate_mixture(thick, plan, _TEMPERATURE.value, _TOP_K.value, match=match)
        elif config.profile == "estimate":
            resolved = selfsup.estimate_profile(thick, plan, match=match)
        else:
            resolved = selfsup.resolve_profile(thick, plan, config.profile, config.slice_thickness)
        resolve_seconds = time.perf_counter() - started
        if isinstance(resolved, selfsup.ProfileMixture) and len(resolved.candidates) > 1:
            same = ("mixture", json.dumps(resolved.to_json()["mixture"]["candidates"]), init)
        else:  # a mixture of one candidate degrades every slice by it: the network of that profile
            same = (resolved.kind, round(resolved.thickness_mm, 3), init)
        run = {"slice_profile": resolved.to_json(), "profile_seconds": round(resolve_seconds, 2)}
        if same in trained:
            array, run["reused_network_of"] = trained[same]
        else:
            result = selfsup.train(thick, config, _log, profile=resolved)
            run.update({"train_steps": result.steps, "train_seconds": round(result.seconds, 1)})
            started = time.perf_counter()
            array = selfsup.upscale_thick(thick, result.model).array
            run["infer_seconds"] = round(time.perf_counter() - started, 1)
            trained[same] = (array, method)
        entry["runs"][method] = run
        finish(method, array)

    def finish(method: str, array: np.ndarray) -> None:
        entry["scores"][method] = _score(truth.array, array, data_range)
        _log(f"  {method:11s} PSNR {entry['scores'][method]['psnr']:.2f} dB  SSIM {entry['scores'][method]['ssim']:.4f}")
        _update_json(path, key, entry)

    shipped_d = (inference.shipped_model_dir(factor) / inference.MODEL_FILES["d"]).exists()
    for method in methods:
        if method in ("lanczos", "cubic"):
            up = baselines.upscale_axes(thick.array, factor, "lanczos" if method == "lanczos" else "bicubic", axes=(0,))
            finish(method, np.clip(up, thick.array.min(), thick.array.max()))
        elif method == "supervised":
            if not shipped_d:
                _log(f"  supervised: no shipped x{factor} model")
                continue
            started = time.perf_counter()
            array = sr3d.upscale(thick, factor, mode="d", self_check=False).array
            entry["runs"]["supervised"] = {"model": _rel(inference.shipped_model_dir(factor)),
                                           "infer_seconds": round(time.perf_counter() - started, 1)}
            finish(method, array)
        elif method == "gap_aware":
            selfsup_run(method, profile=kind, slice_thickness=thickness_mm)
        elif method == "gap_aware_shipped":
            if not shipped_d:
                _log(f"  gap_aware_shipped: no shipped x{factor} model to start from")
                continue
            selfsup_run(method, profile=kind, slice_thickness=thickness_mm, init="shipped")
        elif method == "no_gap":
            selfsup_run(method, profile=kind, slice_thickness=thick.spacing[0])
        elif method == "estimated":
            selfsup_run(method, profile="estimate")
        elif method == "estimated_per_axis":
            selfsup_run(method, match="per-axis", profile="estimate")
        elif method == "estimated_mixture":
            selfsup_run(method, profile="estimate", estimate="mixture")
        elif method == "estimated_posterior":
            selfsup_run(method, profile="estimate", estimate="posterior")
        elif method == "espreso":
            found = espreso_profile(pathlib.Path(_ESPRESO_DIR.value) / f"{name}_{config_name}.json", thick)
            entry["espreso"] = found
            selfsup_run(method, profile="gaussian", slice_thickness=found["thickness_mm"])
        else:
            raise app.UsageError(f"--methods: {method!r} is not one of {GAP_METHODS + PEER_METHODS}")
    return entry


# A statistically isotropic 1 mm volume (power spectrum |k|^-3, seed 0): the estimator's assumption holds.
ISOTROPIC_FIELD = "isotropic-field"
AXIS_POWER_PERIODS_MM = (16.0, 8.0, 4.0, 2.0)


def _isotropic_field(n: int = 120) -> sr3d_io.Volume:
    k = np.fft.fftfreq(n)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    radius[0, 0, 0] = 1.0
    noise = np.random.default_rng(0).standard_normal((n, n, n))
    field = np.fft.ifftn(np.fft.fftn(noise) * radius ** -1.5).real
    array = (field - field.min()) / (field.max() - field.min()) * 100 + 50
    return sr3d_io.Volume(array=array.astype(np.float32), spacing=(1.0, 1.0, 1.0), affine=np.eye(4))


def _axis_power(volume: sr3d_io.Volume) -> dict:
    """log10 power (normalised units) of the 1 mm scan's lines along D, H and W at AXIS_POWER_PERIODS_MM:
    how alike the anatomy is along the axes (the estimator's assumption)."""
    from sr3d import intensity

    normalised = intensity.window(volume.array).normalise(volume.array)
    out = {}
    for axis, label in enumerate("DHW"):
        lines = np.moveaxis(normalised, axis, -1).reshape(-1, normalised.shape[axis])
        spectrum = selfsup._line_spectrum(lines[lines.std(axis=1) > 0.05], 32)
        out[label] = {f"{p:g}": round(float(np.log10(spectrum[round(32 * volume.spacing[axis] / p)])), 3)
                      for p in AXIS_POWER_PERIODS_MM}
    return out


def run_bias(name: str, path: pathlib.Path) -> dict:
    """`selfsup.estimate_profile` (both spectral matches) on slices simulated from one real scan
    every BIAS_SPACING_MM mm, box and Gaussian, BIAS_WIDTHS_MM; the golden value is the
    simulated width. Stored in bias.json."""
    volume = _isotropic_field() if name == ISOTROPIC_FIELD else sr3d_io.load_volume(SHARED / GAP_SCANS[name])
    factor = round(BIAS_SPACING_MM / volume.spacing[0])
    cases = []
    for kind in selfsup.PROFILES:
        for width in BIAS_WIDTHS_MM:
            _, thick = selfsup.simulate_thick_slices(volume, factor, axis=0, profile=kind,
                                                     thickness=width / volume.spacing[0])
            plan = selfsup.plan_for(thick.spacing, factor=factor)
            case = {"kind": kind, "thickness_mm": width}
            for match in BIAS_MATCHES:
                started = time.perf_counter()
                estimate = selfsup.estimate_profile(thick, plan, match=match)
                case[match] = {"kind": estimate.kind, "thickness_mm": round(estimate.thickness_mm, 3),
                               "error_mm": round(estimate.thickness_mm - width, 3),
                               "seconds": round(time.perf_counter() - started, 1)}
            _log(f"{name}: {kind} {width:g} mm every {thick.spacing[0]:.3g} mm -> " + ", ".join(
                f"{m}: {case[m]['kind']} {case[m]['thickness_mm']:.2f}" for m in BIAS_MATCHES))
            cases.append(case)
    entry = {"scan": ISOTROPIC_FIELD if name == ISOTROPIC_FIELD else _rel(SHARED / GAP_SCANS[name]),
             "spacing_mm": volume.spacing[0] * factor, "cases": cases, "axis_power": _axis_power(volume)}
    _update_json(path, name, entry)
    return entry


def _plane_aspect(volume: sr3d_io.Volume, normal_axis: int) -> float:
    """Height / width of one pixel of `planes.show(volume, normal_axis)`, from the spacing (the
    vertical axis chosen as sr3d.planes.display chooses it)."""
    from sr3d import planes

    axes = [a for a in range(3) if a != normal_axis]
    vertical_world = 1 if planes.plane_name(volume.affine, normal_axis) == "axial" else 2
    vertical = next((a for a in axes if planes.world_axis(volume.affine, a)[0] == vertical_world), axes[0])
    horizontal = axes[1] if vertical == axes[0] else axes[0]
    return volume.spacing[vertical] / volume.spacing[horizontal]


def run_figure(name: str, steps: int, out_dir: pathlib.Path, nifti_dir: pathlib.Path) -> dict:
    """A real thick-slice scan before and after `--self-supervised` (x FIGURE_FACTOR along the
    slices, `steps` steps, seed 0), in the three planes named and oriented the radiological way
    (`sr3d.planes`); the middle acquired slice and the planes through the middle of the others."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sr3d import planes

    thick = sr3d_io.load_volume(SHARED / FIGURE_SCANS[name])
    config = selfsup.SelfSupConfig(factor=FIGURE_FACTOR, time_budget_s=None, max_steps=steps, seed=0)
    trained = selfsup.train(thick, config, _log)
    started = time.perf_counter()
    result = selfsup.upscale_thick(thick, trained.model)
    infer_seconds = time.perf_counter() - started
    nifti_dir.mkdir(parents=True, exist_ok=True)
    sr3d_io.save_volume(result, nifti_dir / f"{name}_selfsup_x{FIGURE_FACTOR}.nii.gz", note=trained.plan.describe())
    axis = trained.plan.axis
    middle = thick.shape[axis] // 2
    # Thick voxel i covers output voxels i*r .. i*r + r - 1 (sr3d.io.upscaled_affine): its centre is i*r + (r-1)/2.
    index = {"acquired": [thick.shape[a] // 2 if a != axis else middle for a in range(3)],
             "self-supervised": [result.shape[a] // 2 if a != axis else middle * FIGURE_FACTOR + FIGURE_FACTOR // 2
                                 for a in range(3)]}
    vmin, vmax = np.percentile(thick.array, (1, 99.5))
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.4))
    for row, (label, volume) in enumerate((("acquired", thick), ("self-supervised", result))):
        for col, normal in enumerate(sorted(range(3), key=lambda a: ["axial", "coronal", "sagittal"].index(
                planes.plane_name(thick.affine, a)))):
            shown = planes.show(volume.array, volume.affine, normal, index[label][normal])
            ax = axes[row, col]
            ax.imshow(shown.image, cmap="gray", vmin=vmin, vmax=vmax, aspect=_plane_aspect(volume, normal),
                      interpolation="nearest")
            planes.label_edges(ax, shown)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(shown.name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{label}\n{_mm(volume.spacing)} mm", fontsize=9)
    fig.suptitle(f"{name}: {thick.shape[axis]} slices of {trained.profile.thickness_mm:.3g} mm every "
                 f"{thick.spacing[axis]:.3g} mm -> x{FIGURE_FACTOR} self-supervised ({trained.steps} steps, seed 0; "
                 f"{trained.profile.source})", fontsize=10)
    fig.tight_layout()
    figure = out_dir / f"planes_{name}.png"
    fig.savefig(figure, dpi=80)
    plt.close(fig)
    _log(f"wrote {figure}")
    return {"scan": _rel(SHARED / FIGURE_SCANS[name]), "shape": list(thick.shape), "spacing_mm": list(thick.spacing),
            "factor": FIGURE_FACTOR, "training": trained.to_json(), "infer_seconds": round(infer_seconds, 1),
            "figure": figure.name}


def _figure(path: pathlib.Path, columns: list, grid: sr3d_io.Volume, title: str,
            error_of: np.ndarray | None = None, window: tuple[float, float] = (0.5, 99.5)) -> None:
    """Coronal ((D, W) plane) and sagittal ((D, H) plane) reformats of each column at the grid's
    physical aspect, superior up; with `error_of`, a third row of |column - truth| (coronal).
    window: grey levels span these percentiles of the first column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, h, w = grid.shape
    reference = columns[0][1]
    vmin, vmax = np.percentile(reference, window)
    flip = grid.affine[2, 0] < 0  # D runs towards inferior: flip so superior is up
    views = [("coronal (D, W)", lambda v: v[:, h // 2, :], grid.spacing[0] / grid.spacing[2]),
             ("sagittal (D, H)", lambda v: v[:, :, w // 2], grid.spacing[0] / grid.spacing[1])]
    rows = len(views) + (error_of is not None)
    fig, axes = plt.subplots(rows, len(columns), figsize=(3.1 * len(columns), 3.1 * rows), squeeze=False)
    for col, (label, array) in enumerate(columns):
        for row, (view, take, aspect) in enumerate(views):
            plane = take(array)
            axes[row, col].imshow(plane if flip else plane[::-1], cmap="gray", vmin=vmin, vmax=vmax,
                                  aspect=aspect, interpolation="nearest")
            if col == 0:
                axes[row, col].set_ylabel(view)
        axes[0, col].set_title(label, fontsize=9)
        if error_of is not None:
            if col == 0:
                axes[-1, 0].set_ylabel("|error| (coronal)")
                axes[-1, 0].axis("off")
            else:
                plane = np.abs(views[0][1](array) - views[0][1](error_of))
                axes[-1, col].imshow(plane if flip else plane[::-1], cmap="magma", vmin=0,
                                     vmax=0.25 * (vmax - vmin), aspect=views[0][2], interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out_dir: pathlib.Path) -> pathlib.Path:
    lines = ["# Thick-slice upscaling: generated results", "",
             "Written by `experiments/thick_slice.py --part=report` from simulated.json and real.json.", ""]
    simulated_path = out_dir / "simulated.json"
    if simulated_path.exists():
        simulated = json.loads(simulated_path.read_text())
        lines += ["## Simulated thick slices (ground truth known)", "",
                  "| scan | factor (slice mm) | Lanczos along D PSNR / SSIM | self-supervised PSNR / SSIM "
                  "| self-sup., (D,W)+(D,H) planes | supervised shipped stage d | training steps in budget |",
                  "|---|---|---|---|---|---|---|"]
        for key in sorted(simulated):
            e = simulated[key]
            s = e["scores"]

            def cell(m):
                return f"{s[m]['psnr']:.2f} / {s[m]['ssim']:.4f}" if m in s else f"no shipped x{e['factor']}"
            lines.append(f"| {key.split('|')[0]} | x{e['factor']} ({e['thick_spacing_mm'][0]:.3g}) | "
                         f"{cell('lanczos')} | {cell('selfsup')} | {cell('selfsup_both')} | {cell('supervised')} | "
                         f"{e['train_steps']} in {e['train_seconds']:.0f} s |")
        protocol = re.sub(r"the fixed window \[[^]]*\]", "the scan's own [min, max]",
                          next(iter(simulated.values()))["protocol"])
        windows = sorted({(k.split("|")[0], tuple(e["data_range"])) for k, e in simulated.items()})
        lines += ["", f"Scores: {protocol} Windows: " + "; ".join(f"{n} [{lo:g}, {hi:g}]" for n, (lo, hi) in windows)
                  + ". Supervised: the shipped stage-d network of the same factor (sr3d/data_files/models/x{r}), "
                  "trained on six IXI T1 scans and the upper 72 slices of the TotalSegmentator CT (so its "
                  "totalseg-ct rows are partly on training data) to upsample depth after the shipped stage hw "
                  "(bicubic-downscaled in 3D, in-plane restored by stage hw: cascade training, "
                  "docs/model_card.md), so a thick-slice scan with sharp slices is not what it was trained on; "
                  "rows without one say so.", ""]
    real_path = out_dir / "real.json"
    if real_path.exists():
        real = json.loads(real_path.read_text())
        lines += ["## Real thick-slice scans (no ground truth)", "",
                  "| scan | slices | factor | data consistency PSNR, Lanczos / self-sup. | in-plane task PSNR, "
                  "Lanczos / self-sup. | training steps in budget |", "|---|---|---|---|---|---|"]
        for key in sorted(real):
            e = real[key]
            c, t = e["data_consistency_psnr_db"], e["in_plane_task_psnr_db"]
            lines.append(f"| {key} | {e['shape'][0]} x {e['spacing_mm'][0]:.3g} mm | x{e['factor']} -> "
                         f"{e['target_mm']} mm | {c['lanczos']:.2f} / {c['selfsup']:.2f} | "
                         f"{t['lanczos']:.2f} / {t['selfsup']:.2f} | {e['train_steps']} in "
                         f"{e['train_seconds']:.0f} s |")
        lines += ["", f"Data consistency: {next(iter(real.values()))['data_consistency_note']}.",
                  f"In-plane task: {next(iter(real.values()))['in_plane_task_note']}.", ""]
    lines += (_gaps_report(out_dir) + _seeds_report(out_dir) + _espreso_report(out_dir) + _posterior_report(out_dir)
              + _bias_report(out_dir) + _figures_report(out_dir))
    path = out_dir / "results.md"
    path.write_text("\n".join(lines))
    return path


def _merged_gaps(out_dir: pathlib.Path) -> dict:
    """gaps*.json merged: scores and runs of one case from all files (runs made in parallel)."""
    merged = {}
    for path in sorted(out_dir.glob("gaps*.json")):
        for key, entry in json.loads(path.read_text()).items():
            into = merged.setdefault(key, {**entry, "scores": {}, "runs": {}})
            into["scores"].update(entry["scores"])
            into["runs"].update(entry["runs"])
    return merged


def _seed_entries(out_dir: pathlib.Path):
    """(case key, entry) of the merged gap cases of out_dir and of its seed*/ folders (one per --seed)."""
    for folder in [out_dir, *sorted(out_dir.glob("seed*/"))]:
        yield from _merged_gaps(folder).items()


def _seeds_report(out_dir: pathlib.Path) -> list[str]:
    """Estimated - gap-aware and gap-aware - Lanczos (PSNR, dB) per seed, with their mean and sample
    standard deviation over seeds: the gap cases of `out_dir` and of its seed*/ folders (one per
    --seed), for the cases that have all three networks in at least two of them."""
    runs = {}                                        # case -> seed -> (estimated - gap-aware, gap-aware - Lanczos)
    for key, entry in _seed_entries(out_dir):
        s = entry["scores"]
        if all(m in s for m in ("estimated", "gap_aware", "lanczos")):
            runs.setdefault(key, {})[entry.get("seed", 0)] = (
                s["estimated"]["psnr"] - s["gap_aware"]["psnr"], s["gap_aware"]["psnr"] - s["lanczos"]["psnr"])
    runs = {key: seeds for key, seeds in runs.items() if len(seeds) > 1}
    if not runs:
        return []

    def cell(values) -> str:
        return " / ".join(f"{v:+.2f}" for v in values)

    def spread(values) -> str:
        return f"{np.mean(values):+.2f} +- {np.std(values, ddof=1):.2f}"

    lines = ["## Over seeds: estimated - gap-aware and gap-aware - Lanczos (PSNR, dB)", "",
             "| case | seeds | estimated - gap-aware, per seed | mean +- sd | gap-aware - Lanczos, per seed "
             "| mean +- sd |", "|---|---|---|---|---|---|"]
    for key in sorted(runs):
        seeds = sorted(runs[key])
        est, lz = [runs[key][k][0] for k in seeds], [runs[key][k][1] for k in seeds]
        lines.append(f"| {key.replace('|', ', ')} | {', '.join(map(str, seeds))} | {cell(est)} | {spread(est)} "
                     f"| {cell(lz)} | {spread(lz)} |")
    return lines + [""]


def _espreso_report(out_dir: pathlib.Path) -> list[str]:
    """The peer's estimate (ESPRESO, method "espreso") beside sr3d's: per gap case the true profile, both
    estimates and each network's PSNR minus the gap-aware one's, per seed (out_dir and its seed*/ folders)
    and their mean."""
    cases = {}                                        # case -> seed -> (estimated, espreso) - gap-aware
    about = {}
    for key, entry in _seed_entries(out_dir):
        s = entry["scores"]
        if "espreso" not in s or "gap_aware" not in s:
            continue
        gap = s["gap_aware"]["psnr"]
        cases.setdefault(key, {})[entry.get("seed", 0)] = tuple(
            s[m]["psnr"] - gap if m in s else float("nan") for m in ("estimated", "espreso"))
        about[key] = (entry, entry["runs"].get("estimated", {}).get("slice_profile"))
    if not cases:
        return []
    lines = ["## The peer's estimate: ESPRESO (ECLARE) as the slice profile", "",
             "sr3d's network trained on a Gaussian of the FWHM ESPRESO estimated (experiments/espreso_peer.py) against "
             "the one told the true profile (gap-aware), beside sr3d's own estimate (PSNR, dB; mean over the seeds).",
             "", "| case | true profile | sr3d estimate | ESPRESO FWHM | seeds | sr3d estimated - gap-aware "
             "| ESPRESO - gap-aware |", "|---|---|---|---|---|---|---|"]
    for key in sorted(cases):
        entry, ours = about[key]
        seeds = sorted(cases[key])
        est = [cases[key][k][0] for k in seeds]
        peer = [cases[key][k][1] for k in seeds]
        mine = f"{ours['kind']} {ours['thickness_mm']:.3g} mm" if ours else "-"
        lines.append(f"| {key.replace('|', ', ')} | {entry['profile']} {entry['thickness_mm']:g} mm every "
                     f"{entry['spacing_mm'][0]:.3g} mm | {mine} | {entry['espreso']['thickness_mm']:.3g} mm | "
                     f"{', '.join(map(str, seeds))} | " + " / ".join(f"{v:+.2f}" for v in est)
                     + f" (mean {np.mean(est):+.2f}) | " + " / ".join(f"{v:+.2f}" for v in peer)
                     + f" (mean {np.mean(peer):+.2f}) |")
    return lines + [""]


def _posterior_report(out_dir: pathlib.Path) -> list[str]:
    """`--profile-estimate posterior` (method estimated_posterior) beside the best candidate (estimated):
    each network's PSNR minus the gap-aware one's per seed (out_dir and its seed*/ folders), their mean,
    and the mean over the cases that have every seed of both."""
    cases = {}                                        # case -> seed -> (estimated, posterior) - gap-aware
    for key, entry in _seed_entries(out_dir):
        s = entry["scores"]
        if all(m in s for m in ("estimated", "estimated_posterior", "gap_aware")):
            cases.setdefault(key, {})[entry.get("seed", 0)] = (
                s["estimated"]["psnr"] - s["gap_aware"]["psnr"], s["estimated_posterior"]["psnr"] - s["gap_aware"]["psnr"])
    if not cases:
        return []
    lines = ["## The estimate's posterior (--profile-estimate posterior)", "",
             "PSNR (dB) minus the gap-aware network's (told the true profile), per seed and mean: the best candidate "
             "(--slice-profile estimate) and the mixture of the true profiles of the estimator's 7 nearest errors on "
             "training-split scans (selfsup.estimate_posterior).", "",
             "| case | seeds | best - gap-aware | posterior - gap-aware |", "|---|---|---|---|"]
    means = []
    for key in sorted(cases):
        seeds = sorted(cases[key])
        pair = [[cases[key][k][i] for k in seeds] for i in (0, 1)]
        means.append([np.mean(v) for v in pair])
        lines.append(f"| {key.replace('|', ', ')} | {', '.join(map(str, seeds))} | "
                     + " | ".join(" / ".join(f"{v:+.2f}" for v in values) + f" (mean {np.mean(values):+.2f})"
                                  for values in pair) + " |")
    best, posterior = np.array(means).T
    lines.append(f"| mean over the {len(means)} cases | | {best.mean():+.2f} (worst {best.min():+.2f}) | "
                 f"{posterior.mean():+.2f} (worst {posterior.min():+.2f}) |")
    return lines + [""]


def _gaps_report(out_dir: pathlib.Path) -> list[str]:
    cases = _merged_gaps(out_dir)
    if not cases:
        return []
    first = next(iter(cases.values()))
    lines = ["## Slice gaps, simulated from real 1 mm scans (ground truth known)", "",
             "PSNR (dB) / SSIM against the 1 mm truth on its grid. Self-supervised networks: "
             f"{first['steps']} steps, seed {first.get('seed', 0)}.", "",
             "| scan | slices | Lanczos | cubic | supervised stage d | self-sup. no-gap | self-sup. gap-aware "
             "| self-sup. estimated (estimate) | estimated, per-axis match (estimate) | gap-aware - Lanczos "
             "| gap-aware - no-gap | estimated - gap-aware | self-sup. gap-aware from shipped d "
             "| from shipped d - Lanczos | self-sup. estimated mixture (candidates, weights) "
             "| mixture - gap-aware |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(scores, method):
        return f"{scores[method]['psnr']:.2f} / {scores[method]['ssim']:.4f}" if method in scores else "-"

    def estimate(runs, method):
        if method not in runs:
            return ""
        profile = runs[method]["slice_profile"]
        if "mixture" in profile:
            return " (" + ", ".join(f"{c['kind'][:3]} {c['thickness_mm']:.3g} mm {c['weight']:.0%}"
                                    for c in profile["mixture"]["candidates"]) + ")"
        return f" ({profile['kind']} {profile['thickness_mm']:.3g} mm)"

    def delta(scores, a, b):
        return f"{scores[a]['psnr'] - scores[b]['psnr']:+.2f}" if a in scores and b in scores else "-"

    for key in sorted(cases):
        e = cases[key]
        s, runs = e["scores"], e["runs"]
        supervised = cell(s, "supervised") if "supervised" in s else f"no shipped x{e['factor']}"
        lines.append(f"| {key.split('|')[0]} | {e['profile']} {e['thickness_mm']:g} mm every "
                     f"{e['spacing_mm'][0]:.3g} mm | {cell(s, 'lanczos')} | {cell(s, 'cubic')} | {supervised} | "
                     f"{cell(s, 'no_gap')} | {cell(s, 'gap_aware')} | {cell(s, 'estimated')}"
                     f"{estimate(runs, 'estimated')} | {cell(s, 'estimated_per_axis')}"
                     f"{estimate(runs, 'estimated_per_axis')} | {delta(s, 'gap_aware', 'lanczos')} | "
                     f"{delta(s, 'gap_aware', 'no_gap')} | {delta(s, 'estimated', 'gap_aware')} | "
                     f"{cell(s, 'gap_aware_shipped')} | {delta(s, 'gap_aware_shipped', 'lanczos')} | "
                     f"{cell(s, 'estimated_mixture')}{estimate(runs, 'estimated_mixture')} | "
                     f"{delta(s, 'estimated_mixture', 'gap_aware')} |")
    times = [r["train_seconds"] for e in cases.values() for r in e["runs"].values() if "train_seconds" in r]
    protocol = re.sub(r"the fixed window \[[^]]*\]", "the scan's own [min, max]",
                      next(iter(cases.values()))["protocol"])
    windows = sorted({(k.split("|")[0], tuple(e["data_range"])) for k, e in cases.items()})
    lines += ["", f"Training wall time per network: {min(times):.0f}-{max(times):.0f} s "
              f"({len(times)} networks, nice'd, sharing the 2 cores with other jobs). Scores: {protocol} Windows: "
              + "; ".join(f"{n} [{lo:g}, {hi:g}]" for n, (lo, hi) in windows) + ".", ""]
    return lines


def _bias_report(out_dir: pathlib.Path) -> list[str]:
    path = out_dir / "bias.json"
    if not path.exists():
        return []
    bias = json.loads(path.read_text())
    names = sorted(bias)
    lines = ["## Slice-profile estimate on slices simulated from real scans", "",
             f"Slices every {BIAS_SPACING_MM} mm along D; estimate per-axis match -> shape match (kind, mm).", "",
             "| simulated | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    cases = {(c["kind"], c["thickness_mm"]) for n in names for c in bias[n]["cases"]}
    for kind, width in sorted(cases):
        row = [f"{kind} {width:g} mm"]
        for n in names:
            c = next(c for c in bias[n]["cases"] if (c["kind"], c["thickness_mm"]) == (kind, width))
            row.append(" -> ".join(f"{c[m]['kind'][:3]} {c[m]['thickness_mm']:.2f}" for m in BIAS_MATCHES))
        lines.append("| " + " | ".join(row) + " |")
    for label, stat in (("mean error (mm)", np.mean), ("mean absolute error (mm)", lambda e: np.mean(np.abs(e))),
                        ("largest absolute error (mm)", lambda e: np.max(np.abs(e)))):
        row = [label]
        for n in names:
            row.append(" -> ".join(f"{stat([c[m]['error_mm'] for c in bias[n]['cases']]):+.2f}"
                                   for m in BIAS_MATCHES))
        lines.append("| " + " | ".join(row) + " |")
    row = ["kind right"]
    for n in names:
        row.append(" -> ".join(f"{sum(c[m]['kind'] == c['kind'] for c in bias[n]['cases'])}/{len(bias[n]['cases'])}"
                               for m in BIAS_MATCHES))
    lines += ["| " + " | ".join(row) + " |", "",
              "How alike the scans are along their axes: log10 power of the 1 mm lines along D / H / W "
              "(normalised units) at periods of " + ", ".join(f"{p:g}" for p in AXIS_POWER_PERIODS_MM) + " mm.", "",
              "| scan | " + " | ".join(f"{p:g} mm" for p in AXIS_POWER_PERIODS_MM) + " |",
              "|---|" + "---|" * len(AXIS_POWER_PERIODS_MM)]
    for n in names:
        power = bias[n].get("axis_power")
        if power:
            lines.append(f"| {n} | " + " | ".join(" / ".join(f"{power[a][f'{p:g}']:.2f}" for a in "DHW")
                                                  for p in AXIS_POWER_PERIODS_MM) + " |")
    return lines + [""]


def _figures_report(out_dir: pathlib.Path) -> list[str]:
    path = out_dir / "figures.json"
    if not path.exists():
        return []
    lines = ["## Real thick-slice scans before and after", "", "| scan | slices | profile used | steps | training s "
             "| inference s | figure |", "|---|---|---|---|---|---|---|"]
    for name, e in sorted(json.loads(path.read_text()).items()):
        t = e["training"]
        lines.append(f"| {name} | {e['shape'][0]} x {e['spacing_mm'][0]:.3g} mm | {t['slice_profile']['kind']} "
                     f"{t['slice_profile']['thickness_mm']:.3g} mm ({t['slice_profile']['source']}) | {t['steps']} | "
                     f"{t['wall_seconds']:.0f} | {e['infer_seconds']:.0f} | {e['figure']} |")
    return lines + [""]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out_dir = pathlib.Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _PART.value == "simulate":
        for name in _SCANS.value or list(SIMULATED_SCANS):
            for factor in (int(f) for f in _FACTORS.value):
                entry = run_simulated(name, factor, _BUDGET.value, out_dir)
                _update_json(out_dir / "simulated.json", f"{name}|x{factor}", entry)
    elif _PART.value == "supervised":
        path = out_dir / "simulated.json"
        for key, entry in json.loads(path.read_text()).items():
            if add_supervised(entry):
                _update_json(path, key, entry)
                _log(f"{key}: supervised {entry['scores']['supervised']}")
    elif _PART.value == "gaps":
        for name in _SCANS.value or list(GAP_SCANS):
            for config_name in _CONFIGS.value or list(GAP_CONFIGS):
                run_gaps(name, config_name, _METHODS.value or GAP_METHODS, _STEPS.value, out_dir / _GAPS_FILE.value,
                         _SEED.value)
    elif _PART.value == "export_gaps":
        for name in _SCANS.value or list(GAP_SCANS):
            for config_name in _CONFIGS.value or list(GAP_CONFIGS):
                _log(f"wrote {export_gaps(name, config_name, pathlib.Path(_NIFTI_DIR.value))}")
    elif _PART.value == "bias":
        for name in _SCANS.value or list(GAP_SCANS) + [ISOTROPIC_FIELD]:
            run_bias(name, out_dir / "bias.json")
    elif _PART.value == "figures":
        for name in _SCANS.value or list(FIGURE_SCANS):
            entry = run_figure(name, _STEPS.value, out_dir, pathlib.Path(_NIFTI_DIR.value))
            _update_json(out_dir / "figures.json", name, entry)
    elif _PART.value == "real":
        for name in _SCANS.value or list(REAL_SCANS):
            entry = run_real(name, _BUDGET.value, out_dir, pathlib.Path(_NIFTI_DIR.value))
            _update_json(out_dir / "real.json", name, entry)
    if _PART.value != "export_gaps":               # it adds no results
        print(f"wrote {write_report(out_dir)}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
