"""A real worker (HTTP on 127.0.0.1, in a thread of the test process) and the bundled CT, for server tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import numpy as np

from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.server.app import WorkerServer
from FMSegCore.server.client import WorkerClient, geometry
from FMSegCore.server.service import Service
from FMSegCore.zoo.cache import resources_dir

CT_CASE = resources_dir() / "SampleData" / "ct_abdomen_pelvis"
TOKEN = "test-token-0123456789"


@contextmanager
def running_worker(token: str = TOKEN, max_upload_bytes: int = 256 << 20,
                   service: Optional[Service] = None) -> Iterator[WorkerServer]:
    """A worker (of ``service``, default a CPU one) serving on a free port of 127.0.0.1 until the block ends."""
    server = WorkerServer(service or Service("cpu"), "127.0.0.1", 0, token, max_upload_bytes)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.service.shutdown()
        server.server_close()
        thread.join(5)


def ct_case() -> tuple[Volume, np.ndarray, dict[str, int]]:
    """The bundled abdominal CT, its label map and label values by name."""
    image = read_volume(CT_CASE / "image.nii.gz")
    labels = read_volume(CT_CASE / "label.nii.gz", allow_empty=True).array
    names = {v: int(k) for k, v in json.loads((CT_CASE / "labels.json").read_text()).items()}
    return image, labels, names


def kidney_roi(labels: np.ndarray, names: dict[str, int], slices: int = 4) -> tuple[tuple, tuple]:
    """IJK corners (lo, hi) of a ROI around the left kidney, 2 voxels of margin in-plane, ``slices`` thick."""
    k, j, i = np.nonzero(labels == names["kidney_left"])
    middle = int(np.median(k))
    return (i.min() - 2.0, j.min() - 2.0, float(middle - slices // 2)), \
        (i.max() + 2.0, j.max() + 2.0, float(middle + slices // 2 - 1))


def sub_volume(volume: Volume, slices: np.ndarray) -> Volume:
    """The given K slices of a volume as a volume of their own (same spacing and direction)."""
    return Volume(np.ascontiguousarray(volume.array[slices]), volume.spacing, volume.origin, volume.direction)


def upload(client: WorkerClient, volume: Volume, array: np.ndarray | None = None, **meta) -> str:
    data = volume.array if array is None else array
    return client.upload_volume(data, {**geometry(volume.spacing, volume.origin, volume.direction), **meta})
