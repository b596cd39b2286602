"""``fmseg batch`` on a real little cohort (copies of the bundled CT, cut and resampled, and a broken file): one
model load per worker, outputs on each scan's own grid, a bad scan recorded while the others go on, resumable
reruns, the local and Ray engines voxel-equal, the QC report rendered by a real headless Chromium, and bad input
refused in one line with nothing lost."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from FMSegCore.batch.qc import flag_rows
from FMSegCore.batch.report import render_report
from FMSegCore.cli.main import main
from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import read_volume
from FMSegCore.zoo.cache import resources_dir

CT = resources_dir() / "SampleData" / "ct_abdomen_pelvis"
STRUCTURES = ("liver", "spleen")


def _rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "results.csv").open(newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """Two scans cut and resampled from the bundled CT (other fields of view and spacings), a broken file, and a
    task for the liver and the spleen made from the whole CT."""
    import SimpleITK as sitk

    from FMSegCore.cli.incontext3d import task_to_file

    root = tmp_path_factory.mktemp("cohort")
    scans = root / "scans"
    scans.mkdir()
    image = sitk.ReadImage(str(CT / "image.nii.gz"))
    sitk.WriteImage(image[:, :, 50:70], str(scans / "upper.nii.gz"))
    size = [int(s * 3.0 / 5.0) for s in image.GetSize()]
    coarse = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [5.0] * 3,
                           image.GetDirection(), -1000.0)
    sitk.WriteImage(coarse, str(scans / "coarse.nrrd"))
    (scans / "broken.nii.gz").write_bytes(b"this is not a scan")
    task = root / "liver_spleen.fmseg-task"
    task_to_file([(CT / "image.nii.gz", CT / "label.nii.gz")], task, labels=list(STRUCTURES), device="cpu",
                 progress=False)
    local = root / "local"
    code = main(["batch", "--inputs", str(scans), "--output", str(local), "--task", str(task), "--device", "cpu",
                 "--no-progress"])
    return {"root": root, "scans": scans, "task": task, "local": local, "code": code}


def test_a_cohort_run_segments_every_good_scan_on_its_own_grid_and_records_the_bad_one(cohort):
    assert cohort["code"] == 1  # one case failed: the exit status says so
    rows = _rows(cohort["local"])
    assert set(rows) == {"upper", "coarse", "broken"}
    assert rows["broken"]["status"] == "failed"
    assert "broken.nii.gz" in rows["broken"]["error"] and "\n" not in rows["broken"]["error"]
    assert len({rows["upper"]["worker"], rows["coarse"]["worker"]}) == 1  # one worker held the model for both
    for case, source in (("upper", "upper.nii.gz"), ("coarse", "coarse.nrrd")):
        assert rows[case]["status"] == "done"
        scan = read_volume(cohort["scans"] / source)
        labels, segments = read_labelmap(cohort["local"] / f"{case}.seg.nrrd", reference=scan)
        assert labels.array.shape == scan.array.shape
        assert sorted(s.name for s in segments) == sorted(STRUCTURES)
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        for segment in segments:
            measured = float((labels.array == segment.value).sum()) * voxel_ml
            assert float(rows[case][f"{segment.name}_ml"]) == pytest.approx(measured, rel=1e-3)
        assert 0.0 <= float(rows[case]["mean_uncertainty"]) <= 1.0
        assert (cohort["local"] / rows[case]["overlay"]).stat().st_size > 1000
    assert not list(cohort["local"].glob(".*partial*"))


def test_a_rerun_skips_what_is_done_and_retries_what_failed(cohort, tmp_path, capsys):
    folder = tmp_path / "resumed"
    shutil.copytree(cohort["local"], folder)
    before = {case: (folder / f"{case}.seg.nrrd").stat().st_mtime_ns for case in ("upper", "coarse")}
    shutil.copy(cohort["scans"] / "upper.nii.gz", cohort["scans"] / "repaired.nii.gz")
    try:
        (cohort["scans"] / "broken.nii.gz").rename(tmp_path / "broken.nii.gz")
        code = main(["batch", "--inputs", str(cohort["scans"]), "--output", str(folder), "--task",
                     str(cohort["task"]), "--device", "cpu", "--no-progress"])
    finally:
        (cohort["scans"] / "repaired.nii.gz").unlink()
        (tmp_path / "broken.nii.gz").rename(cohort["scans"] / "broken.nii.gz")
    assert code == 0
    assert "1 case(s) done now, 2 done before, 0 failed" in capsys.readouterr().out
    assert {case: (folder / f"{case}.seg.nrrd").stat().st_mtime_ns for case in before} == before
    rows = _rows(folder)
    assert rows["repaired"]["status"] == "done" and "broken" not in rows  # a failed case gone from the cohort
    repaired, _ = read_labelmap(folder / "repaired.seg.nrrd")
    upper, _ = read_labelmap(folder / "upper.seg.nrrd")
    assert np.array_equal(repaired.array, upper.array)


def test_the_local_and_ray_engines_give_the_same_voxels(cohort, tmp_path):
    pytest.importorskip("ray", reason="the ray engine needs Ray (pip install 'fmseg[ray]')")
    folder = tmp_path / "ray"
    code = main(["batch", "--inputs", str(cohort["scans"]), "--output", str(folder), "--task", str(cohort["task"]),
                 "--engine", "ray", "--workers", "1", "--device", "cpu", "--no-progress"])
    assert code == 1
    ray_rows, local_rows = _rows(folder), _rows(cohort["local"])
    assert ray_rows["broken"]["status"] == "failed" and ray_rows["broken"]["error"] == local_rows["broken"]["error"]
    for case in ("upper", "coarse"):
        by_ray, _ = read_labelmap(folder / f"{case}.seg.nrrd")
        by_pool, _ = read_labelmap(cohort["local"] / f"{case}.seg.nrrd")
        assert (by_pool.array > 0).sum() > 1000
        assert np.array_equal(by_ray.array, by_pool.array)
    import pandas

    table = pandas.read_parquet(folder / "results.parquet")
    assert sorted(table["case"]) == ["broken", "coarse", "upper"]


def test_the_report_renders_in_headless_chromium_and_shows_every_case(cohort, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium here (.ci/run installs the Debian package)")
    page = cohort["local"] / "report.html"
    shown = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    assert 'data-ready="yes"' in dom  # the page's script ran to its end
    assert "3 cases in the table" in dom  # ... and counted the rows it shows
    for case in ("upper", "coarse", "broken"):
        assert f'data-case="{case}"' in dom
    assert dom.index('data-case="broken"') < dom.index('data-case="coarse"')  # failed cases first
    assert dom.count("<svg") == len(STRUCTURES)  # one volume plot per structure
    screenshot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={screenshot}",
                    "--window-size=1200,900", page.as_uri()], capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 10_000


def test_flags_name_missing_structures_and_volumes_far_from_the_median():
    rows = [{"case": f"c{i}", "status": "done", "liver_ml": str(v), "spleen_ml": "150"}
            for i, v in enumerate([1500, 1600, 1550, 5000, 0])]
    rows.append({"case": "bad", "status": "failed", "error": "x: unreadable"})
    flags = flag_rows(rows)
    assert flags["c3"] == ["liver 3.2x median"]
    assert flags["c4"] == ["missing liver"]
    assert flags["c0"] == flags["bad"] == []
    page = render_report(rows, "test")
    assert page.index("data-case='bad'") < page.index("data-case='c3'") < page.index("data-case='c0'")


def _refused(capsys, *arguments: str) -> str:
    code = main(["batch", *arguments, "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    return error


def test_bad_input_is_one_line_and_nothing_is_lost(cohort, tmp_path, capsys):
    task, scans = str(cohort["task"]), str(cohort["scans"])
    table = tmp_path / "cohort.csv"
    table.write_text("scan\nupper.nii.gz\n")
    assert "no 'image' column (columns: scan)" in _refused(capsys, "--inputs", str(table), "--output",
                                                           str(tmp_path / "a"), "--task", task)
    table.write_text("image,case\nupper.nii.gz,one\ncoarse.nrrd,one\n")
    assert "two cases are named 'one'" in _refused(capsys, "--inputs", str(table), "--output", str(tmp_path / "a"),
                                                   "--task", task)
    assert not (tmp_path / "a").exists()
    # a folder holding another task's results, or someone's files, is refused and left as it was
    other = tmp_path / "other"
    shutil.copytree(cohort["local"], other)
    (other / "batch.json").write_text('{"task_sha256": "another", "method": "task other.fmseg-task"}')
    before = sorted((p.name, p.stat().st_mtime_ns) for p in other.iterdir())
    assert "holds results of another task" in _refused(capsys, "--inputs", scans, "--output", str(other),
                                                       "--task", task)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in other.iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "not FMSeg batch results" in _refused(capsys, "--inputs", scans, "--output", str(mine), "--task", task)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "is the inputs' folder" in _refused(capsys, "--inputs", scans, "--output", scans, "--task", task)
    pytest.importorskip("ray", reason="the ray engine needs Ray")
    assert "nothing answers there" in _refused(capsys, "--inputs", scans, "--output", str(tmp_path / "b"),
                                               "--task", task, "--engine", "ray", "--address", "127.0.0.1:9")
    assert not (tmp_path / "b").exists()


def test_a_support_set_and_per_case_prompts_segment_a_cohort_too(cohort, tmp_path):
    """The two other methods on a 6 mm copy: the bundled CT as the support set (its spleen), and a CSV whose
    column names each case's markups (the kidney's box, in physical space, so it fits the copy too); a case whose
    prompts file is missing fails alone."""
    import SimpleITK as sitk

    table = tmp_path / "cohort.csv"
    coarse = tmp_path / "coarse_6mm.nii.gz"  # fewer slices than the cohort's 5 mm copy: a shorter test
    image = sitk.ReadImage(str(CT / "image.nii.gz"))
    sitk.WriteImage(sitk.Resample(image, [int(n * 3.0 / 6.0) for n in image.GetSize()], sitk.Transform(),
                                  sitk.sitkLinear, image.GetOrigin(), [6.0] * 3, image.GetDirection(), -1000.0),
                    str(coarse))
    table.write_text(f"case,image,prompts\ncoarse,{coarse},{CT / 'prompts' / 'kidney_left.mrk.json'}\n"
                     f"unprompted,{coarse},absent.mrk.json\n")
    support = tmp_path / "support"
    code = main(["batch", "--inputs", str(table), "--output", str(support), "--support", str(CT / "image.nii.gz"),
                 str(CT / "label.nii.gz"), "--labels", "spleen", "--device", "cpu", "--no-progress"])
    assert code == 0
    prompted = tmp_path / "prompted"
    code = main(["batch", "--inputs", str(table), "--output", str(prompted), "--prompts-column", "prompts",
                 "--device", "cpu", "--no-progress", "--format", ".nii.gz"])
    assert code == 1
    rows = _rows(prompted)
    assert rows["unprompted"]["status"] == "failed" and "absent.mrk.json: file not found" in rows["unprompted"]["error"]
    scan = read_volume(coarse)
    for folder, name, ending in ((support, "spleen", ".seg.nrrd"), (prompted, "kidney_left", ".nii.gz")):
        labels, segments = read_labelmap(folder / f"coarse{ending}", reference=scan)
        assert [s.name for s in segments] == [name]
        truth, truth_segments = read_labelmap(CT / "label.nii.gz")
        value = next(s.value for s in truth_segments if s.name == name)
        found_ml = float((labels.array > 0).sum()) * float(np.prod(scan.spacing)) / 1000.0
        true_ml = float((truth.array == value).sum()) * float(np.prod(truth.spacing)) / 1000.0
        assert 0.5 * true_ml < found_ml < 1.5 * true_ml, (name, found_ml, true_ml)


def test_a_folder_gives_one_case_per_scan_and_per_dicom_series_and_nothing_else(tmp_path):
    import SimpleITK as sitk

    from FMSegCore.batch.cases import read_cases
    from FMSegCore.batch.results import file_sha256

    image = sitk.ReadImage(str(CT / "image.nii.gz"))[:, :, 50:53]
    sitk.WriteImage(image, str(tmp_path / "patient 1.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "p2.nrrd"))
    series = tmp_path / "p3_dicom"
    series.mkdir()
    slices = sitk.Cast(image, sitk.sitkInt16)
    for index in range(slices.GetDepth()):
        sitk.WriteImage(slices[:, :, index], str(series / f"{index:03d}.dcm"))
    for other in ("results.csv", "p2.seg.nrrd", "p2.labels.json", ".hidden.nii.gz", "notes.txt"):
        (tmp_path / other).write_text("not a scan")
    (tmp_path / "empty_folder").mkdir()
    cases = read_cases(tmp_path)
    assert [case.case_id for case in cases] == ["p2", "p3_dicom", "patient_1"]
    digest = file_sha256(series)
    (series / "000.dcm").write_bytes((series / "000.dcm").read_bytes() + b"\0")
    assert file_sha256(series) != digest  # a changed slice changes the series' hash: a rerun redoes it
