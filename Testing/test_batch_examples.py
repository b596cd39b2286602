"""The headless Slicer batch examples (the module's Logic on files) give the same segmentations as the plain CLI
on the same files: ``slicer_batch_prompt.py`` as ``fmseg prompt``, ``slicer_batch_cohort.py`` as ``fmseg batch
--task`` (on a real little cohort, with a bad scan recorded and reruns skipping what is done); bad input exits 2
with one line and writes nothing."""

from __future__ import annotations

import csv
import shutil
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


def _batch(*args: str, script: str = "slicer_batch_prompt.py") -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "Testing" / "run_in_scene.py"), str(ROOT / "Examples" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_slicer_batch_script_and_cli_agree_voxel_by_voxel(tmp_path):
    import SimpleITK as sitk

    # the bundled CT resampled to 4.5 mm (the markups are in physical space): the same check, fewer slices to run
    original = sitk.ReadImage(str(CASE / "image.nii.gz"))
    scan = tmp_path / "ct_4.5mm.nii.gz"
    sitk.WriteImage(sitk.Resample(original, [int(n * 3.0 / 4.5) for n in original.GetSize()], sitk.Transform(),
                                  sitk.sitkLinear, original.GetOrigin(), [4.5] * 3, original.GetDirection(), -1000.0),
                    str(scan))
    batch_output, cli_output = tmp_path / "batch.seg.nrrd", tmp_path / "cli.seg.nrrd"
    batch = _batch("--image", str(scan), "--prompts", *map(str, PROMPTS), "--output",
                   str(batch_output), "--device", "cpu")
    assert batch.returncode == 0, batch.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-m", "FMSegCore", "prompt", "--image", str(scan),
                          "--prompts", *map(str, PROMPTS), "--output", str(cli_output), "--device", "cpu",
                          "--no-progress"], capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr[-2000:]
    image = read_volume(scan)
    batch_labels, batch_segments = read_labelmap(batch_output, reference=image)
    cli_labels, cli_segments = read_labelmap(cli_output, reference=image)
    assert [s.name for s in batch_segments] == [s.name for s in cli_segments] == ["kidney_left", "spleen"]
    for mine, theirs in zip(batch_segments, cli_segments):
        batch_mask, cli_mask = batch_labels.array == mine.value, cli_labels.array == theirs.value
        assert cli_mask.sum() > 300
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


# ------------------------------------------------------------------------------------------------ cohorts

STRUCTURES = {"liver": "10200004", "spleen": "78961009"}  # and their SNOMED CT codes (the terminology's type)
GOOD = {"upper": "upper.nii.gz", "coarse": "coarse.nrrd", "ct_dicom": "ct_dicom"}


def _cohort_script(*args: str) -> subprocess.CompletedProcess:
    return _batch(*args, script="slicer_batch_cohort.py")


def _rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "results.csv").open(newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _write_dicom_series(image, folder: Path) -> None:
    """``image`` (SimpleITK) as a CT DICOM series, one file per slice, in ``folder``."""
    import SimpleITK as sitk

    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.16"
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in (("0020|000d", uid), ("0020|000e", f"{uid}.1"), ("0008|0018", f"{uid}.2.{k}"),
                           ("0008|0060", "CT"), ("0020|0013", str(k)),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "\\".join(map(str, direction[0:3] + direction[3:6])))):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """Three scans cut and resampled from the bundled CT (a NIfTI, a coarse NRRD, a DICOM series), a broken
    file and a liver and spleen task; the cohort segmented by the Slicer script and by ``fmseg batch``."""
    import SimpleITK as sitk

    from FMSegCore.cli.incontext3d import task_to_file
    from FMSegCore.cli.main import main

    root = tmp_path_factory.mktemp("cohort")
    scans = root / "scans"
    scans.mkdir()
    image = sitk.ReadImage(str(CASE / "image.nii.gz"))
    sitk.WriteImage(image[:, :, 50:70], str(scans / "upper.nii.gz"))
    coarse = sitk.Resample(image, [int(s * 3.0 / 5.0) for s in image.GetSize()], sitk.Transform(), sitk.sitkLinear,
                           image.GetOrigin(), [5.0] * 3, image.GetDirection(), -1000.0)
    sitk.WriteImage(coarse, str(scans / "coarse.nrrd"))
    _write_dicom_series(image[:, :, 50:70], scans / "ct_dicom")
    (scans / "broken.nii.gz").write_bytes(b"this is not a scan")
    task = root / "liver_spleen.fmseg-task"
    task_to_file([(CASE / "image.nii.gz", CASE / "label.nii.gz")], task, labels=list(STRUCTURES), device="cpu",
                 progress=False)
    slicer_folder, cli_folder = root / "slicer", root / "cli"
    run = _cohort_script("--inputs", str(scans), "--task", str(task), "--output", str(slicer_folder), "--device",
                         "cpu")
    code = main(["batch", "--inputs", str(scans), "--task", str(task), "--output", str(cli_folder), "--device",
                 "cpu", "--no-progress"])
    return {"scans": scans, "task": task, "slicer": slicer_folder, "cli": cli_folder, "run": run, "cli_code": code}


def test_the_cohort_script_gives_fmseg_batchs_voxels_with_terminology_and_records_the_bad_scan(cohort):
    import slicerio

    run, folder = cohort["run"], cohort["slicer"]
    assert run.returncode == 1, run.stderr[-2000:]  # one case failed: the exit status says so
    assert cohort["cli_code"] == 1
    assert "3 case(s) done now, 0 done before, 1 failed" in run.stdout
    rows, cli_rows = _rows(folder), _rows(cohort["cli"])
    assert set(rows) == set(cli_rows) == {*GOOD, "broken"}
    broken = rows["broken"]
    assert broken["status"] == "failed" and broken["output"] == ""
    assert broken["error"] == f"{cohort['scans'] / 'broken.nii.gz'}: Slicer cannot read this volume"
    assert not (folder / "broken.seg.nrrd").exists()
    for case, source in GOOD.items():
        row, cli_row = rows[case], cli_rows[case]
        assert row["status"] == "done" and row["output"] == f"{case}.seg.nrrd", row["error"]
        assert row["task_sha256"] == cli_row["task_sha256"] and row["input_sha256"] == cli_row["input_sha256"]
        scan = read_volume(cohort["scans"] / source)
        labels, segments = read_labelmap(folder / row["output"], reference=scan)
        cli_labels, cli_segments = read_labelmap(cohort["cli"] / cli_row["output"], reference=scan)
        assert labels.array.shape == scan.array.shape
        assert sorted(s.name for s in segments) == sorted(STRUCTURES)
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        for segment in segments:
            theirs = next(s for s in cli_segments if s.name == segment.name)
            mask, cli_mask = labels.array == segment.value, cli_labels.array == theirs.value
            assert cli_mask.sum() > 1000, (case, segment.name)
            assert np.array_equal(mask, cli_mask), (case, segment.name)
            assert float(row[f"{segment.name}_ml"]) == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
            assert row[f"{segment.name}_ml"] == cli_row[f"{segment.name}_ml"]
        assert float(row["mean_uncertainty"]) == pytest.approx(float(cli_row["mean_uncertainty"]), abs=1e-4)
        assert (folder / row["overlay"]).stat().st_size > 1000
        # written by Slicer's storage node, with the terminology the module gives known structures
        written = slicerio.read_segmentation(str(folder / row["output"]), skip_voxels=True)
        codes = {s["name"]: s["terminology"]["type"] for s in written["segments"]}
        assert {name: code[1] for name, code in codes.items()} == STRUCTURES
        assert codes["liver"][2] == "Liver"
    report = (folder / "report.html").read_text(encoding="utf-8")
    assert all(f"data-case='{case}'" in report for case in rows)
    assert not list(folder.glob(".*partial*"))


def test_a_rerun_of_the_cohort_script_skips_the_done_cases(cohort, tmp_path):
    folder = tmp_path / "again"
    shutil.copytree(cohort["slicer"], folder)
    written = {case: (folder / f"{case}.seg.nrrd").stat().st_mtime_ns for case in GOOD}
    rerun = _cohort_script("--inputs", str(cohort["scans"]), "--task", str(cohort["task"]), "--output",
                           str(folder), "--device", "cpu")
    assert rerun.returncode == 1, rerun.stderr[-2000:]  # the broken scan is tried again, and fails again
    assert "0 case(s) done now, 3 done before, 1 failed" in rerun.stdout
    assert {case: (folder / f"{case}.seg.nrrd").stat().st_mtime_ns for case in GOOD} == written
    rows = _rows(folder)
    assert [rows[case]["status"] for case in GOOD] == ["done"] * 3 and rows["broken"]["status"] == "failed"


def test_the_cohort_script_refuses_bad_input_in_one_line_and_runs_nothing(cohort, tmp_path):
    scans, task = str(cohort["scans"]), str(cohort["task"])
    missing = _cohort_script("--inputs", scans, "--task", str(tmp_path / "absent.fmseg-task"), "--output",
                             str(tmp_path / "out"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"{tmp_path / 'absent.fmseg-task'}: no such file"
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    taken = _cohort_script("--inputs", scans, "--task", task, "--output", str(a_file))
    assert taken.returncode == 2 and taken.stderr.strip() == f"{a_file}: is a file; the output must be a folder"
    assert a_file.read_text() == "keep me"
    nothing = _cohort_script("--inputs", str(tmp_path / "none"), "--task", task, "--output", str(tmp_path / "out"))
    assert nothing.returncode == 2 and nothing.stderr.strip() == f"{tmp_path / 'none'}: no such file or folder"
    not_a_task = tmp_path / "scan.fmseg-task"
    shutil.copy(cohort["scans"] / "upper.nii.gz", not_a_task)
    refused = _cohort_script("--inputs", scans, "--task", str(not_a_task), "--output", str(tmp_path / "out"),
                             "--device", "cpu")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert refused.stderr.startswith(f"{not_a_task}: ")
    assert not (tmp_path / "out").exists()
