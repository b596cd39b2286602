"""Test session setup: the Slicer module's folder is importable (``FMSegSlicerLib``), as inside Slicer."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FMSegSlicer"))
