"""What the absl scripts train.py, evaluate.py and export.py share: `run(main)`, which exits with
status 0 for --help, and `import_tensorflow(verbose)`, which hides TensorFlow's startup lines.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from absl import app, logging

# absl's help flags, with one or two dashes (absl accepts both).
_HELP_FLAGS = {f"{dashes}{name}" for dashes in ("-", "--")
               for name in ("help", "?", "helpshort", "helpfull", "helpxml")}


def asked_for_help(argv: Sequence[str]) -> bool:
    """Whether a help flag comes before the end of the flags ("--") in `argv` (without argv[0])."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in _HELP_FLAGS:
            return True
    return False


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, except that a help flag exits with status 0, as `sr3d --help` does.

    absl prints the help and then exits 1 on purpose (`HelpFlag.parse` in absl/app.py calls
    `_exit_before_main(1)`), so `train.py --help && ...` fails in shells and CI.
    """
    try:
        app.run(main)
    except SystemExit as exit_:
        if exit_.code == 1 and asked_for_help(sys.argv[1:]):
            raise SystemExit(0) from None
        raise


def import_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow, hiding its startup log lines unless `verbose`.

    TensorFlow 2.21 writes "oneDNN custom operations are on" (twice), "This TensorFlow binary is
    optimized..." and "All log messages before absl::InitializeLog()..." from C++ before absl's
    logging is initialised, where TF_CPP_MIN_LOG_LEVEL has no effect, so the import runs with the
    process's stderr (file descriptor 2) sent to a temporary file, replayed if the import fails.
    Python-side INFO lines (SavedModel writer, signatures) are hidden by absl's verbosity.
    """
    logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
