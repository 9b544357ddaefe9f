"""`python -m sr3d` runs the sr3d command."""
import sys

from sr3d.cli import main

sys.exit(main())
