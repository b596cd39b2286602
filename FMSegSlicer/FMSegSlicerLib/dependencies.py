"""Check and install what the worker needs, in the Python that will run it, without touching what is there.

The check runs in a separate process of that Python, so torch is never imported into Slicer's own. Missing
packages are installed with pip under a constraints file that pins every installed distribution to its
version: pip may add packages but cannot upgrade or downgrade one Slicer ships. A requirement that an
installed package does not meet is reported, not "fixed": the answer then is a worker environment of its own.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"

_PROBE = r"""
import json, sys
import importlib.metadata as metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
report = {"requirements": {}, "installed": {}}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        report["installed"][name.lower().replace("_", "-")] = dist.version
for line in json.loads(sys.argv[1]):
    requirement = Requirement(line)
    version = report["installed"].get(requirement.name.lower().replace("_", "-"))
    report["requirements"][line] = {"name": requirement.name, "installed": version,
        "satisfied": version is not None and requirement.specifier.contains(version, prereleases=True)}
try:
    import torch  # only in this throw-away process
    report["torch"] = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
                       "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
except Exception as error:
    report["torch"] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(report))
"""


@dataclass
class DependencyReport:
    """What a Python has and lacks for the worker."""

    python: str
    missing: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # "name installed-version (needs requirement)"
    installed: dict[str, str] = field(default_factory=dict)
    torch: dict = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.missing and not self.conflicts and "version" in self.torch

    def describe(self) -> str:
        """One paragraph for the user: what is missing and what to do."""
        parts = []
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)} (FMSeg can install them)")
        if self.conflicts:
            parts.append(f"too old and left alone: {', '.join(self.conflicts)}; set a worker Python of its own "
                         "(FMSEG_WORKER_PYTHON) instead")
        if "version" not in self.torch:
            parts.append("PyTorch is not installed: install Slicer's PyTorch extension (or torch for your CUDA "
                         "version in the worker's Python)")
        elif not self.torch.get("cuda"):
            parts.append(f"PyTorch {self.torch['version']} has no CUDA device here: FMSeg runs on the CPU"
                         f"{' (or Apple MPS)' if self.torch.get('mps') else ''}")
        return "; ".join(parts) if parts else f"all set (PyTorch {self.torch.get('version')})"


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def check(python: str, requirements: Optional[list[str]] = None, timeout: float = 300.0) -> DependencyReport:
    """Probe ``python`` (a separate process) for the requirements and PyTorch."""
    requirements = read_requirements() if requirements is None else requirements
    result = subprocess.run([python, "-c", _PROBE, json.dumps(requirements)], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{python}: cannot check its packages ({last})")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    report = DependencyReport(python, installed=probe["installed"], torch=probe["torch"])
    for line, state in probe["requirements"].items():
        if state["installed"] is None:
            report.missing.append(line)
        elif not state["satisfied"]:
            report.conflicts.append(f"{state['name']} {state['installed']} (needs {line})")
    return report


def install_command(report: DependencyReport, constraints: Path) -> list[str]:
    """The pip command installing the missing packages with every installed one pinned."""
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(report.installed.items())))
    return [report.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "-c", str(constraints), *report.missing]


def install_missing(report: DependencyReport, timeout: float = 3600.0) -> subprocess.CompletedProcess:
    """Install what is missing (call after asking the user, off the GUI thread); pip's result."""
    with tempfile.TemporaryDirectory(prefix="fmseg-pip-") as folder:
        command = install_command(report, Path(folder) / "constraints.txt")
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
