"""PEFT methods as wrappers over real layers and models: LoRA/ARENA merging, AdaptFormer, what each method trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from FMSegCore.engines.adaptation.adaptformer import ParallelAdapter, inject_adaptformer
from FMSegCore.engines.adaptation.auto_learner import auto_parts, build_auto_segmenter
from FMSegCore.engines.adaptation.lora import (
    LoRALayer,
    arena_soft_threshold,
    inject_lora,
    kept_ranks,
    merge_lora,
)
from FMSegCore.engines.adaptation.losses import dice_bce_loss
from FMSegCore.engines.adaptation.methods import METHODS, MethodSettings, apply_method
from FMSegCore.models.litemedsam import LiteMedSAM


def _perturb(layer: LoRALayer) -> None:
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        if layer.diagonal is not None:
            layer.diagonal.uniform_(-1, 1)


@pytest.mark.parametrize("base, shape", [
    (nn.Linear(12, 7), (5, 12)),
    (nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 9, 9)),
    (nn.Conv3d(3, 5, 3, padding=1), (1, 3, 6, 6, 6)),
])
@pytest.mark.parametrize("diagonal", [False, True])
def test_lora_starts_at_the_base_and_merges_exactly(base: nn.Module, shape: tuple, diagonal: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    expected = base(x).detach()
    model = nn.Sequential(base)
    names = inject_lora(model, [r"^0$"], rank=3, diagonal=diagonal)
    assert names == ["0"] and isinstance(model[0], LoRALayer)
    assert torch.allclose(model(x), expected)  # B is zero: training starts from the pre-trained layer
    _perturb(model[0])
    adapted = model(x).detach()
    assert not torch.allclose(adapted, expected, atol=1e-4)
    assert merge_lora(model) == 1
    assert type(model[0]) is type(base)
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_arena_soft_threshold_prunes_rank_per_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject_lora(model, [r"^\d$"], rank=4, diagonal=True)
    with torch.no_grad():
        model[0].diagonal.copy_(torch.tensor([0.5, -0.02, 0.3, 0.01]))
        model[1].diagonal.copy_(torch.tensor([-0.8, 0.9, 0.7, -0.6]))
    arena_soft_threshold(model, 0.05)
    assert kept_ranks(model) == {"0": 2, "1": 4}
    assert torch.allclose(model[0].diagonal, torch.tensor([0.45, 0.0, 0.25, 0.0]))
    assert torch.allclose(model[1].diagonal, torch.tensor([-0.75, 0.85, 0.65, -0.55]))


def test_grouped_convolutions_are_not_targets() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    assert inject_lora(model, [r"^\d$"]) == ["1"]


def test_adaptformer_starts_at_the_base_and_trains_only_the_bottleneck() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)))
    x = torch.randn(2, 5, 16)
    expected = model(x).detach()
    assert inject_adaptformer(model, [r"^mlp$"], bottleneck=4) == ["mlp"]
    assert isinstance(model.mlp, ParallelAdapter)
    assert torch.allclose(model(x), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mlp.down.weight", "mlp.down.bias", "mlp.up.weight", "mlp.up.bias"}


@pytest.fixture(scope="module")
def litemedsam_structure() -> LiteMedSAM:
    """LiteMedSAM's architecture (random weights: these tests check structure, not accuracy)."""
    torch.manual_seed(0)
    return LiteMedSAM()


def _trainable(method: str, base: LiteMedSAM) -> tuple[set[str], int]:
    import copy

    root = build_auto_segmenter(copy.deepcopy(base), 3, method)
    report = apply_method(auto_parts(root), MethodSettings(method))
    names = {n for n, p in root.named_parameters() if p.requires_grad}
    assert report.trainable == sum(p.numel() for p in root.parameters() if p.requires_grad)
    return names, report.trainable


def test_each_method_trains_what_it_says(litemedsam_structure: LiteMedSAM) -> None:
    counts = {}
    for method in METHODS:
        names, counts[method] = _trainable(method, litemedsam_structure)
        encoder = {n for n in names if n.startswith("encoder.")}
        head = {n for n in names if n.startswith("head.")}
        assert head, method  # every automatic segmenter trains its head
        assert not any(n.startswith(("encoder.patch_embed", "encoder.layers.0.")) for n in names), method
        if method in ("linear-probe", "spatial-adapter", "decoder"):
            assert not encoder, method
        elif method == "bitfit":
            assert encoder and all(n.endswith(".bias") for n in encoder)
        elif method == "affine":
            assert encoder and all(".norm" in n or "bn." in n or "neck." in n for n in encoder)
        elif method in ("lora", "arena"):
            assert encoder and all("lora_" in n or n.endswith(".diagonal") for n in encoder)
            assert any(n.endswith(".diagonal") for n in encoder) == (method == "arena")
        elif method == "adaptformer":
            assert encoder and all(".mlp.down." in n or ".mlp.up." in n for n in encoder)
    assert counts["linear-probe"] < counts["lora"] < counts["full"]
    assert counts["lora"] < 0.1 * counts["full"]


def test_partial_labels_leave_unknown_structures_out_of_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = (torch.rand(2, 3, 8, 8) > 0.5).float()
    known = torch.tensor([[True, False, True], [True, True, False]])
    other = target.clone()
    other[0, 1] = 1 - other[0, 1]
    other[1, 2] = 1 - other[1, 2]
    assert torch.allclose(dice_bce_loss(logits, target, known), dice_bce_loss(logits, other, known))
    assert not torch.allclose(dice_bce_loss(logits, target), dice_bce_loss(logits, other))
    with pytest.raises(ValueError):
        dice_bce_loss(logits, target, torch.zeros(2, 3, dtype=torch.bool))


def test_a_rank_outside_the_offered_range_is_refused() -> None:
    from FMSegCore.engines.adaptation.defaults import MAX_RANK

    assert MethodSettings("lora", rank=MAX_RANK).rank == MAX_RANK
    for rank in (0, MAX_RANK + 1):
        with pytest.raises(ValueError, match=f"between 1 and {MAX_RANK}"):
            MethodSettings("lora", rank=rank)
