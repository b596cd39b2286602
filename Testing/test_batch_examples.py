"""The headless Slicer batch example (the module's Logic on files) gives the same segmentation as the plain
``fmseg prompt`` CLI on the same Slicer files; bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

from FMSegCore.io.labelmap import read_labelmap  # noqa: E402
from FMSegCore.io.volume import read_volume  # noqa: E402
from FMSegCore.zoo.cache import resources_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASE = resources_dir() / "SampleData" / "ct_abdomen_pelvis"
PROMPTS = [CASE / "prompts" / "kidney_left.mrk.json", CASE / "prompts" / "spleen.mrk.json"]


def _batch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "Testing" / "run_in_scene.py"), str(ROOT / "Examples" / "slicer_batch_prompt.py"),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_slicer_batch_script_and_cli_agree_voxel_by_voxel(tmp_path):
    batch_output, cli_output = tmp_path / "batch.seg.nrrd", tmp_path / "cli.seg.nrrd"
    batch = _batch("--image", str(CASE / "image.nii.gz"), "--prompts", *map(str, PROMPTS), "--output",
                   str(batch_output), "--device", "cpu")
    assert batch.returncode == 0, batch.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-m", "FMSegCore", "prompt", "--image", str(CASE / "image.nii.gz"),
                          "--prompts", *map(str, PROMPTS), "--output", str(cli_output), "--device", "cpu",
                          "--no-progress"], capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr[-2000:]
    image = read_volume(CASE / "image.nii.gz")
    batch_labels, batch_segments = read_labelmap(batch_output, reference=image)
    cli_labels, cli_segments = read_labelmap(cli_output, reference=image)
    assert [s.name for s in batch_segments] == [s.name for s in cli_segments] == ["kidney_left", "spleen"]
    for mine, theirs in zip(batch_segments, cli_segments):
        batch_mask, cli_mask = batch_labels.array == mine.value, cli_labels.array == theirs.value
        assert cli_mask.sum() > 1000
        assert np.array_equal(batch_mask, cli_mask)
    assert not list(tmp_path.glob(".*partial*"))


def test_slicer_batch_script_refuses_bad_input_in_one_line(tmp_path):
    existing = tmp_path / "taken.seg.nrrd"
    existing.write_bytes(b"keep me")
    refused = _batch("--image", str(CASE / "image.nii.gz"), "--prompts", str(PROMPTS[0]), "--output", str(existing))
    assert refused.returncode == 2 and "exists already" in refused.stderr
    assert existing.read_bytes() == b"keep me"
    missing = _batch("--image", str(tmp_path / "absent.nii.gz"), "--prompts", str(PROMPTS[0]), "--output",
                     str(tmp_path / "new.seg.nrrd"))
    assert missing.returncode == 2 and "absent.nii.gz: no such file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new.seg.nrrd").exists()
