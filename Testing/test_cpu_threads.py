"""CPU threads: --threads, then FMSEG_THREADS, then OMP_NUM_THREADS, then the cores the load leaves idle; and
the CLI's parser starts without importing torch (help is instant)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from FMSegCore.cli.main import main
from FMSegCore.device import chosen_threads, default_threads
from FMSegCore.errors import FMSegError


def test_the_default_leaves_busy_cores_alone():
    assert default_threads(cores=2, load=0.0) == 2
    assert default_threads(cores=2, load=1.2) == 1  # one other job: one thread runs faster than two fighting
    assert default_threads(cores=2, load=7.0) == 1
    assert default_threads(cores=16, load=3.4) == 13


def test_threads_come_from_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv("FMSEG_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert chosen_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("FMSEG_THREADS", "2")
    assert chosen_threads() == (2, "FMSEG_THREADS")
    assert chosen_threads(1) == (1, "--threads")
    monkeypatch.setenv("FMSEG_THREADS", "two")
    with pytest.raises(FMSegError, match="FMSEG_THREADS='two'"):
        chosen_threads()


def test_the_option_is_accepted_before_or_after_the_command(monkeypatch, capsys):
    import os

    seen = []
    monkeypatch.delenv("FMSEG_THREADS", raising=False)
    monkeypatch.setattr("FMSegCore.cli.models_cmd.show_info", lambda card: seen.append(chosen_threads()) or 0)
    assert main(["--threads", "1", "models", "info", "litemedsam"]) == 0
    assert main(["models", "--threads", "2", "info", "litemedsam"]) == 0
    assert seen == [(1, "FMSEG_THREADS"), (2, "FMSEG_THREADS")] and "FMSEG_THREADS" not in os.environ
    assert main(["--threads", "0", "models"]) == 2 and "at least 1" in capsys.readouterr().err


def test_the_parser_and_help_need_no_torch():
    code = ("import sys; from FMSegCore.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_the_threads_bench_times_every_setting_idle_and_beside_a_busy_job(tmp_path):
    import json

    output = tmp_path / "threads.json"
    assert main(["bench", "threads", "--busy-jobs", "0", "1", "--repeats", "1", "--settle", "0", "--output",
                 str(output)]) == 0
    figures = json.loads(output.read_text())
    assert [c["busy_jobs"] for c in figures["conditions"]] == [0, 1]
    for condition in figures["conditions"]:
        settings = condition["settings"]
        assert set(settings) == {"one thread", "every core", "default"}
        assert settings["default"]["threads"] == condition["default_threads"] >= 1
        assert all(s["median_s"] > 0 for s in settings.values())
