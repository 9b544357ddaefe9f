"""Statistics of an `evaluate` result: the mean over scans of each cell, and the paired per-slice
Wilcoxon signed-rank test of one method against another (why this test: `sr3d.evaluation`)."""
from __future__ import annotations

import numpy as np

REFERENCE_METHOD = "lanczos"
# The paper's significance level (Table 2).
ALPHA = 1e-3

SIGNIFICANCE_TEST = {
    "test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon) on per-slice PSNR, each method "
            f"vs {REFERENCE_METHOD}, slices of all scans pooled and paired by (scan, slice)",
    "why": "paired: both methods reconstruct the same slices, so slice difficulty cancels; the "
           "per-slice PSNR differences are not normal (heavy tails from near-empty slices), so no "
           "t-test; slices of one scan are correlated, so p-values are optimistic",
    "alpha": ALPHA,
}


def mean_scores(cells: list[dict]) -> dict:
    """Mean over scans of the per-volume scores (IFC None when not computed)."""
    psnr = np.array([c["psnr"] for c in cells], dtype=np.float64)
    ifc = [c["ifc"] for c in cells]
    return {
        "psnr": float(np.mean(psnr)),
        "ssim": float(np.mean([c["ssim"] for c in cells])),
        "ifc": None if any(v is None for v in ifc) else float(np.mean(ifc)),
        "psnr_std": float(np.std(psnr)),
        "n_scans": len(cells),
    }


def _paired_slice_values(cells: list[dict], reference_cells: list[dict],
                         metric: str = "psnr") -> tuple[np.ndarray, np.ndarray]:
    """Per-slice `metric` of a method and of the reference method, pooled over scans, in the same order."""
    tests, references = [], []
    for cell, reference in zip(cells, reference_cells, strict=True):
        if cell["slice_indices"] != reference["slice_indices"]:
            raise RuntimeError(f"{cell['scan']}: scored slices differ between methods; cannot pair them")
        if cell["per_slice"][metric] is None or reference["per_slice"][metric] is None:
            raise ValueError(f"{cell['scan']}: no per-slice {metric} was computed (IFC needs with_ifc)")
        tests.extend(cell["per_slice"][metric])
        references.extend(reference["per_slice"][metric])
    return np.array(tests, dtype=np.float64), np.array(references, dtype=np.float64)


def wilcoxon_vs_reference(cells: list[dict], reference_cells: list[dict], metric: str = "psnr") -> dict:
    """Two-sided Wilcoxon signed-rank test of per-slice `metric`, method minus reference."""
    from scipy import stats

    test, reference = _paired_slice_values(cells, reference_cells, metric)
    finite = np.isfinite(test) & np.isfinite(reference)  # identical slices give infinite PSNR
    difference = test[finite] - reference[finite]
    median = float(np.median(difference)) if difference.size else None
    result = {"n_pairs": int(difference.size), "median_difference": median,
              "p_value": None, "significant": False}
    if metric == "psnr":
        result["median_psnr_difference_db"] = median
    if difference.size and np.any(difference != 0):
        result["p_value"] = float(stats.wilcoxon(difference, alternative="two-sided").pvalue)
        result["significant"] = bool(result["p_value"] < ALPHA)
    elif difference.size:
        result["p_value"] = 1.0  # every slice identical to the reference's
    return result


def compare_methods(results: dict, method: str, reference: str, metric: str = "psnr") -> dict:
    """The test of "significance" between any two rows of one `evaluate` result (there: every
    method against Lanczos, on PSNR), e.g. an ablated CNN against the full one, on any metric.

    results: as returned by `evaluate`, or its JSON read back (None per-slice values count as
    non-finite and are dropped, as infinite ones are). metric: "psnr", "ssim" or "ifc".
    Returns [protocol]["x{r}"] -> {"n_pairs", "median_difference" (method minus reference;
    also as "median_psnr_difference_db" for PSNR), "p_value", "significant"}.
    """
    per_scan = results["per_scan"]
    for name in (method, reference):
        if any(name not in cells for by_scale in per_scan.values() for cells in by_scale.values()):
            raise ValueError(f"compare_methods: no row {name!r} in the results, which have "
                             f"{results.get('methods')}")
    return {protocol: {key: wilcoxon_vs_reference(cells[method], cells[reference], metric)
                       for key, cells in by_scale.items()}
            for protocol, by_scale in per_scan.items()}
