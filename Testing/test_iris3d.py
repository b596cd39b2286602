"""The 3-D in-context network (models/iris.py), its training episodes and its resumable trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from FMSegCore.errors import InputError
from FMSegCore.models.interfaces import InContextModel3D
from FMSegCore.models.iris import IrisConfig, IrisNet, average_tasks, iris_checkpoint, load_iris
from FMSegCore.training.incontext3d_data import (
    PatchPose,
    VolumePair,
    cut_patch,
    pair_episode,
    synthetic_episode,
)
from FMSegCore.training.incontext3d_train import InContext3DConfig, train
from FMSegCore.training.task_bank import LabelledVolume

SMALL = IrisConfig(patch_size=16, spacing_mm=2.5, features=(4, 8, 16), embed_dim=16, query_tokens=2, heads=2)


@pytest.fixture(scope="module")
def net() -> IrisNet:
    torch.manual_seed(0)
    return IrisNet(SMALL).eval()


def _reference(classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 16, 16, 16, generator=generator)
    masks = torch.zeros(2, classes, 16, 16, 16)
    for k in range(classes):
        masks[:, k, 2 + 5 * k:6 + 5 * k, 3:12, 3:12] = 1
    return images, masks


@torch.no_grad()
def test_the_network_implements_the_interface_and_segments_all_classes_in_one_pass(net):
    assert isinstance(net, InContextModel3D)
    assert net.patch_shape == (16, 16, 16) and net.patch_spacing_mm == (2.5, 2.5, 2.5)
    task = net.encode_task(*_reference(classes=2))
    assert task.shape == (2, *net.task_shape) == (2, 4, 16)
    logits = net.predict(torch.rand(3, 1, 16, 16, 16), task)
    assert logits.shape == (3, 3, 16, 16, 16)  # background and both classes, for every query
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_reordering_the_task_reorders_the_output_channels_and_nothing_else(net):
    task = net.encode_task(*_reference(classes=2))
    query = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    forward, backward = net.predict(query, task), net.predict(query, task.flip(0))
    assert torch.allclose(forward[:, 0], backward[:, 0], atol=1e-5)
    assert torch.allclose(forward[:, 1], backward[:, 2], atol=1e-5)
    assert torch.allclose(forward[:, 2], backward[:, 1], atol=1e-5)
    assert not torch.allclose(forward[:, 1], forward[:, 2], atol=1e-3)


@torch.no_grad()
def test_a_task_is_encoded_once_and_several_references_pool_into_one(net):
    images, masks = _reference(classes=1)
    first = net.encode_task(images[:1], masks[:1])
    assert torch.equal(first, net.encode_task(images[:1], masks[:1]))  # deterministic: a task can be cached
    both = net.encode_task(images, masks)
    second = net.encode_task(images[1:], masks[1:])
    assert both.shape == first.shape
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    mean = average_tasks([first, second], [3.0, 1.0])
    assert torch.allclose(mean, 0.75 * first + 0.25 * second, atol=1e-6)


def test_checkpoints_round_trip_in_half_precision_and_bad_files_are_one_line_errors(net, tmp_path):
    path = tmp_path / "iris.pt"
    torch.save(iris_checkpoint(net), path)
    loaded = load_iris(path)
    assert loaded.config == net.config and not loaded.training
    images, masks = _reference(classes=1)
    with torch.no_grad():
        query = torch.rand(1, 1, 16, 16, 16)
        expected = net.predict(query, net.encode_task(images, masks))
        got = loaded.predict(query, loaded.encode_task(images, masks))
    assert torch.allclose(expected, got, atol=0.05)  # fp16 weights
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"config": {"patch_size": 16, "colour": "red"}, "state_dict": {}}, foreign)
    other_shape = tmp_path / "other.pt"
    torch.save({"config": {**SMALL.to_dict(), "embed_dim": 8}, "state_dict": iris_checkpoint(net)["state_dict"]},
               other_shape)
    for bad in (truncated, foreign, other_shape, tmp_path / "missing.pt"):
        with pytest.raises(InputError) as error:
            load_iris(bad)
        assert bad.name in str(error.value) and "\n" not in str(error.value)


def test_patches_cut_at_the_volume_spacing_without_rotation_are_the_volume_itself():
    rng = np.random.default_rng(0)
    image = rng.random((20, 22, 24)).astype(np.float32)
    labels = rng.integers(0, 4, (20, 22, 24))
    centre = (12.0, 10.0, 9.0)  # I, J, K; an odd patch of 7 spans centre -3 .. +3 voxels
    patch, cut = cut_patch(image, labels, (2.0, 2.0, 2.0), PatchPose(centre, np.eye(3)), 7, 2.0)
    assert np.allclose(patch[0].numpy(), image[6:13, 7:14, 9:16], atol=1e-5)
    assert np.array_equal(cut.numpy(), labels[6:13, 7:14, 9:16])
    mirrored, _ = cut_patch(image, None, (2.0, 2.0, 2.0), PatchPose(centre, np.eye(3), flips=(True, False, False)),
                            7, 2.0)
    assert np.allclose(mirrored[0].numpy(), image[6:13, 7:14, 9:16][:, :, ::-1], atol=1e-5)
    coarse, _ = cut_patch(image, None, (1.0, 1.0, 1.0), PatchPose(centre, np.eye(3)), 4, 2.0)  # -3, -1, 1, 3
    assert np.allclose(coarse[0].numpy(), image[6:13:2, 7:14:2, 9:16:2], atol=1e-5)


def test_episodes_hold_the_anchor_class_in_the_reference_and_targets_number_the_classes():
    shape = (40, 40, 40)
    labels = np.zeros(shape, np.int16)
    labels[10:20, 10:20, 10:20] = 3
    labels[18:30, 12:26, 20:30] = 7
    labels[25:35, 25:35, 5:15] = 9
    image = np.where(labels > 0, 0.3 + 0.05 * labels, 0.1).astype(np.float32)
    first = LabelledVolume("a", "body/test", image, labels, {3: "a", 7: "b", 9: "c"})
    second = LabelledVolume("b", "body/test", image[::-1].copy(), labels[::-1].copy(), {3: "a", 7: "b", 9: "c"})
    pair = VolumePair(first, second, (3, 7, 9), ((2.0, 2.0, 2.0), (2.0, 2.0, 2.0)))
    for seed in range(6):
        episode = pair_episode(pair, np.random.default_rng(seed), 16, 2.5, max_classes=3)
        assert 1 <= len(episode.classes) <= 3 and set(episode.classes) <= {3, 7, 9}
        assert episode.reference_masks.shape == (len(episode.classes), 16, 16, 16)
        assert episode.reference_masks[0].sum() > 0  # the anchor is in the reference patch
        assert (episode.target > 0).any()  # ... and in the query patch
        assert int(episode.target.max()) <= len(episode.classes)
        assert 0 <= float(episode.query.min()) and float(episode.query.max()) <= 1
    drawn = [pair_episode(pair, np.random.default_rng(seed), 16, 2.5, max_classes=3) for seed in range(6)]
    again = [pair_episode(pair, np.random.default_rng(seed), 16, 2.5, max_classes=3, query_anywhere=0.0)
             for seed in range(6)]
    assert all(torch.equal(a.query, b.query) for a, b in zip(drawn, again))  # 0 draws nothing: the same stream
    anywhere = [pair_episode(pair, np.random.default_rng(seed), 16, 2.5, max_classes=1, query_anywhere=1.0)
                for seed in range(12)]
    assert all(e.reference_masks[0].sum() > 0 for e in anywhere)  # the reference still shows its class
    assert any(not (e.target > 0).any() for e in anywhere)  # some queries hold none of it: "none here"
    synthetic = synthetic_episode(np.random.default_rng(3), 16, max_classes=2)
    assert synthetic.reference.shape == synthetic.query.shape == (1, 16, 16, 16)
    assert all(synthetic.reference_masks[k].sum() >= 30 for k in range(len(synthetic.classes)))


def test_training_resumes_where_it_stopped_and_ends_as_an_uninterrupted_run(tmp_path):
    config = InContext3DConfig(steps=4, batch_size=1, patch_size=16, features=[4, 8], embed_dim=8, query_tokens=2,
                               heads=2, warmup_steps=1, source_weights={"synthetic": 1.0}, log_every=1,
                               checkpoint_every=2, validate_every=0, threads=1)
    whole = train(config, tmp_path / "whole", torch.device("cpu"), progress=False)
    halves = tmp_path / "halves"
    train(config, halves, torch.device("cpu"), max_minutes=0.0, progress=False)  # stops after its first step
    assert torch.load(halves / "checkpoint.pt", weights_only=True)["step"] == 1
    resumed = train(config, halves, torch.device("cpu"), progress=False)
    log = [json.loads(line) for line in (halves / "train.log").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    a, b = load_iris(whole), load_iris(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    fine_tune = InContext3DConfig(**{**config.__dict__, "steps": 0, "initial_weights": str(whole)})
    started = load_iris(train(fine_tune, tmp_path / "fine_tune", torch.device("cpu"), progress=False))
    for (name, x), (_, y) in zip(a.state_dict().items(), started.state_dict().items()):
        assert torch.equal(x, y), name  # a fresh run starts from the given weights
