#!/usr/bin/env python3
"""Run the FMSegSlicer module's ScriptedLoadableModuleTest inside a real 3D Slicer.

This is what the ctest registered by ``slicer_add_python_unittest(SCRIPT FMSegSlicer.py)`` does in an extension
build, run against the source tree instead::

    Slicer --no-splash --testing --additional-module-paths <repo>/FMSegSlicer \\
        --python-code "import slicer.testing; slicer.testing.runUnitTest([...], 'FMSegSlicer')"

Slicer loads the module from ``--additional-module-paths`` (by default ``<repo>/FMSegSlicer``; a build tree's
``lib/Slicer-X.Y/qt-scripted-modules`` works too) and appends that folder to ``sys.path``. When FMSegCore is not beside the module (the
source tree), the repository root is added to ``PYTHONPATH`` and to the test's search path so that
``import FMSegCore`` finds the checkout's package, as it finds the copy shipped beside the module in a build. In ``--testing`` mode a failing test makes
Slicer exit with a nonzero code, which this script returns.

    python Testing/run_slicer_tests.py --slicer /path/to/Slicer
    SLICER_EXECUTABLE=/path/to/Slicer python Testing/run_slicer_tests.py

Without a Slicer executable it prints one line saying it skipped and exits 0, or 2 with ``--require``. On a
Linux machine without a display, run it under ``xvfb-run -a``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
MODULE_NAME = "FMSegSlicer"
SLICER_ENV = "SLICER_EXECUTABLE"
#: Exit status when ``--require`` is given and no Slicer executable is available.
MISSING_SLICER = 2


def core_folders(module_path: Path, repo: Path = REPO) -> list[Path]:
    """Where FMSegCore must be looked for besides the module folder: the checkout, unless shipped beside it."""
    return [] if (module_path / "FMSegCore").is_dir() else [repo]


def slicer_arguments(module_path: Path, repo: Path = REPO, module: str = MODULE_NAME) -> list[str]:
    """Slicer's command-line arguments (after the executable) that run ``module``'s unit test."""
    search_path = [str(folder) for folder in [module_path, *core_folders(module_path, repo)]]
    code = f"import slicer.testing; slicer.testing.runUnitTest({search_path!r}, {module!r})"
    return ["--no-splash", "--testing", "--additional-module-paths", str(module_path), "--python-code", code]


def find_slicer(given: Optional[str]) -> tuple[Optional[str], str]:
    """The Slicer executable to run, or None with the reason none is usable."""
    candidate = given or os.environ.get(SLICER_ENV)
    if not candidate:
        return None, f"no Slicer executable (give --slicer PATH or set {SLICER_ENV})"
    found = shutil.which(candidate)
    if found is None:
        return None, f"Slicer executable {candidate} is not an executable file"
    return found, ""


def _environment(module_path: Path) -> dict[str, str]:
    environment = dict(os.environ)
    folders = [str(folder) for folder in core_folders(module_path)]
    existing = environment.get("PYTHONPATH")
    if folders:
        environment["PYTHONPATH"] = os.pathsep.join(folders + ([existing] if existing else []))
    return environment


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slicer", help=f"the Slicer executable (default: ${SLICER_ENV})")
    parser.add_argument("--module-path", type=Path, default=REPO / MODULE_NAME,
                        help="folder holding FMSegSlicer.py (default: the checkout's FMSegSlicer/)")
    parser.add_argument("--require", action="store_true",
                        help=f"exit {MISSING_SLICER} instead of 0 when no Slicer executable is available")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before Slicer is stopped")
    args = parser.parse_args(argv)

    slicer, reason = find_slicer(args.slicer)
    if slicer is None:
        print(f"run_slicer_tests: skipped: {reason}")
        return MISSING_SLICER if args.require else 0
    module_path = args.module_path.resolve()
    command = [slicer, *slicer_arguments(module_path)]
    print("run_slicer_tests: " + shlex.join(command), flush=True)
    try:
        completed = subprocess.run(command, env=_environment(module_path), timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"run_slicer_tests: Slicer did not finish within {args.timeout:g} s")
        return 1
    code = completed.returncode
    print(f"run_slicer_tests: Slicer exited with {code}")
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
