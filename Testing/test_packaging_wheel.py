"""The pip package: every FMSegCore package is listed in pyproject.toml, and a built wheel carries the shipped
weights and sample data where an installed FMSegCore finds them."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_of_the_tree():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(FMSegCore[\w.]*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "FMSegCore").rglob("__init__.py")}
    assert listed == tree | {"FMSegCore.resources"}


def test_an_installed_wheel_finds_its_weights_and_sample_data(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(ROOT), "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("fmseg-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import FMSegCore; "
             "from FMSegCore.zoo.cache import fetch; from FMSegCore.zoo.registry import get_card; "
             "from FMSegCore.zoo.cache import resources_dir; "
             "print(FMSegCore.__file__); print(resources_dir()); print(fetch(get_card('universeg-fmseg'), allow_download=False))")
    result = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    module, resources, weights = result.stdout.strip().splitlines()[-3:]
    assert module.startswith(str(site)) and resources == str(site / "FMSegCore" / "resources")
    assert Path(weights).is_file() and Path(weights).is_relative_to(site)
    assert (site / "FMSegCore" / "resources" / "SampleData" / "ct_abdomen_pelvis" / "image.nii.gz").is_file()
