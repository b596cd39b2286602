"""Headless Slicer cohort job: segment every scan of a folder or CSV with a task file, with FMSeg's module Logic.

    Slicer --no-splash --no-main-window --python-script Examples/slicer_batch_cohort.py \\
        --inputs SCANS_FOLDER_OR_CASES.csv --task liver_spleen.fmseg-task --output OUTDIR [--device cpu] \\
        [--server http://gpu-host:8765 --token TOKEN]

The cases are those of ``fmseg batch``: a folder's scans (NIfTI, NRRD, MetaImage files; DICOM series as
sub-folders) or a CSV's rows (an 'image' column, an optional 'case' column). Each scan is loaded as Slicer loads
it, segmented by the worker with the task (its model, its classes' names and colours) into a segmentation node
whose segments carry their standard terminology, and saved by Slicer's segmentation storage node as
OUTDIR/<case>.seg.nrrd (atomically); the case's nodes leave the scene (and its volume the worker) after it.
OUTDIR is the results folder ``fmseg batch --inputs ... --task ... --output OUTDIR`` writes, with the same
voxels: results.csv (status, one-line error, volumes in ml, mean uncertainty, flags), qc/<case>.png overlays
(where Slicer's Python has matplotlib, torch and MONAI) and report.html. A rerun skips the cases done for the
same scan and task (by this script or ``fmseg batch``), and retries the others. Exit status 0: every case done; 1: some failed (see results.csv); 2: bad input (one line on
stderr), nothing run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

SEG_NRRD = ".seg.nrrd"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slicer_batch_cohort.py", description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", required=True, metavar="FOLDER|CSV",
                        help="a folder of scans or a CSV with an 'image' column")
    parser.add_argument("--task", required=True, help="a task file ('fmseg task create', or the module's Save task)")
    parser.add_argument("--output", required=True, metavar="OUTDIR", help="the results folder (made if absent)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--server", default="", help="a running 'fmseg serve' (default: start a local worker)")
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)

    import slicer
    from FMSegSlicerLib.logic import FMSegLogic

    from FMSegCore.batch.cases import read_cases
    from FMSegCore.batch.casework import check_overlays_possible
    from FMSegCore.batch.methods import TASK, MethodPlan, MethodSpec, method_sha256
    from FMSegCore.batch.results import RESULTS_FILE, read_results
    from FMSegCore.batch.run import BatchSettings, check_folder, check_outputs, plan_jobs, write_manifest
    from FMSegCore.errors import InputError
    from FMSegCore.io.labelmap import SegmentInfo

    folder, task = Path(args.output), Path(args.task)
    if not task.is_file():
        return _fail(task, "no such file")
    spec = MethodSpec(TASK, (str(task),))  # the worker applies a task with these (default) settings too
    # the same sha256 as 'fmseg batch --task' records: one results folder for both, reruns skipping each other's
    plan = MethodPlan(f"task {task.name}", None, True, method_sha256(spec))
    try:
        cases = read_cases(args.inputs)
        check_folder(folder, plan, False, Path(args.inputs))
        check_outputs(cases, folder, SEG_NRRD)
        previous = read_results(folder / RESULTS_FILE)
    except InputError as error:
        return _fail(None, str(error))

    logic = FMSegLogic(slicer.mrmlScene, device=args.device)
    try:
        try:
            logic.connect(args.server, args.token)
        except Exception as error:  # one line for the user, whatever went wrong
            return _fail(args.server or "the local FMSeg worker", str(error))
        try:
            info = logic.load_task(str(task))  # once: the worker keeps it for every case
        except Exception as error:
            return _fail(task, str(error))
        plan.description = f"task {task.name} ({info['model']}; 3D Slicer)"
        plan.structures = [SegmentInfo(int(c["value"]), str(c["name"]), tuple(c["color"])) for c in info["classes"]]
        folder.mkdir(exist_ok=True)
        overlay_problem = _overlay_problem(check_overlays_possible())
        if overlay_problem:
            print(f"Note: no overlay thumbnails ({overlay_problem})", file=sys.stderr)
        jobs, skipped = plan_jobs(cases, folder, previous, plan, SEG_NRRD, overlay_problem is None)
        write_manifest(folder, plan, BatchSettings(str(args.inputs), str(folder), spec, device=args.device,
                                                   format=SEG_NRRD))
        print(f"Cohort: {len(cases)} case(s); {len(skipped)} done before, {len(jobs)} to run; {plan.description}",
              flush=True)
        rows = dict(previous)
        for job in jobs:
            row = segment_case(logic, job)
            rows[row["case"]] = row
            _write_table(folder, list(rows.values()))  # after every case: a crash loses only the case in flight
            print(f"{row['case']}: {row['status']} ({row['seconds']} s){' ' + row['error'] if row['error'] else ''}",
                  flush=True)
    finally:
        logic.shutdown()
    return finish(folder, cases, rows, plan.description, len(jobs), len(skipped))


def segment_case(logic: Any, job: Any) -> dict[str, Any]:
    """Load, segment and save one case; its results row (failed, with its one-line error, on any problem). The
    case's nodes are removed from the scene afterwards, and its volume freed on the worker."""
    import slicer
    import slicer.util

    from FMSegCore.batch.casework import done_row, failed
    from FMSegCore.batch.methods import CaseSegmentation
    from FMSegCore.errors import InputError
    from FMSegCore.io.labelmap import read_labelmap
    from FMSegCore.io.volume import read_volume

    scene = slicer.mrmlScene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    began, volume = time.perf_counter(), None
    image_path = Path(job.case.image)
    try:
        if not image_path.exists():
            raise InputError(image_path, "no such file")
        volume = slicer.modules.volumes.logic().AddArchetypeVolume(str(_archetype(image_path)), job.case.case_id)
        if volume is None:
            raise InputError(image_path, "Slicer cannot read this volume")
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", job.case.case_id)
        result = logic.run_task(volume, segmentation, uncertainty=True)
        output = Path(job.folder) / job.output_name
        _save(segmentation, output)
        # the volumes are measured on what was written, on the scan's grid as FMSegCore reads it
        image = read_volume(image_path)
        labels, segments = read_labelmap(output, reference=image)
        node = result.get("uncertainty_node")
        spread = slicer.util.arrayFromVolume(node) if node is not None else None
        return done_row(job, image, CaseSegmentation(labels.array, segments, spread), time.perf_counter() - began)
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop the cohort: it is recorded
        return failed(job, error, time.perf_counter() - began)
    finally:
        logic.release_volume(volume)
        _remove_new_nodes(scene, before)


def _overlay_problem(problem: Optional[str]) -> Optional[str]:
    """Why no overlay PNGs can be drawn here: matplotlib missing (``problem``), or the intensity windows' MONAI and
    torch (Slicer's Python may lack them when the worker runs in an environment of its own)."""
    if problem is None:
        try:
            from FMSegCore.preprocessing.intensity import normalize  # noqa: F401 - what the overlays' grey uses
        except ImportError as error:
            return f"drawing them needs torch and MONAI in Slicer's Python, not only the worker's ({error})"
    return problem


def _archetype(image: Path) -> Path:
    """What Slicer loads a case from: the file, or a DICOM series' first file (ITK reads the series around it)."""
    if image.is_dir():
        files = sorted(p for p in image.iterdir() if p.is_file() and not p.name.startswith("."))
        return files[0] if files else image
    return image


def _save(segmentation: Any, output: Path) -> None:
    """Write the segmentation with Slicer's storage node, atomically: a half-written result never appears."""
    partial = output.with_name(f".{output.name}.partial{SEG_NRRD}")
    storage = segmentation.CreateDefaultStorageNode()
    storage.SetFileName(str(partial))
    if not storage.WriteData(segmentation):
        partial.unlink(missing_ok=True)
        raise OSError(f"{output}: Slicer could not write the segmentation")
    partial.replace(output)


def _remove_new_nodes(scene: Any, before: set[str]) -> None:
    """Remove the nodes added since ``before`` (volume, segmentation, uncertainty and their display and storage
    nodes), keeping singletons (the subject hierarchy)."""
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in reversed(added):
        if node is not None and node.GetID() not in before and not node.GetSingletonTag() \
                and scene.IsNodePresent(node):
            scene.RemoveNode(node)


def _write_table(folder: Path, rows: list[dict[str, Any]]) -> None:
    from FMSegCore.batch.results import RESULTS_FILE, write_results

    write_results(folder / RESULTS_FILE, rows)


def finish(folder: Path, cases: list[Any], rows: dict[str, dict[str, Any]], method: str, ran: int,
           skipped: int) -> int:
    """Flag the cohort, write results.csv and report.html as ``fmseg batch`` does; the exit status."""
    from FMSegCore.batch.qc import flag_rows
    from FMSegCore.batch.report import write_report
    from FMSegCore.batch.results import DONE, FAILED, RESULTS_FILE

    names = {case.case_id for case in cases}
    cohort = [rows[case.case_id] for case in cases if case.case_id in rows]
    # rows of cases no longer in the cohort: done ones stay (their outputs are there), failed ones go
    others = [row for name, row in rows.items() if name not in names and row.get("status") == DONE]
    flag_rows(cohort + others)
    _write_table(folder, cohort + others)
    report = write_report(folder, cohort + others, method)
    failures = [row for row in cohort if row.get("status") == FAILED]
    print(f"{ran - len(failures)} case(s) done now, {skipped} done before, {len(failures)} failed")
    for row in failures:
        print(f"  failed: {row['case']}: {row.get('error')}")
    print(f"Wrote {folder / RESULTS_FILE} and {report}")
    return 1 if failures else 0


def _fail(path: object, problem: str) -> int:
    line = " ".join(str(problem).split())
    print(f"{path}: {line}" if path is not None else line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
