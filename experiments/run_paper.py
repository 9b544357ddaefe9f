"""Reproduces the paper's experiments on our real scans: Tables 1-6, figures and docs/results.md.

  python experiments/run_paper.py --budget full                  # what docs/results.md shows
  python experiments/run_paper.py --budget quick                 # smoke run, a few minutes
  python experiments/run_paper.py --budget full --only table2,table1

Parts (--only): table2 (ablation, 2D 2x, 7 trainings plus seed controls), table1 (patch size
and filters, 6 trainings, inference time per slice), main (Tables 3-6 and extra test scans: interpolation
baselines and the shipped CNN bundles, 2D and 3D, 2x and 4x, float and paper protocols).
The page (docs/results.md beside --out) is assembled from whatever tables exist.

Reruns resume: a finished training (its training.json matches the config) is skipped, an
interrupted one resumes from its checkpoint (sr3d.training), and an evaluation whose
inputs are unchanged (spec.json beside its results.json) is read back instead of rerun.
Trained runs go to --runs_dir (not committed); tables, figures and their JSON to --out.
The main tables need the shipped bundles sr3d/data_files/models/x{2,4}
(bash experiments/train_shipped.sh, or --train_shipped to run it first).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sr3d  # noqa: E402
from sr3d import evaluation, inference, models, training, upscaling  # noqa: E402
from sr3d import baselines, degrade, intensity, metrics, transforms  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import volume as sr3d_volume  # noqa: E402

PARTS = ("table2", "table1", "main")
SEED = 0
DISCUSSION = pathlib.Path(__file__).with_name("results_discussion.md")
# A 2x stage-hw model turns a 128 x 128 LR slice into a 256 x 256 one: the slice of Table 1's timing.
TIMING_LR_SIDE = 128
STUDYFORREST_FACTOR = 2  # 0.67 mm -> 1.33 mm: the closest integer factor to 1 mm


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each part trains and evaluates.

    steps_per_epoch None: sr3d.training's default, one pass over every LR voxel per epoch
    (batches of 128 patches; the patch count per epoch scales with 1 / patch area).
    table1_steps_7x7: steps of Table 1's single epoch for 7 x 7 patches; other patch sizes get
    as many steps as keep the LR pixels seen the same (None: one pass over every LR voxel).
    """

    name: str
    table2_epochs: int
    steps_per_epoch: int | None
    table1_steps_7x7: int | None
    validate: bool  # PSNR on the IXI test scans after every epoch (training curves; monitoring only)
    control_seeds: tuple[int, ...]  # Table 2: the full model again with these seeds (seed variance)
    datasets: tuple[str, ...]
    scales: tuple[int, ...]
    ensemble_datasets: tuple[str, ...]
    timing_repeats: int
    why: str


BUDGETS = {
    "quick": Budget("quick", table2_epochs=1, steps_per_epoch=2, table1_steps_7x7=2, validate=False, control_seeds=(),
                    datasets=("ixi",), scales=(2,), ensemble_datasets=(), timing_repeats=3,
                    why="smoke run: every code path, numbers meaningless"),
    "full": Budget("full", table2_epochs=6, steps_per_epoch=None, table1_steps_7x7=155, validate=True,
                   control_seeds=(1,),
                   datasets=("ixi", "studyforrest", "stroke_t1", "stroke_t2", "ct"), scales=(2, 4),
                   ensemble_datasets=("ixi",), timing_repeats=30,
                   why="fits ~60 min of a 2-core machine shared with other jobs (the shipped-model "
                       "training ran at the same time, so an epoch took 2-3x its idle time): Table 2 "
                       "gets 6 of the paper's 40 epochs, learning-rate drop halfway as in the paper; "
                       "Table 1 gets 155 steps of 7x7 patches (half an epoch, no drop; the same LR "
                       "pixels for other patch sizes) because its 128-filter row costs ~16x a "
                       "32-filter one"),
}

# Table 2 of the paper, top to bottom. "Variable sigma" unticked = the common fixed-sigma blur
# the paper set out to improve (its last ablation row), so the baseline CNN uses it too.
# Without the second block the intermediate output is the final one: no separate loss term.
ABLATION_ROWS = (
    ("baseline", "baseline CNN (all enhancements removed)",
     dict(second_block=False, intermediate_weight=0.0, short_skips=False, long_skip=False, blur="fixed")),
    ("espcn", "without second conv block (ESPCN-like)",
     dict(second_block=False, intermediate_weight=0.0, short_skips=True, long_skip=True, blur="random")),
    ("no_intermediate", "without intermediate loss",
     dict(second_block=True, intermediate_weight=0.0, short_skips=True, long_skip=True, blur="random")),
    ("no_short_skips", "without short skips",
     dict(second_block=True, intermediate_weight=1.0, short_skips=False, long_skip=True, blur="random")),
    ("no_long_skip", "without long skip",
     dict(second_block=True, intermediate_weight=1.0, short_skips=True, long_skip=False, blur="random")),
    ("fixed_sigma", "fixed sigma (0.5) instead of a random one",
     dict(second_block=True, intermediate_weight=1.0, short_skips=True, long_skip=True, blur="fixed")),
    ("full", "full model",
     dict(second_block=True, intermediate_weight=1.0, short_skips=True, long_skip=True, blur="random")),
)
# The paper's Table 2 on its CH data (SSIM, PSNR), for orientation only.
PAPER_TABLE2 = {"baseline": (0.9224, 35.58), "espcn": (0.9236, 35.94), "no_intermediate": (0.9256, 36.15),
                "no_short_skips": (0.9260, 36.17), "no_long_skip": (0.9234, 36.11),
                "fixed_sigma": (0.9236, 35.69), "full": (0.9270, 36.22)}
# Table 1: (patch size, filters) and the paper's (SSIM, PSNR, seconds per slice on a GPU).
PATCH_FILTER_ROWS = ((4, 32), (7, 32), (14, 32), (17, 32), (7, 64), (7, 128))
PAPER_TABLE1 = {(4, 32): (0.9165, 35.36, None), (7, 32): (0.9270, 36.22, 0.05),
                (14, 32): (0.8987, 33.83, None), (17, 32): (0.8934, 33.42, None),
                (7, 64): (0.9279, 36.28, 0.08), (7, 128): (0.9276, 36.28, 0.16)}
# Lanczos and CNN rows of the paper's Tables 3-6 (SSIM, PSNR, IFC) at 2x and 4x.
PAPER_MAIN = {
    "2d": {"CH (Table 3)": {"lanczos": {"x2": (0.9111, 35.08, 4.93), "x4": (0.8012, 30.57, 1.84)},
                            "cnn": {"x2": (0.9291, 36.39, 5.36), "x4": (0.8308, 31.59, 1.92)}},
           "NAMIC T1w (Table 5)": {"lanczos": {"x2": (0.9635, 37.03, 3.06), "x4": (0.8955, 32.71, 1.28)},
                                   "cnn": {"x2": (0.9775, 39.29, 3.56), "x4": (0.9193, 33.74, 1.29)}},
           "NAMIC T2w (Table 5)": {"lanczos": {"x2": (0.9788, 39.64, 3.22), "x4": (0.9143, 33.80, 1.37)},
                                   "cnn": {"x2": (0.9882, 42.20, 3.79), "x4": (0.9382, 34.86, 1.39)}}},
    "3d": {"CH (Table 4)": {"lanczos": {"x2": (0.8423, 27.85, 2.58), "x4": (0.7263, 25.06, 1.09)},
                            "cnn": {"x2": (0.8926, 33.04, 2.83), "x4": (0.7819, 29.36, 1.13)}},
           "NAMIC T1w (Table 6)": {"lanczos": {"x2": (0.9423, 35.72, 2.00), "x4": (0.8690, 31.81, 0.95)},
                                   "cnn": {"x2": (0.9687, 37.85, 2.38), "x4": (0.9050, 32.88, 0.99)}},
           "NAMIC T2w (Table 6)": {"lanczos": {"x2": (0.9615, 37.80, 2.29), "x4": (0.8829, 32.08, 1.03)},
                                   "cnn": {"x2": (0.9835, 40.57, 2.67), "x4": (0.9251, 33.54, 1.10)}}},
}
DATASET_LABELS = {
    "ixi": "IXI T1w, 2 mm (test scans 7-8)",
    "studyforrest": "studyforrest T1w, 1.33 mm",
    "stroke_t1": "stroke T1w, 1 mm",
    "stroke_t2": "stroke T2w, 1 mm",
    "ct": "CT, 3 mm (held-out lower 40 slices)",
}
METRICS = (("ssim", "SSIM", 4), ("psnr", "PSNR", 2), ("ifc", "IFC", 2))
PAPER_TABLE_NUMBERS = {"2d": "Tables 3 and 5", "3d": "Tables 4 and 6"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(evaluation.json_ready(payload), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rel(path: pathlib.Path, start: pathlib.Path) -> str:
    return os.path.relpath(path, start)


# ---------------------------------------------------------------------------- data

def ixi_split(shared: pathlib.Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(first 6 IXI scans for training, last 2 for testing), absolute paths."""
    files = sorted(str(p.resolve()) for p in (shared / "ixi-t1-2mm").glob("*.nii.gz"))
    if len(files) < 3:
        raise ValueError(f"{shared / 'ixi-t1-2mm'}: expected the IXI scans (6 train + 2 test), "
                         f"found {len(files)} files")
    return tuple(files[:-2]), tuple(files[-2:])


def studyforrest_scan(shared: pathlib.Path, data_dir: pathlib.Path) -> str:
    """The 0.67 mm studyforrest T1 DICOM series shrunk 2x (sr3d.degrade.downscale, the antialiased
    bicubic of the LR simulation) to 1.33 mm, written once as NIfTI."""
    out = data_dir / "studyforrest_t1_1.33mm.nii.gz"
    if out.exists():
        return str(out)
    volume = sr3d_io.load_volume(shared / "studyforrest-t1-dicom")
    factor = STUDYFORREST_FACTOR
    hr = degrade.crop_to_multiple(volume.array, factor)
    lr = np.clip(degrade.downscale(hr, factor, axes=(0, 1, 2)), 0, None)
    # LR voxel u covers HR voxels 2u, 2u + 1: its centre is HR index 2u + 0.5 (nibabel's
    # rescale_affine rounds the centres to whole voxels, hence the explicit map).
    index_map = np.diag([factor, factor, factor, 1.0])
    index_map[:3, 3] = (factor - 1) / 2.0
    affine = volume.affine @ index_map
    shrunk = sr3d_volume.Volume(array=lr.astype(np.float32), spacing=tuple(s * factor for s in volume.spacing),
                                affine=affine, modality=volume.modality, source_dtype="int16")
    data_dir.mkdir(parents=True, exist_ok=True)
    sr3d_io.save_volume(shrunk, out)
    log(f"wrote {out}: {lr.shape} voxels at {shrunk.spacing} mm")
    return str(out)


def ct_test_scan(shared: pathlib.Path, data_dir: pathlib.Path) -> str:
    """The lower 40 slices of the TotalSegmentator CT, the part the shipped models never saw
    (experiments/split_ct.py, as experiments/train_shipped.sh calls it)."""
    out = data_dir / "ct_test.nii.gz"
    if not out.exists():
        subprocess.run([sys.executable, str(REPO / "experiments" / "split_ct.py"),
                        str(shared / "totalseg-ct" / "example_ct.nii.gz"), str(data_dir)], check=True)
    return str(out)


def evaluation_sets(shared: pathlib.Path, data_dir: pathlib.Path, names: tuple[str, ...]) -> dict[str, dict]:
    """name -> {"label", "scans", "note"} for the main tables."""
    makers = {
        "ixi": lambda: (ixi_split(shared)[1], "last 2 of the 8 IXI scans; the shipped models trained "
                                              "on the first 6 (and on the rest of experiments/corpus.py's train split)"),
        "studyforrest": lambda: ((studyforrest_scan(shared, data_dir),),
                                 "7T 0.67 mm T1 DICOM series shrunk 2x with sr3d.degrade.downscale "
                                 "(antialiased bicubic) to 1.33 x 1.33 x 1.4 mm, 192 x 192 x 137; "
                                 "never seen in training"),
        "stroke_t1": lambda: ((str(shared / "stroke-t1-t2-flair" / "T1.nii.gz"),),
                              "1 mm T1 of a stroke patient, another site; never seen in training (ds002748 1 mm T1 x10, IXI 2 mm T1 x6, LIDC chest CT, TotalSegmentator CT upper slices: experiments/corpus.py)"),
        "stroke_t2": lambda: ((str(shared / "stroke-t1-t2-flair" / "T2.nii.gz"),),
                              "1 mm T2 of the same patient; no T2 scan was in training (ds002748 1 mm T1 x10, IXI 2 mm T1 x6, LIDC chest CT, TotalSegmentator CT upper slices: experiments/corpus.py)"),
        "ct": lambda: ((ct_test_scan(shared, data_dir),),
                       "lower 40 slices of the TotalSegmentator CT; the shipped models trained on its "
                       "upper 72 slices (same patient, other anatomy)"),
    }
    out = {}
    for name in names:
        scans, note = makers[name]()
        out[name] = {"label": DATASET_LABELS[name], "scans": list(scans), "note": note}
    return out


# ---------------------------------------------------------------------------- training

def _same_run(done: dict, config: training.TrainConfig) -> bool:
    new = json.loads(json.dumps(config.to_json()))
    return all(done.get(k) == v for k, v in new.items() if k not in training.RESUMABLE_CHANGES) \
        and done.get("epochs") == new["epochs"]


def train_or_skip(config: training.TrainConfig) -> dict:
    """Trains (or resumes) a run unless it finished with this config; returns its summary:
    training.json plus "wall_s" (training wall time summed over the sessions that ran it)."""
    model_dir = pathlib.Path(config.model_dir)
    summary_path, wall_path = model_dir / "training.json", model_dir / "run_paper_wall.json"
    done = json.loads(summary_path.read_text()) if summary_path.exists() else None
    wall = json.loads(wall_path.read_text())["wall_s"] if wall_path.exists() else 0.0
    if done is None or not _same_run(done["config"], config) or not (model_dir / "model.keras").exists():
        log(f"training {model_dir.name}: {config.epochs} epochs, patch {config.patch_size}, "
            f"{config.filters} filters")
        start = time.perf_counter()
        training.train(config)
        wall += time.perf_counter() - start
        _write_json(wall_path, {"wall_s": wall})
        done = json.loads(summary_path.read_text())
    else:
        log(f"training {model_dir.name}: finished before, skipped")
    done["wall_s"] = wall
    return done


def _stage_config(data, val_data, model_dir: pathlib.Path, epochs: int, steps: int | None, seed: int = SEED,
                  **changes):
    # The paper drops the learning rate halfway (training's default); a 1-epoch run keeps 1e-3.
    return training.TrainConfig(data=tuple(data), val_data=tuple(val_data), model_dir=str(model_dir),
                                stage="hw", scale=2, epochs=epochs, steps_per_epoch=steps,
                                lr_drop_epoch=None if epochs > 1 else 1, seed=seed, verbose=2, **changes)


def _load_hw_bundle(model_path: pathlib.Path) -> models.ModelBundle:
    """A 2x bundle of one trained stage-hw network. 2D evaluation never runs stage d, so its
    place is held by an untrained 1-filter stage-d network."""
    import keras

    from sr3d import layers  # noqa: F401  (registers the custom layers)

    model = keras.saving.load_model(model_path, compile=False)
    return models.ModelBundle(hw=model, d=models.build("d", 2, filters=1), scale=2,
                              info={"model": str(model_path), "d": "placeholder, unused in 2D"})


def _training_facts(summary: dict) -> dict:
    config = summary["config"]
    steps = summary["steps_per_epoch"]
    history = pathlib.Path(config["model_dir"]) / "history.csv"
    return {"epochs": config["epochs"], "steps_per_epoch": steps, "batch_size": config["batch_size"],
            "patches_per_epoch": summary["patches_per_epoch"],
            "patches_seen": summary["patches_per_epoch"] * config["epochs"],
            "lr_pixels_seen": summary["patches_per_epoch"] * config["epochs"] * config["patch_size"] ** 2,
            "parameters": summary["parameters"], "wall_s": round(summary["wall_s"], 1),
            "validation": summary.get("validation"), "run_dir": config["model_dir"],
            "history": str(history) if history.exists() else None}


# ---------------------------------------------------------------------------- evaluation

def _unchanged(directory: pathlib.Path, result_name: str, spec: dict) -> dict | None:
    """The saved result in `directory` if its spec.json equals `spec` (then it is not recomputed)."""
    spec_path, result_path = directory / "spec.json", directory / result_name
    if spec_path.exists() and result_path.exists() and json.loads(spec_path.read_text()) == spec:
        log(f"{directory.name}: unchanged, read back")
        return json.loads(result_path.read_text())
    return None


def _normalise_spec(spec: dict) -> dict:
    return json.loads(json.dumps(evaluation.json_ready(spec)))


def evaluate_or_load(name: str, config: evaluation.EvalConfig, spec: dict, out: pathlib.Path) -> dict:
    """evaluation.evaluate + write_report into out/eval/name, unless spec.json there matches
    (then the saved results.json is read back)."""
    directory = out / "eval" / name
    spec = _normalise_spec(spec)
    saved = _unchanged(directory, evaluation.RESULTS_JSON, spec)
    if saved is not None:
        return saved
    log(f"evaluation {name}: {len(config.scans)} scans, {config.mode}, scales {config.scales}")
    results = evaluation.evaluate(config, progress=lambda m: log(f"  {name}: {m}"))
    evaluation.write_report(results, directory)
    _write_json(directory / "spec.json", spec)
    return json.loads((directory / evaluation.RESULTS_JSON).read_text())


def compute_or_load(name: str, spec: dict, out: pathlib.Path, compute) -> dict:
    """compute() saved as out/eval/name/result.json, unless spec.json there matches."""
    directory = out / "eval" / name
    spec = _normalise_spec(spec)
    saved = _unchanged(directory, "result.json", spec)
    if saved is not None:
        return saved
    log(f"diagnostic {name}")
    _write_json(directory / "result.json", compute())
    _write_json(directory / "spec.json", spec)
    return json.loads((directory / "result.json").read_text())


def _scores(results: dict, method: str, key: str = "x2") -> dict:
    return {protocol: {m: by_scale[key][method][m] for m in ("ssim", "psnr", "ifc", "psnr_std")}
            for protocol, by_scale in results["summary"].items()}


def _fmt(value, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def _bold_best(texts: list[str]) -> list[str]:
    numbers = [float(t) for t in texts if t != "-"]
    best = max(numbers) if numbers else None
    return [f"**{t}**" if t != "-" and float(t) == best else t for t in texts]


# ---------------------------------------------------------------------------- Table 2

def run_table2(args, budget: Budget, out: pathlib.Path) -> dict:
    shared = pathlib.Path(args.shared_data)
    train_scans, test_scans = ixi_split(shared)
    rows = [(*r, SEED) for r in ABLATION_ROWS if r[0] in args.table2_rows]
    if "full" not in [r[0] for r in rows]:
        raise ValueError("--table2_rows must include 'full' (every row is tested against it)")
    full_switches = next(r[2] for r in ABLATION_ROWS if r[0] == "full")
    # Controls: the full model with other seeds shows how much the per-slice test calls
    # "significant" when nothing but the seed changes.
    rows += [(f"full_seed{seed}", f"full model, seed {seed} (control: only the seed differs)", full_switches,
              seed) for seed in budget.control_seeds]
    runs = pathlib.Path(args.runs_dir) / "table2"
    trained = {}
    for key, _, switches, seed in rows:
        config = _stage_config(train_scans, test_scans if budget.validate else (), runs / key,
                               budget.table2_epochs, budget.steps_per_epoch, seed=seed, **switches)
        trained[key] = train_or_skip(config)
    bundles = {row[0]: _load_hw_bundle(runs / row[0] / "model.keras") for row in rows}
    config = evaluation.EvalConfig(scans=test_scans, scales=(2,), mode="2d", methods=("bicubic", "lanczos"),
                                   cnn=bundles, with_ifc=False, out_dir=str(out / "eval" / "table2"),
                                   consistency=False)  # the paper's networks alone
    spec = {"part": "table2", "scans": test_scans, "runs": {k: s["config"] for k, s in trained.items()},
            "methods": config.methods, "with_ifc": False}
    results = evaluate_or_load("table2", config, spec, out)
    table_rows = []
    for key, label, switches, seed in rows:
        vs_full = None if key == "full" else evaluation.compare_methods(results, key, "full")
        per_scan = {p: [a["psnr"] - b["psnr"] for a, b in zip(by_scale["x2"][key], by_scale["x2"]["full"])]
                    for p, by_scale in results["per_scan"].items()}
        table_rows.append({
            "key": key, "label": label, "switches": switches, "seed": seed,
            "scores": _scores(results, key),
            "vs_full": None if vs_full is None else {p: v["x2"] for p, v in vs_full.items()},
            "psnr_minus_full_per_scan": None if key == "full" else per_scan,
            "training": _training_facts(trained[key]),
            "paper_ch": dict(zip(("ssim", "psnr"), PAPER_TABLE2[key])) if key in PAPER_TABLE2 else None,
        })
    payload = {
        "table": "Table 2 (ablation, 2D, 2x)",
        "budget": dataclasses.asdict(budget),
        "train_scans": train_scans, "test_scans": test_scans, "seed": SEED,
        "rows": table_rows,
        "reference_rows": {m: _scores(results, m) for m in ("bicubic", "lanczos")},
        "protocols": results["protocols"], "data_range": results["data_range"],
        "significance_test": {**evaluation.SIGNIFICANCE_TEST,
                              "test": "two-sided Wilcoxon signed-rank on per-slice PSNR, each ablated "
                                      "model vs the full model, slices of both test scans paired by "
                                      "(scan, slice); dagger = p < 0.001 and median difference < 0, "
                                      "double dagger = p < 0.001 and median difference > 0"},
        "eval_dir": "eval/table2",
    }
    _write_json(out / "table2_ablation.json", payload)
    _write_text(out / "table2_ablation.md", table2_markdown(payload))
    plot_training_curves({r["label"]: r["training"]["history"] for r in table_rows},
                         out / "figures" / "training_table2.png",
                         f"Table 2 runs (stage hw, 2x, IXI train 6): {budget.table2_epochs} epochs each")
    return payload


def _tick(value: bool) -> str:
    return "✓" if value else "×"


def _worse(test: dict | None) -> bool:
    return bool(test and test["significant"] and (test["median_psnr_difference_db"] or 0) < 0)


def _better(test: dict | None) -> bool:
    return bool(test and test["significant"] and (test["median_psnr_difference_db"] or 0) > 0)


def table2_markdown(payload: dict) -> str:
    protocols = list(payload["protocols"])
    header = ["Row", "Second block", "Intermediate loss", "Short skips", "Long skip", "Variable σ"]
    header += [f"{t} ({p})" for p in protocols for t in ("SSIM", "PSNR")]
    header += ["ΔPSNR vs full (float): median per slice (p); per scan", "paper SSIM", "paper PSNR"]
    body = []
    columns = {(p, m): _bold_best([_fmt(r["scores"][p][m], 4 if m == "ssim" else 2) for r in payload["rows"]])
               for p in protocols for m in ("ssim", "psnr")}
    for index, row in enumerate(payload["rows"]):
        s = row["switches"]
        cells = [row["label"], _tick(s["second_block"]), _tick(s["intermediate_weight"] > 0),
                 _tick(s["short_skips"]), _tick(s["long_skip"]), _tick(s["blur"] == "random")]
        for p in protocols:
            for m in ("ssim", "psnr"):
                text = columns[(p, m)][index]
                if m == "psnr" and row["vs_full"]:
                    text += " †" if _worse(row["vs_full"][p]) else " ‡" if _better(row["vs_full"][p]) else ""
                cells.append(text)
        float_test = (row["vs_full"] or {}).get(protocols[0])
        cells.append("-" if not float_test else
                     f"{float_test['median_psnr_difference_db']:+.3f} (p={float_test['p_value']:.1g}); "
                     + " / ".join(f"{d:+.2f}" for d in row["psnr_minus_full_per_scan"][protocols[0]]))
        paper = row["paper_ch"]
        cells += ["-", "-"] if paper is None else [f"{paper['ssim']:.4f}", f"{paper['psnr']:.2f}"]
        body.append(cells)
    for method, scores in payload["reference_rows"].items():
        cells = [f"{evaluation.method_label(method)} (reference)"] + [""] * 5
        cells += [_fmt(scores[p][m], 4 if m == "ssim" else 2) for p in protocols for m in ("ssim", "psnr")]
        body.append(cells + ["", "", ""])
    train = payload["rows"][0]["training"]
    names = ", ".join(pathlib.Path(s).name for s in payload["test_scans"])
    lines = [f"## {payload['table']}", "",
             f"Stage hw, 2x, trained on the first {len(payload['train_scans'])} IXI scans, each row with "
             f"the same budget and seed {payload['seed']}: {train['epochs']} epochs x "
             f"{train['steps_per_epoch']} steps x {train['batch_size']} patches "
             f"({train['patches_seen']:,} patches of 7 x 7 LR pixels). Tested on {names} (2D: H and W "
             f"shrunk 2x, every slice). Cells: mean over the 2 test scans; bold: best in the column.", ""]
    lines += _md_table(header, body)
    lines += ["", "† (‡) on PSNR: significantly worse (better) than the full model: two-sided Wilcoxon "
              "signed-rank test on per-slice PSNR (slices of both scans paired by (scan, slice)), "
              "p < 0.001, sign of the median difference. The paper used McNemar's test, which needs a "
              "yes/no outcome per item; PSNR is continuous and its per-slice differences are "
              "heavy-tailed, hence a paired rank test. It tests the two trained models as they are: "
              "slices of one scan are correlated and the variation between training runs (seeds) is "
              "not in it, so compare with the seed-control row before reading a † as an effect of "
              "the component.",
              "\"paper\" columns: the authors' numbers on their CH data (another data set: orientation "
              "only).", ""]
    for p in protocols:
        lines += [f"Protocol {p}: {payload['protocols'][p]}", ""]
    timing = ", ".join(f"{r['key']} {r['training']['wall_s']:.0f} s" for r in payload["rows"])
    lines += [f"Training wall time per row: {timing}.", ""]
    return "\n".join(lines)


def plot_training_curves(histories: dict[str, str | None], png: pathlib.Path, title: str) -> None:
    """Loss and validation PSNR (IXI test, network units) per epoch of several runs, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    lanczos = None
    for label, path in histories.items():
        if not path or not pathlib.Path(path).exists():
            continue
        rows = list(csv.DictReader(open(path)))
        if not rows:
            continue
        epochs = [int(r["epoch"]) + 1 for r in rows]
        axes[0].plot(epochs, [float(r["final_loss"]) for r in rows], "o-", ms=3, label=label)
        if rows[0].get("val_psnr"):
            axes[1].plot(epochs, [float(r["val_psnr"]) for r in rows], "o-", ms=3, label=label)
            lanczos = float(rows[-1]["val_psnr_lanczos"])
    if lanczos is not None:
        axes[1].axhline(lanczos, color="k", ls="--", label="Lanczos")
    axes[0].set(xlabel="epoch", ylabel="L1 of the final output (training, normalised units)")
    axes[1].set(xlabel="epoch", ylabel="PSNR on the IXI test scans (dB, peak 1)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- Table 1

def seconds_per_slice(model, repeats: int) -> dict:
    """Wall time of stage hw on one TIMING_LR_SIDE^2 LR slice (batch of 1, after warm-up): median
    and minimum over `repeats` runs (on a shared machine the minimum is the least disturbed)."""
    stage = upscaling._Stage(model, batch_size=1, ensemble=False, kind="hw")
    lr = np.random.default_rng(SEED).random((1, TIMING_LR_SIDE, TIMING_LR_SIDE), dtype=np.float32)
    for _ in range(2):
        stage(lr)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stage(lr)
        times.append(time.perf_counter() - start)
    return {"median": float(np.median(times)), "min": float(np.min(times))}


def timing_or_load(run_dir: pathlib.Path, model, repeats: int) -> dict:
    """seconds_per_slice, measured once per run and kept in the run directory (timings on a
    shared machine vary from run to run; delete timing.json to measure again)."""
    path = run_dir / "timing.json"
    if path.exists() and json.loads(path.read_text()).get("repeats") == repeats:
        return json.loads(path.read_text())["seconds_per_slice"]
    timing = seconds_per_slice(model, repeats)
    _write_json(path, {"repeats": repeats, "seconds_per_slice": timing,
                       "load_average": list(os.getloadavg()), "measured": time.strftime("%Y-%m-%d %H:%M")})
    return timing


def run_table1(args, budget: Budget, out: pathlib.Path) -> dict:
    shared = pathlib.Path(args.shared_data)
    train_scans, test_scans = ixi_split(shared)
    runs = pathlib.Path(args.runs_dir) / "table1"
    trained, bundles = {}, {}
    for patch, filters in PATCH_FILTER_ROWS:
        key = f"p{patch}_f{filters}"
        steps = (None if budget.table1_steps_7x7 is None
                 else max(1, round(budget.table1_steps_7x7 * 7 ** 2 / patch ** 2)))
        config = _stage_config(train_scans, test_scans if budget.validate else (), runs / key, 1, steps,
                               patch_size=patch, filters=filters)
        trained[key] = train_or_skip(config)
        bundles[key] = _load_hw_bundle(runs / key / "model.keras")
    config = evaluation.EvalConfig(scans=test_scans, scales=(2,), mode="2d", methods=("lanczos",),
                                   cnn=bundles, with_ifc=False, out_dir=str(out / "eval" / "table1"),
                                   consistency=False)
    spec = {"part": "table1", "scans": test_scans, "runs": {k: s["config"] for k, s in trained.items()},
            "with_ifc": False}
    results = evaluate_or_load("table1", config, spec, out)
    rows = []
    for patch, filters in PATCH_FILTER_ROWS:
        key = f"p{patch}_f{filters}"
        log(f"timing {key}")
        paper = PAPER_TABLE1[(patch, filters)]
        rows.append({"key": key, "patch_size": patch, "filters": filters,
                     "scores": _scores(results, key),
                     "vs_lanczos": {p: v["x2"][key] for p, v in results["significance"].items()},
                     "seconds_per_slice": timing_or_load(runs / key, bundles[key].hw, budget.timing_repeats),
                     "training": _training_facts(trained[key]),
                     "paper_ch": {"ssim": paper[0], "psnr": paper[1], "seconds_per_slice_gpu": paper[2]}})
    payload = {
        "table": "Table 1 (patch size and filters, 2D, 2x)",
        "budget": dataclasses.asdict(budget), "train_scans": train_scans, "test_scans": test_scans,
        "seed": SEED, "rows": rows, "reference_rows": {"lanczos": _scores(results, "lanczos")},
        "timing": {"what": f"stage hw on one {TIMING_LR_SIDE}x{TIMING_LR_SIDE} LR slice -> "
                           f"{2 * TIMING_LR_SIDE}x{2 * TIMING_LR_SIDE}, batch 1, median and minimum "
                           f"of {budget.timing_repeats} runs after 2 warm-up runs",
                   "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          "shared with other jobs"},
        "protocols": results["protocols"], "eval_dir": "eval/table1",
    }
    _write_json(out / "table1_patch_filters.json", payload)
    _write_text(out / "table1_patch_filters.md", table1_markdown(payload))
    return payload


def table1_markdown(payload: dict) -> str:
    protocols = list(payload["protocols"])
    header = ["Filters", "Input size"] + [f"{t} ({p})" for p in protocols for t in ("SSIM", "PSNR")]
    header += ["CPU s / slice: median (min)", "steps x epochs", "patches seen", "LR pixels seen", "train wall s",
               "paper SSIM", "paper PSNR", "paper GPU s"]
    columns = {(p, m): _bold_best([_fmt(r["scores"][p][m], 4 if m == "ssim" else 2) for r in payload["rows"]])
               for p in protocols for m in ("ssim", "psnr")}
    body = []
    for index, row in enumerate(payload["rows"]):
        t = row["training"]
        cells = [str(row["filters"]), f"{row['patch_size']}×{row['patch_size']}"]
        cells += [columns[(p, m)][index] for p in protocols for m in ("ssim", "psnr")]
        timing = row["seconds_per_slice"]
        cells += [f"{timing['median']:.3f} ({timing['min']:.3f})", f"{t['steps_per_epoch']} x {t['epochs']}",
                  f"{t['patches_seen']:,}", f"{t['lr_pixels_seen']:,}", f"{t['wall_s']:.0f}",
                  f"{row['paper_ch']['ssim']:.4f}", f"{row['paper_ch']['psnr']:.2f}",
                  _fmt(row["paper_ch"]["seconds_per_slice_gpu"], 2)]
        body.append(cells)
    lanczos = payload["reference_rows"]["lanczos"]
    body.append(["Lanczos (reference)", ""] + [_fmt(lanczos[p][m], 4 if m == "ssim" else 2)
                                               for p in protocols for m in ("ssim", "psnr")] + [""] * 8)
    seven = next(r["training"] for r in payload["rows"] if r["patch_size"] == 7)
    lines = [f"## {payload['table']}", "",
             f"Stage hw, 2x, first {len(payload['train_scans'])} IXI scans, seed {payload['seed']}, "
             f"reduced budget: one epoch of {seven['steps_per_epoch']} steps of 128 7x7 patches "
             "(no learning-rate drop). Kept constant across rows, as the paper's fixed number of "
             "epochs did: the LR pixels seen (steps x 128 x patch area), so the number of patches "
             "scales with 1 / patch area (the paper's 326,000 7x7 patches per epoch would be "
             "~55,000 17x17 ones) and the compute per row is about the same for equal filters. "
             "Tested on the 2 IXI test scans (2D, 2x); bold: best in the column.", ""]
    lines += _md_table(header, body)
    lines += ["", f"Time: {payload['timing']['what']}, on {payload['timing']['cpu']} (noisy); the "
              "paper timed a GPU (GeForce 940MX).", ""]
    for p in protocols:
        lines += [f"Protocol {p}: {payload['protocols'][p]}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- Tables 3-6

def _bundle_fingerprint(scale: int) -> dict:
    directory = models.shipped_model_dir(scale)
    info = json.loads((directory / models.BUNDLE_JSON).read_text())
    return {"bundle": info, "mtime": {f: (directory / f).stat().st_mtime for f in models.MODEL_FILES.values()}}


def run_main(args, budget: Budget, out: pathlib.Path) -> dict:
    if args.train_shipped:
        subprocess.run(["bash", str(REPO / "experiments" / "train_shipped.sh"), args.shipped_runs], check=True,
                       env={**os.environ, "SR3D_SHARED_DATA": str(args.shared_data)})
    scales = budget.scales
    missing = [s for s in scales if not (models.shipped_model_dir(s) / models.BUNDLE_JSON).exists()]
    if missing:
        raise ValueError(f"no shipped bundle for scales {missing} in {models.SHIPPED_DIR}: the main tables "
                         "need them; run bash experiments/train_shipped.sh (or add --train_shipped)")
    shared = pathlib.Path(args.shared_data)
    datasets = evaluation_sets(shared, pathlib.Path(args.runs_dir) / "data", budget.datasets)
    fingerprints = {f"x{s}": _bundle_fingerprint(s) for s in scales}
    payloads = {}
    for mode in degrade.MODES:
        tables = {}
        for name, dataset in datasets.items():
            config = evaluation.EvalConfig(scans=dataset["scans"], scales=scales, mode=mode,
                                           cnn={"cnn": None}, out_dir=str(out / "eval" / f"{name}_{mode}"),
                                           consistency=False)  # as docs/results.md was made
            spec = {"part": "main", "scans": dataset["scans"], "mode": mode, "scales": scales,
                    "shipped": fingerprints, "ensemble": False}
            results = evaluate_or_load(f"{name}_{mode}", config, spec, out)
            entry = {**dataset, "eval_dir": f"eval/{name}_{mode}", "results": _summary_only(results),
                     "slice_tests": slice_tests(results)}
            if name in budget.ensemble_datasets:
                config = dataclasses.replace(config, methods=("lanczos",), ensemble=True,
                                             out_dir=str(out / "eval" / f"{name}_{mode}_ensemble"))
                ensemble = evaluate_or_load(f"{name}_{mode}_ensemble", config, {**spec, "ensemble": True}, out)
                entry["ensemble"] = {"eval_dir": f"eval/{name}_{mode}_ensemble",
                                     "results": _summary_only(ensemble), "slice_tests": slice_tests(ensemble)}
            diagnostic = {"2d": ("ensemble_transforms", ensemble_transforms, budget.ensemble_datasets),
                          "3d": ("stage_attribution", stage_attribution, budget.datasets)}[mode]
            if name in diagnostic[2]:
                entry[diagnostic[0]] = compute_or_load(f"{name}_{diagnostic[0]}", {**spec, "diagnostic": diagnostic[0]},
                                                       out, lambda: diagnostic[1](entry, scales))
            tables[name] = entry
        payload = {"mode": mode, "scales": list(scales), "budget": dataclasses.asdict(budget),
                   "shipped_models": fingerprints, "shipped_training": shipped_training(args.shipped_runs),
                   "datasets": tables, "cnn_vs_lanczos": cnn_vs_lanczos(tables),
                   "paper": PAPER_MAIN[mode]}
        _write_json(out / f"tables_{mode}.json", payload)
        _write_text(out / f"tables_{mode}.md", main_markdown(payload))
        payloads[mode] = payload
    copy_shipped_curves(args.shipped_runs, out / "figures")
    return payloads


def _protocols_for(entry: dict) -> dict:
    lo, hi = entry["results"]["data_range"]
    return {"float": metrics.float_protocol((lo, hi), with_ifc=False),
            "paper": metrics.paper_protocol(with_ifc=False)}


def _score(hr: np.ndarray, test: np.ndarray, protocols: dict) -> dict:
    return {name: {k: v for k, v in metrics.score_volume(hr, test, protocol).items() if k in ("psnr", "ssim")}
            for name, protocol in protocols.items()}


def _mean_over_scans(per_scan: list[dict]) -> dict:
    return {p: {m: float(np.mean([s[p][m] for s in per_scan])) for m in ("psnr", "ssim")}
            for p in per_scan[0]}


def ensemble_transforms(entry: dict, scales: tuple[int, ...]) -> dict:
    """2D: the shipped stage hw on each of the 8 flips/rotations of the self-ensemble alone, and
    their median (the ensemble) and mean: does any transform score like the untransformed input?"""
    protocols = _protocols_for(entry)
    out = {}
    for scale in scales:
        stage = upscaling._Stage(models.load_models(None, scale).hw, 8, False, "hw")
        per_scan = {name: [] for name in [f"transform {k}" for k in range(8)] + ["median (ensemble)", "mean"]}
        for path in entry["scans"]:
            volume = sr3d_io.load_volume(path)
            hr, lr = degrade.simulate_lr(volume.array, scale, "2d")
            window = intensity.window(lr)
            x = window.normalise(lr)
            outs = [window.denormalise(transforms.dihedral_inverse(stage(np.ascontiguousarray(
                transforms.dihedral(x, k))), k)) for k in range(8)]
            lo, hi = float(volume.array.min()), float(volume.array.max())
            for k, image in enumerate(outs):
                per_scan[f"transform {k}"].append(_score(hr, np.clip(image, lo, hi), protocols))
            per_scan["median (ensemble)"].append(_score(hr, np.clip(np.median(outs, axis=0), lo, hi), protocols))
            per_scan["mean"].append(_score(hr, np.clip(np.mean(outs, axis=0), lo, hi), protocols))
        out[f"x{scale}"] = {name: _mean_over_scans(v) for name, v in per_scan.items()}
    return {"what": "transform k: rot90 k % 4 times, W flipped if k >= 4 (0 = the input as it is); "
                    "scores as the tables (mean over scans), no IFC", "scores": out}


def stage_attribution(entry: dict, scales: tuple[int, ...]) -> dict:
    """3D: each combination of CNN or Lanczos for the in-plane (hw) and the depth (d) step,
    to see which stage gains or loses against Lanczos. All outputs clipped to the scan's range
    (as the CNN's are), so the Lanczos+Lanczos row can differ slightly from the tables'."""
    protocols = _protocols_for(entry)
    out = {}
    for scale in scales:
        bundle = models.load_models(None, scale)
        steps = {
            "hw": {"cnn": lambda x: inference.upscale_normalised(x, bundle, mode="2d"),
                   "lanczos": lambda x: baselines.upscale_axes(x, scale, "lanczos", axes=(1, 2))},
            "d": {"cnn": lambda x: inference.upscale_depth_normalised(x, bundle.d),
                  "lanczos": lambda x: baselines.upscale_axes(x, scale, "lanczos", axes=(0,))},
        }
        per_scan = {}
        for path in entry["scans"]:
            volume = sr3d_io.load_volume(path)
            hr, lr = degrade.simulate_lr(volume.array, scale, "3d")
            window = intensity.window(lr)
            x = window.normalise(lr)
            lo, hi = float(volume.array.min()), float(volume.array.max())
            for hw_method, hw_step in steps["hw"].items():
                in_plane = hw_step(x)
                for d_method, d_step in steps["d"].items():
                    image = np.clip(window.denormalise(d_step(in_plane)), lo, hi)
                    per_scan.setdefault(f"hw {hw_method} + d {d_method}", []).append(_score(hr, image, protocols))
        out[f"x{scale}"] = {name: _mean_over_scans(v) for name, v in per_scan.items()}
    return {"what": "3D LR as in the tables; in-plane step then depth step, each by the shipped CNN "
                    "stage or by Lanczos; mean over scans, no IFC", "scores": out}


def slice_tests(results: dict) -> dict:
    """CNN vs Lanczos per slice for every metric: [metric][protocol]["x{r}"] -> Wilcoxon test."""
    return {metric: evaluation.compare_methods(results, "cnn", "lanczos", metric) for metric, _, _ in METRICS}


def _summary_only(results: dict) -> dict:
    """What the tables need from an evaluation (its per-slice values stay in its own results.json)."""
    keep = ("scans", "scales", "methods", "method_labels", "data_range", "data_range_source", "protocols",
            "summary", "significance", "figures", "timing_s")
    return {k: results[k] for k in keep}


def shipped_training(shipped_runs: str) -> dict:
    """Budget of the shipped models from their runs' training.json, where the runs are at hand."""
    facts = {}
    for scale in (2, 4):
        for stage in ("hw", "d"):
            path = pathlib.Path(shipped_runs) / f"{stage}_x{scale}" / "training.json"
            if path.exists():
                summary = json.loads(path.read_text())
                config = summary["config"]
                facts[f"{stage}_x{scale}"] = {
                    "epochs": config["epochs"], "steps_per_epoch": summary["steps_per_epoch"],
                    "patches_seen": summary["patches_per_epoch"] * config["epochs"],
                    "data": [pathlib.Path(p).name for p in config["data"]],
                    "validation": summary.get("validation")}
    return facts


def copy_shipped_curves(shipped_runs: str, figures: pathlib.Path) -> None:
    for scale in (2, 4):
        for stage in ("hw", "d"):
            source = pathlib.Path(shipped_runs) / f"{stage}_x{scale}" / "training_curve.png"
            if source.exists():
                figures.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, figures / f"shipped_{stage}_x{scale}.png")


def _rows(entry: dict) -> list[tuple[str, str, dict, dict]]:
    """(method, label, summary, significance) of every row of one data set, ensemble row last."""
    results = entry["results"]
    rows = [(m, results["method_labels"][m], results["summary"], results["significance"])
            for m in results["methods"]]
    if "ensemble" in entry:
        ens = entry["ensemble"]["results"]
        rows.append(("cnn", ens["method_labels"]["cnn"], ens["summary"], ens["significance"]))
    return rows


def cnn_vs_lanczos(tables: dict) -> list[dict]:
    """Every (data set, protocol, scale, metric) cell: CNN minus Lanczos, and whether CNN wins."""
    cells = []
    for name, entry in tables.items():
        for label, part in [("CNN", entry)] + ([("CNN + self-ensemble", entry["ensemble"])]
                                                if "ensemble" in entry else []):
            for protocol, by_scale in part["results"]["summary"].items():
                for key, methods in by_scale.items():
                    for metric, _, _ in METRICS:
                        cnn, lanczos = methods["cnn"][metric], methods["lanczos"][metric]
                        if cnn is None or lanczos is None:
                            continue
                        test = part["slice_tests"][metric][protocol][key]
                        cells.append({"dataset": name, "row": label, "protocol": protocol, "scale": key,
                                      "metric": metric, "cnn": cnn, "lanczos": lanczos,
                                      "difference": cnn - lanczos, "cnn_wins": cnn > lanczos,
                                      "slice_median_difference": test["median_difference"],
                                      "slice_wilcoxon_p": test["p_value"], "slice_pairs": test["n_pairs"]})
    return cells


def _paper_shaped(entries: list[tuple[str, dict]], protocol: str, scales: list[int]) -> list[str]:
    """Rows = methods; columns = for each data set and scale SSIM, PSNR, IFC (the paper's Table 5)."""
    header = ["Method"]
    for label, _ in entries:
        header += [f"{label} {s}× {title}" if len(entries) > 1 else f"{s}× {title}"
                   for s in scales for _, title, _ in METRICS]
    methods = [(m, lab) for m, lab, _, _ in _rows(entries[0][1])]
    columns = []
    for _, entry in entries:
        rows = _rows(entry)
        for s in scales:
            key = f"x{s}"
            for metric, _, decimals in METRICS:
                texts = _bold_best([_fmt(summary[protocol][key][m][metric], decimals) for m, _, summary, _ in rows])
                if metric == "psnr":
                    texts = [t + (" †" if m != "lanczos" and sig[protocol][key][m]["significant"] else "")
                             for t, (m, _, _, sig) in zip(texts, rows)]
                columns.append(texts)
    body = [[label] + [column[i] for column in columns] for i, (_, label) in enumerate(methods)]
    return _md_table(header, body)


def main_markdown(payload: dict) -> str:
    mode = payload["mode"]
    scales = payload["scales"]
    datasets = payload["datasets"]
    title = "2D" if mode == "2d" else "3D"
    ensemble = (", self-ensemble row: 8 (hw) / 4 (d) transforms, median"
                if any("ensemble" in e for e in datasets.values()) else "")
    what = ("H and W of every slice shrunk by r, D kept" if mode == "2d" else "D, H and W shrunk by r")
    lines = [f"## {title} super-resolution ({PAPER_TABLE_NUMBERS[mode]} of the paper)", "",
             f"LR simulated from each HR scan ({what}; MATLAB-style antialiased bicubic), brought back "
             "by each method, scored against the HR. CNN: the shipped two-stage bundles "
             f"(sr3d/data_files/models/x{{2,4}}){ensemble}. "
             "Bold: best in the column. † on PSNR: per-slice PSNR differs from Lanczos at p < 0.001 "
             "(two-sided Wilcoxon signed-rank, paired by (scan, slice)).", ""]
    groups = [("IXI test scans (the paper's CH table: train and test from one data set)", ["ixi"]),
              ("stroke T1w and T2w (the paper's NAMIC table; models trained on other scans)",
               ["stroke_t1", "stroke_t2"]),
              ("studyforrest (extra high-resolution test scan)", ["studyforrest"]),
              ("CT (extra column)", ["ct"])]
    for protocol in ("float", "paper"):
        lines += [f"### {title}, {protocol} protocol", ""]
        for heading, names in groups:
            entries = [(datasets[n]["label"], datasets[n]) for n in names if n in datasets]
            if not entries:
                continue
            lines += [f"**{heading}**", ""] + _paper_shaped(entries, protocol, scales) + [""]
        first = next(iter(datasets.values()))
        lines += [f"Protocol (as worded for {first['label']}; each data set's float window is listed under "
                  f"Data sets below): {first['results']['protocols'][protocol]}", ""]
    lines += [f"### CNN minus Lanczos, every cell ({title})", ""]
    header = ["Data set", "Row", "Protocol"] + [f"{s}× Δ{t}" for s in scales for _, t, _ in METRICS] + \
        [f"{s}× median Δ per slice (dB), p" for s in scales]
    body = []
    cells = payload["cnn_vs_lanczos"]
    keys = []
    for c in cells:
        if (c["dataset"], c["row"], c["protocol"]) not in keys:
            keys.append((c["dataset"], c["row"], c["protocol"]))
    for dataset, row, protocol in keys:
        mine = {(c["scale"], c["metric"]): c for c in cells
                if (c["dataset"], c["row"], c["protocol"]) == (dataset, row, protocol)}
        texts = [DATASET_LABELS[dataset], row, protocol]
        for s in scales:
            for metric, _, decimals in METRICS:
                c = mine.get((f"x{s}", metric))
                texts.append("-" if c is None else
                             f"{c['difference']:+.{decimals}f}" + ("" if c["cnn_wins"] else " ✗"))
        for s in scales:
            c = mine.get((f"x{s}", "psnr"))
            texts.append("-" if c is None else f"{c['slice_median_difference']:+.2f}, "
                                               f"p={c['slice_wilcoxon_p']:.1g}")
        body.append(texts)
    wins = sum(c["cnn_wins"] for c in cells)
    lines += _md_table(header, body)
    lines += ["", f"✗: the CNN does not beat Lanczos in that cell. The CNN wins {wins} of {len(cells)} "
              f"cells ({title}).", ""]
    lines += diagnostics_markdown(payload)
    lines += ["### Data sets", ""]
    for name, entry in datasets.items():
        scans = ", ".join(pathlib.Path(s).name for s in entry["scans"])
        lo, hi = entry["results"]["data_range"]
        lines += [f"- {entry['label']}: {scans}. {entry['note']}. Float window [{lo:g}, {hi:g}] "
                  f"({entry['results']['data_range_source']}). Evaluation time "
                  f"{entry['results']['timing_s']['total']:.0f} s; details: `{entry['eval_dir']}/`."]
    lines += [""]
    paper = payload["paper"]
    header = ["Paper data set", "Row"] + [f"{s}× {t}" for s in (2, 4) for _, t, _ in METRICS]
    body = [[name, evaluation.method_label(m)] + [f"{v:.{d}f}" for s in ("x2", "x4")
                                                 for v, (_, _, d) in zip(rows[m][s], METRICS)]
            for name, rows in paper.items() for m in ("lanczos", "cnn")]
    lines += [f"The paper's Lanczos and CNN rows ({PAPER_TABLE_NUMBERS[mode]}, their 8-bit protocol, "
              "with self-ensemble), for orientation:", ""] + _md_table(header, body) + [""]
    return "\n".join(lines)


def diagnostics_markdown(payload: dict) -> list[str]:
    """The self-ensemble (2D) or stage-attribution (3D) diagnostics as tables."""
    key = "ensemble_transforms" if payload["mode"] == "2d" else "stage_attribution"
    entries = [(name, entry[key]) for name, entry in payload["datasets"].items() if key in entry]
    if not entries:
        return []
    scales = [f"x{s}" for s in payload["scales"]]
    header = ["Data set", "Variant"] + [f"{k[1:]}× {m} ({p})" for k in scales
                                        for p, m in (("float", "PSNR"), ("float", "SSIM"), ("paper", "PSNR"))]
    body = []
    for name, result in entries:
        for variant in result["scores"][scales[0]]:
            cells = [DATASET_LABELS[name], variant]
            for k in scales:
                scores = result["scores"][k][variant]
                cells += [f"{scores['float']['psnr']:.2f}", f"{scores['float']['ssim']:.4f}",
                          f"{scores['paper']['psnr']:.2f}"]
            body.append(cells)
    if key == "ensemble_transforms":
        title = ("### Self-ensemble, transform by transform (2D)", "Stage hw of the shipped models on each "
                 "flip/rotation of the LR alone, then the median of the 8 (the self-ensemble) and their mean. "
                 + entries[0][1]["what"] + ".")
    else:
        title = ("### Which stage gains or loses (3D)", "Every combination of the shipped CNN stage or "
                 "Lanczos for the in-plane step (hw) and the depth step (d). " + entries[0][1]["what"] + ".")
    return [title[0], "", title[1], ""] + _md_table(header, body) + [""]


# ---------------------------------------------------------------------------- page

def write_page(out: pathlib.Path, page: pathlib.Path, run_info: dict) -> None:
    """docs/results.md from the tables in `out` and the hand-written discussion."""
    rel = _rel(out, page.parent)
    parts = ("table2_ablation.md", "table1_patch_filters.md", "tables_2d.md", "tables_3d.md")
    lines = ["# Reproducing the paper's experiments on our scans", "",
             "Georgescu, Ionescu and Verga, *CNNs with intermediate loss for 3D super-resolution of CT "
             "and MRI scans*, IEEE Access 2020, re-run with sr3d on the real scans in ../shared/data. "
             "Every number below comes from the runs of `experiments/run_paper.py` (JSON beside each "
             f"table in `{rel}/`). Paper numbers are quoted only for comparison, labelled as such.", "",
             "## How to regenerate", "",
             "From the repository root, everything from scratch (the shipped models with "
             "experiments/train_shipped.sh, then Tables 2, 1 and 3-6 and every figure; each step "
             "resumes, or is skipped when its inputs are unchanged):", "",
             "```",
             "python experiments/run_paper.py --budget full --train_shipped --shipped_runs runs/shipped",
             "```", "",
             "Without `--train_shipped` the main tables use the bundles in sr3d/data_files/models as "
             "they are; `--shipped_runs` only says where their training runs (curves, budgets) are. "
             f"This page was last written by `python {run_info.get('command', '?')}`. Parts alone: "
             "`--only table2`, `--only table1`, `--only main`; a smoke run of every code path: "
             "`--budget quick` (writes to runs/paper/quick/results, not here). Trained runs go to "
             "runs/paper/full (not committed).", ""]
    lines += summary_section(out)
    lines += budget_section(run_info, out)
    discussion = DISCUSSION.read_text(encoding="utf-8") if DISCUSSION.exists() else ""
    if discussion:
        lines += [discussion.strip(), ""]
    for name in parts:
        path = out / name
        if path.exists():
            text = path.read_text(encoding="utf-8")
            lines += [text.replace("](eval/", f"]({rel}/eval/").strip(), ""]
    lines += thick_slice_section(page.parent)
    lines += figures_section(out, rel)
    _write_text(page, "\n".join(lines) + "\n")


def thick_slice_section(docs: pathlib.Path) -> list[str]:
    """The self-supervised thick-slice rows (experiments/thick_slice.py writes them)."""
    path = docs / "thick_slice" / "results.md"
    if not path.exists():
        return []
    body = path.read_text(encoding="utf-8").split("\n", 1)[1].replace("\n## ", "\n### ")
    return ["## Thick-slice scans: self-supervised stage d (beyond the paper)", "",
            "Made by `python experiments/thick_slice.py` (see docs/thick_slice.md for the method, "
            "the commands and the figures).", body.strip(), ""]


def summary_section(out: pathlib.Path) -> list[str]:
    """Headline numbers computed from the table JSON (so the page never quotes stale values)."""
    lines = ["## Summary (computed from the tables below)", ""]
    for mode in degrade.MODES:
        path = out / f"tables_{mode}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        cells = [c for c in payload["cnn_vs_lanczos"] if c["row"] == "CNN"]
        losses = [c for c in cells if not c["cnn_wins"]]
        lines.append(f"- {mode.upper()}: the shipped CNN beats Lanczos in {len(cells) - len(losses)} of "
                     f"{len(cells)} cells (data set x protocol x scale x SSIM/PSNR/IFC)"
                     + (f"; it loses in: {', '.join(_cell_name(c) for c in losses)}." if losses else "."))
        ensemble_cells = [c for c in payload["cnn_vs_lanczos"] if c["row"] != "CNN"]
        if ensemble_cells:
            lines.append(f"  - with self-ensemble it beats Lanczos in {sum(c['cnn_wins'] for c in ensemble_cells)} "
                         f"of {len(ensemble_cells)} cells.")
        for protocol in ("float", "paper"):
            margins = []
            for scale in payload["scales"]:
                per_set = [f"{DATASET_LABELS[c['dataset']].split(',')[0]} {c['difference']:+.2f}"
                           for c in cells if c["metric"] == "psnr" and c["protocol"] == protocol
                           and c["scale"] == f"x{scale}"]
                margins.append(f"{scale}x: " + ", ".join(per_set))
            lines.append(f"  - PSNR margin over Lanczos, {protocol} protocol (dB): " + "; ".join(margins) + ".")
        ensemble = [c for c in payload["cnn_vs_lanczos"] if c["row"] != "CNN" and c["metric"] == "psnr"]
        if ensemble:
            lines.append("  - PSNR margin with self-ensemble: " + ", ".join(
                f"{DATASET_LABELS[c['dataset']].split(',')[0]} {c['scale'][1:]}x {c['protocol']} "
                f"{c['difference']:+.2f} dB" for c in ensemble) + ".")
    path = out / "table2_ablation.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
        full = next(r for r in rows if r["key"] == "full")
        for protocol in ("float", "paper"):
            ranked = sorted(rows, key=lambda r: -r["scores"][protocol]["psnr"])
            lines.append(f"- Table 2 ({protocol}): PSNR ranking " + " > ".join(
                f"{r['key']} {r['scores'][protocol]['psnr']:.2f}" for r in ranked) + "; rows significantly "
                "worse than the full model: " + (", ".join(r["key"] for r in rows if r["vs_full"]
                                                          and _worse(r["vs_full"][protocol])) or "none")
                + f" (full model {full['scores'][protocol]['psnr']:.2f} dB).")
    path = out / "table1_patch_filters.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
        best = max(rows, key=lambda r: r["scores"]["float"]["psnr"])
        lines.append(f"- Table 1: best float PSNR with {best['patch_size']}x{best['patch_size']} patches and "
                     f"{best['filters']} filters ({best['scores']['float']['psnr']:.2f} dB); CPU time per "
                     "slice (median) " + ", ".join(f"{r['filters']} filters {r['seconds_per_slice']['median']:.3f} s"
                                          for r in rows if r["patch_size"] == 7) + ".")
    return lines + [""]


def _cell_name(cell: dict) -> str:
    return (f"{DATASET_LABELS[cell['dataset']].split(',')[0]} {cell['scale'][1:]}x {cell['protocol']} "
            f"{cell['metric'].upper()} ({cell['difference']:+.4g}; per slice: median "
            f"{cell['slice_median_difference']:+.3g}, Wilcoxon p = {cell['slice_wilcoxon_p']:.2g}, "
            f"{cell['slice_pairs']} slices)")


def budget_section(run_info: dict, out: pathlib.Path) -> list[str]:
    lines = ["## Budgets", ""]
    rows = []
    for name, label in (("table2_ablation.json", "Table 2"), ("table1_patch_filters.json", "Table 1")):
        path = out / name
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        for row in payload["rows"]:
            t = row["training"]
            rows.append([label, row["key"], str(t["epochs"]), str(t["steps_per_epoch"]), str(t["batch_size"]),
                         f"{t['patches_seen']:,}", f"{t['lr_pixels_seen']:,}", f"{t['wall_s']:.0f}"])
    main = out / "tables_2d.json"
    if main.exists():
        for key, t in json.loads(main.read_text()).get("shipped_training", {}).items():
            rows.append(["shipped", key, str(t["epochs"]), str(t["steps_per_epoch"]), "128",
                         f"{t['patches_seen']:,}", "", ""])
    if rows:
        lines += _md_table(["Table", "Run", "Epochs", "Steps / epoch", "Batch", "Patches seen",
                            "LR pixels seen", "Wall s"], rows)
        lines += ["", "Wall s: training wall time, summed over the sessions that completed (time of a "
                  "session killed mid-run is not counted), on 2 cores shared with other jobs.", ""]
    training_s = sum(float(r[-1]) for r in rows if r[-1])
    evaluation_s = sum(json.loads(p.read_text())["timing_s"]["total"]
                       for p in (out / "eval").glob(f"*/{evaluation.RESULTS_JSON}")) if (out / "eval").exists() else 0
    lines.append(f"Wall time summed from the saved runs: {training_s / 60:.0f} min of training (Tables 1 and 2) "
                 f"and {evaluation_s / 60:.0f} min of evaluation (all tables), besides the shipped models' "
                 "training and the small diagnostics.")
    lines.append("")
    for part, info in run_info.get("parts", {}).items():
        lines.append(f"- last session of `{part}`: budget {info['budget']}, {info['finished']}, "
                     f"{info['wall_s'] / 60:.1f} min (work already done is read back, not redone; "
                     f"load average {info['load_average']} on {info['cpus']} cores at its start).")
    budget = BUDGETS[next(iter(run_info.get("parts", {}).values()), {}).get("budget", "full")]
    lines += ["", f"Why this budget ({budget.name}): {budget.why}. The paper trained 40 epochs. Training is "
              "deterministic (seeded batches, TensorFlow op determinism), so a rerun gives the same "
              "weights on the same software.", ""]
    return lines


def figures_section(out: pathlib.Path, rel: str) -> list[str]:
    lines = ["## Figures", ""]
    figures = out / "figures"
    for name, caption in (("training_table2.png", "Training curves of the Table 2 runs (validation: "
                                                  "the IXI test scans, monitored only, no model selection)"),
                          ("shipped_hw_x2.png", "Shipped 2x model, stage hw"),
                          ("shipped_d_x2.png", "Shipped 2x model, stage d"),
                          ("shipped_hw_x4.png", "Shipped 4x model, stage hw"),
                          ("shipped_d_x4.png", "Shipped 4x model, stage d")):
        if (figures / name).exists():
            lines += [f"{caption}:", "", f"![{caption}]({rel}/figures/{name})", ""]
    shown = (("ixi_2d", 2), ("ixi_2d", 4), ("stroke_t2_2d", 2), ("ct_3d", 2), ("studyforrest_3d", 4),
             ("table2", 2))
    for name, scale in shown:
        png = out / "eval" / name / f"comparison_x{scale}.png"
        if png.exists():
            lines += [f"Comparison ({name}, {scale}x): middle slice of the last test scan, HR, Lanczos and "
                      "CNN with a zoomed inset where the error is largest, and the absolute error maps:", "",
                      f"![{name} {scale}x]({rel}/eval/{name}/comparison_x{scale}.png)", ""]
    others = sorted(p.relative_to(out) for p in (out / "eval").glob("*/comparison_x*.png")) \
        if (out / "eval").exists() else []
    if others:
        lines += ["All comparison figures: " + ", ".join(f"[{p}]({rel}/{p})" for p in others) + ".", ""]
    return lines


# ---------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts among {PARTS}")
    parser.add_argument("--out", default=None, help="tables, figures and JSON (default: docs/results for "
                                                    "the full budget, runs/paper/quick/results for quick); "
                                                    "the page is written beside it as OUT.md")
    parser.add_argument("--runs_dir", default=None, help="trained runs (default runs/paper/BUDGET)")
    parser.add_argument("--shared_data", default=os.environ.get("SR3D_SHARED_DATA",
                                                                str(REPO.parent / "shared" / "data")))
    parser.add_argument("--shipped_runs", default=str(REPO / "runs" / "shipped"),
                        help="runs of experiments/train_shipped.sh: training curves and budgets of the "
                             "shipped models are taken from there when present")
    parser.add_argument("--train_shipped", action="store_true",
                        help="run experiments/train_shipped.sh SHIPPED_RUNS before the main tables")
    parser.add_argument("--table2_rows", default=",".join(r[0] for r in ABLATION_ROWS),
                        help="Table 2 rows to run (tests use fewer); must include full")
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--only takes parts among {PARTS}, got {args.only!r}")
    args.parts = parts
    args.table2_rows = tuple(r for r in args.table2_rows.split(",") if r)
    bad_rows = [r for r in args.table2_rows if r not in [row[0] for row in ABLATION_ROWS]]
    if bad_rows:
        parser.error(f"--table2_rows: unknown rows {bad_rows}; rows are {[r[0] for r in ABLATION_ROWS]}")
    args.out = pathlib.Path(args.out or (REPO / ("docs/results" if args.budget == "full"
                                                 else "runs/paper/quick/results"))).resolve()
    args.runs_dir = str(pathlib.Path(args.runs_dir or REPO / "runs" / "paper" / args.budget).resolve())
    args.shared_data = str(pathlib.Path(args.shared_data).resolve())
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "run_info.json"
    run_info = json.loads(info_path.read_text()) if info_path.exists() else {"parts": {}}
    runners = {"table2": run_table2, "table1": run_table1, "main": run_main}
    for part in PARTS:
        if part not in args.parts:
            continue
        log(f"part {part}, budget {budget.name}")
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        start = time.perf_counter()
        runners[part](args, budget, out)
        run_info["parts"][part] = {"budget": budget.name, "wall_s": round(time.perf_counter() - start, 1),
                                   "finished": time.strftime("%Y-%m-%d %H:%M"), "load_average": load,
                                   "cpus": os.cpu_count()}
        run_info.update({"sr3d_version": sr3d.__version__, "command": " ".join(sys.argv),
                         "python": platform.python_version()})
        _write_json(info_path, run_info)
    write_page(out, out.parent / f"{out.name}.md", run_info)
    log(f"wrote {out.parent / f'{out.name}.md'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"run_paper.py: error: {error}")
