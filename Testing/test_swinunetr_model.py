"""Swin UNETR: renaming of the official key layouts, round trips through saved checkpoints, head handling, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from FMSegCore.errors import ModelError
from FMSegCore.models.swinunetr import (
    HEAD_KEYS,
    NUM_BACKBONE_PARAMETERS,
    build_swinunetr,
    load_swinunetr,
    load_swinunetr_model,
    official_to_monai_keys,
)
from FMSegCore.zoo.families import WEIGHTS_ONLY, family_of, model_kind
from FMSegCore.zoo.registry import get_card

FEATURES = 12  # smallest feature_size SwinUNETR accepts (a multiple of 12): keeps the tests fast
CLASSES = 3
SHAPE = (1, 1, 64, 32, 32)  # every side divisible by 32, the bottleneck keeps 2 voxels for instance norm

# Modules of the Universal Model (SuPreM, CLIP-Driven) that sit beside the Swin UNETR backbone.
UNIVERSAL_EXTRAS = {
    "module.organ_embedding": torch.zeros(CLASSES, 512),
    "module.controller.weight": torch.zeros(153, 512, 1, 1, 1),
    "module.precls_conv.0.weight": torch.zeros(FEATURES),
}


class NotATensor:
    """An arbitrary picklable object: a weights-only load must refuse it."""

    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """A small Swin UNETR whose every float tensor differs from a fresh initialisation."""
    torch.manual_seed(0)
    model = build_swinunetr(CLASSES, feature_size=FEATURES)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(source: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return source(image)


def suprem_layout(state: dict[str, torch.Tensor]) -> dict:
    """``{"net": {"module.backbone.swin_vit...", ...}}`` plus the Universal Model's own modules."""
    net = {"module.backbone." + key.replace("swinViT.", "swin_vit.", 1): value for key, value in state.items()}
    return {"net": {**net, **UNIVERSAL_EXTRAS}, "epoch": 400}


def fseft_layout(state: dict[str, torch.Tensor]) -> dict:
    """``{"state_dict": {"swin_vit...", "classifier.weight", ...}}``."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("swinViT.", "swin_vit.", 1)
        renamed[key.replace("out.conv.conv.", "classifier.", 1) if key in HEAD_KEYS else key] = value
    return {"state_dict": renamed}


def save(payload: object, path: Path) -> Path:
    torch.save(payload, path)
    return path


def assert_same_tensors(model: torch.nn.Module, reference: dict[str, torch.Tensor], keys) -> None:
    loaded = model.state_dict()
    for key in keys:
        assert torch.equal(loaded[key], reference[key]), key


def test_official_to_monai_keys_renames_only_leading_parts():
    value = torch.zeros(1)
    renamed = official_to_monai_keys({
        "module.backbone.swin_vit.patch_embed.proj.weight": value,
        "backbone.module.encoder1.layer.conv1.conv.weight": value,
        "classifier.weight": value,
        "module.classifier.bias": value,
        "decoder1.module.backbone.swin_vit.x": value,  # not at the front: left alone
        "classifier.0.linear.weight": value,  # a fine-tuned PEFT head, not the plain classifier
        "module.organ_embedding": value,
    })
    assert list(renamed) == [
        "swinViT.patch_embed.proj.weight",
        "encoder1.layer.conv1.conv.weight",
        "out.conv.conv.weight",
        "out.conv.conv.bias",
        "decoder1.module.backbone.swin_vit.x",
        "classifier.0.linear.weight",
        "organ_embedding",
    ]
    with pytest.raises(ValueError, match="both map to 'swinViT.a'"):
        official_to_monai_keys({"module.swinViT.a": value, "swin_vit.a": value})


@pytest.mark.parametrize("layout", ["monai", "suprem", "fseft"])
def test_official_layouts_round_trip(layout, source, image, expected, tmp_path):
    state = source.state_dict()
    payload = {"monai": state, "suprem": suprem_layout(state), "fseft": fseft_layout(state)}[layout]
    model, report = load_swinunetr(save(payload, tmp_path / f"{layout}.pth"))
    assert report.out_channels == CLASSES and report.feature_size == FEATURES
    assert report.head_loaded and report.initialised == []
    assert report.loaded == sorted(state)
    expected_skips = set(official_to_monai_keys(UNIVERSAL_EXTRAS)) if layout == "suprem" else set()
    assert set(report.skipped) == expected_skips
    assert not model.training
    assert_same_tensors(model, state, state)
    with torch.no_grad():
        torch.testing.assert_close(model(image), expected, rtol=0, atol=0)


def test_head_of_another_class_count_is_skipped_and_reported(source, tmp_path):
    state = source.state_dict()
    path = save(suprem_layout(state), tmp_path / "suprem.pth")
    model, report = load_swinunetr(path, out_channels=CLASSES + 2)
    assert not report.head_loaded
    assert report.initialised == list(HEAD_KEYS)
    assert set(HEAD_KEYS) <= set(report.skipped)
    assert "does not fit" in report.skipped["out.conv.conv.weight"]
    assert model.state_dict()["out.conv.conv.weight"].shape == (CLASSES + 2, FEATURES, 1, 1, 1)
    backbone = [key for key in state if key not in HEAD_KEYS]
    assert report.loaded == sorted(backbone)
    assert_same_tensors(model, state, backbone)
    assert "head freshly initialised" in report.summary()


def test_missing_head_needs_out_channels(source, tmp_path):
    state = {key: value for key, value in source.state_dict().items() if key not in HEAD_KEYS}
    path = save(state, tmp_path / "backbone.pt")
    with pytest.raises(ModelError, match="pass out_channels") as raised:
        load_swinunetr(path)
    assert str(path) in str(raised.value)
    model, report = load_swinunetr(path, out_channels=2)
    assert report.initialised == list(HEAD_KEYS) and report.skipped == {}
    assert_same_tensors(model, state, state)


def test_missing_backbone_key_is_a_model_error(source, tmp_path):
    net = suprem_layout(source.state_dict())["net"]
    del net["module.backbone.decoder2.conv_block.conv1.conv.weight"]
    path = save({"net": net}, tmp_path / "broken.pth")
    with pytest.raises(ModelError) as raised:
        load_swinunetr(path)
    message = str(raised.value)
    assert str(path) in message and "1 missing backbone key(s), e.g. decoder2.conv_block.conv1.conv.weight" in message
    assert "\n" not in message


def test_wrong_feature_size_is_a_model_error(source, tmp_path):
    path = save(source.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ModelError, match="feature_size 12, not 48") as raised:
        load_swinunetr(path, feature_size=48)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", None])
def test_not_a_checkpoint_is_a_model_error(content, tmp_path):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match="cannot load Swin UNETR checkpoint") as raised:
        load_swinunetr(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_state_without_swin_unetr_keys_is_a_model_error(tmp_path):
    path = save({"model": {"linear.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a Swin UNETR checkpoint") as raised:
        load_swinunetr(path)
    assert str(path) in str(raised.value)


def test_pickled_objects_are_refused(source, tmp_path):
    path = save({"net": source.state_dict(), "args": NotATensor()}, tmp_path / "pickled.pth")
    assert isinstance(torch.load(path, weights_only=False)["args"], NotATensor)  # a valid pickle otherwise
    with pytest.raises(ModelError, match="refused by the weights-only loader: it pickles .*NotATensor") as raised:
        load_swinunetr(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_zoo_cards_and_family_loader(source, tmp_path):
    card = get_card("suprem-swinunetr")
    assert card.architecture == get_card("fseft-swinunetr").architecture == "swinunetr"
    family = family_of(card)
    assert family.load_function() is load_swinunetr_model
    assert model_kind(card) == WEIGHTS_ONLY  # the layouts load, but no engine runs Swin UNETR yet
    model = family.load_function()(save(fseft_layout(source.state_dict()), tmp_path / "fseft.pth"), device="cpu")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.state_dict()["out.conv.conv.weight"].shape[0] == CLASSES


def test_published_size_loads_strictly_from_the_official_layout(tmp_path):
    classes = 29
    torch.manual_seed(2)
    model = build_swinunetr(classes)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == NUM_BACKBONE_PARAMETERS + 49 * classes
    assert abs(count / 1e6 - 62.2) < 0.05
    state = model.state_dict()
    official = {}
    for key, value in state.items():
        key = key.replace("swinViT.", "swin_vit.", 1)
        official["module.backbone." + (key.replace("out.conv.conv.", "classifier.", 1) if key in HEAD_KEYS
                                       else key)] = value
    del model
    loaded, report = load_swinunetr(save({"net": official}, tmp_path / "published.pth"))
    assert report.feature_size == 48 and report.out_channels == classes
    assert report.loaded == sorted(state) and report.skipped == {} and report.head_loaded
    assert_same_tensors(loaded, state, state)
