"""`write_report`: an `evaluate` result as results.json, results.md and one figure per scale."""
from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from sr3d import files as sr3d_files
from sr3d.evaluation.figures import draw_figure
from sr3d.evaluation.markdown import format_markdown

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def json_ready(value):
    """Non-finite floats as None (strict JSON has no Infinity), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Writes results.json, results.md and comparison_x{r}.png (one per scale) into `out_dir`.

    Every file is written under a temporary name and renamed, so a reader never sees a
    partial file. Returns {"json", "markdown", "figure_x{r}"...} -> path.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD}
    for key, slices in results.get("figure_slices", {}).items():
        info = results["figures"][key]
        title = (f"{pathlib.Path(info['scan']).name}, slice {info['slice_index']} (D), x{key[1:]} "
                 f"{results['mode']}; PSNR: {info['psnr_protocol']} protocol")
        paths[f"figure_{key}"] = out / info["file"]
        with sr3d_files.atomic_path(paths[f"figure_{key}"]) as temporary:
            draw_figure(temporary, slices, info, results["method_labels"], title)
    serialisable = json_ready({k: v for k, v in results.items() if k != "figure_slices"})
    text = json.dumps(serialisable, indent=1, allow_nan=False)
    sr3d_files.write_text(paths["json"], text + "\n")
    markdown = format_markdown(results)
    sr3d_files.write_text(paths["markdown"], markdown)
    return paths
