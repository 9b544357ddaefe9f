"""Score interpolation baselines (and optionally a CNN) on real scans: the paper's results tables.

  python evaluate.py --data ../shared/data/ixi-t1-2mm --scale 2,4 --mode 3d [--cnn shipped]

Writes results.json, results.md and comparison_x{r}.png into --out and prints the Markdown.
"""
import os
import sys

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sr3d import baselines, degrade, evaluation, scripting  # noqa: E402  (after the TF log level)
from sr3d import files as sr3d_files  # noqa: E402
from sr3d import progress as sr3d_progress  # noqa: E402

_DATA = flags.DEFINE_list("data", None, "HR scans: NIfTI/NRRD files, directories of NIfTI files (every "
                          "file), or DICOM series directories (one series each).", required=True)
_SCALE = flags.DEFINE_list("scale", ["2"], "Upscaling factors r, comma-separated (e.g. 2,4).")
_MODE = flags.DEFINE_enum("mode", "3d", list(degrade.MODES), "2d: H and W downscaled (Tables 3, 5); "
                          "3d: D, H and W (Tables 4, 6).")
_METHODS = flags.DEFINE_list("methods", list(baselines.METHODS), "Interpolation baselines to score.")
_CNN = flags.DEFINE_string("cnn", None, "Model bundle directory (or one with x2/, x4/ bundles) for a "
                           "'cnn' row; 'shipped' for the shipped models.")
_ENSEMBLE = flags.DEFINE_bool("ensemble", False, "Self-ensemble for the CNN row.")
_PLANES = flags.DEFINE_enum("planes", "dw", ["dw", "both", "all"], "3D CNN row: stage d on (D, W) planes, on "
                            "(D, W) and (D, H) planes averaged, or all: the cascade with each axis once as depth, "
                            "the three averaged.")
_CONSISTENCY = flags.DEFINE_bool("consistency", True, "CNN row: its output made consistent with the LR input, as "
                                 "sr3d upscale does by default (--noconsistency: the networks' output alone).")
_PROTOCOLS = flags.DEFINE_list("protocol", list(evaluation.PROTOCOLS), "Scoring protocols, comma-separated: "
                               "float (scan units in a fixed window), paper (8-bit slices, as the authors).")
_DATA_RANGE = flags.DEFINE_list("data_range", None, "lo,hi window of the float protocol in scanner "
                                "units (default: global min,max of the scans).")
_CROP_BORDER = flags.DEFINE_integer("crop_border", 0, "Pixels shaved off each side of H and W.")
_NO_IFC = flags.DEFINE_bool("no_ifc", False, "Skip IFC (faster; needed for slices under 72 x 72).")
_OUT_DIR = flags.DEFINE_string("out", "results", "Directory of the report.")
flags.DEFINE_alias("out_dir", "out")
flags.DEFINE_alias("protocols", "protocol")


def _numbers(values, kind, flag):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated numbers, got {','.join(values)}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        cnn = {} if _CNN.value is None else {"cnn": None if _CNN.value == "shipped" else _CNN.value}
        config = evaluation.EvalConfig(
            scans=sr3d_files.expand_scans(_DATA.value), scales=_numbers(_SCALE.value, int, "scale"),
            mode=_MODE.value, methods=tuple(_METHODS.value), cnn=cnn, protocols=tuple(_PROTOCOLS.value),
            data_range=None if _DATA_RANGE.value is None else _numbers(_DATA_RANGE.value, float, "data_range"),
            crop_border=_CROP_BORDER.value, with_ifc=not _NO_IFC.value, out_dir=_OUT_DIR.value,
            ensemble=_ENSEMBLE.value, planes=_PLANES.value, consistency=_CONSISTENCY.value)
        results = evaluation.evaluate(config, progress=sr3d_progress.print_line)
        paths = evaluation.write_report(results, config.out_dir)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        print(f"evaluate.py: error: {error}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    print(evaluation.format_markdown(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)


if __name__ == "__main__":
    scripting.run(main)  # app.run, but --help exits 0
