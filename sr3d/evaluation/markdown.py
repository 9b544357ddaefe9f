"""An `evaluate` result as Markdown: one table per protocol in the layout of the paper's Tables 3
and 4, with the significance against Lanczos."""
from __future__ import annotations

import pathlib

from sr3d.evaluation.stats import ALPHA, REFERENCE_METHOD

_MODE_TITLES = {"2d": "2D super-resolution", "3d": "3D super-resolution"}
_MODE_TEXT = {"2d": "H and W of every slice downscaled by r (D kept)",
              "3d": "D, H and W downscaled by r"}
# Column order and decimals of the paper's tables.
_COLUMNS = (("ssim", "SSIM", 4), ("psnr", "PSNR", 2), ("ifc", "IFC", 2))
_SIGNIFICANT = "†"


def _format(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _table(results: dict, protocol: str) -> list[str]:
    """Rows = methods, columns = SSIM, PSNR, IFC for each scale; best per column in bold."""
    with_ifc = results["config"]["with_ifc"]
    columns = [c for c in _COLUMNS if with_ifc or c[0] != "ifc"]
    summary = results["summary"][protocol]
    significance = results["significance"].get(protocol, {})
    keys = [f"x{s}" for s in results["scales"]]
    header = ["Method"] + [f"{key[1:]}× {title}" for key in keys for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" + "---:|" * (len(header) - 1)]
    cells = {m: [] for m in results["methods"]}
    for key in keys:
        for metric, _, decimals in columns:
            texts = {m: _format(summary[key][m][metric], decimals) for m in results["methods"]}
            numbers = [float(t) for t in texts.values() if t != "-"]
            best = max(numbers) if numbers else None
            for method, text in texts.items():
                if text != "-" and float(text) == best:
                    text = f"**{text}**"
                if metric == "psnr" and significance.get(key, {}).get(method, {}).get("significant"):
                    text += f" {_SIGNIFICANT}"
                cells[method].append(text)
    for method in results["methods"]:
        lines.append("| " + " | ".join([results["method_labels"][method]] + cells[method]) + " |")
    return lines


def _significance_table(results: dict, protocol: str) -> list[str]:
    significance = results["significance"].get(protocol)
    if not significance:
        return []
    keys = [f"x{s}" for s in results["scales"]]
    header = ["Method"] + [f"{key[1:]}× {t}" for key in keys for t in ("median ΔPSNR (dB)", "p")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for method in results["methods"]:
        if method == REFERENCE_METHOD:
            continue
        row = [results["method_labels"][method]]
        for key in keys:
            test = significance[key][method]
            median = test["median_psnr_difference_db"]
            row += ["-" if median is None else f"{median:+.2f}",
                    "-" if test["p_value"] is None else f"{test['p_value']:.2g}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def format_markdown(results: dict) -> str:
    """The report as Markdown: one table per protocol in the layout of the paper's Tables 3 and 4."""
    mode = results["mode"]
    config = results["config"]
    names = [pathlib.Path(s).name for s in results["scans"]]
    lo, hi = results["data_range"]
    crop = (f"{config['crop_border']} px shaved off each side of H and W" if config["crop_border"]
            else "no border crop")
    ensemble = " CNN rows with self-ensemble." if config["ensemble"] and config["cnn"] else ""
    lines = [f"# {_MODE_TITLES[mode]}", "",
             f"sr3d {results['sr3d_version']}. LR simulated from each HR scan (mode {mode}: "
             f"{_MODE_TEXT[mode]}, MATLAB imresize bicubic, antialiased) and brought back to the HR "
             f"grid by each method.{ensemble} Each cell: mean over the {len(names)} scans of the "
             "per-volume score; bold: best value in the column.", ""]
    for protocol, description in results["protocols"].items():
        lines += [f"## {_MODE_TITLES[mode]}, {protocol} protocol", ""]
        lines += _table(results, protocol)
        lines += ["",
                  f"Protocol: {description}",
                  "",
                  f"Scans ({len(names)}): {', '.join(names)}. Mode: {mode} ({_MODE_TEXT[mode]}). "
                  f"Crop: {crop}."
                  + (f" Float window: [{lo:g}, {hi:g}] ({results['data_range_source']})."
                     if protocol == "float" else ""),
                  ""]
        significance = _significance_table(results, protocol)
        if significance:
            lines += [f"{_SIGNIFICANT}: per-slice PSNR differs from Lanczos at p < {ALPHA:g} "
                      "(two-sided Wilcoxon signed-rank test, slices of all scans paired by "
                      "(scan, slice)). Median per-slice PSNR difference to Lanczos and p-value:", ""]
            lines += significance + [""]
    if results["significance"]:
        lines += ["Why Wilcoxon: " + results["significance_test"]["why"] + ".", ""]
    for key, figure in results["figures"].items():
        lines += [f"Figure {figure['file']}: {pathlib.Path(figure['scan']).name}, slice "
                  f"{figure['slice_index']} along D, x{key[1:]}.", ""]
    lines += [f"Time: {results['timing_s']['total']:.1f} s.", ""]
    return "\n".join(lines)
