"""Automatic segmenters' heads: shapes, the spatial adapter's identity start, and the prior initialisation."""

from __future__ import annotations

import pytest
import torch

from FMSegCore.engines.adaptation.heads import PRIOR_PROBABILITY, build_head


@pytest.mark.parametrize("kind", ["linear", "spatial-adapter", "decoder"])
def test_a_new_head_predicts_the_prior_everywhere_at_the_input_size(kind):
    torch.manual_seed(0)
    head = build_head(kind, 32, 16, 3, 64)
    embedding, stem, image = torch.randn(2, 32, 16, 16), torch.randn(2, 16, 32, 32), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        probability = torch.sigmoid(head(embedding, stem, image))
    assert probability.shape == (2, 3, 64, 64)
    # close to the prior, nowhere near 0.5: no structure starts out everywhere
    assert abs(float(probability.mean()) - PRIOR_PROBABILITY) < 0.01
    assert float(probability.max()) < 0.2


def test_the_spatial_adapter_starts_as_the_identity():
    probe, adapted = build_head("linear", 32, 16, 3, 64), build_head("spatial-adapter", 32, 16, 3, 64)
    adapted.classifier.load_state_dict(probe.classifier.state_dict())
    embedding = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        assert torch.allclose(adapted(embedding), probe(embedding))


def test_an_unknown_head_is_refused():
    with pytest.raises(ValueError, match="unknown head"):
        build_head("transformer", 32, 16, 3, 64)
