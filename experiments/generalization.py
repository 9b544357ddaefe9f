"""Held-out scores of a model per domain (CNN vs Lanczos) and how well the self-check predicts them.

  python experiments/generalization.py --model sr3d/data_files/models --out docs/generalization
      [--corpus runs/corpus/corpus.json] [--modes 3d,2d] [--scales 2,4] [--part all|eval|selfcheck|report]

--model: a directory with one bundle per scale (x2/, x4/). The test scans are those of the
corpus's "test" split (experiments/corpus.py), grouped by domain. For each domain and mode it
runs `sr3d.evaluation.evaluate` (float protocol, no IFC), the same as

  python evaluate.py --data=<the domain's test scans> --scale=2,4 --mode=3d --cnn=<model>
      --methods=lanczos --protocol=float --no_ifc --out=<out>/<domain>_<mode>

and writes that report under OUT/<domain>_<mode>/. Then, for every scan, scale and mode, it
runs the self-check (`sr3d.selfcheck`) on the simulated LR input, as `sr3d upscale` would on
it, both noise-matched and naive, and compares its margin with the real one (CNN minus
Lanczos PSNR on the HR). OUT/summary.md and .json hold the per-domain table and the
self-check accuracy (sign agreement, Pearson r). Every part is resumable: finished
reports and self-checks are kept.
"""
import argparse
import functools
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sr3d import degrade, evaluation, inference, models, selfcheck  # noqa: E402
from sr3d import files as sr3d_files  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402
from sr3d import progress as sr3d_progress  # noqa: E402

DOMAIN_ORDER = ("T1 1 mm (ds002748)", "T1 1 mm (other sites)", "T1 0.7 mm", "T1 2 mm", "T2 1 mm", "FLAIR 1 mm", "chest CT 1 mm",
                "abdominal CT 3 mm")


def test_groups(corpus: pathlib.Path) -> dict[str, list[dict]]:
    scans = [r for r in json.loads(corpus.read_text())["scans"] if r["split"] == "test"]
    groups = {}
    for record in scans:
        groups.setdefault(record["domain"], []).append(record)
    return {d: groups[d] for d in DOMAIN_ORDER if d in groups}


def slug(domain: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in domain).strip("_")


def run_eval(model: str, groups, out: pathlib.Path, modes, scales, planes: str = "dw", ensemble: bool = False,
             consistency: bool = True) -> None:
    for scale in scales:
        for domain, records in groups.items():
            for mode in modes:
                _eval_one(model, domain, records, out, mode, scale, planes if mode == "3d" else "dw", ensemble,
                          consistency)


def report_dir(out: pathlib.Path, domain: str, mode: str, scale: int) -> pathlib.Path:
    return out / f"{slug(domain)}_{mode}_x{scale}"


def _eval_one(model: str, domain: str, records, out: pathlib.Path, mode: str, scale: int,
              planes: str = "dw", ensemble: bool = False, consistency: bool = True) -> None:
    where = report_dir(out, domain, mode, scale)
    if (where / "results.json").exists():
        return
    print(f"evaluating {domain} {mode} x{scale} ({len(records)} scans)", flush=True)
    config = evaluation.EvalConfig(scans=tuple(r["path"] for r in records), scales=(scale,),
                                   mode=mode, methods=("lanczos",), cnn={"cnn": model},
                                   protocols=("float",), with_ifc=False, out_dir=str(where), planes=planes,
                                   ensemble=ensemble, consistency=consistency)
    results = evaluation.evaluate(config, progress=sr3d_progress.print_line)
    evaluation.write_report(results, where)


def run_selfcheck(model: str, groups, out: pathlib.Path, modes, scales, consistency: bool = True) -> None:
    path = out / "selfcheck.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for scale in scales:
        bundle = models.load_models(pathlib.Path(model) / f"x{scale}", scale)
        for domain, records in groups.items():
            for record in records:
                volume = sr3d_io.load_volume(record["path"])
                for mode in modes:
                    key = f"{record['name']}|x{scale}|{mode}"
                    if key in done:
                        continue
                    _, lr = degrade.simulate_lr(volume.array, scale, mode)
                    run = functools.partial(inference.upscale_normalised, models=bundle, mode=mode,
                                            consistency=consistency)
                    entry = {"domain": domain, "scan": record["name"], "scale": scale, "mode": mode}
                    for variant in selfcheck.NOISE_MODELS:
                        check = selfcheck.self_check(lr, run, scale, mode, noise=variant)
                        entry[variant] = None if check is None else check.to_json()
                    done[key] = entry
                    sr3d_files.write_json(path, done)
                    print(f"self-check {key}: " + ", ".join(
                        f"{v} {entry[v]['margin_db']:+.2f} dB" if entry[v] else f"{v} too small"
                        for v in selfcheck.NOISE_MODELS), flush=True)


def real_margins(out: pathlib.Path, groups, modes) -> dict:
    """(scan|xr|mode) -> real CNN minus Lanczos PSNR and SSIM on the HR, from the reports."""
    margins = {}
    for domain, records in groups.items():
        for mode, scale in ((m, s) for m in modes for s in (2, 4)):
            path = report_dir(out, domain, mode, scale) / "results.json"
            if not path.exists():
                continue
            results = json.loads(path.read_text())
            for key, cells in results["per_scan"]["float"].items():
                for cnn, lanczos, record in zip(cells["cnn"], cells["lanczos"], records):
                    margins[f"{record['name']}|{key}|{mode}"] = (cnn["psnr"] - lanczos["psnr"],
                                                                 cnn["ssim"] - lanczos["ssim"])
    return margins


def report(out: pathlib.Path, groups, modes, scales, planes: str = "dw", ensemble: bool = False,
           consistency: bool = True) -> str:
    lines = ["# Held-out scores per domain and self-check accuracy", "",
             "Float protocol (PSNR peak = the domain's global HR range, SSIM Gaussian), no IFC, "
             f"{'self-ensemble' if ensemble else 'no self-ensemble'}, 3D planes {planes!r}, "
             f"{'consistency with the LR' if consistency else 'no consistency step'}; mean over the domain's test scans; † per-slice PSNR differs from Lanczos at "
             "p < 0.001 (Wilcoxon signed-rank). Each cell: Lanczos -> CNN (margin).", "",
             "| domain (test scans) | mode | x | Lanczos PSNR | CNN PSNR | margin dB | Lanczos SSIM | CNN SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    table = []
    for domain, records in groups.items():
        for mode in modes:
            for scale in scales:
                path = report_dir(out, domain, mode, scale) / "results.json"
                if not path.exists():
                    continue
                results = json.loads(path.read_text())
                key = f"x{scale}"
                s = results["summary"]["float"][key]
                sig = results["significance"]["float"][key]["cnn"]
                margin = s["cnn"]["psnr"] - s["lanczos"]["psnr"]
                table.append({"domain": domain, "n_scans": len(records), "mode": mode, "scale": scale,
                              "lanczos": s["lanczos"], "cnn": s["cnn"], "margin_db": margin,
                              "ssim_margin": s["cnn"]["ssim"] - s["lanczos"]["ssim"], "wilcoxon": sig})
                lines.append(f"| {domain} ({len(records)}) | {mode} | {scale} | {s['lanczos']['psnr']:.2f} | "
                             f"{s['cnn']['psnr']:.2f}{' †' if sig['significant'] else ''} | {margin:+.2f} | "
                             f"{s['lanczos']['ssim']:.4f} | {s['cnn']['ssim']:.4f} |")
    margins = real_margins(out, groups, modes)
    checks = json.loads((out / "selfcheck.json").read_text()) if (out / "selfcheck.json").exists() else {}
    rows, accuracy = [], {}
    for key, entry in checks.items():
        if key not in margins:
            continue
        real, real_ssim = margins[key]
        rows.append((key, real, real_ssim, entry))
    for variant in selfcheck.NOISE_MODELS:
        pairs = [(r, e[variant]["margin_db"]) for _, r, _, e in rows if e[variant]]
        if len(pairs) >= 3:
            real, predicted = np.array(pairs).T
            accuracy[variant] = {"n": len(pairs), "sign_agreement": float(np.mean(np.sign(real) == np.sign(predicted))),
                                 "pearson_r": float(np.corrcoef(real, predicted)[0, 1]),
                                 "mean_abs_error_db": float(np.mean(np.abs(real - predicted)))}
    lines += ["", "## Self-check: predicted vs real margin (dB, CNN minus Lanczos PSNR)", ""]
    for variant, a in accuracy.items():
        lines.append(f"- {variant}: sign agrees on {a['sign_agreement'] * a['n']:.0f} of {a['n']} "
                     f"(scan, scale, mode) cells, Pearson r = {a['pearson_r']:.2f}, mean |error| = "
                     f"{a['mean_abs_error_db']:.2f} dB")
    lines += ["", "Noise models (sr3d.selfcheck.noise_matched_pair): measured (the default of sr3d upscale), "
              "white, none (the naive check).", "",
              "| scan | x | mode | real dB | self-check dB (measured, default) | white dB | naive dB | real SSIM | "
              "self-check SSIM |", "|---|---|---|---|---|---|---|---|---|"]
    for key, real, real_ssim, entry in sorted(rows):
        scan, scale, mode = key.split("|")
        m, me, n = entry["measured"], entry["white"], entry["none"]
        lines.append(f"| {scan} | {scale[1:]} | {mode} | {real:+.2f} | {m['margin_db']:+.2f} | {me['margin_db']:+.2f} | "
                     f"{n['margin_db']:+.2f} | {real_ssim:+.4f} | {m['ssim_margin']:+.4f} |" if m else
                     f"| {scan} | {scale[1:]} | {mode} | {real:+.2f} | too small | | | {real_ssim:+.4f} | |")
    sr3d_files.write_json(out / "summary.json", {"table": table, "selfcheck_accuracy": accuracy,
                                              "selfcheck_cells": {k: {"real_db": r, "real_ssim": rs, **e}
                                                                  for k, r, rs, e in rows}})
    text = "\n".join(lines) + "\n"
    with sr3d_files.atomic_path(out / "summary.md") as tmp:
        tmp.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sr3d/data_files/models")
    parser.add_argument("--out", required=True)
    parser.add_argument("--corpus", default="runs/corpus/corpus.json")
    parser.add_argument("--modes", default="3d,2d")
    parser.add_argument("--scales", default="2,4")
    parser.add_argument("--part", default="all", choices=["all", "eval", "selfcheck", "report"])
    parser.add_argument("--planes", default="dw", choices=["dw", "both", "all"],
                        help="3d CNN rows (eval part): as evaluate.py --planes; the self-check part runs dw")
    parser.add_argument("--ensemble", action="store_true", help="self-ensemble the CNN rows (eval part)")
    parser.add_argument("--no-consistency", dest="consistency", action="store_false",
                        help="the networks' output alone, as the reports before 2026-12-03 were made (default: "
                             "made consistent with the LR, as sr3d upscale does)")
    parser.add_argument("--domains", default="", help="comma-separated domains of DOMAIN_ORDER to keep (default all)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = test_groups(pathlib.Path(args.corpus))
    if args.domains:
        keep = args.domains.split(",")
        unknown = [d for d in keep if d not in groups]
        if unknown:
            parser.error(f"--domains: {unknown} not among {list(groups)}")
        groups = {d: r for d, r in groups.items() if d in keep}
    modes, scales = args.modes.split(","), [int(s) for s in args.scales.split(",")]
    if args.part in ("all", "eval"):
        run_eval(args.model, groups, out, modes, scales, args.planes, args.ensemble, args.consistency)
    if args.part in ("all", "selfcheck"):
        run_selfcheck(args.model, groups, out, modes, scales, args.consistency)
    print(report(out, groups, modes, scales, args.planes, args.ensemble, args.consistency))


if __name__ == "__main__":
    main()
