"""Our LiteMedSAM port against the reference package, on a real CT slice, with the real shipped weights."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

from FMSegCore.bench.prompt_bench import reference_module
from FMSegCore.errors import ModelError
from FMSegCore.io.volume import read_volume
from FMSegCore.models.litemedsam import LiteMedSAM, load_litemedsam
from FMSegCore.preprocessing.intensity import normalize
from FMSegCore.zoo.cache import fetch, resources_dir
from FMSegCore.zoo.registry import get_card

reference = reference_module()  # benchmark-only code, from the source checkout


@pytest.fixture(scope="module")
def checkpoint():
    return fetch(get_card("litemedsam"), allow_download=False)


@pytest.fixture(scope="module")
def ct_slice():
    volume = read_volume(resources_dir() / "SampleData" / "ct_abdomen_pelvis" / "image.nii.gz")
    image = normalize(volume, modality="CT")[60]
    tensor = torch.from_numpy(image)[None, None]
    tensor = torch.nn.functional.interpolate(tensor, size=(256, 256), mode="bilinear", align_corners=False)
    return tensor.expand(1, 3, 256, 256).contiguous()


def test_forward_matches_reference_on_a_real_slice(checkpoint, ct_slice):
    try:
        ref = reference.build_reference_litemedsam()
    except (ImportError, importlib.metadata.PackageNotFoundError) as error:
        pytest.skip(f"reference package unavailable: {error}")
    ours = load_litemedsam(checkpoint, )
    box = torch.tensor([[90.0, 80.0, 170.0, 160.0]])
    with torch.inference_mode():
        expected = ref(ct_slice, box.numpy())
        ours_embedding = ours.encode(ct_slice.contiguous(memory_format=torch.channels_last))
        got = ours(ct_slice, box)
        ref_embedding = ref.image_encoder(ct_slice)
    assert expected.shape == got.shape == (1, 1, 256, 256)
    assert torch.allclose(ours_embedding, ref_embedding, atol=1e-3, rtol=1e-3)
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
    assert ((got > 0) == (expected > 0)).float().mean() > 0.999
    # the pretrained model segments something inside the box and little outside it
    inside = (got[0, 0, 80:161, 90:171] > 0).float().mean()
    outside = (got[0, 0] > 0).float().sum() - (got[0, 0, 80:161, 90:171] > 0).float().sum()
    assert inside > 0.05 and outside < 0.05 * 256 * 256


def test_checkpoint_keys_load_strictly(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert len(state) == 435
    model = LiteMedSAM()
    assert set(model.state_dict()) == set(state)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(9.79e6, rel=0.01)
    broken = dict(state)
    broken.pop("mask_decoder.iou_token.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ModelError, match="not a LiteMedSAM checkpoint"):
        load_litemedsam(tmp_path / "broken.pth")


def test_fused_encoder_equals_unfused(checkpoint):
    plain = load_litemedsam(checkpoint, trainable=True)
    fused = load_litemedsam(checkpoint, )
    torch.manual_seed(1)
    images = torch.rand(2, 3, 256, 256)
    with torch.inference_mode():
        a = plain.encode(images)
        b = fused.encode(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    assert not np.allclose(a.numpy(), 0)


def test_bf16_decoder_agrees_with_fp32_and_leaves_the_state_dict_alone(checkpoint, ct_slice):
    from FMSegCore.models.interfaces import PromptBatch2D

    model = load_litemedsam(checkpoint, )
    keys = set(model.state_dict())
    prompts = PromptBatch2D(embedding_index=torch.zeros(1, dtype=torch.long),
                            boxes=torch.tensor([[90.0, 80.0, 170.0, 160.0]]))
    with torch.inference_mode():
        embedding = model.encode(ct_slice.contiguous(memory_format=torch.channels_last))
        full, _ = model.decode(embedding, prompts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, quality = model.decode(embedding, prompts)
    assert low.dtype == torch.float32 and quality.dtype == torch.float32
    assert ((low > 0) == (full > 0)).float().mean() > 0.99
    assert not torch.equal(low, full)  # the bf16 copy really ran
    assert set(model.state_dict()) == keys
