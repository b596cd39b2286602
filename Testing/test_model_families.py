"""Model families: the registry's rules, and a new 3-D promptable family (Testing/plugins/fmseg_dummy3d.py: one
model file and one registry entry, found through the ``fmseg.families`` entry point) run through the engine, the
``fmseg prompt`` command, the worker and the Slicer Logic, which all give the same voxels."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from FMSegCore.engines.prompting.session3d import Crop, PromptSession3D
from FMSegCore.engines.prompting.sessions import open_prompt_session
from FMSegCore.errors import ModelError
from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import Volume
from FMSegCore.models.factory import build_network, load_model
from FMSegCore.models.interfaces import PromptableModel2D, PromptableModel3D
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts
from FMSegCore.server.client import WorkerClient, WorkerError
from FMSegCore.server.service import Service
from FMSegCore.zoo.families import (
    ENTRY_POINT_GROUP,
    WEIGHTS_ONLY,
    Family,
    model_dims,
    model_kind,
    register_family,
    require_kind,
    unregister_family,
)
from FMSegCore.zoo.registry import get_card, list_cards

PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))
import fmseg_dummy3d  # noqa: E402
from worker_fixtures import CT_CASE, TOKEN, ct_case, running_worker, upload  # noqa: E402

MODEL = fmseg_dummy3d.CARD.name
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The dummy family installed as a plug-in distribution (an entry point on PYTHONPATH) with its checkpoint
    in a cache folder; registered in this process too. Yields the environment a subprocess needs."""
    root = tmp_path_factory.mktemp("plugin")
    dist = root / "site" / "fmseg_dummy3d-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fmseg-dummy3d\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ndummy3d = fmseg_dummy3d:FAMILY\n")
    cache = root / "cache"
    (cache / MODEL).mkdir(parents=True)
    shutil.copy(fmseg_dummy3d.CHECKPOINT, cache / MODEL / fmseg_dummy3d.CARD.filename)
    env = {"FMSEG_CACHE_DIR": str(cache), "FMSEG_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(root / "site"), os.environ.get("PYTHONPATH", "")])}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMSEG_CACHE_DIR", str(cache))
        register_family(fmseg_dummy3d.FAMILY)
        try:
            yield env
        finally:
            unregister_family(fmseg_dummy3d.FAMILY.name)


@pytest.fixture(scope="module")
def case():
    return ct_case()


def liver_click(labels: np.ndarray, names: dict[str, int]) -> tuple[float, float, float]:
    k, j, i = np.argwhere(labels == names["liver"]).mean(axis=0)
    return float(i), float(j), float(k)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# ------------------------------------------------------------------------------------------------ registry


def test_a_family_names_known_interfaces_and_a_module_function_loader():
    with pytest.raises(ModelError, match="unknown interface.*PromptableModel4D"):
        Family("x", "some.module:load", ("PromptableModel4D",))
    with pytest.raises(ModelError, match="must be 'module:function'"):
        Family("x", "some_module_load", ("PromptableModel2D",))
    with pytest.raises(ModelError, match="cannot import its loader"):
        Family("x", "no_such_module_here:load").load_function()


def test_a_registered_family_adds_its_cards_and_names_cannot_clash(plugin):
    card = get_card(MODEL)
    assert card in list_cards()
    assert (model_kind(card), model_dims(card)) == ("promptable", 3)
    assert require_kind(MODEL, "promptable") is card
    with pytest.raises(ModelError, match="is not a incontext model"):
        require_kind(MODEL, "incontext")
    with pytest.raises(ModelError, match="registered twice"):
        register_family(Family(fmseg_dummy3d.FAMILY.name, "fmseg_dummy3d:build", ("PromptableModel3D",)))
    clash = Family("other", "fmseg_dummy3d:load", ("PromptableModel3D",), cards=(get_card("litemedsam"),))
    with pytest.raises(ModelError, match="already in the zoo: litemedsam"):
        register_family(clash)


def test_cards_without_a_family_are_weights_only_and_refused_before_any_download():
    card = dataclasses.replace(get_card("medsam-vit-b"), name="no-family", architecture=None)
    assert model_kind(card) == WEIGHTS_ONLY and model_dims(card) is None
    with pytest.raises(ModelError, match="weights only"):
        build_network(card, torch.device("cpu"), allow_download=False)
    assert model_kind(get_card("litemedsam")) == "promptable" and model_dims(get_card("litemedsam")) == 2


def test_a_network_that_lacks_a_declared_interface_is_refused(plugin):
    liar = Family("liar3d", "fmseg_dummy3d:load", ("PromptableModel3D", "InContextModel2D"))
    register_family(liar)
    try:
        card = get_card(MODEL)
        fake = type(card)(**{**card.__dict__, "architecture": "liar3d"})
        with pytest.raises(ModelError, match="does not implement InContextModel2D"):
            build_network(fake, torch.device("cpu"))
    finally:
        unregister_family("liar3d")


# ------------------------------------------------------------------------------------------------ engine


def test_the_session_path_follows_the_interface(plugin, case):
    image = case[0]
    model = load_model(MODEL, "cpu")
    assert isinstance(model, PromptableModel3D) and not isinstance(model, PromptableModel2D)
    assert isinstance(open_prompt_session(image, model, "cpu"), PromptSession3D)
    assert not isinstance(open_prompt_session(image, load_model("litemedsam", "cpu"), "cpu"), PromptSession3D)


def test_crop_and_paste_back_are_inverse_on_an_anisotropic_grid():
    labels = np.zeros((40, 50, 60), dtype=bool)
    labels[10:30, 15:35, 20:45] = True
    volume = Volume(labels.astype(np.float32), (0.8, 1.1, 2.5), (0.0, 0.0, 0.0), np.eye(3))

    class Shape:
        crop_shape, crop_spacing_mm = (40, 40, 48), (1.5, 1.5, 1.5)

    session = PromptSession3D.__new__(PromptSession3D)
    session.volume, session.model, session._intensities = volume, Shape, volume.array
    crop = Crop((32.0, 25.0, 20.0), Shape.crop_shape, Shape.crop_spacing_mm)
    values = session.extract(crop)
    assert values.shape == Shape.crop_shape and 0 < values.mean() < 1
    back = session.paste(crop, values * 2 - 1)
    reach = crop.half() * crop.scale(volume.spacing)
    structure_lo, structure_hi = np.array([20, 15, 10]), np.array([44, 34, 29])  # IJK
    assert np.all(crop.centre - reach <= structure_lo) and np.all(structure_hi <= crop.centre + reach)
    assert dice(back, labels) > 0.95


def test_a_click_segments_the_structure_in_3d_and_exclude_points_and_boxes_limit_it(plugin, case):
    image, labels, names = case
    session = PromptSession3D(image, load_model(MODEL, "cpu"), "cpu")
    click = liver_click(labels, names)
    mask = session.segment(SegmentPrompts("liver", points=[PointPrompt(click)]))
    i, j, k = (int(round(c)) for c in click)
    liver = labels == names["liver"]
    assert mask[k, j, i] and len(np.unique(np.nonzero(mask)[0])) > 20  # many slices, from one click
    assert dice(mask, liver) > 0.5
    assert session.timings.encoded == 1 and session.timings.decoded == 1

    inside = tuple(float(v) for v in np.argwhere(mask & ~liver)[0][::-1])
    corrected = session.segment(SegmentPrompts("liver", points=[PointPrompt(click), PointPrompt(inside, False)]))
    assert not corrected[tuple(int(v) for v in inside[::-1])] and corrected.sum() < mask.sum()
    assert session.timings.encoded == 1 and session.timings.decoded == 2  # the crop's embedding is reused

    lo, hi = (i - 6.0, j - 6.0, k - 4.0), (i + 6.0, j + 6.0, k + 4.0)
    boxed = session.segment(SegmentPrompts("liver box", [BoxPrompt(lo, hi)]))
    kk, jj, ii = np.nonzero(boxed)
    assert boxed.any() and ii.min() >= lo[0] - 1 and ii.max() <= hi[0] + 1 and kk.max() <= hi[2] + 1


# ------------------------------------------------------------------------------------------------ entry points


def _points_markup(path: Path, image: Volume, points_ijk, name: str) -> Path:
    """A Slicer point list (.mrk.json, LPS) at the given IJK positions."""
    points = []
    for number, ijk in enumerate(points_ijk, start=1):
        lps = np.asarray(image.origin) + np.asarray(image.direction) @ (np.asarray(image.spacing) * ijk)
        points.append({"id": str(number), "label": f"{name}-{number}", "position": [float(v) for v in lps],
                       "positionStatus": "defined"})
    markup = {"type": "Fiducial", "name": name, "coordinateSystem": "LPS", "controlPoints": points}
    path.write_text(json.dumps({"markups": [markup]}))
    return path


@pytest.fixture(scope="module")
def liver(plugin, case):
    """A click in the liver and the mask the engine gives for it in this process: what every entry point must
    give."""
    image, labels, names = case
    click = liver_click(labels, names)
    session = PromptSession3D(image, load_model(MODEL, "cpu"), "cpu")
    return click, session.segment(SegmentPrompts("liver", points=[PointPrompt(click)]))


def test_fmseg_prompt_runs_the_plugin_family_in_a_fresh_process(plugin, case, liver, tmp_path):
    image = case[0]
    click, expected = liver
    prompts = _points_markup(tmp_path / "liver.mrk.json", image, [click], "liver")
    output = tmp_path / "liver.nii.gz"
    env = dict(os.environ, **plugin)
    run = subprocess.run([sys.executable, "-m", "FMSegCore", "prompt", "--model", MODEL, "--device", "cpu",
                          "--image", str(CT_CASE / "image.nii.gz"), "--prompts", str(prompts),
                          "--output", str(output)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    listed = subprocess.run([sys.executable, "-m", "FMSegCore", "models"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert any(line.split()[:4] == [MODEL, "promptable-3d", "promptable", "3-D"] for line in listed.stdout.splitlines())

    labelmap, segments = read_labelmap(output)
    written = labelmap.array == 1
    assert [s.name for s in segments] == ["liver"]
    assert expected.sum() > 1000 and np.array_equal(written, expected)


def test_the_worker_serves_the_plugin_family_and_lists_it(plugin, case, liver):
    image = case[0]
    click, expected = liver
    with running_worker() as server:
        client = WorkerClient(server.url, TOKEN)
        listed = {m["id"]: m for m in client.models()}
        assert (listed[MODEL]["kind"], listed[MODEL]["dims"]) == ("promptable", 3)
        assert listed["suprem-swinunetr"]["kind"] == WEIGHTS_ONLY
        session = client.open_session(upload(client, image), model=MODEL, device="cpu")
        got, info = client.prompt(session, "liver", points=[(click, True)])
        assert (info["encoded"], info["decoded"]) == (1, 1)
    assert np.array_equal(got, expected)


def test_the_slicer_logic_prompts_the_plugin_family_through_its_own_worker_process(plugin, liver, monkeypatch):
    pytest.importorskip("slicer")
    import slicer
    import slicer.util
    import vtk
    from FMSegSlicerLib.logic import FMSegLogic
    from FMSegSlicerLib.scene_geometry import ijk_to_ras
    from slicer_scene import new_scene

    click, expected = liver
    for key, value in plugin.items():
        monkeypatch.setenv(key, value)
    scene = new_scene()
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(CT_CASE / "image.nii.gz"), "CT")
    markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    markups.AddControlPointWorld(vtk.vtkVector3d(*(ijk_to_ras(node) @ np.r_[click, 1.0])[:3]))
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    logic = FMSegLogic(scene, device="cpu")
    try:
        logic.connect()
        logic.prompt(node, segmentation, "liver", include_points=markups, model=MODEL)
    finally:
        logic.shutdown()
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    got = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, node).astype(bool)
    assert expected.sum() > 1000 and np.array_equal(got, expected)


def test_the_workers_sessions_share_one_embedding_budget(plugin, case):
    image, labels, names = case
    click = liver_click(labels, names)
    spleen = tuple(float(v) for v in np.argwhere(labels == names["spleen"]).mean(axis=0)[::-1])
    crop_bytes = 2 * 32 ** 3 * 4  # the dummy model's embedding of one crop (2 channels, float32)
    service = Service("cpu", embedding_budget_bytes=int(1.5 * crop_bytes))
    with running_worker(service=service) as server:
        client = WorkerClient(server.url, TOKEN)
        volume = upload(client, image)
        first, second = (client.open_session(volume, model=MODEL, device="cpu") for _ in range(2))
        assert client.prompt(first, "liver", points=[(click, True)])[1]["encoded"] == 1
        assert client.prompt(first, "liver", points=[(click, True)])[1]["encoded"] == 0  # cached
        assert client.prompt(second, "spleen", points=[(spleen, True)])[1]["encoded"] == 1
        info = client.info()
        assert info["embedding_bytes"] == crop_bytes <= info["embedding_budget_bytes"]
        # the second session's crop pushed the first one's out of the shared budget: encoded again
        assert client.prompt(first, "liver", points=[(click, True)])[1]["encoded"] == 1


def test_a_3d_in_context_family_is_refused_by_the_2d_engine_and_taken_by_the_3d_path_of_the_worker(plugin, case):
    """The 2-D in-context engine refuses a 3-D family in one line; the worker sends a 3-D in-context model to its
    3-D path: the job is accepted (no 2-D refusal) and only then loads the model (this test card's weights
    cannot be fetched offline, so the job fails there, in one line)."""
    image, labels, _names = case
    card = type(get_card(MODEL))(**{**get_card(MODEL).__dict__, "name": "ic3d-test", "task": "in-context-3d",
                                    "architecture": "ic3d"})
    register_family(Family("ic3d", "fmseg_dummy3d:load", ("InContextModel3D",), cards=(card,)))
    try:
        assert (model_kind(card), model_dims(card)) == ("incontext", 3)
        with pytest.raises(ModelError, match="is a 3-D incontext model; this engine runs 2-D ones only so far"):
            require_kind("ic3d-test", "incontext", dims=2)
        with running_worker() as server:
            client = WorkerClient(server.url, TOKEN)
            volume = upload(client, image)
            pair = {"image": volume, "labels": upload(client, image, labels.astype(np.uint16), kind="labels")}
            job = client.start_job("incontext", {"volume": volume, "model": "ic3d-test", "supports": [pair]})
            with pytest.raises(WorkerError) as raised:
                client.wait(job["id"])
            message = str(raised.value)
            assert "\n" not in message and "2-D" not in message and "dummy3d.pt" in message
    finally:
        unregister_family("ic3d")
