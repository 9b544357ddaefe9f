"""Export a model bundle as a SavedModel for TF Serving and TensorFlow pipelines, or as ONNX.

  python export.py --scale 2 --export_dir /models            # the shipped 2x model
  python export.py --model runs/bundle_x2 --scale 2 --export_dir /models --version 3
  python export.py --scale 2 --export_dir /models --precision bfloat16   # bf16 convolutions
  python export.py --scale 2 --export_dir /models --format onnx          # hw.onnx, d.onnx (sr3d/onnx_export.py)

writes `<export_dir>/<name>/<version>/` (saved_model.pb + variables/), the layout
TF Serving polls; the signatures are described in sr3d/export.py.
"""
import sys

from absl import app, flags

from sr3d import export, models, onnx_export, precision, scripting

_MODEL = flags.DEFINE_string("model", None, "Model bundle directory (hw.keras, d.keras, bundle.json); "
                             "default: the shipped model for --scale.")
_SCALE = flags.DEFINE_integer("scale", 2, "Upsampling factor r of the model.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Base directory of the exported models.",
                                  required=True)
_NAME = flags.DEFINE_string("name", "sr3d", "Model name: the subdirectory of --export_dir.")
_VERSION = flags.DEFINE_integer("version", None, "Version subdirectory (default: Unix timestamp).")
_PRECISION = flags.DEFINE_enum("precision", "float32", list(precision.PRECISIONS),
                               "Precision of the networks in the graph; auto: bfloat16 if this CPU "
                               "multiplies bf16 natively (sr3d/precision.py).")


_FORMAT = flags.DEFINE_enum("format", "savedmodel", ["savedmodel", "onnx"],
                             "savedmodel: the chained volume model for TF Serving; onnx: the two stage "
                             "networks as hw.onnx and d.onnx (needs pip install \"sr3d[onnx]\").")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show TensorFlow's startup and SavedModel-writer log lines.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    scripting.import_tensorflow(verbose=_VERBOSE.value)
    try:
        bundle = models.load_models(_MODEL.value, scale=_SCALE.value)
        if _FORMAT.value == "onnx":
            if _PRECISION.value != "float32":
                raise ValueError(f"--precision {_PRECISION.value} applies to the SavedModel; ONNX is float32")
            path = onnx_export.export(bundle, _EXPORT_DIR.value, name=_NAME.value, version=_VERSION.value)
        else:
            path = export.export(bundle, _EXPORT_DIR.value, name=_NAME.value, version=_VERSION.value,
                                 precision=_PRECISION.value)
        print(f"exported {path}")
    except (ValueError, OSError) as error:
        sys.exit(f"export.py: error: {error}")


if __name__ == "__main__":
    scripting.run(main)  # app.run, but --help exits 0
