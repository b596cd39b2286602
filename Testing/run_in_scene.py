"""Run a Slicer batch script (``Slicer --python-script``) on slicer-core's real MRML, without the application:
``python Testing/run_in_scene.py SCRIPT ARGS...``. The scene is set up as Slicer does at start-up; the script's
``sys.exit`` code is this process's."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "FMSegSlicer")]

from slicer_scene import new_scene  # noqa: E402

new_scene()
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
