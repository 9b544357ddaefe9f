"""Scores super-resolution methods on real scans: the paper's Tables 3-6 as Markdown, JSON and a figure.

Protocol (the paper's): every HR scan is cropped so the
downscaled axes divide by r and shrunk by r (`sr3d.degrade.simulate_lr`: MATLAB
imresize bicubic, antialiased; H and W in "2d" mode, D too in "3d"); every
method brings that LR back to the grid of the cropped HR; the result is scored
against the cropped HR under each protocol of `sr3d.metrics` ("float": the
scan's own units through one fixed intensity window; "paper": 8-bit slices as
the authors' code). A table cell is the mean over scans of the per-volume
scores; per-scan and per-slice values are kept in the JSON.

Significance: each method against Lanczos, paired by slice (the same slice of
the same scan reconstructed by both), with the two-sided Wilcoxon signed-rank
test on per-slice PSNR. Pairing removes how hard each slice is; the per-slice
differences are not normal (near-empty slices at the top and bottom of a scan
give heavy tails), so a paired t-test would be wrong, and the paper's McNemar
test needs a yes/no outcome per item, which PSNR is not. Slices of one scan are
correlated, so the p-values are optimistic: treat them as a screen, and the
per-scan scores in the JSON as the evidence.

One concern a module: `config` (EvalConfig, row names), `run` (`evaluate`), `stats` (means,
Wilcoxon, `compare_methods`), `markdown` (the tables), `figures` (the comparison figure),
`report` (`write_report`: JSON, Markdown and figures on disk).
"""
from sr3d.evaluation.config import PROTOCOLS, EvalConfig, method_label  # noqa: F401
from sr3d.evaluation.stats import ALPHA, REFERENCE_METHOD, SIGNIFICANCE_TEST, compare_methods  # noqa: F401
from sr3d.evaluation.figures import FIGURE_NAME  # noqa: F401
from sr3d.evaluation.markdown import format_markdown  # noqa: F401
from sr3d.evaluation.run import evaluate  # noqa: F401
from sr3d.evaluation.report import RESULTS_JSON, RESULTS_MD, json_ready, write_report  # noqa: F401
