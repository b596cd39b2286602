"""MedSAM (SAM ViT-B): the official checkpoint layout loads with strict keys and gives segment-anything's outputs
(a fixture made with the official code: Utilities/references/make_medsam_fixture.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_fixtures import arrays, assert_close, metadata, official_state_dict

from FMSegCore.errors import ModelError
from FMSegCore.models.interfaces import PromptableModel2D, PromptBatch2D
from FMSegCore.models.medsam import MedSAM, load_medsam


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> MedSAM:
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(official_state_dict("medsam"), path)  # the release's wrapping: a plain state_dict
    return load_medsam(path)


def test_the_layout_is_segment_anythings_vit_b():
    meta = metadata("medsam")
    net = MedSAM()
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == [[k, s] for k, s, _ in meta["state_dict"]]
    assert sum(p.numel() for p in net.parameters()) == meta["num_parameters"]
    assert isinstance(net, PromptableModel2D) and (net.input_size, net.mask_size) == (1024, 256)


def test_encoder_and_decoder_give_the_official_outputs(loaded: MedSAM):
    data = arrays("medsam")
    image = loaded.preprocess(data["image_u8"].astype(np.float32))  # min-max of a 0..255 image = u8 / 255
    with torch.no_grad():
        embedding = loaded.encode(image[None])
    assert_close(embedding[:, :, ::4, ::4], data["image_embedding_every4"])
    for name, points in (("box", None), ("box_point", torch.from_numpy(data["point_coords"]))):
        prompts = PromptBatch2D(torch.zeros(1, dtype=torch.long), boxes=torch.from_numpy(data["box"]),
                                points=points, point_labels=None if points is None else torch.ones(1, 1))
        with torch.no_grad():
            logits, iou = loaded.decode(embedding, prompts)
        assert_close(logits, data[f"{name}.low_res_masks"])
        assert_close(iou, data[f"{name}.iou_predictions"][:, 0])


def test_other_checkpoints_are_one_line_errors(tmp_path):
    other = tmp_path / "universeg.pt"
    torch.save(official_state_dict("universeg"), other)
    with pytest.raises(ModelError, match="not a MedSAM") as caught:
        load_medsam(other)
    assert "\n" not in str(caught.value) and str(other) in str(caught.value)
