"""Tyche v1: the official checkpoint layout and outputs (fixtures made with the official code), the stochastic
in-context interface (seeded candidates, their mean, shared supports), loading errors."""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import arrays, assert_close, images, metadata, official_state_dict

from FMSegCore.errors import ModelError
from FMSegCore.models.interfaces import StochasticInContextModel2D
from FMSegCore.models.tyche import NUM_PARAMETERS, TycheNet, build_tyche, load_tyche, mean_probability_logits
from FMSegCore.models.universeg import build_universeg

SIZE = 32  # divisible by 8: three poolings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions run fastest on one thread, most of all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> TycheNet:
    net = build_tyche()
    net.load_state_dict(official_state_dict("tyche"), strict=True)
    return net.eval()


def inputs(count: int, seed: int = 1, batch: int = 1, size: int = SIZE):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.rand(batch, 1, size, size, generator=generator)
    images = torch.rand(count, 1, size, size, generator=generator)
    labels = (torch.rand(count, 1, size, size, generator=generator) > 0.5).float()
    return queries, images, labels


def test_layout_equals_the_official_state_dict():
    meta = metadata("tyche")
    net = build_tyche()
    assert [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in net.state_dict().items()] \
        == [[k, s, d] for k, s, d in meta["state_dict"]]
    assert sum(p.numel() for p in net.parameters()) == meta["num_parameters"] == NUM_PARAMETERS
    assert isinstance(net, StochasticInContextModel2D) and net.input_size == 128


@torch.no_grad()
def test_the_official_checkpoint_loads_and_gives_the_official_outputs(tmp_path):
    path = tmp_path / "tyche_v1_model_weights_CVPR.pt"
    torch.save({"model": official_state_dict("tyche")}, path)  # the release's wrapping
    net = load_tyche(path)
    assert not net.training
    data = arrays("tyche")
    target = images(data["target_image_u8"])
    support_images = images(data["support_images_u8"])
    support_labels = torch.from_numpy(data["support_labels_u8"]).float()
    logits = net(support_images, support_labels, target.unsqueeze(1).expand(-1, 3, -1, -1, -1),
                 torch.from_numpy(data["noise_image"]))
    assert_close(logits, data["logits"], tolerance=1e-5)

    # The interface draws the same noise as the official get_model_inputs (torch.manual_seed(0); randn_like).
    support = net.encode_support(support_images[0], support_labels[0])
    candidates = net.predict_candidates(target[:1], support, 3, generator=torch.Generator().manual_seed(0))
    assert_close(candidates, data["logits"][:1], tolerance=1e-5)


@torch.no_grad()
def test_seeded_candidates_are_reproducible_and_differ(model):
    queries, images, labels = inputs(count=3, batch=2)
    support = model.encode_support(images, labels)
    assert support.shape == (1, 3, 2, SIZE, SIZE)
    first = model.predict_candidates(queries, support, 4, generator=torch.Generator().manual_seed(7))
    again = model.predict_candidates(queries, support, 4, generator=torch.Generator().manual_seed(7))
    other = model.predict_candidates(queries, support, 4, generator=torch.Generator().manual_seed(8))
    assert first.shape == (2, 4, 1, SIZE, SIZE)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    spread = (first.unsqueeze(1) - first.unsqueeze(2)).abs().amax(dim=(3, 4, 5))  # (B, K, K)
    off_diagonal = spread[:, ~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.min() > 1e-3  # every pair of candidates differs


@torch.no_grad()
def test_predict_is_the_mean_probability_of_seeded_candidates(model):
    queries, images, labels = inputs(count=2, batch=2, seed=2)
    support = model.encode_support(images, labels)
    logits = model.predict(queries, support)
    assert logits.shape == (2, 1, SIZE, SIZE)
    for b in range(2):  # every query gets the same seeded noise, whatever its batch
        candidates = model.predict_candidates(queries[b:b + 1], support, model.default_candidates,
                                              generator=torch.Generator().manual_seed(model.default_seed))
        expected = torch.logit(torch.sigmoid(candidates).mean(dim=1))
        torch.testing.assert_close(logits[b:b + 1], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.predict(queries[b:b + 1], support), logits[b:b + 1], atol=1e-5, rtol=1e-5)


def test_mean_probability_logits_is_stable():
    candidates = torch.tensor([[200.0, 200.0], [-300.0, -300.0], [0.0, 0.0], [4.0, -1.0]]).reshape(4, 2, 1)
    expected = torch.tensor([200.0, -300.0, 0.0, float(torch.logit(torch.sigmoid(torch.tensor([4.0, -1.0])).mean()))])
    torch.testing.assert_close(mean_probability_logits(candidates)[:, 0], expected)


@torch.no_grad()
def test_shared_support_set_matches_one_by_one(model):
    queries, images, labels = inputs(count=2, batch=3, seed=3)
    noise = torch.randn(3, 2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    target = queries.unsqueeze(1).expand(-1, 2, -1, -1, -1)
    shared = model(images[None], labels[None], target, noise)
    assert shared.shape == (3, 2, 1, SIZE, SIZE)
    one_by_one = torch.cat([model(images[None], labels[None], target[b:b + 1], noise[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(shared, one_by_one, atol=1e-5, rtol=1e-5)
    repeated = model(images.expand(3, -1, -1, -1, -1), labels.expand(3, -1, -1, -1, -1), target, noise)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(images[None, :, :, :12, :12], labels[None, :, :, :12, :12], target[..., :12, :12],
              noise[..., :12, :12])


def test_bad_files_are_one_line_model_errors(tmp_path, model):
    def error(path) -> str:
        with pytest.raises(ModelError) as info:
            load_tyche(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        return str(info.value)

    universeg = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(build_universeg().state_dict(), universeg)  # another family's layout
    assert "missing" in error(universeg) and "Tyche" in error(universeg)

    good = tmp_path / "good.pt"
    torch.save({"model": model.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "cannot read" in error(truncated)

    reshaped = model.state_dict()
    reshaped["enc_blocks.0.meanconv.vmapped.conv.weight"] = torch.zeros(64, 65, 3, 3)
    torch.save({"model": reshaped}, tmp_path / "shape.pt")
    assert "enc_blocks.0.meanconv.vmapped.conv.weight" in error(tmp_path / "shape.pt")

    plain = tmp_path / "plain.pt"  # a plain state_dict loads as well
    torch.save(model.state_dict(), plain)
    assert torch.equal(load_tyche(plain).out_conv.conv.weight, model.out_conv.conv.weight)
