"""How well `--planes auto` (the self-check chooses one pass or three orientations) picks, per held-out scan.

  python experiments/planes_auto.py [--one docs/model_card/consistency] [--all docs/model_card/fusion_all]
      [--out docs/model_card/planes_auto] [--no-consistency]

For every 3D report of --one (single pass, `experiments/generalization.py`) and --all (the same with
`--planes all`): the per-scan real margins over Lanczos (CNN minus Lanczos PSNR against the HR, the
reports' protocol). For every scan and scale the LR is simulated as evaluate.py does (antialiased
bicubic along D, H and W) and `sr3d.inference.choose_planes` (what `sr3d upscale --planes auto`
runs) picks dw or all from the self-check on that LR alone. Writes OUT.md and OUT.json: per scan the
real margin of dw, of all, of the pick, and whether the pick was the better one; per domain (--corpus) the
mean margins (PSNR and SSIM) of dw, all and the pick, which are the default's 3D numbers. The self-check runs
with the consistency step, as the reports of the default --one and --all were made; --no-consistency
without it (give it reports made with `generalization.py --no-consistency`, e.g.
docs/model_card/generalization and docs/model_card/planes_all).
"""
import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sr3d import degrade, inference, models  # noqa: E402
from sr3d import files as sr3d_files  # noqa: E402
from sr3d import io as sr3d_io  # noqa: E402


def per_scan_margins(report_dir: pathlib.Path, metric: str = "psnr") -> dict:
    """{(scan, scale): CNN - Lanczos `metric` (psnr or ssim)} of every 3D report under report_dir."""
    margins = {}
    for path in sorted(report_dir.glob("*_3d_x*/results.json")):
        results = json.loads(path.read_text())
        for key, methods in results["per_scan"]["float"].items():
            scale = int(key.lstrip("x"))
            for lanczos, cnn in zip(methods["lanczos"], methods["cnn"], strict=True):
                margins[(lanczos["scan"], scale)] = cnn[metric] - lanczos[metric]
    return margins


def domain_table(rows: list, one_ssim: dict, three_ssim: dict, corpus: pathlib.Path) -> list[str]:
    """Per domain and scale: the mean over the domain's scans of the pick's margins, which is the
    domain's margin in the reports' tables (their PSNR and SSIM are means of per-scan values)."""
    domains = {r["path"]: r["domain"] for r in json.loads(corpus.read_text())["scans"]}
    lines = ["", "## Per domain: one pass, three orientations and the pick (`--planes auto`, the default)", "",
             "Mean over the domain's test scans of CNN minus Lanczos (PSNR dB / SSIM), 3D, as in the reports.", "",
             "| domain | x | one pass (dw) | three orientations (all) | auto (the default) |", "|---|---|---|---|---|"]
    from generalization import DOMAIN_ORDER  # experiments/, beside this script

    order = [d for d in DOMAIN_ORDER if d in set(domains.values())]
    for scale in sorted({r["scale"] for r in rows}):
        for domain in order:
            sub = [r for r in rows if r["scale"] == scale and domains[r["path"]] == domain]
            if not sub:
                continue
            cells = []
            for planes in ("dw", "all", "chosen"):
                psnr = np.mean([r["real_dw" if planes == "dw" else "real_all" if planes == "all" else "real_chosen"]
                                for r in sub])
                ssim = np.mean([(one_ssim if (r["chosen"] if planes == "chosen" else planes) == "dw" else three_ssim)
                                [(r["path"], scale)] for r in sub])
                cells.append(f"{psnr:+.2f} / {ssim:+.4f}")
            lines.append(f"| {domain} ({len(sub)}) | {scale} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", default="docs/model_card/consistency")
    parser.add_argument("--all", default="docs/model_card/fusion_all")
    parser.add_argument("--no-consistency", dest="consistency", action="store_false")
    parser.add_argument("--out", default="docs/model_card/planes_auto")
    parser.add_argument("--corpus", default="runs/corpus/corpus.json", help="for the domain of each scan")
    args = parser.parse_args()
    one, three = per_scan_margins(pathlib.Path(args.one)), per_scan_margins(pathlib.Path(args.all))
    rows = []
    for scan, scale in sorted(set(one) & set(three), key=lambda k: (k[1], k[0])):
        volume = sr3d_io.load_volume(scan)
        hr = degrade.crop_to_multiple(np.asarray(volume.array, np.float32), scale, axes=(0, 1, 2))
        lr = inference.as_volume(degrade.downscale(hr, scale, axes=(0, 1, 2)),
                                 spacing=tuple(s * scale for s in volume.spacing))
        chosen, _, choice = inference.choose_planes(lr, models.load_models(None, scale), False,
                                                    {"consistency": args.consistency}, print)
        real = {"dw": one[(scan, scale)], "all": three[(scan, scale)]}
        rows.append({"scan": pathlib.Path(scan).name.split(".")[0], "path": scan, "scale": scale, "real_dw": round(real["dw"], 3),
                     "real_all": round(real["all"], 3), "chosen": chosen, "real_chosen": round(real[chosen], 3),
                     "best": max(real, key=real.get), **{k: v for k, v in choice.items() if k != "chosen"}})
        print(rows[-1], flush=True)
    lines = ["# `--planes auto` on the held-out scans (3D)", "",
             "Written by `python experiments/planes_auto.py`. Real margins: CNN minus Lanczos PSNR (dB) against the HR, "
             "from the per-scan reports of `experiments/generalization.py` (one pass) and of the same with `--planes all`. "
             "Pick: `sr3d.inference.choose_planes` on the simulated LR alone (the self-check with each).", "",
             "| scan | x | real dw | real all | self-check dw | self-check all | pick | real of the pick | better of the two |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scan']} | {r['scale']} | {r['real_dw']:+.2f} | {r['real_all']:+.2f} | "
                     f"{r.get('dw_self_check_margin_db', float('nan')):+.2f} | {r.get('all_self_check_margin_db', float('nan')):+.2f} | "
                     f"{r['chosen']}{' (too small to check)' if 'why' in r else ''} | {r['real_chosen']:+.2f} | {r['best']} |")
    for scale in sorted({r["scale"] for r in rows}):
        sub = [r for r in rows if r["scale"] == scale]
        lines += ["", f"x{scale}: pick = the better of the two on {sum(r['chosen'] == r['best'] for r in sub)} of {len(sub)} "
                  f"scans; mean real margin dw {np.mean([r['real_dw'] for r in sub]):+.3f}, all "
                  f"{np.mean([r['real_all'] for r in sub]):+.3f}, auto {np.mean([r['real_chosen'] for r in sub]):+.3f} dB; "
                  f"worst of auto against dw {min(r['real_chosen'] - r['real_dw'] for r in sub):+.3f} dB."]
    lines += domain_table(rows, per_scan_margins(pathlib.Path(args.one), "ssim"),
                          per_scan_margins(pathlib.Path(args.all), "ssim"), pathlib.Path(args.corpus))
    out = pathlib.Path(args.out)
    sr3d_files.write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    sr3d_files.write_json(out.with_suffix(".json"), rows)
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
