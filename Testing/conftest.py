"""Test session setup: the Slicer module's folder is importable (``FMSegSlicerLib``), as inside Slicer; and the
tests never write into the user's model cache: ``FMSEG_CACHE_DIR`` points at a folder of their own, removed at
the end, while downloaded data (``fmseg data fetch``) is read from the user's data folder, never fetched."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FMSegSlicer"))

_TEST_CACHE = tempfile.mkdtemp(prefix="fmseg-test-cache-")


def pytest_configure(config):
    from FMSegCore.zoo.cache import CACHE_ENV, DATA_ENV, cache_dir

    os.environ.setdefault(DATA_ENV, str(cache_dir()))  # the user's data stays where `fmseg data fetch` put it
    os.environ[CACHE_ENV] = _TEST_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)
