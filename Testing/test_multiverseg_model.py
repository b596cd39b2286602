"""MultiverSeg v1: the official checkpoint layout, the official 5-channel target rebuilt from raw prompts, the
official outputs (fixtures made with the official code), the interactive in-context interface, loading errors.

Each forward of the 18.9 M-parameter network at 128x128 takes seconds on a CPU: the fixture cases run three of
them (full case twice, click case once); the interface checks run at 16x16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference_fixtures import arrays, assert_close, images, metadata, official_state_dict

from FMSegCore.errors import ModelError
from FMSegCore.models.interfaces import InteractiveInContextModel2D, PromptMaps2D
from FMSegCore.models.multiverseg import (
    NUM_PARAMETERS,
    MultiverSeg,
    build_multiverseg,
    load_multiverseg,
    prompt_maps,
    target_input,
)

TOLERANCE = 1e-5  # measured: 6.7e-7 (full), 5.8e-7 (click) of the logits' max |value|


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The official layout, wrapped as the release is (the state_dict under ``"model"``)."""
    path = tmp_path_factory.mktemp("multiverseg") / "MultiverSeg_v1_nf256_res128.pt"
    torch.save({"model": official_state_dict("multiverseg")}, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint) -> MultiverSeg:
    return load_multiverseg(checkpoint)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return arrays("multiverseg")


def full_prompts(data: dict[str, np.ndarray]) -> PromptMaps2D:
    """Both clicks, the box, the scribbles and the previous logits of both images, as the fixture's raw prompts."""
    return prompt_maps(128, torch.from_numpy(data["point_coords"]), torch.from_numpy(data["point_labels"]),
                       box=torch.from_numpy(data["box"]),
                       scribbles=torch.from_numpy(data["scribbles_u8"]).float(),
                       previous_logits=torch.from_numpy(data["mask_input_u8"]).float() / 255 * 16 - 8)


def click_prompts(data: dict[str, np.ndarray]) -> PromptMaps2D:
    """Image 0's positive click only."""
    return prompt_maps(128, torch.from_numpy(data["point_coords"][:1, :1]),
                       torch.from_numpy(data["point_labels"][:1, :1]))


def context(data: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return images(data["context_images_u8"]), torch.from_numpy(data["context_labels_u8"]).float()


def test_layout_equals_the_official_one():
    meta = metadata("multiverseg")
    net = build_multiverseg()
    assert [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in net.state_dict().items()] \
        == meta["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == meta["num_parameters"] == NUM_PARAMETERS == 18_903_297
    assert isinstance(net, InteractiveInContextModel2D)
    assert net.input_size == 128


def test_rebuilt_targets_equal_the_official_ones(data):
    image = images(data["target_image_u8"])
    assert torch.equal(target_input(image, full_prompts(data)), torch.from_numpy(data["full.target_5ch"]))
    assert torch.equal(target_input(image[:1], click_prompts(data)), torch.from_numpy(data["click.target_5ch"]))


@torch.no_grad()
def test_official_checkpoint_gives_the_official_full_logits(model, data):
    assert not model.training
    context_images, context_labels = context(data)
    official_target = torch.from_numpy(data["full.target_5ch"]).unsqueeze(1)  # (B, 1, 5, H, W) as the official call
    assert_close(model(official_target, context_images, context_labels), data["full.logits"], tolerance=TOLERANCE)
    # the interface: one cached support per query, stacked (a support batch equal to the query batch)
    support = torch.cat([model.encode_support(context_images[b], context_labels[b]) for b in range(2)])
    logits = model.predict_with_prompts(images(data["target_image_u8"]), support, full_prompts(data))
    assert_close(logits, data["full.logits"], tolerance=TOLERANCE)


@torch.no_grad()
def test_official_checkpoint_gives_the_official_click_logits(model, data):
    context_images, context_labels = context(data)
    support = model.encode_support(context_images[0], context_labels[0])
    assert support.shape == (1, 3, 2, 128, 128)
    logits = model.predict_with_prompts(images(data["target_image_u8"][:1]), support, click_prompts(data))
    assert_close(logits, data["click.logits"], tolerance=TOLERANCE)


@torch.no_grad()
def test_predict_without_prompts_and_cached_support(model):
    generator = torch.Generator().manual_seed(0)
    queries = torch.rand(2, 1, 16, 16, generator=generator)
    support_images = torch.rand(3, 1, 16, 16, generator=generator)
    support_labels = (torch.rand(3, 1, 16, 16, generator=generator) > 0.5).float()
    cached = model.encode_support(support_images, support_labels)
    predicted = model.predict(queries, cached)
    assert predicted.shape == (2, 1, 16, 16)
    # the official call: zero prompt channels, the context repeated for every query
    zero_prompts = torch.cat([queries, torch.zeros(2, 4, 16, 16)], dim=1)
    official = model(zero_prompts.unsqueeze(1), support_images[None].expand(2, -1, -1, -1, -1),
                     support_labels[None].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(predicted, official, atol=1e-5, rtol=1e-5)
    # a cached support equals the uncached path (one context shared by both queries)
    uncached = model(zero_prompts, support_images[None], support_labels[None])
    assert torch.equal(predicted, uncached)
    no_maps = PromptMaps2D(box=torch.zeros(1, 1, 16, 16), include=torch.zeros(1, 1, 16, 16),
                           exclude=torch.zeros(1, 1, 16, 16))
    assert torch.equal(model.predict_with_prompts(queries, cached, no_maps), predicted)
    # no context: one support of constant 0.5, as the official network uses
    assert torch.equal(model(zero_prompts[:1]), model(zero_prompts[:1], support=torch.full((1, 1, 2, 16, 16), 0.5)))


def test_prompt_maps_rasterise_like_the_official_code():
    maps = prompt_maps(8, [[[1, 2], [5, 6]]], [[1, 0]], box=[[6, 5, 2, 1]])  # corners in any order
    assert maps.include.shape == maps.exclude.shape == maps.box.shape == (1, 1, 8, 8)
    assert maps.include[0, 0, 2, 1] == 1 and maps.include.sum() == 1  # [x, y] -> pixel [y, x]
    assert maps.exclude[0, 0, 6, 5] == 1 and maps.exclude.sum() == 1
    expected_box = torch.zeros(8, 8)
    expected_box[1:5, 2:6] = 1  # rows y1:y2, columns x1:x2, end-exclusive
    assert torch.equal(maps.box[0, 0], expected_box)
    assert maps.previous_logits is None
    scribbles = torch.zeros(1, 2, 8, 8)
    scribbles[0, 0, 2, :] = 1
    both = prompt_maps(8, [[[1, 2]]], [[1]], scribbles=scribbles)
    assert both.include.max() == 1 and both.include.sum() == 8  # clamped where click and scribble meet
    assert prompt_maps(8).include.sum() == 0
    with pytest.raises(ValueError, match="outside"):
        prompt_maps(8, [[[8, 0]]], [[1]])
    with pytest.raises(ValueError, match="label"):
        prompt_maps(8, [[[0, 0]]], [[-1]])


def test_bad_checkpoints_are_one_line_errors(tmp_path, checkpoint):
    universeg_file = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(official_state_dict("universeg"), universeg_file)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1_000_000])
    reshaped_state = official_state_dict("multiverseg")
    reshaped_state["out_conv.conv.weight"] = torch.zeros(2, 256, 1, 1)
    reshaped = tmp_path / "reshaped.pt"
    torch.save({"model": reshaped_state}, reshaped)
    for path, match in ((universeg_file, "not a MultiverSeg checkpoint .*missing"),
                        (truncated, "cannot read a MultiverSeg checkpoint"),
                        (reshaped, "out_conv.conv.weight \\(2, 256, 1, 1\\) instead of \\(1, 256, 1, 1\\)"),
                        (tmp_path / "absent.pt", "no such file")):
        with pytest.raises(ModelError, match=match) as info:
            load_multiverseg(path)
        assert "\n" not in str(info.value)
