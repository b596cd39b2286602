"""The dependency check and install, for real: a fresh virtual environment stands in for Slicer's Python; pip
installs from PyPI what is missing and leaves installed packages exactly as they were."""

from __future__ import annotations

import subprocess
import sys
import venv

import pytest
from FMSegSlicerLib.dependencies import check, install_missing, read_requirements


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slicer-python")
    venv.EnvBuilder(with_pip=True).create(folder)
    executable = str(folder / "bin" / "python")
    pinned = subprocess.run([executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             "tqdm==4.60.0"], capture_output=True, text=True, timeout=600)
    if pinned.returncode != 0:
        pytest.skip(f"PyPI is not reachable: {pinned.stderr.strip().splitlines()[-1:]}")
    return executable


def test_the_check_finds_missing_packages_old_ones_and_no_torch(python):
    report = check(python, ["tqdm>=4.66", "six>=1.16", "pip>=1"])
    assert report.missing == ["six>=1.16"]
    assert report.conflicts == ["tqdm 4.60.0 (needs tqdm>=4.66)"]
    assert "error" in report.torch and not report.ready
    text = report.describe()
    assert "six>=1.16" in text and "left alone" in text and "PyTorch is not installed" in text


def test_install_adds_what_is_missing_and_never_changes_an_installed_package(python):
    report = check(python, ["tqdm>=4.66", "six>=1.16"])
    result = install_missing(report)
    assert result.returncode == 0, result.stderr[-1000:]
    after = check(python, ["tqdm>=4.66", "six>=1.16"])
    assert after.missing == [] and after.installed["six"]
    assert after.installed["tqdm"] == "4.60.0"  # pinned: not upgraded although a newer one was asked for
    assert {k: v for k, v in after.installed.items() if k != "six"} == report.installed


def test_this_interpreter_meets_the_modules_requirements_and_has_torch():
    report = check(sys.executable)
    assert report.missing == [] and report.conflicts == []
    assert report.torch["version"] and report.ready
    assert "monai>=1.3" in read_requirements()


def test_a_python_that_cannot_run_is_reported_in_one_line(tmp_path):
    with pytest.raises((RuntimeError, OSError)):
        check(str(tmp_path / "no-python"))


def test_the_logic_refuses_to_start_a_worker_in_a_python_without_the_packages(python):
    slicer = pytest.importorskip("slicer")
    from FMSegSlicerLib.logic import FMSegLogic, MissingDependencies

    logic = FMSegLogic(slicer.vtkMRMLScene(), python=python)
    with pytest.raises(MissingDependencies, match="PyTorch is not installed") as refused:
        logic.connect()
    assert "monai>=1.3" in refused.value.report.missing and logic.local is None
