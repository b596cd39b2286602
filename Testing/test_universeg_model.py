"""UniverSeg v1: the official checkpoint layout and outputs (fixtures made with the official code), split-weight
cross conv vs a plain pairwise reference, caching, loading."""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import arrays, assert_close, images, metadata, official_state_dict

from FMSegCore.bench.reference_universeg import reference_forward
from FMSegCore.errors import ModelError
from FMSegCore.models.universeg import UniverSeg, build_universeg, load_universeg

SIZE = 32  # divisible by 8: three poolings


def random_state() -> dict[str, torch.Tensor]:
    """The official layout filled as the official-code fixture was (Testing/Data/reference)."""
    return official_state_dict("universeg")


@pytest.fixture(scope="module")
def model() -> UniverSeg:
    net = build_universeg()
    net.load_state_dict(random_state(), strict=True)
    return net.eval()


def inputs(batch: int, count: int, seed: int = 1, size: int = SIZE):
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 1, size, size, generator=generator)
    images = torch.rand(batch, count, 1, size, size, generator=generator)
    labels = (torch.rand(batch, count, 1, size, size, generator=generator) > 0.5).float()
    return target, images, labels


def test_the_official_checkpoint_loads_and_gives_the_official_outputs(tmp_path):
    meta = metadata("universeg")
    net = build_universeg()
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == [[k, s] for k, s, _ in meta["state_dict"]]
    assert sum(p.numel() for p in net.parameters()) == meta["num_parameters"] == 1_182_785
    path = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(random_state(), path)  # the release's wrapping: a plain state_dict
    loaded = load_universeg(path)
    data = arrays("universeg")
    with torch.no_grad():
        logits = loaded(images(data["target_image_u8"]), images(data["support_images_u8"]),
                        torch.from_numpy(data["support_labels_u8"]).float())
    assert_close(logits, data["logits"], tolerance=1e-5)


@torch.no_grad()
def test_split_weights_match_pairwise_reference(model):
    target, images, labels = inputs(batch=2, count=3)
    logits = model(target, images, labels)
    assert logits.shape == (2, 1, SIZE, SIZE)
    expected = reference_forward(random_state(), target, images, labels)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_shared_support_set_matches_one_by_one(model):
    target, images, labels = inputs(batch=3, count=2, seed=2)
    images, labels = images[:1], labels[:1]
    batched = model(target, images, labels)
    one_by_one = torch.cat([model(target[b:b + 1], images, labels) for b in range(3)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    repeated = model(target, images.expand(3, -1, -1, -1, -1), labels.expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(batched, repeated, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_first_layer_support(model):
    target, images, labels = inputs(batch=2, count=2, seed=3)
    cache = model.encode_support_first_layer(images[:1], labels[:1])
    assert cache.shape == (1, 2, 64, SIZE, SIZE)
    direct = model(target, images[:1], labels[:1])
    cached = model(target, first_layer_support=cache)
    assert torch.equal(direct, cached)


def test_load_round_trip_and_errors(tmp_path, model):
    path = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(model.state_dict(), path)
    loaded = load_universeg(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": model.state_dict()}, wrapped)
    assert torch.equal(load_universeg(wrapped).out_conv.conv.weight, model.out_conv.conv.weight)

    broken = model.state_dict()
    del broken["dec_blocks.1.cross.cross_conv.bias"]
    bad = tmp_path / "missing.pt"
    torch.save(broken, bad)
    with pytest.raises(ModelError, match="missing") as info:
        load_universeg(bad)
    assert "\n" not in str(info.value)

    reshaped = model.state_dict()
    reshaped["out_conv.conv.weight"] = torch.zeros(2, 64, 1, 1)
    torch.save(reshaped, tmp_path / "shape.pt")
    with pytest.raises(ModelError) as info:
        load_universeg(tmp_path / "shape.pt")
    assert "\n" not in str(info.value)

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):
        load_universeg(tmp_path / "junk.pt")
