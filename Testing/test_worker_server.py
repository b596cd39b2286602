"""The worker, started for real on 127.0.0.1: wire format, sessions, prompt round trips equal to in-process
results, jobs with progress and cancellation, tokens, refused requests, the API's description, images versus
label maps, idle sessions, logging."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from worker_fixtures import TOKEN, ct_case, kidney_roi, running_worker, sub_volume, upload

from FMSegCore.engines.adaptation.defaults import DEFAULT_PIXEL_MM
from FMSegCore.engines.prompting.session import PromptSession
from FMSegCore.errors import FMSegError
from FMSegCore.io.volume import Volume
from FMSegCore.models.factory import load_model
from FMSegCore.progress import Progress
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts
from FMSegCore.server.app import MAX_JSON_BYTES, WorkerServer
from FMSegCore.server.client import JobCancelledError, WorkerClient, WorkerError, WorkerUnavailable, geometry
from FMSegCore.server.gate import Gate, GateSettings
from FMSegCore.server.launcher import LocalWorker
from FMSegCore.server.service import Service
from FMSegCore.server.wire import WireError, decode_array, decode_mask, encode_array, encode_mask


@pytest.fixture(scope="module")
def worker():
    with running_worker() as server:
        yield server


@pytest.fixture(scope="module")
def client(worker):
    client = WorkerClient(worker.url, TOKEN)
    yield client
    client.close()


@pytest.fixture(scope="module")
def case():
    return ct_case()


# ------------------------------------------------------------------------------------------------ wire


def test_frames_round_trip_every_dtype_and_masks_travel_as_small_crops():
    rng = np.random.default_rng(0)
    for dtype in ("uint8", "int16", "uint16", "int32", "float32", "float64"):
        array = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
        for compress in (False, True):
            back, meta = decode_array(encode_array(array, {"a": 1}, compress))
            assert back.dtype == array.dtype and np.array_equal(back, array) and meta == {"a": 1}
    mask = np.zeros((200, 256, 256), dtype=bool)
    mask[50:60, 100:140, 30:90] = rng.random((10, 40, 60)) > 0.3
    frame = encode_mask(mask, {"name": "x"})
    assert len(frame) < 4000  # 13 M voxels, a few kB on the wire
    back, meta = decode_mask(frame)
    assert np.array_equal(back, mask) and meta == {"name": "x"}
    empty, _ = decode_mask(encode_mask(np.zeros((4, 5, 6), dtype=bool)))
    assert empty.shape == (4, 5, 6) and not empty.any()


@pytest.mark.parametrize("damage, problem", [
    (lambda f: b"XX" + f[2:], "magic"),
    (lambda f: f[:-3], "bytes of data"),
    (lambda f: f[:7] + (10 ** 9).to_bytes(4, "little") + f[11:], "header length"),
    (lambda f: f.replace(b'"int16"', b'"objec"'), "unsupported"),
])
def test_damaged_frames_are_refused_with_the_reason(damage, problem):
    frame = encode_array(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    with pytest.raises(WireError, match=problem):
        decode_array(damage(frame))


# ------------------------------------------------------------------------------------------------ prompting


def test_prompt_round_trip_equals_the_in_process_session_and_clicks_reuse_the_embeddings(client, case):
    image, labels, names = case
    lo, hi = kidney_roi(labels, names)
    kidney = labels == names["kidney_left"]
    volume_id = upload(client, image)
    session_id = client.open_session(volume_id, model="litemedsam", precision="fp32")
    mask, info = client.prompt(session_id, "kidney", boxes=[(lo, hi)])
    assert info["encoded"] == 4 and info["decoded"] >= 4  # the ROI's 4 slices, no more

    local = PromptSession(image, load_model("litemedsam", "cpu"), "cpu")
    expected = local.segment(SegmentPrompts("kidney", [BoxPrompt(lo, hi)]))
    assert mask.shape == image.array.shape and mask.dtype == bool
    assert np.array_equal(mask, expected)  # voxel for voxel
    inside = kidney[int(lo[2]):int(hi[2]) + 1]
    assert 2 * (mask[int(lo[2]):int(hi[2]) + 1] & inside).sum() / (mask.sum() + inside.sum()) > 0.8

    k = int(lo[2]) + 1
    j, i = np.argwhere(mask[k])[0]
    click = ((float(i), float(j), float(k)), False)
    corrected, info = client.prompt(session_id, "kidney", boxes=[(lo, hi)], points=[click])
    assert info["encoded"] == 0 and 1 <= info["decoded"] <= 4  # the decoder only: its slice, the ones it carries to
    assert not corrected[k, j, i]
    expected = local.segment(SegmentPrompts("kidney", [BoxPrompt(lo, hi)], [PointPrompt(click[0], False)]))
    assert np.array_equal(corrected, expected)
    client.close_session(session_id)
    with pytest.raises(WorkerError, match="no session") as error:
        client.prompt(session_id, "kidney", boxes=[(lo, hi)])
    assert error.value.status == 404


@pytest.mark.parametrize("body, status, words", [
    ({"boxes": [{"lo": [1, 1, 1], "hi": [2, 2, 2]}]}, 400, "missing field 'name'"),
    ({"name": "x"}, 400, "no box and no include point"),
    ({"name": "x", "points": [{"ijk": [1e4, 1, 1]}]}, 400, "outside the volume"),
    ({"name": "x", "boxes": [{"lo": [1, 1], "hi": [2, 2, 2]}]}, 400, "list of 3 numbers"),
    ({"name": 3}, 400, "must be a string"),
])
def test_malformed_prompts_get_one_line_errors(client, case, body, status, words):
    volume_id = upload(client, case[0])
    session_id = client.open_session(volume_id)
    response = client.http.post(f"{client.url}/v1/sessions/{session_id}/prompt", json=body)
    assert response.status_code == status
    message = response.json()["error"]
    assert words in message and "\n" not in message


def test_token_is_required_and_checked(worker, client, case):
    before = len(worker.service.volumes)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = requests.post(f"{worker.url}/v1/volumes", headers=headers,
                                 data=encode_array(case[0].array[:2], {"spacing": [1, 1, 1]}))
        assert response.status_code == 401 and "token" in response.json()["error"]
    assert len(worker.service.volumes) == before  # nothing stored
    assert client.info()["device"] == "cpu"  # and the right token still works on the same server


def test_oversize_malformed_and_unknown_requests_are_refused_and_the_worker_keeps_serving(worker, client):
    url, auth = worker.url, {"Authorization": f"Bearer {TOKEN}"}
    big = requests.post(f"{url}/v1/sessions", headers={**auth, "Content-Type": "application/json"},
                        data=b" " * (MAX_JSON_BYTES + 1))
    assert big.status_code == 413
    worker.settings.max_upload_bytes = 1000
    try:
        upload = requests.post(f"{url}/v1/volumes", headers=auth, data=b"\0" * 1001)
        assert upload.status_code == 413 and "limit of 1000 bytes" in upload.json()["error"]
    finally:
        worker.settings.max_upload_bytes = 256 << 20
    chunked = requests.post(f"{url}/v1/volumes", headers=auth, data=iter([b"FMSEG1\n"]))
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    bad_json = requests.post(f"{url}/v1/sessions", headers=auth, data=b"{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    bad_frame = requests.post(f"{url}/v1/volumes", headers=auth, data=b"garbage")
    assert bad_frame.status_code == 400 and "magic" in bad_frame.json()["error"]
    flat = requests.post(f"{url}/v1/volumes", headers=auth,
                         data=encode_array(np.zeros((4, 4), np.int16), {"spacing": [1, 1, 1]}))
    assert flat.status_code == 400 and "3D array" in flat.json()["error"]
    no_geometry = requests.post(f"{url}/v1/volumes", headers=auth, data=encode_array(np.zeros((2, 2, 2), np.int16)))
    assert no_geometry.status_code == 400 and "spacing" in no_geometry.json()["error"]
    assert requests.get(f"{url}/v1/nothing", headers=auth).status_code == 404
    assert requests.get(f"{url}/v1/sessions", headers=auth).status_code == 405
    assert requests.get(f"{url}/v1/jobs/unknown", headers=auth).status_code == 404
    unknown_model = requests.post(f"{url}/v1/sessions", headers=auth, json={"volume": "x"})
    assert unknown_model.status_code == 404 and "upload it first" in unknown_model.json()["error"]
    assert client.info()["version"]  # still serving


ROUTES = {("get", "/v1/info"), ("get", "/v1/models"), ("post", "/v1/models/download"),
          ("post", "/v1/models/{model_id}/weights"), ("post", "/v1/volumes"),
          ("delete", "/v1/volumes/{volume_id}"), ("post", "/v1/adapters"), ("get", "/v1/adapters/{adapter_id}"),
          ("post", "/v1/tasks"), ("get", "/v1/tasks/{task_id}"),
          ("post", "/v1/sessions"), ("post", "/v1/sessions/{session_id}/prompt"),
          ("delete", "/v1/sessions/{session_id}"), ("post", "/v1/jobs/incontext"), ("post", "/v1/jobs/task"),
          ("post", "/v1/jobs/adapt"),
          ("post", "/v1/jobs/segment"), ("get", "/v1/jobs/{job_id}"), ("post", "/v1/jobs/{job_id}/cancel"),
          ("get", "/v1/jobs/{job_id}/arrays/{name}"), ("post", "/v1/shutdown")}


def test_the_api_is_described_at_openapi_json_and_docs_behind_the_token(worker):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/openapi.json", "/docs"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = requests.get(f"{worker.url}{path}", headers=headers)
            assert refused.status_code == 401 and "token" in refused.json()["error"]
    assert "text/html" in requests.get(f"{worker.url}/docs", headers=auth).headers["content-type"]
    schema = requests.get(f"{worker.url}/openapi.json", headers=auth).json()
    listed = {(method, path) for path, operations in schema["paths"].items() for method in operations}
    assert listed == ROUTES
    prompt = schema["paths"]["/v1/sessions/{session_id}/prompt"]["post"]
    assert prompt["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PromptRequest")
    assert "application/x-fmseg-array" in prompt["responses"]["200"]["content"]
    assert "application/x-fmseg-array" in schema["paths"]["/v1/volumes"]["post"]["requestBody"]["content"]
    assert all("422" not in operation["responses"] for operations in schema["paths"].values()
               for operation in operations.values())  # validation errors are answered 400
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    box = schema["components"]["schemas"]["Box"]["properties"]["lo"]
    assert box["minItems"] == box["maxItems"] == 3


@pytest.mark.parametrize("route, body, words", [
    ("sessions", {"volume": "v", "axis": "upwards"}, "session: field 'axis' must be one of"),
    ("sessions", {"volume": "v", "device": "gpu"}, "session: field 'device' must be auto, cpu"),
    ("sessions", [1, 2], "session: must be a JSON object"),
    ("jobs/adapt", {"cases": [{"image": "i", "labels": "l"}], "steps": 0}, "adapt: field 'steps' must be at least 1"),
    ("jobs/adapt", {"cases": [{"image": "a"}]}, "adapt.cases[0]: missing field 'labels'"),
    ("jobs/incontext", {"volume": "v", "supports": [{"image": "i", "labels": "l"}], "seed": "3"},
     "incontext: field 'seed' must be an integer"),
    ("jobs/incontext", {"volume": "v", "supports": [{"image": "i", "labels": "l"}], "uncertainty": 1},
     "field 'uncertainty' must be true or false"),
    ("jobs/adapt", {"cases": []}, "adapt: field 'cases' must hold at least 1 item"),
    ("jobs/incontext", {"volume": "v", "supports": []}, "incontext: field 'supports' must hold at least 1 item"),
    ("models/download", {}, "download: missing field 'model'"),
])
def test_request_fields_are_checked_by_their_models_and_refused_in_one_line_naming_the_field(worker, route, body,
                                                                                            words):
    response = requests.post(f"{worker.url}/v1/{route}", headers={"Authorization": f"Bearer {TOKEN}"}, json=body)
    assert response.status_code == 400
    message = response.json()["error"]
    assert words in message and "\n" not in message


def test_integer_images_stay_images_and_label_maps_say_so(worker, client, case):
    image = case[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    meta = geometry(image.spacing, image.origin, image.direction)

    def send(array, **extra):
        return requests.post(f"{worker.url}/v1/volumes", headers=auth, data=encode_array(array, {**meta, **extra}))

    for dtype in (np.int16, np.int32, np.uint8):  # a CT's thousands of values are no segments
        answer = send(image.array.astype(dtype)).json()
        assert answer["kind"] == "image" and answer["volume"] not in worker.service.segments
    labels = np.zeros(image.array.shape, np.int16)
    labels[10:20, 10:20, 10:20], labels[30:40, 30:40, 30:40] = 2, 5
    plain = send(labels, kind="labels").json()
    assert plain["kind"] == "labels"
    assert [(s.value, s.name) for s in worker.service.segments[plain["volume"]]] == [(2, "Segment_2"), (5, "Segment_5")]
    named = send(labels, segments=[{"value": 5, "name": "liver", "color": [0.8, 0.4, 0.3]}]).json()
    assert named["kind"] == "labels"
    assert [(s.value, s.name) for s in worker.service.segments[named["volume"]]] == [(5, "liver"), (2, "Segment_2")]
    refused = send(labels.astype(np.float32), kind="labels")
    assert refused.status_code == 400 and "holds integers" in refused.json()["error"]
    assert "field 'kind' must be one of" in send(labels, kind="mask").json()["error"]
    ct = upload(client, image)  # the client's plain upload: an image
    with pytest.raises(WorkerError, match=r"supports\[0\]\.labels: .* was uploaded as an image") as mixed_up:
        client.start_job("incontext", {"volume": ct, "supports": [{"image": ct, "labels": ct}]})
    assert mixed_up.value.status == 400


def test_idle_sessions_expire(case):
    image = sub_volume(case[0], np.arange(40, 44))
    with running_worker(service=Service("cpu", session_idle_s=0.5)) as server:
        client = WorkerClient(server.url, TOKEN)
        volume_id = upload(client, image)
        idle = client.open_session(volume_id)
        busy = client.open_session(volume_id)
        assert {idle, busy} <= set(server.service.sessions)
        server.service.sessions[busy].lock.acquire()  # as while it answers a prompt: never expired
        try:
            time.sleep(0.8)
            assert client.info()["sessions"] == 1 and busy in server.service.sessions
        finally:
            server.service.sessions[busy].lock.release()
        with pytest.raises(WorkerError, match="expired after") as expired:
            client.prompt(idle, "kidney", boxes=[((10, 10, 0), (20, 20, 1))])
        assert expired.value.status == 404  # the Slicer module opens a new session on a 404
        client.close()


def test_requests_are_logged_when_verbose_and_internal_errors_always_with_their_traceback(worker, client, capfd):
    worker.settings.verbose = True
    try:
        client.info()
        requests.get(f"{worker.url}/v1/jobs/none", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        worker.settings.verbose = False
    logged = capfd.readouterr().err
    assert re.search(r"GET /v1/info 200 [0-9.]+ ms", logged) and "GET /v1/jobs/none 404" in logged
    client.info()
    assert "/v1/info" not in capfd.readouterr().err  # quiet unless verbose

    async def broken(scope, receive, send):  # a route with a bug, behind the worker's gate
        raise ZeroDivisionError("division by zero")

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/info", "headers": [], "query_string": b""}
    asyncio.run(Gate(broken, GateSettings())(scope, receive, send))
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {"error": "internal error: ZeroDivisionError: division by zero"}
    logged = capfd.readouterr().err
    assert "Traceback (most recent call last)" in logged and "ZeroDivisionError" in logged


def test_a_worker_bound_beyond_this_machine_requires_a_token():
    with pytest.raises(FMSegError, match="token"):
        WorkerServer(Service("cpu"), "0.0.0.0", 0, token="")
    result = subprocess.run([sys.executable, "-m", "FMSegCore", "serve", "--host", "0.0.0.0", "--port", "0"],
                            capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "FMSEG_SERVER_TOKEN"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--token" in result.stderr


# ------------------------------------------------------------------------------------------------ jobs


def _support_and_query(case, structure="liver"):
    image, labels, names = case
    organ = np.flatnonzero((labels == names[structure]).any(axis=(1, 2)))
    support = organ[::6][:5]
    query = organ[len(organ) // 2 + 1: len(organ) // 2 + 3]
    return image, labels, names, support, query


def test_incontext_job_matches_the_in_process_session_and_reports_progress(client, case):
    from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
    from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
    from FMSegCore.io.labelmap import SegmentInfo

    image, labels, names, support, query = _support_and_query(case)
    support_labels = (labels[support] == names["liver"]).astype(np.uint16)
    support_volume = sub_volume(image, support)
    query_volume = sub_volume(image, query)
    image_id = upload(client, support_volume)
    labels_id = upload(client, support_volume, support_labels,
                       segments=[{"value": 1, "name": "liver", "color": [0.8, 0.4, 0.3]}])
    query_id = upload(client, query_volume)
    seen = []
    job = client.start_job("incontext", {"volume": query_id, "supports": [{"image": image_id, "labels": labels_id}],
                                         "support_size": 4, "ensemble": 2, "uncertainty": True, "match": "index"})
    status = client.wait(job["id"], progress=seen.append, interval=0.05)
    assert status["result"]["segments"] == [{"value": 1, "name": "liver", "color": [0.8, 0.4, 0.3]}]
    # one Progress a poll; the last: every block done, under the segment's name, no time left, time taken
    assert all(isinstance(update, Progress) for update in seen)
    assert seen[-1].step == seen[-1].total >= 1 and seen[-1].message == "liver"
    assert seen[-1].remaining is None and seen[-1].elapsed > 0
    result_labels, _ = client.job_array(job["id"], "labels")
    uncertainty, _ = client.job_array(job["id"], "uncertainty")

    example = example_from_arrays(support_volume.array, support_labels, [SegmentInfo(1, "liver", (0.8, 0.4, 0.3))])
    local = InContextSession(load_model("universeg-fmseg", "cpu"), SupportSet([example]), [1], axis=2,
                             settings=InContextSettings(support_size=4, ensemble=2), device="cpu")
    expected = local.segment_volume(query_volume.array, uncertainty=True)
    assert np.array_equal(result_labels, expected.labels)
    assert np.allclose(uncertainty, expected.uncertainty, atol=1e-6)
    truth = labels[query] == names["liver"]
    assert 2 * ((result_labels == 1) & truth).sum() / ((result_labels == 1).sum() + truth.sum()) > 0.7


def test_incontext_job_aligns_a_support_from_another_scan_like_the_cli_engine(client):
    from FMSegCore.bench.cross_scenarios import sample_scan, shifted_copy
    from FMSegCore.engines.incontext.anatomical import AnatomicalInContext
    from FMSegCore.engines.incontext.session import InContextSettings
    from FMSegCore.engines.incontext.support import SupportScan
    from FMSegCore.io.labelmap import SegmentInfo

    mr = sample_scan("mr_abdomen")
    query = shifted_copy(mr, keep=(0.35, 1.0), spacing=(1.5, 1.5, 3.0))  # another grid, LAS, another frame
    liver = (mr.labels == mr.value_of("liver")).astype(np.uint16)
    image_id = upload(client, mr.volume)
    labels_id = upload(client, mr.volume, liver, segments=[{"value": 1, "name": "liver", "color": [0.8, 0.4, 0.3]}])
    job = client.start_job("incontext", {"volume": upload(client, query.volume), "support_size": 2,
                                         "supports": [{"image": image_id, "labels": labels_id}]})
    status = client.wait(job["id"], interval=0.05)
    assert status["result"]["match"] == "anatomy"
    assert status["result"]["alignments"][0]["body_dice"] > 0.9
    result_labels, _ = client.job_array(job["id"], "labels")
    support = SupportScan(mr.volume, liver.astype(np.int32), [SegmentInfo(1, "liver", (0.8, 0.4, 0.3))], "mr")
    expected, _ = AnatomicalInContext(load_model("universeg-fmseg", "cpu"), [support], [1],
                                      settings=InContextSettings(support_size=2), device="cpu").segment(query.volume)
    assert np.array_equal(result_labels, expected.labels)
    truth = query.mask("liver")
    assert 2 * ((result_labels == 1) & truth).sum() / ((result_labels == 1).sum() + truth.sum()) > 0.85


def test_a_tyche_job_returns_its_candidates_as_label_maps_of_the_query(client, case, monkeypatch, tmp_path):
    from reference_fixtures import TYCHE_CENTRED, official_checkpoint

    from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
    from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
    from FMSegCore.io.labelmap import SegmentInfo

    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path))  # a throw-away cache: Tyche's weights cannot be fetched
    client.import_weights("tyche", official_checkpoint("tyche", shifts=TYCHE_CENTRED))
    image, labels, names, support, query = _support_and_query(case)
    support_labels = (labels[support] == names["liver"]).astype(np.uint16)
    support_volume, query_volume = sub_volume(image, support), sub_volume(image, query)
    pair = {"image": upload(client, support_volume),
            "labels": upload(client, support_volume, support_labels,
                             segments=[{"value": 1, "name": "liver", "color": [0.8, 0.4, 0.3]}])}
    body = {"volume": upload(client, query_volume), "supports": [pair], "model": "tyche", "support_size": 2,
            "match": "index"}
    job = client.start_job("incontext", dict(body, candidates=2, uncertainty=True))
    status = client.wait(job["id"], interval=0.05)
    assert status["result"]["candidates"] == ["candidate1", "candidate2"]
    assert status["arrays"] == ["candidate1", "candidate2", "labels", "uncertainty"]
    drawn = [client.job_array(job["id"], name)[0] for name in status["result"]["candidates"]]
    assert [d.shape for d in drawn] == [query_volume.array.shape] * 2
    assert all(d.any() and set(np.unique(d)) <= {0, 1} for d in drawn)
    assert (drawn[0] != drawn[1]).any()  # two draws, two segmentations
    example = example_from_arrays(support_volume.array, support_labels, [SegmentInfo(1, "liver", (0.8, 0.4, 0.3))])
    expected = InContextSession(load_model("tyche", "cpu"), SupportSet([example]), [1], axis=2, device="cpu",
                                settings=InContextSettings(support_size=2, candidates=2)
                                ).segment_volume(query_volume.array, uncertainty=True)
    assert all(np.array_equal(d, e) for d, e in zip(drawn, expected.candidates))  # the CLI's candidates

    plain = client.wait(client.start_job("incontext", body)["id"], interval=0.05)
    assert plain["result"]["candidates"] == [] and plain["arrays"] == ["labels"]
    with pytest.raises(WorkerError, match="'universeg-fmseg' draws no candidates") as refused:
        client.start_job("incontext", dict(body, model="universeg-fmseg", candidates=2))
    assert refused.value.status == 400


def test_adaptation_job_is_cancelled_between_steps_then_a_short_one_gives_a_usable_adapter(client, case, tmp_path):
    from FMSegCore.engines.adaptation.adapter_file import load_adapter

    image, labels, names = case
    kidney_slices = np.flatnonzero((labels == names["kidney_left"]).any(axis=(1, 2)))[::4][:3]
    case_volume = sub_volume(image, kidney_slices)
    case_labels = np.where(labels[kidney_slices] == names["kidney_left"], 3, 0).astype(np.uint16)
    image_id = upload(client, case_volume)
    labels_id = upload(client, case_volume, case_labels, segments=[{"value": 3, "name": "kidney_left"}])
    body = {"cases": [{"image": image_id, "labels": labels_id}], "mode": "auto", "method": "linear-probe",
            "steps": 100_000, "batch_size": 2, "views": 4}
    job = client.start_job("adapt", body)
    while (status := client.job(job["id"]))["done"] < 2 and status["state"] in ("queued", "running"):
        time.sleep(0.05)
    assert status["state"] == "running" and status["message"] == "training (linear-probe)"
    assert status["loss"] > 0 and status["elapsed"] > 0 and status["remaining"] > 0
    began = time.perf_counter()
    client.cancel(job["id"])
    with pytest.raises(JobCancelledError):
        client.wait(job["id"], interval=0.05)
    assert time.perf_counter() - began < 30
    assert client.job(job["id"])["state"] == "cancelled" and not client.job(job["id"])["result"]

    job = client.start_job("adapt", {**body, "steps": 4})
    status = client.wait(job["id"], interval=0.1)
    assert status["result"]["structures"][0]["name"] == "kidney_left" and status["result"]["mode"] == "auto"
    # the same physical-units adapter as ``fmseg adapt`` makes: its geometry, the views and steps asked for
    assert status["result"]["geometry"]["pixel_mm"] == DEFAULT_PIXEL_MM and status["result"]["views"] == 4
    assert status["result"]["fit"]["steps"] == 4
    data = client.download_adapter(status["result"]["adapter"])
    assert 0 < len(data) < 5 << 20
    # the downloaded file is an adapter ``fmseg segment`` reads (the checked, weights-only loader)
    (tmp_path / "kidney.pt").write_bytes(data)
    saved = load_adapter(tmp_path / "kidney.pt")
    assert saved.mode == "auto" and [s["name"] for s in saved.metadata["structures"]] == ["kidney_left"]
    uploaded = client.upload_adapter(data)
    assert uploaded["method"] == "linear-probe"
    segment = client.start_job("segment", {"volume": upload(client, case_volume), "adapter": uploaded["adapter"]})
    client.wait(segment["id"], interval=0.1)
    result, _ = client.job_array(segment["id"], "labels")
    assert result.shape == case_volume.array.shape and set(np.unique(result)) <= {0, 3}
    # an MR-like scan (no air below -500) is refused for this CT adapter, unless its modality is given
    mr_like = Volume(case_volume.array.clip(0, None) + 100.0, case_volume.spacing, case_volume.origin,
                     case_volume.direction)
    mr_id = upload(client, mr_like)
    with pytest.raises(WorkerError, match="looks like MR but the adapter was trained on CT") as refused:
        client.start_job("segment", {"volume": mr_id, "adapter": uploaded["adapter"]})
    assert refused.value.status == 400 and "\n" not in str(refused.value)
    forced = client.start_job("segment", {"volume": mr_id, "adapter": uploaded["adapter"], "modality": "MR"})
    assert client.wait(forced["id"], interval=0.1)["state"] == "done"

    with pytest.raises(WorkerError, match="adapter") as refused:
        client.upload_adapter(b"PK\x03\x04 not an adapter")
    assert refused.value.status == 400


# ------------------------------------------------------------------------------------------------ process


def test_a_local_worker_process_starts_crashes_and_restarts(tmp_path, case):
    worker = LocalWorker(device="cpu", log_path=str(tmp_path / "worker.log"))
    client = worker.start()
    try:
        assert client.info()["device"] == "cpu" and worker.running
        volume_id = upload(client, case[0])
        anonymous = requests.get(f"{worker.url}/v1/info")
        assert anonymous.status_code == 401  # even locally, other users of this machine need the token
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
        with pytest.raises(WorkerUnavailable, match="cannot be reached"):
            client.open_session(volume_id)
        assert not worker.running and worker.exit_code == -signal.SIGKILL
        client = worker.start()
        assert client.info()["volumes"] == 0 and worker.starts == 2
    finally:
        worker.stop()
    assert not worker.running
    log = (tmp_path / "worker.log").read_text()
    assert log.count("fmseg worker on http://127.0.0.1:") == 2


def test_a_local_worker_stops_cleanly_when_asked_and_on_ctrl_c(tmp_path):
    worker = LocalWorker(device="cpu", log_path=str(tmp_path / "worker.log"))
    try:
        client = worker.start()  # port 0: the ready file carries the port the system chose
        assert not worker.url.endswith(":0") and client.info()["version"]
        process = worker.process
        client.shutdown()
        assert process.wait(30) == 0
        worker.start().info()
        process = worker.process
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130  # fmseg's exit code for an interrupted command
    finally:
        worker.stop()
    log = (tmp_path / "worker.log").read_text()
    assert log.count("fmseg serve: interrupted") == 1 and "Traceback" not in log


def test_a_worker_that_cannot_start_says_why(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no module named torch' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(WorkerUnavailable, match="code 3.*no module named torch"):
        LocalWorker(python=str(broken), log_path=str(tmp_path / "log")).start()
    missing = LocalWorker(python=str(tmp_path / "absent"))
    with pytest.raises(WorkerUnavailable, match="cannot start"):
        missing.start()
    assert json  # json is used by the fixtures' label names


def test_weights_uploaded_by_hand_are_checked_and_installed(client, monkeypatch, tmp_path):
    from reference_fixtures import official_checkpoint

    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path))
    checkpoint = official_checkpoint("tyche")
    with pytest.raises(WorkerError, match="not a MultiverSeg checkpoint") as wrong:
        client.import_weights("multiverseg", checkpoint)
    assert "\n" not in str(wrong.value) and "uploaded file" in str(wrong.value)
    assert not any(tmp_path.rglob("*.pt"))  # nothing installed
    done = client.import_weights("tyche", checkpoint)
    assert Path(done["path"]).read_bytes() == checkpoint and done["verified"] is False
    assert {m["id"]: m for m in client.models()}["tyche"]["available"]
    with pytest.raises(WorkerError, match="already installed"):
        client.import_weights("tyche", checkpoint)
    loaded = load_model("tyche", "cpu")
    assert client.import_weights("tyche", checkpoint, replace=True)["model"] == "tyche"
    assert load_model("tyche", "cpu") is not loaded  # replaced weights are read again, not the copy loaded before


def test_model_download_jobs_report_cached_models_and_fail_in_one_line_when_offline(client, monkeypatch, tmp_path):
    monkeypatch.setenv("FMSEG_OFFLINE", "1")
    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path))
    models = {card["id"]: card for card in client.models()}
    assert models["universeg-fmseg"]["kind"] == "incontext" and models["universeg-fmseg"]["available"]
    assert models["litemedsam"]["kind"] == "promptable" and not models["medsam-vit-b"]["available"]
    done = client.wait(client.start_download("universeg-fmseg")["id"], interval=0.05)
    assert done["result"]["path"].endswith(".pt")
    job = client.start_download("medsam-vit-b")
    with pytest.raises(WorkerError, match="offline|sha256") as failed:
        client.wait(job["id"], interval=0.05)
    assert "\n" not in str(failed.value) and client.job(job["id"])["state"] == "failed"
    with pytest.raises(WorkerError, match="unknown model") as unknown:
        client.start_download("no-such-model")
    assert unknown.value.status == 400
