"""Tasks of 3-D in-context models (``iris-fmseg``) on a worker started for real on 127.0.0.1: task files uploaded
and downloaded byte for byte, task jobs that encode uploaded supports, in-context jobs with a task or with a 3-D
model and supports, the same voxels as ``fmseg task create`` / ``fmseg incontext --task`` on the same files, and
the refusals (one line, the worker's usual 4xx).

The model's weights may be untrained placeholders: these tests check behaviour and equality with the CLI, never
the quality of the segmentation. Crops of the bundled CT keep them short on one core.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import requests
import torch
from worker_fixtures import CT_CASE, TOKEN, running_worker, upload

from FMSegCore.cli.main import main
from FMSegCore.engines.incontext.task_file import load_task, save_task, task_metadata
from FMSegCore.engines.incontext.volume3d import apply_task, create_task
from FMSegCore.io.labelmap import read_labelmap, write_labelmap
from FMSegCore.io.volume import Volume, read_volume, write_volume
from FMSegCore.models.factory import load_model
from FMSegCore.server.client import WorkerClient, WorkerError
from FMSegCore.server.service import Service
from FMSegCore.zoo.registry import get_card

MODEL = "iris-fmseg"
LIVER, SPLEEN = 5, 1
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def crop(volume: Volume, start_kji: tuple[int, int, int], stop_kji: tuple[int, int, int]) -> Volume:
    """A sub-volume with its geometry (origin moved to its first voxel)."""
    box = tuple(slice(a, b) for a, b in zip(start_kji, stop_kji))
    origin = volume.ijk_to_lps(np.array(start_kji[::-1], dtype=float))[0]
    return Volume(np.ascontiguousarray(volume.array[box]), volume.spacing, tuple(origin),
                  np.array(volume.direction, dtype=float))


@pytest.fixture(scope="module")
def one_core():
    """One torch thread for the worker and the CLI alike (both would tune the process to every core)."""
    with pytest.MonkeyPatch.context() as patch:
        for where in ("FMSegCore.device.tune_cpu_runtime", "FMSegCore.server.service.tune_cpu_runtime"):
            patch.setattr(where, lambda threads=None: None)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worker(one_core):
    with running_worker(service=Service("cpu")) as server:
        yield server


@pytest.fixture(scope="module")
def client(worker):
    client = WorkerClient(worker.url, TOKEN)
    yield client
    client.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A reference crop around the liver and the spleen (image and label map with its labels.json) and a smaller
    query crop of the same scan, as files; the volumes as read back from them (the worker gets the very arrays and
    geometry the CLI reads)."""
    folder = tmp_path_factory.mktemp("tasks")
    image = read_volume(CT_CASE / "image.nii.gz")
    labels, segments = read_labelmap(CT_CASE / "label.nii.gz", reference=image)
    start, stop = (72, 20, 8), (112, 90, 106)
    write_volume(crop(image, start, stop), folder / "ref.nii.gz")
    write_labelmap(crop(labels, start, stop).array, crop(image, start, stop), folder / "ref_labels.nii.gz", segments)
    write_volume(crop(image, (74, 28, 40), (112, 84, 100)), folder / "query.nii.gz")
    reference = read_volume(folder / "ref.nii.gz")
    reference_labels, reference_segments = read_labelmap(folder / "ref_labels.nii.gz", reference=reference)
    return {"folder": folder, "reference": reference, "labels": reference_labels,
            "segments": {s.value: s for s in reference_segments}, "query": read_volume(folder / "query.nii.gz")}


@pytest.fixture(scope="module")
def uploaded(client, files):
    """The reference uploaded: its image and its label map (named segments), ids on the worker."""
    segments = [{"value": s.value, "name": s.name, "color": list(s.color)} for s in files["segments"].values()]
    image_id = upload(client, files["reference"])
    labels_id = upload(client, files["reference"], files["labels"].array.astype(np.uint16), segments=segments)
    return {"image": image_id, "labels": labels_id}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, files, one_core):
    """A task file (liver and spleen) made in-process, as ``fmseg task create`` makes it."""
    model = load_model(MODEL, "cpu")
    classes = [files["segments"][LIVER], files["segments"][SPLEEN]]
    built = create_task(model, [(files["reference"], files["labels"])], classes, modality="CT")
    path = tmp_path_factory.mktemp("task") / "upper.fmseg-task"
    save_task(path, built.task, task_metadata(MODEL, model, built, "CT", "abdomen"))
    return path


def run_cli(capsys, *argv) -> None:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def refused(response: requests.Response, status: int, words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert words in message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ task files


def test_a_task_file_uploads_and_downloads_byte_for_byte(client, task_file):
    data = task_file.read_bytes()
    before = client.info()["tasks"]
    info = client.upload_task(data)
    _, metadata = load_task(task_file)
    assert info["model"] == MODEL and info["model_sha256"] == get_card(MODEL).sha256
    assert info["classes"] == [{"value": c.value, "name": c.name, "color": list(c.color)} for c in metadata.classes]
    assert [c["name"] for c in info["classes"]] == ["liver", "spleen"]
    assert info["spacing_mm"] == list(metadata.spacing_mm) and info["patch_shape"] == list(metadata.patch_shape)
    assert info["references"] == 1 and info["references_sha256"] == metadata.references_sha256
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert client.download_task(info["task"]) == data
    assert client.info()["tasks"] == before + 1
    again = client.upload_task(data)  # the same file twice: two tasks, the same bytes
    assert again["task"] != info["task"] and client.download_task(again["task"]) == data


def test_bad_task_files_are_refused_in_one_line_and_nothing_is_kept(worker, client, task_file):
    good = torch.load(str(task_file), weights_only=True)

    def edited(**changes) -> bytes:
        buffer = io.BytesIO()
        torch.save({**good, **changes}, buffer)
        return buffer.getvalue()

    def tensor() -> bytes:
        buffer = io.BytesIO()
        torch.save(torch.zeros(3), buffer)
        return buffer.getvalue()

    data = task_file.read_bytes()
    cases = {
        b"hello": "not an FMSeg task file",
        data[: len(data) // 2]: "damaged or truncated task file",
        tensor(): "a torch file of something else",
        edited(model_sha256="0" * 64): "task made for other weights of 'iris-fmseg'",
        edited(model="universeg-fmseg", model_sha256=get_card("universeg-fmseg").sha256): "is a 2-D incontext model",
        edited(model="no-such-model"): "which this FMSeg does not know",
        edited(classes=[{"value": 1, "name": "x", "color": [1, 0, 0]}]): "2 task rows for 1 classes",
        edited(version=99): "written by a newer FMSeg",
    }
    before = set(worker.service.tasks)
    for body, words in cases.items():
        response = requests.post(f"{worker.url}/v1/tasks", headers=AUTH, data=body, timeout=30)
        message = refused(response, 400, words)
        assert message.startswith("task: "), message
    assert set(worker.service.tasks) == before
    with pytest.raises(WorkerError, match="no task 'nothing'") as missing:
        client.download_task("nothing")
    assert missing.value.status == 404
    too_big = requests.post(f"{worker.url}/v1/tasks", headers=AUTH, data=b"\0" * (5 * 1024 * 1024 + 1), timeout=30)
    refused(too_big, 413, "longer than")


# ------------------------------------------------------------------------------------------------ jobs


def test_a_task_job_makes_the_task_fmseg_task_create_makes_and_applied_by_id_it_equals_fmseg_incontext_task(
        client, uploaded, files, tmp_path, capsys):
    seen = []
    started = client.start_job("task", {"supports": [uploaded], "classes": ["liver", SPLEEN], "modality": "CT"})
    status = client.wait(started["id"], progress=seen.append, interval=0.05)
    info = status["result"]
    assert status["kind"] == "task" and seen[-1].message == "task ready"
    assert info["model"] == MODEL and [(c["value"], c["name"]) for c in info["classes"]] == \
        [(LIVER, "liver"), (SPLEEN, "spleen")]
    assert info["classes"][0]["color"] == list(files["segments"][LIVER].color)
    data = client.download_task(info["task"])
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    worker_file = tmp_path / "worker.fmseg-task"
    worker_file.write_bytes(data)

    # the task the CLI makes from the same files is the same task
    folder = files["folder"]
    cli_file = tmp_path / "cli.fmseg-task"
    run_cli(capsys, "task", "create", "--support", folder / "ref.nii.gz", folder / "ref_labels.nii.gz", "--labels",
            "liver", str(SPLEEN), "--output", cli_file, "--modality", "CT", "--no-progress")
    task, metadata = load_task(worker_file, model=MODEL)
    cli_task, cli_metadata = load_task(cli_file)
    assert torch.equal(task, cli_task)
    assert metadata.classes == cli_metadata.classes and metadata.references_sha256 == cli_metadata.references_sha256

    # applied by its id, it segments the query voxel for voxel as fmseg incontext --task does
    job = client.start_job("incontext", {"volume": upload(client, files["query"]), "task": info["task"],
                                         "modality": "CT", "uncertainty": True})
    status = client.wait(job["id"], interval=0.05)
    assert status["result"]["segments"] == info["classes"] and status["result"]["task"] == info["task"]
    assert sorted(status["arrays"]) == ["labels", "uncertainty"]
    labels, _ = client.job_array(job["id"], "labels")
    entropy, _ = client.job_array(job["id"], "uncertainty")
    output, cli_entropy = tmp_path / "cli.nii.gz", tmp_path / "cli_entropy.nii.gz"
    run_cli(capsys, "incontext", "--task", worker_file, "--image", folder / "query.nii.gz", "--output", output,
            "--uncertainty", cli_entropy, "--modality", "CT", "--no-progress")
    expected = read_volume(output, allow_empty=True).array
    assert labels.shape == expected.shape == files["query"].array.shape and labels.dtype == np.uint16
    assert np.array_equal(labels, expected)
    assert np.allclose(entropy, read_volume(cli_entropy, allow_empty=True).array, atol=1e-6)
    assert set(np.unique(labels)) <= {0, LIVER, SPLEEN}

    # one class of the task, named by value; the task's model named explicitly is accepted
    job = client.start_job("incontext", {"volume": upload(client, files["query"]), "task": info["task"],
                                         "classes": [str(SPLEEN)], "model": MODEL, "modality": "CT"})
    status = client.wait(job["id"], interval=0.05)
    assert [s["name"] for s in status["result"]["segments"]] == ["spleen"] and status["arrays"] == ["labels"]
    spleen, _ = client.job_array(job["id"], "labels")
    assert set(np.unique(spleen)) <= {0, SPLEEN}


def test_a_3d_model_with_supports_builds_the_task_on_the_fly(client, uploaded, files):
    job = client.start_job("incontext", {"volume": upload(client, files["query"]), "model": MODEL,
                                         "supports": [uploaded], "classes": ["spleen"], "modality": "CT",
                                         "uncertainty": True})
    status = client.wait(job["id"], interval=0.05)
    result = status["result"]
    assert result["dims"] == 3 and result["model"] == MODEL and result["task"] is None
    assert [(s["value"], s["name"]) for s in result["segments"]] == [(SPLEEN, "spleen")]
    labels, _ = client.job_array(job["id"], "labels")
    entropy, _ = client.job_array(job["id"], "uncertainty")
    model = load_model(MODEL, "cpu")
    classes = [files["segments"][SPLEEN]]
    built = create_task(model, [(files["reference"], files["labels"])], classes, modality="CT")
    expected = apply_task(model, built, files["query"], classes, modality="CT", uncertainty=True)
    assert np.array_equal(labels, expected.labels)
    assert np.allclose(entropy, expected.uncertainty, atol=1e-6)
    assert entropy.shape == files["query"].array.shape and 0 <= entropy.min() and entropy.max() <= 1


def test_task_and_3d_requests_are_refused_in_one_line(worker, client, uploaded, files, task_file):
    task_id = client.upload_task(task_file.read_bytes())["task"]
    query = upload(client, files["query"])
    jobs_before = len(worker.service.jobs.jobs)

    def post(route: str, body: dict) -> requests.Response:
        return requests.post(f"{worker.url}/v1/jobs/{route}", headers=AUTH, json=body, timeout=30)

    refused(post("incontext", {"volume": query}), 400, "give either 'supports' (labelled examples) or 'task'")
    refused(post("incontext", {"volume": query, "task": task_id, "supports": [uploaded]}), 400, "not both")
    refused(post("incontext", {"volume": query, "task": task_id, "model": "universeg-fmseg"}), 400,
            f"incontext: task '{task_id}' was made for model 'iris-fmseg', not 'universeg-fmseg'")
    refused(post("incontext", {"volume": query, "task": "nothing"}), 404, "incontext.task: no task 'nothing'")
    refused(post("incontext", {"volume": query, "task": task_id, "classes": ["kidney"]}), 400,
            "incontext.classes: the task has no class 'kidney'")
    refused(post("incontext", {"volume": query, "task": task_id, "window": "brain"}), 400, "unknown CT window")
    mr = read_volume(CT_CASE.parent / "mr_abdomen" / "image.nii.gz")
    mr_query = upload(client, crop(mr, (0, 0, 0), (12, 64, 64)))
    refused(post("incontext", {"volume": mr_query, "task": task_id}), 400,
            "incontext.volume: looks like MR but the task's references are CT")
    refused(post("incontext", {"volume": mr_query, "model": MODEL, "supports": [uploaded]}), 400,
            "incontext.volume: looks like MR")
    refused(post("incontext", {"volume": query, "model": MODEL, "supports": [uploaded], "classes": ["heart"]}), 400,
            "incontext.supports: unknown label 'heart'")
    refused(post("task", {"supports": [uploaded], "model": "universeg-fmseg"}), 400,
            "model 'universeg-fmseg' is a 2-D incontext model")
    refused(post("task", {"supports": [uploaded], "model": "litemedsam"}), 400, "is not a incontext model")
    refused(post("task", {"supports": [{"image": uploaded["image"], "labels": uploaded["image"]}]}), 400,
            "task.supports[0].labels: volume")
    refused(post("task", {"supports": [{"image": query, "labels": uploaded["labels"]}]}), 400,
            "task.supports[0]: label map shape")
    refused(post("task", {"supports": []}), 400, "task: field 'supports' must hold at least 1 item")
    refused(post("task", {"supports": [uploaded], "modality": "PET"}), 400, "task: field 'modality' must be one of")
    assert len(worker.service.jobs.jobs) == jobs_before  # no job started
