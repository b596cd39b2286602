"""The worker under a property-based fuzz run (schemathesis on its live ``/openapi.json``): no request, valid or
not, gets a server error, and the worker keeps serving; the refusals the run led to, one test each; how the
gate answers malformed HTTP framing; and prompts answered alike while other clients prompt and adapt at once.

In the fuzz run, generated ids are swapped, some of the time, for ids the worker really holds (an image, a label
map, a prompt session, adapters, finished jobs), so valid requests reach the service and its engines and not
only its 404s; the jobs they start are kept small (a few steps, slices and views), downloads stay offline."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from worker_fixtures import TOKEN, ct_case, running_worker, sub_volume, upload

from FMSegCore.engines.adaptation.adapter_file import FORMAT, VERSION
from FMSegCore.io.volume import Volume
from FMSegCore.server.app import WorkerServer
from FMSegCore.server.client import WorkerClient
from FMSegCore.server.service import Service
from FMSegCore.server.wire import CONTENT_TYPE, DTYPES, MAGIC, WireError, decode_array, encode_array

AUTH = {"Authorization": f"Bearer {TOKEN}"}
IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
#: Body fields holding an id, and the kind of thing the worker holds under it.
BODY_IDS = {"volume": "images", "image": "images", "labels": "labels", "adapter": "adapters", "task": "tasks"}
#: Path parameters holding an id (a DELETE keeps its generated id: the ids held must outlive the run).
PATH_IDS = {"session_id": "sessions", "job_id": "jobs", "adapter_id": "adapters", "task_id": "tasks",
            "name": "arrays"}
#: Caps on a job's size (the fuzz run must stay short on two busy cores).
JOB_CAPS = {"steps": 2, "batch_size": 2, "views": 4, "support_size": 4, "ensemble": 2}
MAX_ITEMS = 2
JOB_TIMEOUT_S = 300.0

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


# ------------------------------------------------------------------------------------------------ bodies


def _vectors(length: int) -> st.SearchStrategy:
    return st.lists(st.floats(-1e3, 1e3) | st.integers(-1000, 1000), min_size=length, max_size=length)


def _mostly(good: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` three times in four, else ``odd``."""
    return st.one_of(good, good, good, odd)


def _meta() -> st.SearchStrategy:
    """An upload's meta: mostly a usable grid, with any of its fields sometimes wrong."""
    segment = st.fixed_dictionaries({"value": st.integers(-2, 70_000), "name": st.text(max_size=6)},
                                    optional={"color": _vectors(3)})
    return st.fixed_dictionaries(
        {"spacing": _mostly(st.just([1.0, 1.0, 2.0]), _vectors(3) | JSON_VALUES),
         "origin": _mostly(_vectors(3), JSON_VALUES), "direction": _mostly(st.just(IDENTITY), _vectors(9))},
        optional={"kind": st.sampled_from(["image", "labels", "mask"]) | JSON_VALUES,
                  "segments": st.lists(segment, max_size=3) | JSON_VALUES, "name": st.text(max_size=6) | JSON_VALUES})


def _data_size(header: Any) -> int:
    """The bytes of data ``header`` announces when it is a sane one, else 0."""
    try:
        elements = int(np.prod([int(n) for n in header["shape"]], dtype=np.int64))
        return elements * np.dtype(header["dtype"]).itemsize if 0 <= elements <= 1000 else 0
    except (TypeError, KeyError, ValueError, OverflowError):
        return 0


def _frame(header: Any, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + data


@st.composite
def array_frames(draw: st.DrawFn) -> bytes:
    """A frame whose header is drawn (any shape, dtype, encoding, meta) and whose data may or may not fit it."""
    shape = draw(_mostly(st.lists(st.integers(1, 4), min_size=3, max_size=3),
                         st.lists(st.integers(0, 5), max_size=5) | st.lists(st.integers(), max_size=4) | JSON_VALUES))
    header = {"shape": shape, "dtype": draw(_mostly(st.sampled_from(DTYPES), st.just("object") | JSON_VALUES)),
              "encoding": draw(st.sampled_from(["raw", "zlib", "gzip"])), "meta": draw(_mostly(_meta(), JSON_VALUES))}
    header = draw(_mostly(st.just(header), JSON_VALUES))
    size = _data_size(header)
    data = draw(_mostly(st.binary(min_size=size, max_size=size), st.binary(max_size=16)))
    if isinstance(header, dict) and header.get("encoding") == "zlib":
        data = zlib.compress(data)
    return _frame(header, data)


def _adapter_file(metadata: dict[str, Any], state: Any = None, version: int = VERSION) -> bytes:
    """An adapter file's bytes (``torch.save`` of its outer form) holding ``metadata``."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": version, "metadata": json.dumps(metadata),
                "state": {"weight": torch.zeros(2)} if state is None else state}, buffer)
    return buffer.getvalue()


@st.composite
def adapter_files(draw: st.DrawFn) -> bytes:
    """An adapter file whose metadata may hold anything (NaN too: ``json`` writes it)."""
    values = JSON_VALUES | st.dictionaries(st.text(max_size=4), st.floats(), max_size=2)
    keys = ("base_model", "base_sha256", "mode", "method", "structures")
    metadata = draw(st.fixed_dictionaries({key: values for key in keys},
                                          optional={"validation_dice": values, "geometry": values}))
    return _adapter_file(metadata, version=draw(_mostly(st.just(VERSION), st.integers(0, 3))))


schemathesis.openapi.media_type(CONTENT_TYPE, array_frames() | st.binary(max_size=64))
schemathesis.openapi.media_type("application/octet-stream", adapter_files() | st.binary(max_size=64))


# ------------------------------------------------------------------------------------------------ held ids


def _held(kind: str, value: Any, pool: dict[str, list[str]]) -> st.SearchStrategy:
    """``value``, or one of the ids the worker holds of that kind."""
    return st.sampled_from(pool[kind]) | st.just(value) if pool.get(kind) else st.just(value)


def _cap(key: str, value: Any) -> Any:
    if key in JOB_CAPS and (value is None or (isinstance(value, int) and not isinstance(value, bool))):
        return min(value or JOB_CAPS[key], JOB_CAPS[key])
    return value


def _with_held_ids(value: Any, pool: dict[str, list[str]]) -> st.SearchStrategy:
    """``value`` with its id fields sometimes swapped for held ids, its short lists cut to ``MAX_ITEMS`` items
    and its job sizes capped."""
    if isinstance(value, list):
        items = value[:MAX_ITEMS] if len(value) <= 256 else value
        return st.tuples(*(_with_held_ids(item, pool) for item in items)).map(list)
    if not isinstance(value, dict):
        return st.just(value)
    fields = {key: _held(BODY_IDS[key], item, pool) if key in BODY_IDS and isinstance(item, str)
              else _with_held_ids(_cap(key, item), pool) for key, item in value.items()}
    missing = {key: st.just(limit) for key, limit in JOB_CAPS.items() if key not in value}
    return st.fixed_dictionaries({**fields, **missing})


def _finished(client: WorkerClient, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """A job's final status; one still running after ``timeout`` seconds is cancelled (the test fails)."""
    deadline = time.monotonic() + timeout
    return client.wait(job_id, cancel=lambda: time.monotonic() > deadline, interval=0.1)


def _kidney_case() -> tuple[Volume, np.ndarray]:
    """3 CT slices across the left kidney and their label map (the kidney as 3)."""
    image, labels, names = ct_case()
    slices = np.flatnonzero((labels == names["kidney_left"]).any(axis=(1, 2)))[::4][:3]
    return sub_volume(image, slices), np.where(labels[slices] == names["kidney_left"], 3, 0).astype(np.uint16)


def _adapter(client: WorkerClient, image: str, labels: str, mode: str) -> tuple[str, str]:
    """A one-step adapter of the held case (its id, and its finished job's)."""
    job = client.start_job("adapt", {"cases": [{"image": image, "labels": labels}], "mode": mode,
                                     "method": "decoder", "steps": 1, "batch_size": 1, "views": 2})
    return _finished(client, job["id"])["result"]["adapter"], job["id"]


# ------------------------------------------------------------------------------------------------ fuzz run


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMSEG_OFFLINE", "1")  # a fuzzed download job fails at once, without reaching the network
        with running_worker() as server:
            yield server


@pytest.fixture(scope="module")
def pool(worker: WorkerServer) -> dict[str, list[str]]:
    """Ids the worker holds: an image, its label map, a session, an automatic and a prompt adapter, a task of the
    3-D in-context model, jobs."""
    volume, labels = _kidney_case()
    client = WorkerClient(worker.url, TOKEN)
    image_id = upload(client, volume)
    labels_id = upload(client, volume, labels, segments=[{"value": 3, "name": "kidney_left"}])
    auto, auto_job = _adapter(client, image_id, labels_id, "auto")
    prompt, prompt_job = _adapter(client, image_id, labels_id, "prompt")
    segment = client.start_job("segment", {"volume": image_id, "adapter": auto})["id"]
    _finished(client, segment)
    task_job = client.start_job("task", {"supports": [{"image": image_id, "labels": labels_id}]})["id"]
    task = _finished(client, task_job)["result"]["task"]
    held = {"images": [image_id], "labels": [labels_id], "adapters": [auto, prompt], "tasks": [task],
            "sessions": [client.open_session(image_id)], "jobs": [auto_job, prompt_job, segment, task_job],
            "arrays": ["labels", "uncertainty"]}
    client.close()
    return held


@pytest.fixture(scope="module")
def api(worker: WorkerServer, pool: dict[str, list[str]]) -> Any:
    loaded = schemathesis.openapi.from_url(f"{worker.url}/openapi.json", headers=AUTH, timeout=30)
    loaded.config.generation.update(with_security_parameters=False)  # the token is sent: no made-up ones

    @loaded.hook
    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy:
        return _with_held_ids(body, pool)

    @loaded.hook
    def flatmap_path_parameters(context: Any, parameters: dict[str, Any]) -> st.SearchStrategy:
        if not parameters or context.operation.method.lower() == "delete":
            return st.just(parameters)
        return st.fixed_dictionaries({key: _held(PATH_IDS[key], value, pool) if key in PATH_IDS else st.just(value)
                                      for key, value in parameters.items()})

    return loaded


schema = schemathesis.pytest.from_fixture("api").exclude(path="/v1/shutdown")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
def test_no_request_gets_a_server_error(case):
    response = case.call(headers=AUTH, timeout=120)
    assert response.status_code < 500, \
        f"{case.method} {case.formatted_path}: {response.status_code} {response.content[:300]!r}"


def test_the_worker_still_serves_after_the_fuzz_run(worker, pool):
    info = requests.get(f"{worker.url}/v1/info", headers=AUTH, timeout=30)
    assert info.status_code == 200 and info.json()["device"] == "cpu"
    assert info.json()["volumes"] >= 2 and info.json()["adapters"] >= 2  # the held ones, and what the run added


def test_the_binary_uploads_are_described_so_clients_and_fuzzers_can_send_them(worker):
    paths = requests.get(f"{worker.url}/openapi.json", headers=AUTH, timeout=30).json()["paths"]
    assert list(paths["/v1/volumes"]["post"]["requestBody"]["content"]) == [CONTENT_TYPE]
    assert list(paths["/v1/adapters"]["post"]["requestBody"]["content"]) == ["application/octet-stream"]


# ------------------------------------------------------------------------------------------------ regressions


@pytest.mark.parametrize("header, words", [
    ({"shape": [10 ** 30], "dtype": "uint8"}, "bad array shape"),  # was an OverflowError (500)
    ({"shape": [2 ** 62, 4], "dtype": "uint8"}, "bad array shape"),  # its size wrapped around int64 (500)
    ({"shape": [2 ** 31, 2 ** 31, 2], "dtype": "uint8"}, "9223372036854775808"),  # no wrapping around
    ({"shape": [1.5, 2, 2], "dtype": "uint8"}, "bad array shape"),  # was read as 1
    ({"shape": "122", "dtype": "uint8"}, "bad array shape"),  # was read as (1, 2, 2)
    ({"shape": [True, 2, 2], "dtype": "uint8"}, "bad array shape"),
    ({"shape": [1, 1, 1], "dtype": "uint8", "meta": []}, "frame meta must be a JSON object"),  # was "dtype"
])
def test_frames_with_impossible_shapes_or_meta_are_refused_naming_the_problem(worker, header, words):
    frame = _frame(header, b"\0\0")
    with pytest.raises(WireError, match=words):
        decode_array(frame)
    response = requests.post(f"{worker.url}/v1/volumes", headers=AUTH, data=frame, timeout=30)
    assert response.status_code == 400
    assert words in response.json()["error"] and "\n" not in response.json()["error"]


def test_a_frame_header_nested_too_deep_is_refused():
    deep = b"[" * 100_000 + b"]" * 100_000  # was a RecursionError (500)
    with pytest.raises(WireError, match="not valid JSON"):
        decode_array(MAGIC + struct.pack("<I", len(deep)) + deep)


def test_a_compressed_frame_inflating_past_the_upload_limit_is_refused(worker):
    frame = encode_array(np.zeros((40, 50, 50), np.uint8), {"spacing": [1, 1, 1], "origin": [0, 0, 0],
                                                            "direction": IDENTITY}, compress=True)
    assert len(frame) < 2000
    worker.settings.max_upload_bytes = 50_000  # the frame fits; its 100 000 bytes of voxels do not
    try:
        response = requests.post(f"{worker.url}/v1/volumes", headers=AUTH, data=frame, timeout=30)
    finally:
        worker.settings.max_upload_bytes = 256 << 20
    assert response.status_code == 400
    assert response.json()["error"] == "array of 100000 bytes exceeds the limit of 50000 bytes"
    assert requests.post(f"{worker.url}/v1/volumes", headers=AUTH, data=frame, timeout=30).status_code == 201


GOOD_METADATA = {"base_model": "litemedsam", "base_sha256": "0" * 64, "mode": "auto",
                 "method": {"method": "decoder"}, "structures": [{"name": "liver", "value": 1}]}


@pytest.mark.parametrize("change, words", [
    ({"method": None}, "'method' must be an object"),  # the fuzz run's TypeError (500)
    ({"method": {"rank": 4}}, "'method' names no method"),
    ({"structures": "liver"}, "'structures' must be a list"),
    ({"structures": [{"name": "liver", "value": "1"}]}, "'structures' must each have a name and an integer"),
    ({"mode": "sideways"}, "'mode' must be one of auto, prompt"),
    ({"base_model": ["litemedsam"]}, "'base_model' must be a string"),
    ({"validation_dice": {"liver": "good"}}, "'validation_dice' must map names to numbers"),  # answer's (500)
    ({"trainable_parameters": True}, "'trainable_parameters' must be an integer"),
    ({"geometry": 1.5}, "'geometry' must be an object"),
])
def test_adapter_files_with_unusable_metadata_are_refused_naming_the_field(worker, change, words):
    response = requests.post(f"{worker.url}/v1/adapters", headers=AUTH, timeout=30,
                             data=_adapter_file({**GOOD_METADATA, **change}))
    assert response.status_code == 400
    message = response.json()["error"]
    assert message.startswith("adapter: damaged adapter file") and words in message and "\n" not in message


def test_adapter_files_whose_weights_are_not_tensors_are_refused(worker):
    response = requests.post(f"{worker.url}/v1/adapters", headers=AUTH, timeout=30,
                             data=_adapter_file(GOOD_METADATA, state={"weight": 3}))
    assert response.status_code == 400 and "weights are not named tensors" in response.json()["error"]
    accepted = requests.post(f"{worker.url}/v1/adapters", headers=AUTH, timeout=30,
                             data=_adapter_file({**GOOD_METADATA, "validation_dice": {"liver": float("nan")}}))
    assert accepted.status_code == 201 and accepted.json()["validation_dice"] == {"liver": None}  # NaN: null


def test_a_json_body_nested_too_deep_is_refused_in_one_line_naming_the_problem(worker):
    response = requests.post(f"{worker.url}/v1/sessions", headers={**AUTH, "Content-Type": "application/json"},
                             data=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert response.status_code == 400  # was FastAPI's "There was an error parsing the body"
    assert response.json()["error"].startswith("session: request body cannot be read as JSON (RecursionError")


class _BrokenService(Service):
    """A worker's service with a bug in one operation."""

    def models(self) -> list[dict[str, Any]]:
        raise ZeroDivisionError("division by zero")


def test_a_bug_behind_a_route_is_answered_in_one_line_and_logged_and_the_worker_keeps_serving(capfd):
    with running_worker(service=_BrokenService("cpu")) as server:
        broken = requests.get(f"{server.url}/v1/models", headers=AUTH, timeout=30)
        assert broken.status_code == 500 and broken.headers["connection"] == "close"
        # was Starlette's plain-text "Internal Server Error"
        assert broken.json() == {"error": "internal error: ZeroDivisionError: division by zero"}
        assert requests.get(f"{server.url}/openapi.json", headers=AUTH, timeout=30).status_code == 200
    logged = capfd.readouterr().err
    assert "internal error on GET /v1/models" in logged and "Traceback (most recent call last)" in logged


# ------------------------------------------------------------------------------------------------ HTTP framing


def _exchange(url: str, request: str, timeout: float = 10.0) -> tuple[bytes, bool]:
    """The raw answer to a raw HTTP request, and whether the worker closed the connection after it."""
    host, port = url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request.encode("latin-1"))
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except socket.timeout:
            return answer, False
    return answer, True


@pytest.mark.parametrize("headers", ["Content-Length: abc", "Content-Length: -1", "Content-Length: +2",
                                     "Content-Length: 2\r\nContent-Length: 5", "Content-Length: 1_0",
                                     "Transfer-Encoding: gzip"])
def test_malformed_framing_is_refused_by_the_http_parser_before_the_gate(worker, headers):
    answer, closed = _exchange(worker.url, f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                           f"{TOKEN}\r\n{headers}\r\n\r\n{{}}")
    assert answer.startswith(b"HTTP/1.1 400 ") and closed


@pytest.mark.parametrize("headers, status, words", [
    ("Transfer-Encoding: chunked", 411, b"send a Content-Length"),
    ("Transfer-Encoding: chunked\r\nContent-Length: 2", 411, b"send a Content-Length"),
    (f"Content-Length: {2 << 20}", 413, b"exceeds the limit of 1048576 bytes"),  # refused before it is sent
])
def test_the_gate_refuses_bodies_it_cannot_size_and_closes_the_connection(worker, headers, status, words):
    answer, closed = _exchange(worker.url, f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                           f"{TOKEN}\r\n{headers}\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n")
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()) and words in answer and closed
    assert requests.get(f"{worker.url}/v1/info", headers=AUTH, timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------------ concurrency


def _structure_prompts(labels: np.ndarray, names: dict[str, int], slices: np.ndarray) -> list[tuple]:
    """(IJK box with 2 voxels of margin in-plane, IJK voxel inside) of each structure present on ``slices``."""
    prompts = []
    for name in ("kidney_left", "kidney_right", "liver", "spleen"):
        inside = np.argwhere(labels[slices] == names[name])
        if len(inside):
            (k0, j0, i0), (k1, j1, i1) = inside.min(axis=0), inside.max(axis=0)
            box = ((i0 - 2.0, j0 - 2.0, float(k0)), (i1 + 2.0, j1 + 2.0, float(k1)))
            prompts.append((box, tuple(float(v) for v in inside[len(inside) // 2][::-1])))
    return prompts


def _prompt_run(client: WorkerClient, volume_id: str, box: tuple, click: tuple) -> list[np.ndarray]:
    """A fresh session's masks for a box, then for the box and an exclude click."""
    session = client.open_session(volume_id, precision="fp32")
    masks = [client.prompt(session, "structure", boxes=[box])[0],
             client.prompt(session, "structure", boxes=[box], points=[(click, False)])[0]]
    client.close_session(session)
    return masks


def _in_threads(work: list[Callable[[], Any]]) -> list[Any]:
    """The results of ``work``, each run in its own thread, all started together."""
    results: list[Any] = [None] * len(work)
    start = threading.Barrier(len(work))

    def run(number: int) -> None:
        start.wait()
        try:
            results[number] = work[number]()
        except Exception as error:  # reported by the test
            results[number] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOB_TIMEOUT_S)
    return results


def test_concurrent_prompts_during_an_adaptation_equal_the_same_prompts_alone():
    image, labels, names = ct_case()
    k = np.flatnonzero((labels == names["kidney_left"]).any(axis=(1, 2)))
    slices = np.arange(int(np.median(k)) - 1, int(np.median(k)) + 1)  # 2 slices: a CPU encodes one in seconds
    volume = sub_volume(image, slices)
    prompts = _structure_prompts(labels, names, slices)[:3]
    assert len(prompts) == 3
    with running_worker() as server:
        clients = [WorkerClient(server.url, TOKEN) for _ in range(len(prompts) + 1)]
        volume_id = upload(clients[0], volume)
        alone = [_prompt_run(clients[0], volume_id, box, click) for box, click in prompts]

        case, case_labels = _kidney_case()
        image_id, labels_id = upload(clients[-1], case), upload(clients[-1], case, case_labels, kind="labels")
        job = clients[-1].start_job("adapt", {"cases": [{"image": image_id, "labels": labels_id}], "mode": "auto",
                                              "method": "decoder", "steps": 3, "batch_size": 2, "views": 2})
        while clients[-1].job(job["id"])["state"] == "queued":
            time.sleep(0.05)
        began = time.time()
        together = _in_threads([lambda c=c, b=b, p=p: _prompt_run(c, volume_id, b, p)
                                for c, (b, p) in zip(clients, prompts)])
        adapted = _finished(clients[-1], job["id"])
        finished = server.service.jobs.get(job["id"]).finished
        for client in clients:
            client.close()
    for masks, expected in zip(together, alone):
        assert not isinstance(masks, Exception), masks
        assert len(masks) == len(expected) == 2 and all(np.array_equal(a, b) for a, b in zip(masks, expected))
    assert all(m[0].any() and not np.array_equal(m[0], m[1]) for m in alone)  # the clicks changed the masks
    assert finished > began  # the adaptation trained while the prompts ran
    assert adapted["state"] == "done" and adapted["result"]["adapter"] and adapted["result"]["mode"] == "auto"
