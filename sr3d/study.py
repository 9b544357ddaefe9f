"""Reader study (the paper's Table 7): a blinded two-alternative choice in a static web page.

`make_study` samples slices along axis 0 (D) of test scans, reconstructs them
with two methods after a simulated 3D downscaling, and writes a directory:

    DIR/index.html, study.js, study.css   the page (no network, no external resources)
    DIR/images/case_017_a.png             left image of case 17
    DIR/images/case_017_ref.png           ground truth of case 17
    DIR/images/case_017_b.png             right image of case 17
    DIR/key.json                          which method is left and right: NOT for readers

The page never loads key.json and no name in it says which method made an
image; left and right are randomised per case (balanced: each method is on
the left in half of the cases). Readers send back `answers_<reader>.json`;
`tally` maps their left/right answers through the key to methods, counts
them per reader and overall, and tests each count against chance with a
two-sided exact binomial test.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import cv2
import numpy as np

from sr3d import baselines, degrade, intensity, planes
from sr3d import files as sr3d_files
from sr3d import io as sr3d_io
from sr3d import volume as sr3d_volume
from sr3d.progress import Progress, Step

CNN = "cnn"
METHODS = (CNN,) + tuple(baselines.METHODS)
SIDES = ("left", "right")
KEY_FILE = "key.json"
KEY_FORMAT = "sr3d-study-key/1"
PAGE_FILES = ("study.js", "study.css")
IMAGES_DIR = "images"
TALLY_MD = "tally.md"
TALLY_JSON = "tally.json"
_PAGE_TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent / "data_files" / "study"
# A slice counts as informative when at least this fraction of its pixels is
# brighter than 10% of the way from the volume's low to its high percentile.
MIN_FOREGROUND = 0.1
_FOREGROUND_LEVEL = 0.1
# Display window of a case: these percentiles of its ground-truth slice, for all three images.
_DISPLAY_PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """How one study is made; stored in key.json.

    scans: NIfTI/NRRD/DICOM paths (the held-out test scans).
    methods: the two methods compared, e.g. ("cnn", "lanczos"); the first is
      the one whose share `tally` tests.
    n: number of cases (slices) shown to every reader.
    model_dir: model bundle for "cnn" (None: the shipped model for `scale`).
    """

    scans: tuple[str, ...]
    methods: tuple[str, str] = (CNN, "lanczos")
    scale: int = 2
    n: int = 100
    seed: int = 0
    model_dir: str | None = None

    def __post_init__(self):
        scans = tuple(os.fspath(s) for s in self.scans)
        if not scans:
            raise ValueError("a study needs at least one scan, got none")
        methods = tuple(self.methods)
        if len(methods) != 2 or methods[0] == methods[1]:
            raise ValueError(f"a study compares exactly two different methods, got {methods}")
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {self.scale!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (number of cases) must be a positive integer, got {self.n!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "scans", scans)
        object.__setattr__(self, "methods", methods)
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", os.fspath(self.model_dir))


# ---------------------------------------------------------------------------- making a study

def informative_slices(hr: np.ndarray, min_foreground: float = MIN_FOREGROUND) -> np.ndarray:
    """Indices along axis 0 of a (D, H, W) volume whose slices are not nearly empty background."""
    window = intensity.window(hr)
    level = window.lo + _FOREGROUND_LEVEL * (window.hi - window.lo)
    foreground = np.mean(np.asarray(hr) > level, axis=(1, 2))
    return np.flatnonzero(foreground >= min_foreground)


def reconstruct(volume: sr3d_volume.Volume, scale: int, methods: Sequence[str],
                bundle=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulates the 3D LR scan and upscales it back with each method.

    Returns (hr, {method: sr}): hr is the ground truth cropped to multiples of
    `scale`, float32 (D, H, W) in scanner units; every sr has hr's shape.
    bundle: `sr3d.models.ModelBundle`, needed only for "cnn".
    """
    hr, lr = degrade.simulate_lr(volume.array, scale, "3d")
    results = {}
    for method in methods:
        if method == CNN:
            from sr3d import inference

            if bundle is None:
                raise ValueError("method 'cnn' needs a model bundle (sr3d.models.load_models)")
            lr_volume = sr3d_volume.Volume(lr, tuple(s * scale for s in volume.spacing),
                                           sr3d_volume.downscaled_affine(volume.affine, scale))
            results[method] = inference.upscale_volume(lr_volume, bundle).array
        else:
            results[method] = baselines.upscale(lr, scale, method, "3d")
    return hr, results


def to_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Maps scanner units [lo, hi] linearly to 0..255 (clipped, rounded)."""
    span = hi - lo if hi > lo else 1.0
    scaled = (np.asarray(image, np.float64) - lo) / span * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def render_case(truth: np.ndarray, left: np.ndarray, right: np.ndarray,
                flip_rows: bool = False) -> dict[str, np.ndarray]:
    """The three uint8 (H, W) images of a case: "a" (left), "ref" (ground truth), "b" (right).

    All three share one window, the 0.5th-99.5th percentile of the ground-truth slice.
    """
    lo, hi = (float(v) for v in np.percentile(truth, _DISPLAY_PERCENTILES))
    images = {"a": left, "ref": truth, "b": right}
    return {suffix: to_uint8(image[::-1] if flip_rows else image, lo, hi) for suffix, image in images.items()}


def _write_png(path: pathlib.Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise ValueError(f"{path}: could not write PNG")


def _case_ids(n: int) -> list[str]:
    width = max(3, len(str(n - 1)))
    return [f"case_{i:0{width}d}" for i in range(n)]


def _sides(n: int, rng: np.random.Generator) -> np.ndarray:
    """True where the first method goes left: half of the cases (n odd: one more at random), shuffled."""
    first_left = np.zeros(n, bool)
    first_left[:n // 2 + int(n % 2 == 1 and rng.random() < 0.5)] = True
    return rng.permutation(first_left)


def _sample_cases(config: StudyConfig, progress: Progress | None) -> list[tuple[int, int]]:
    """Draws (scan index, slice index) pairs without replacement among informative slices."""
    pool = []
    for index, scan in enumerate(config.scans):
        hr = degrade.crop_to_multiple(sr3d_io.load_volume(scan).array, config.scale)
        slices = informative_slices(hr)
        if len(slices) == 0:
            raise ValueError(f"{scan}: no informative slice (every slice is nearly empty background)")
        pool.extend((index, int(s)) for s in slices)
        if progress is not None:
            progress(Step("scans read", index + 1, len(config.scans)))
    if config.n > len(pool):
        raise ValueError(f"asked for {config.n} cases but the scans hold only {len(pool)} informative "
                         f"slices: lower --n or add scans")
    rng = np.random.default_rng(config.seed)
    picks = rng.choice(len(pool), size=config.n, replace=False)
    return [pool[i] for i in picks]


def _render_page(study_id: str, cases: list[dict]) -> str:
    data = json.dumps({"study_id": study_id, "cases": cases}, indent=1)
    template = (_PAGE_TEMPLATE_DIR / "index.html").read_text(encoding="utf-8")
    # "</" would end the <script> element holding the data early.
    return template.replace("{{STUDY_DATA}}", data.replace("</", "<\\/"))


def make_study(config: StudyConfig, out_dir: str | os.PathLike,
               progress: Progress | None = None) -> pathlib.Path:
    """Writes a study directory (page, images, key.json) for `config`; returns its path.

    out_dir must not exist or be empty; it is assembled under a temporary name
    and renamed, so a failure leaves nothing behind. The same config (seed)
    and scans give byte-identical files.
    """
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty directory; a study directory "
                         "holds its key, so choose a new --out")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise ValueError(f"{out}: parent directory {parent} does not exist")

    cases = _sample_cases(config, progress)
    rng = np.random.default_rng([config.seed, 1])  # a stream of its own: sides do not shift the sampling
    first_left = _sides(config.n, rng)
    bundle = None
    if CNN in config.methods:
        from sr3d import models as sr3d_models

        bundle = sr3d_models.load_models(config.model_dir, config.scale)

    ids = _case_ids(config.n)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        (work / IMAGES_DIR).mkdir()
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
        page_cases, key_cases, sizes = [], {}, {}
        scans_used = sorted({scan for scan, _ in cases})
        for done, scan_index in enumerate(scans_used):
            volume = sr3d_io.load_volume(config.scans[scan_index])
            hr, results = reconstruct(volume, config.scale, config.methods, bundle)
            flip = planes.rows_point_up(volume.affine, 1)
            for case_index, (scan, slice_index) in enumerate(cases):
                if scan != scan_index:
                    continue
                left, right = config.methods if first_left[case_index] else config.methods[::-1]
                case_id = ids[case_index]
                sizes[case_id] = hr.shape[1:]
                images = render_case(hr[slice_index], results[left][slice_index],
                                     results[right][slice_index], flip)
                for suffix, pixels in images.items():
                    _write_png(work / IMAGES_DIR / f"{case_id}_{suffix}.png", pixels)
                key_cases[case_id] = {"left": left, "right": right, "scan": config.scans[scan],
                                      "slice": slice_index}
            if progress is not None:
                progress(Step("scans reconstructed", done + 1, len(scans_used)))
        for case_id in ids:
            for suffix in ("a", "ref", "b"):
                digest.update((work / IMAGES_DIR / f"{case_id}_{suffix}.png").read_bytes())
            height, width = sizes[case_id]
            page_cases.append({"id": case_id, "width": width, "height": height,
                               **{side: f"{IMAGES_DIR}/{case_id}_{suffix}.png"
                                  for side, suffix in (("left", "a"), ("ref", "ref"), ("right", "b"))}})
        study_id = digest.hexdigest()[:16]
        (work / "index.html").write_text(_render_page(study_id, page_cases), encoding="utf-8")
        for name in PAGE_FILES:
            shutil.copyfile(_PAGE_TEMPLATE_DIR / name, work / name)
        key = {"format": KEY_FORMAT, "study_id": study_id, **dataclasses.asdict(config),
               "cases": {case_id: key_cases[case_id] for case_id in ids}}
        (work / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
        os.chmod(work, 0o755)
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------- tallying answers

def load_key(path: str | os.PathLike) -> dict:
    """Reads and checks a study's key.json."""
    path = pathlib.Path(path)
    key = _read_json(path, "key")
    if key.get("format") != KEY_FORMAT:
        raise ValueError(f"{path}: not an sr3d study key (format {key.get('format')!r}, "
                         f"expected {KEY_FORMAT!r}); pass the key.json written by `sr3d study make`")
    methods = key.get("methods")
    cases = key.get("cases")
    if not (isinstance(key.get("study_id"), str) and isinstance(key.get("scale"), int)
            and isinstance(methods, list) and len(methods) == 2 and isinstance(cases, dict) and cases
            and all(isinstance(c, dict) and sorted((c.get("left"), c.get("right"))) == sorted(methods)
                    for c in cases.values())):
        raise ValueError(f"{path}: damaged study key: methods or cases are missing or inconsistent")
    return key


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: {what} file is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} file must hold a JSON object, got {type(data).__name__}")
    return data


def read_answers(path: str | os.PathLike, key: dict) -> dict:
    """Reads one reader's answers file and checks it is complete and belongs to `key`'s study.

    Returns {"reader": str, "file": str, "answers": {case_id: "left" | "right"}}.
    """
    path = pathlib.Path(path)
    data = _read_json(path, "answers")
    if data.get("study_id") != key["study_id"]:
        raise ValueError(f"{path}: answers are for study {data.get('study_id')!r}, not for study "
                         f"{key['study_id']!r} of the key")
    reader = data.get("reader")
    if not isinstance(reader, str) or not reader.strip():
        raise ValueError(f"{path}: no reader name in the answers file")
    answers = data.get("answers")
    if not isinstance(answers, dict):
        raise ValueError(f"{path}: 'answers' must map case ids to 'left' or 'right', got {answers!r}")
    unknown = sorted(set(answers) - set(key["cases"]))
    if unknown:
        raise ValueError(f"{path}: answers for cases not in the study: {', '.join(unknown[:5])}")
    bad = sorted(case for case, side in answers.items() if side not in SIDES)
    if bad:
        raise ValueError(f"{path}: answers must be 'left' or 'right', got {answers[bad[0]]!r} for {bad[0]}")
    missing = [case for case in key["cases"] if case not in answers]
    if missing:
        raise ValueError(f"{path}: incomplete: {len(missing)} of {len(key['cases'])} cases unanswered "
                         f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                         "the reader must finish the study and save again")
    return {"reader": reader.strip(), "file": str(path), "answers": answers}


def binomial_p_value(successes: int, trials: int) -> float:
    """Two-sided exact binomial test of `successes` out of `trials` against chance (p = 0.5)."""
    from scipy import stats

    return float(stats.binomtest(successes, trials, 0.5, alternative="two-sided").pvalue)


def _row(name: str, first: int, total: int, methods: Sequence[str]) -> dict:
    counts = {methods[0]: first, methods[1]: total - first}
    return {"reader": name, "counts": counts, "total": total,
            "percent": {m: 100.0 * c / total for m, c in counts.items()},
            "p_value": binomial_p_value(first, total)}


def tally(answer_paths: Sequence[str | os.PathLike], key_path: str | os.PathLike) -> dict:
    """Counts per reader and overall how often each method was judged closer to the ground truth.

    Each answers file must belong to the key's study, be complete, and come from
    a reader not seen in an earlier file (names compared case-insensitively).
    Returns a JSON-ready dict: study_id, scale, methods, n_cases, readers
    (one row each: reader, file, counts, total, percent, p_value) and overall
    (all answers pooled). p_value: two-sided exact binomial test against 0.5.
    """
    key = load_key(key_path)
    methods = key["methods"]
    if not answer_paths:
        raise ValueError("no answers files given")
    rows, seen = [], {}
    for path in answer_paths:
        sheet = read_answers(path, key)
        name = sheet["reader"].casefold()
        if name in seen:
            raise ValueError(f"{path}: reader {sheet['reader']!r} already answered in {seen[name]}; "
                             "each reader counts once")
        seen[name] = str(path)
        first = sum(key["cases"][case][side] == methods[0] for case, side in sheet["answers"].items())
        rows.append({**_row(sheet["reader"], first, len(key["cases"]), methods), "file": str(path)})
    overall = _row("Overall", sum(r["counts"][methods[0]] for r in rows),
                   sum(r["total"] for r in rows), methods)
    return {"study_id": key["study_id"], "scale": key["scale"], "methods": methods,
            "n_cases": len(key["cases"]), "readers": rows, "overall": overall}


def _format_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def tally_markdown(result: dict) -> str:
    """The tally as a Markdown table in the layout of the paper's Table 7, plus a percentage row."""
    a, b = result["methods"]
    scale = result["scale"]
    lines = [f"Reader study at {scale}x: which reconstruction is closer to the ground truth "
             f"({result['n_cases']} cases per reader, study {result['study_id']}).",
             "",
             f"| Reader | {scale}x {a} | {scale}x {b} | p (two-sided binomial) |",
             "|---|---:|---:|---:|"]
    for row in result["readers"]:
        lines.append(f"| {row['reader']} | {row['counts'][a]} ({row['percent'][a]:.2f}%) | "
                     f"{row['counts'][b]} ({row['percent'][b]:.2f}%) | {_format_p(row['p_value'])} |")
    overall = result["overall"]
    lines.append(f"| Overall | {overall['counts'][a]} | {overall['counts'][b]} | "
                 f"{_format_p(overall['p_value'])} |")
    lines.append(f"| Overall in % | {overall['percent'][a]:.2f}% | {overall['percent'][b]:.2f}% | |")
    return "\n".join(lines) + "\n"


def write_tally(result: dict, out_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes tally.md and tally.json into out_dir (each atomically); returns their paths."""
    out = pathlib.Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"{out}: output directory does not exist")
    md, js = out / TALLY_MD, out / TALLY_JSON
    stamped = {**result, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    sr3d_files.write_text(md, tally_markdown(result))
    sr3d_files.write_text(js, json.dumps(stamped, indent=2) + "\n")
    return md, js

