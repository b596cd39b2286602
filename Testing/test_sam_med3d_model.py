"""SAM-Med3D-turbo: the official checkpoint layout and outputs (fixtures made with the official code, see
Testing/Data/reference/README.md), through the modules and through the PromptableModel3D interface; loading and
one-line errors; preprocessing; a 3-D prompt session. The 100 M parameter encoder runs once per module."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference_fixtures import arrays, assert_close, metadata, official_state_dict

from FMSegCore.engines.prompting.session3d import PromptSession3D
from FMSegCore.errors import ModelError
from FMSegCore.io.volume import Volume
from FMSegCore.models.interfaces import PromptableModel3D, PromptBatch3D
from FMSegCore.models.sam_med3d import SAMMed3D, load_sam_med3d
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts

CASES = ("a_none", "a_zeros", "a_prev", "b_none", "b_zeros", "b_prev")


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return arrays("sammed3d")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> SAMMed3D:
    """The official layout, wrapped as the release is (a training checkpoint), loaded by our loader."""
    path = tmp_path_factory.mktemp("sammed3d") / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": official_state_dict("sammed3d"), "epoch": 0}, path)
    loaded = load_sam_med3d(path)
    path.unlink()
    return loaded


@pytest.fixture(scope="module")
def embedding(model, data) -> torch.Tensor:
    x = (torch.from_numpy(data["volume_u8"]).float() / 255 - 0.5) * 4
    with torch.no_grad():
        return model.image_encoder(x)


def mask_prompt(case: str, data) -> torch.Tensor | None:
    """The ``masks=`` argument of a fixture case (in the network's axes)."""
    kind = case.split("_")[1]
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(1, 1, 32, 32, 32)
    return torch.from_numpy(data[f"{case}.mask_input"])


def test_the_layout_is_the_official_one():
    meta = metadata("sammed3d")
    net = SAMMed3D()
    state = net.state_dict()
    assert [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()] == meta["state_dict"]
    assert len(state) == 324
    assert sum(p.numel() for p in net.parameters()) == meta["num_parameters"] == 100_509_232
    assert sum(v.numel() for v in state.values()) == meta["num_state_dict_elements"]


def test_the_wrapped_release_loads_in_eval_mode(model):
    assert isinstance(model, PromptableModel3D)
    assert not model.training
    reference = official_state_dict("sammed3d")
    for key in ("image_encoder.pos_embed", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "mask_decoder.iou_prediction_head.layers.2.bias"):
        assert torch.equal(model.state_dict()[key], reference[key])


def test_the_encoder_and_dense_pe_match_the_official_ones(model, embedding, data):
    assert embedding.shape == (1, 384, 8, 8, 8)
    assert_close(embedding, data["image_embedding"])
    with torch.no_grad():
        assert_close(model.prompt_encoder.get_dense_pe(), data["image_pe"])


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prompt_encoder_and_mask_decoder_match_every_official_case(model, data, case):
    coords = torch.from_numpy(data[f"{case}.point_coords"])
    labels = torch.from_numpy(data[f"{case}.point_labels"])
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt(case, data))
    assert_close(sparse, data[f"{case}.sparse_embeddings"])
    if f"{case}.dense_embeddings" in data:
        assert_close(dense, data[f"{case}.dense_embeddings"])
    low_res, iou = model.mask_decoder(torch.from_numpy(data["image_embedding"]), model.prompt_encoder.get_dense_pe(),
                                      sparse, dense, multimask_output=False)
    assert_close(low_res, data[f"{case}.low_res_masks"])
    assert_close(iou, data[f"{case}.iou_predictions"])


@torch.no_grad()
def test_multimask_output_matches_the_official_one(model, data):
    coords, labels = (torch.from_numpy(data[f"a_zeros.point_{name}"]) for name in ("coords", "labels"))
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt("a_zeros", data))
    low_res, iou = model.mask_decoder(torch.from_numpy(data["image_embedding"]), model.prompt_encoder.get_dense_pe(),
                                      sparse, dense, multimask_output=True)
    assert_close(low_res, data["a_zeros.multimask.low_res_masks"])
    assert_close(iou, data["a_zeros.multimask.iou_predictions"])


def to_crop_axes(network: np.ndarray) -> torch.Tensor:
    """A (B, C, I, J, K) array on the network's axes as (B, C, K, J, I) on FMSeg's crop axes."""
    return torch.from_numpy(network).transpose(2, 4)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_the_interface_decode_matches_every_official_case(model, data, case):
    # The network's spatial dims are the crop's (I, J, K): the official coordinates are (i, j, k) as they are.
    kind = case.split("_")[1]
    batch = PromptBatch3D(embedding_index=torch.zeros(1, dtype=torch.long),
                          points=torch.from_numpy(data[f"{case}.point_coords"]),
                          point_labels=torch.from_numpy(data[f"{case}.point_labels"]),
                          mask_logits=to_crop_axes(data[f"{case}.mask_input"]) if kind == "prev" else None)
    model.zero_mask_without_previous = kind != "none"  # the official first click passes zeros
    try:
        low_res, iou = model.decode(torch.from_numpy(data["image_embedding"]), batch)
    finally:
        model.zero_mask_without_previous = True
    assert low_res.shape == (1, 1, 32, 32, 32) and iou.shape == (1,)
    assert_close(low_res, to_crop_axes(data[f"{case}.low_res_masks"]).numpy())
    assert_close(iou, data[f"{case}.iou_predictions"][:, 0])
    # the check is sensitive to the point order: reversed coordinates give another mask
    batch.points = batch.points.flip(-1)
    reversed_low_res, _ = model.decode(torch.from_numpy(data["image_embedding"]), batch)
    reference = data[f"{case}.low_res_masks"]
    assert np.abs(reversed_low_res.transpose(2, 4).numpy() - reference).max() > 1e-2 * np.abs(reference).max()


@torch.no_grad()
def test_a_box_is_an_include_point_at_its_centre_and_embeddings_are_picked_by_index(model, data):
    centre = torch.from_numpy(data["a_zeros.point_coords"])[0, 0]
    boxes = torch.cat([centre - torch.tensor([4.0, 6.0, 8.0]), centre + torch.tensor([4.0, 6.0, 8.0])])[None]
    stack = torch.cat([torch.randn(1, 384, 8, 8, 8), torch.from_numpy(data["image_embedding"])])
    low_res, iou = model.decode(stack, PromptBatch3D(embedding_index=torch.tensor([1]), boxes=boxes))
    assert_close(low_res, to_crop_axes(data["a_zeros.low_res_masks"]).numpy())
    assert_close(iou, data["a_zeros.iou_predictions"][:, 0])


def test_encode_gives_the_network_the_crop_on_its_own_axes():
    recorder = SimpleNamespace(image_encoder=lambda x: x)
    crops = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 2, 3, 4, 5)  # (B, C, K, J, I)
    seen = SAMMed3D.encode(recorder, crops)
    assert seen.shape == (1, 2, 5, 4, 3) and seen[0, 1, 4, 2, 0] == crops[0, 1, 0, 2, 4]


def test_preprocess_z_normalises_over_the_voxels_above_zero():
    model = SimpleNamespace()
    rng = np.random.default_rng(0)
    crop = rng.normal(40.0, 300.0, size=(6, 7, 8)).astype(np.float32)  # HU-like: about half are negative
    out = SAMMed3D.preprocess(model, crop)
    assert out.shape == (1, 6, 7, 8) and out.dtype == torch.float32
    values = crop[crop > 0].astype(np.float64)
    expected = (crop - values.mean()) / values.std(ddof=1)  # torchio: torch's (unbiased) std
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    # no voxel above zero: every voxel gives the statistics; a constant crop is all zeros, never NaN
    negative = -np.abs(crop) - 1
    np.testing.assert_allclose(SAMMed3D.preprocess(model, negative)[0].numpy(),
                               (negative - negative.mean()) / negative.std(ddof=1), rtol=1e-4, atol=1e-4)
    assert torch.equal(SAMMed3D.preprocess(model, np.full((4, 4, 4), 7.0)), torch.zeros(1, 4, 4, 4))


def test_wrong_and_damaged_files_are_one_line_model_errors(tmp_path):
    other = tmp_path / "universeg.pt"
    torch.save(official_state_dict("universeg"), other)
    with pytest.raises(ModelError, match="not a SAM-Med3D checkpoint") as error:
        load_sam_med3d(other)
    assert "\n" not in str(error.value)
    truncated = tmp_path / "truncated.pth"
    torch.save({"model_state_dict": {"image_encoder.pos_embed": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ModelError, match="cannot read a SAM-Med3D checkpoint") as error:
        load_sam_med3d(truncated)
    assert "\n" not in str(error.value)
    with pytest.raises(ModelError, match="no such file"):
        load_sam_med3d(tmp_path / "missing.pth")


def test_a_3d_session_encodes_once_and_refines_with_a_second_click(model):
    # A bright ball in a dark 1.5 mm volume; with the fixture's synthetic weights only the mechanics are checked.
    k, j, i = np.meshgrid(*(np.arange(n) for n in (40, 48, 56)), indexing="ij")
    ball = (k - 20) ** 2 + (j - 24) ** 2 + (i - 28) ** 2 < 8 ** 2
    volume = Volume(np.where(ball, 200.0, -800.0).astype(np.float32), spacing=(1.5, 1.5, 1.5))
    session = PromptSession3D(volume, model, "cpu")
    first = session.segment(SegmentPrompts("ball", points=[PointPrompt((28.0, 24.0, 20.0))]))
    assert first.shape == volume.array.shape and first.dtype == bool
    second = session.segment(SegmentPrompts("ball", points=[PointPrompt((28.0, 24.0, 20.0)),
                                                           PointPrompt((10.0, 10.0, 10.0), False)]))
    assert second.shape == volume.array.shape
    assert session.timings.encoded == 1 and session.timings.decoded == 2


def test_a_box_longer_than_the_crop_is_tiled_and_the_tiles_masks_joined(model):
    """A 450 mm bar boxed whole: overlapping 128^3 crops at 1.5 mm (192 mm) cover the box, each with the box's
    share and the points inside it; a box that fits keeps one crop."""
    volume = Volume(np.full((16, 16, 300), -800.0, dtype=np.float32), spacing=(1.5, 1.5, 1.5))
    volume.array[6:10, 6:10, :] = 200.0
    session = PromptSession3D(volume, model, "cpu")
    box = BoxPrompt((0.0, 4.0, 4.0), (299.0, 11.0, 11.0))
    click = PointPrompt((250.0, 8.0, 8.0))
    tiles = session.tiles_for(SegmentPrompts("bar", boxes=[box], points=[click]))
    reach = (np.asarray(model.crop_shape[::-1]) - 1) / 2.0  # crop voxels = volume voxels at 1.5 mm
    assert len(tiles) == 3
    covered = np.zeros(300, dtype=bool)
    for crop, prompts in tiles:
        lo, hi = prompts.box_bounds()
        assert np.all(np.abs(lo - crop.centre) <= reach) and np.all(np.abs(hi - crop.centre) <= reach)
        covered[int(np.ceil(lo[0])):int(np.floor(hi[0])) + 1] = True
        assert [p.ijk for p in prompts.points] == ([click.ijk] if abs(crop.centre[0] - 250.0) <= reach[0] else [])
    assert covered.all()  # the tiles' boxes cover the whole box
    short = session.tiles_for(SegmentPrompts("bar", boxes=[BoxPrompt((100.0, 4.0, 4.0), (200.0, 11.0, 11.0))]))
    assert len(short) == 1
    mask = session.segment(SegmentPrompts("bar", boxes=[box]))
    assert mask.shape == volume.array.shape
    assert session.timings.encoded == 3 and session.timings.decoded == 3
