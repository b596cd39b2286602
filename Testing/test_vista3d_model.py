"""VISTA3D (MONAI's ``vista3d132``): the official bundle layout through our loader and one-line errors; the
PromptableModel3D wrapper against MONAI's own reference paths (``point_based_window_inferer`` and
``VISTA3D.forward``) on the same crop and points; the crop's (K, J, I) axes against the network's (I, J, K);
automatic class segmentation against ``VistaPostTransformd``. No official fixture exists: random weights, seeded.
The 218 M parameter network is built once; crops are small (sides multiple of 16) to keep CPU time short."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM
from reference_fixtures import assert_close

from FMSegCore.engines.prompting.session3d import PromptSession3D
from FMSegCore.errors import ModelError
from FMSegCore.io.volume import Volume
from FMSegCore.models.interfaces import PromptableModel3D, PromptBatch3D
from FMSegCore.models.vista3d import (
    EVERYTHING_CLASSES,
    HU_RANGE,
    NO_PREDICTION,
    SUBCLASSES,
    VISTA3D_CLASSES,
    VISTA3DModel,
    load_vista3d,
    segment_volume,
)
from FMSegCore.prompts import PointPrompt, SegmentPrompts

#: A non-cubic test crop (K, J, I), so any axis mix-up shows.
CROP = (16, 32, 48)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> tuple[VISTA3DModel, dict[str, float]]:
    """A seeded ``vista3d132()`` saved as the bundle's ``model.pt`` (a plain state_dict), loaded by our loader;
    with a checksum of every saved tensor."""
    torch.manual_seed(0)
    network = VISTA3DModel().network
    sums = {key: float(value.double().sum()) for key, value in network.state_dict().items()}
    path = tmp_path_factory.mktemp("vista3d") / "model.pt"
    torch.save(network.state_dict(), path)
    del network
    model = load_vista3d(path)
    path.unlink()
    return model, sums


@pytest.fixture(scope="module")
def model(loaded) -> VISTA3DModel:
    return loaded[0]


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """HU (K, J, I) with every voxel's value distinct (so a voxel is known by its value)."""
    values = np.random.default_rng(0).permutation(int(np.prod(CROP))).astype(np.float32)
    return (values / values.max() * 1900.0 - 900.0).reshape(CROP)


@pytest.fixture(scope="module")
def encoded(model, crop) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed crop (1, 1, K, J, I) and its embedding."""
    x = model.preprocess(crop)[None]
    with torch.inference_mode():
        return x, model.encode(x)


def decode(model, embedding, points, labels, **kwargs) -> torch.Tensor:
    count = len(points) if points is not None else len(kwargs["boxes"])
    batch = PromptBatch3D(embedding_index=torch.zeros(count, dtype=torch.long),
                          points=None if points is None else torch.tensor(points, dtype=torch.float32),
                          point_labels=None if labels is None else torch.tensor(labels), **kwargs)
    with torch.inference_mode():
        logits, quality = model.decode(embedding, batch)
    assert quality.shape == (count,)
    return logits


def crop_value(model, crop: np.ndarray, k: int, j: int, i: int) -> float:
    """The preprocessed value of the crop's voxel (i, j, k), from the raw HU array."""
    return float(model.preprocess(crop[k:k + 1, j:j + 1, i:i + 1]))


# ---------------------------------------------------------------------------------------------- the network
def test_the_network_is_monais_vista3d132(model):
    assert isinstance(model.network, VISTA3D)
    assert isinstance(model.network.point_head, PointMappingSAM)
    assert isinstance(model.network.class_head, ClassMappingClassify)
    assert sum(p.numel() for p in model.network.parameters()) == 217_964_982
    assert model.network.point_head.last_supported == 132
    assert isinstance(model, PromptableModel3D) and not model.training
    assert model.crop_shape == (128, 128, 128) and model.crop_spacing_mm == (1.5, 1.5, 1.5)


def test_the_label_dictionary_is_the_bundles():
    assert sorted(VISTA3D_CLASSES) == list(range(1, 133))
    assert VISTA3D_CLASSES[1] == "liver" and VISTA3D_CLASSES[3] == "spleen" and VISTA3D_CLASSES[57] == "trachea"
    assert VISTA3D_CLASSES[115] == "heart" and VISTA3D_CLASSES[127] == "vertebrae S1"
    assert VISTA3D_CLASSES[132] == "airway"
    assert len(EVERYTHING_CLASSES) == 117 and 2 not in EVERYTHING_CLASSES and 1 in EVERYTHING_CLASSES
    assert SUBCLASSES[2] == (14, 5)


# ---------------------------------------------------------------------------------------------- loading
def test_the_official_layout_loads_exactly(loaded):
    model, sums = loaded
    state = model.network.state_dict()
    assert list(state) == list(sums) and len(state) == 259
    assert all(float(state[key].double().sum()) == value for key, value in sums.items())


def test_another_layout_is_a_one_line_model_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"point_head.mask_tokens.weight": torch.zeros(2, 48), "head.weight": torch.zeros(1)}}, path)
    with pytest.raises(ModelError) as error:
        load_vista3d(path)
    message = str(error.value)
    assert "\n" not in message and "not a VISTA3D checkpoint" in message
    assert "missing" in message and "unexpected" in message and "another shape" in message
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for bad in (garbage, tmp_path / "absent.pt"):
        with pytest.raises(ModelError) as error:
            load_vista3d(bad)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- prompts
def test_preprocess_is_the_bundles_intensity_window(model):
    low, high = HU_RANGE
    x = model.preprocess(np.array([[[-3000.0, low, (low + high) / 2, high, 3000.0]]]))
    assert x.shape == (1, 1, 1, 5) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.filterwarnings("ignore:Setting affine")
def test_a_point_decodes_as_monais_point_inferer(model, encoded):
    """One click: our cached-encoder decode = ``point_based_window_inferer`` over the whole (network-order) crop."""
    x, embedding = encoded
    point = [[[40.3, 20.7, 10.2]]]  # (i, j, k) in the crop
    ours = decode(model, embedding, point, [[1]])
    assert ours.shape == (1, 1, *CROP)
    with torch.inference_mode():
        reference = point_based_window_inferer(x.transpose(2, 4), CROP[::-1], model.network, torch.tensor(point),
                                               torch.tensor([[1]]), transpose=True)
    assert_close(ours, torch.as_tensor(reference).transpose(2, 4).numpy(), 1e-5)
    assert 0.0 < float((ours > 0).float().mean()) < 1.0


@pytest.mark.filterwarnings("ignore:Setting affine")
def test_clicks_decode_as_monais_forward(model, encoded):
    """Include and exclude clicks: = ``VISTA3D.forward`` on the crop with the points and the window's
    ``patch_coords``; MONAI's point inferer sums one window per click (here every window is the crop)."""
    x, embedding = encoded
    points, labels = [[[40.3, 20.7, 10.2], [12.0, 30.0, 5.0]]], [[1, 0]]
    ours = decode(model, embedding, points, labels)
    window = [(slice(None), slice(None), slice(0, CROP[2]), slice(0, CROP[1]), slice(0, CROP[0]))]
    with torch.inference_mode():
        forward = model.network(x.transpose(2, 4), patch_coords=window, point_coords=torch.tensor(points),
                                point_labels=torch.tensor(labels), transpose=True)
        inferer = point_based_window_inferer(x.transpose(2, 4), CROP[::-1], model.network, torch.tensor(points),
                                             torch.tensor(labels), transpose=True)
    assert_close(ours, forward.transpose(2, 4).numpy(), 1e-5)
    assert_close(2 * ours, torch.as_tensor(inferer).transpose(2, 4).numpy(), 1e-5)


def test_a_point_lands_on_the_voxel_the_network_sees(model, crop):
    """The voxel (i, j, k) of the crop (array [k, j, i]) is the voxel the network's point coordinates index in
    the image the encoder saw; a point's place matters."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.network.image_encoder.register_forward_pre_hook(lambda m, a: seen.update(image=a[0].clone())),
             model.network.point_head.register_forward_pre_hook(lambda m, a: seen.update(points=a[1].clone()))]
    try:
        x = model.preprocess(crop)[None]
        with torch.inference_mode():
            embedding = model.encode(x)
        point = (13.0, 7.0, 11.0)
        logits = decode(model, embedding, [[point]], [[1]])
    finally:
        for hook in hooks:
            hook.remove()
    i, j, k = (int(round(c)) for c in seen["points"][0, 0].tolist())
    assert (i, j, k) == (13, 7, 11)
    assert float(seen["image"][0, 0, i, j, k]) == float(x[0, 0, 11, 7, 13]) == float(crop_value(model, crop, 11, 7, 13))
    assert seen["image"].shape[2:] == CROP[::-1]
    moved = decode(model, embedding, [[(11.0, 7.0, 13.0)]], [[1]])  # i and k swapped
    assert not torch.allclose(logits, moved)


def test_boxes_outside_points_and_batches(model, encoded):
    _, embedding = encoded
    point = decode(model, embedding, [[[30.0, 20.0, 10.0]]], [[1]])
    box = decode(model, embedding, None, None, boxes=torch.tensor([[20.0, 10.0, 4.0, 40.0, 30.0, 16.0]]))
    assert torch.equal(point, box)
    outside = decode(model, embedding, [[[30.0, 20.0, 10.0], [30.0, 20.0, 40.0]]], [[1, 0]])
    assert torch.equal(point, outside)  # k = 40 is beyond the crop's 16 slices: dropped, as MONAI's window does
    nothing = decode(model, embedding, [[[-5.0, 20.0, 10.0]]], [[1]])
    assert bool((nothing == NO_PREDICTION).all())
    other = decode(model, embedding, [[[12.0, 30.0, 5.0]]], [[0]])
    two = torch.cat([embedding, embedding.flip(-1)])
    batch = PromptBatch3D(embedding_index=torch.tensor([1, 0, 0]), points=torch.tensor(
        [[[30.0, 20.0, 10.0]], [[30.0, 20.0, 10.0]], [[12.0, 30.0, 5.0]]]), point_labels=torch.tensor([[1], [1], [0]]))
    with torch.inference_mode():
        logits, _ = model.decode(two, batch)
        flipped = decode(model, embedding.flip(-1), [[[30.0, 20.0, 10.0]]], [[1]])
    assert_close(logits[1:2], point.numpy(), 1e-5)
    assert_close(logits[2:3], other.numpy(), 1e-5)
    assert_close(logits[0:1], flipped.numpy(), 1e-5)


def test_point_class_selects_special_and_zero_shot_tokens(model, encoded):
    _, embedding = encoded
    seen: dict[str, object] = {}
    hook = model.network.point_head.register_forward_pre_hook(
        lambda m, a, kw: seen.update(labels=a[2].clone(), classes=kw.get("class_vector")), with_kwargs=True)
    try:
        plain = decode(model, embedding, [[[30.0, 20.0, 10.0], [12.0, 30.0, 5.0]]], [[1, 0]])
        assert seen["classes"] is None
        model.point_class = 26  # hepatic tumor: special labels
        special = decode(model, embedding, [[[30.0, 20.0, 10.0], [12.0, 30.0, 5.0]]], [[1, 0]])
        assert seen["labels"].tolist() == [[3, 2]] and seen["classes"].tolist() == [[26]]
        model.point_class = 300  # zero-shot
        zero_shot = decode(model, embedding, [[[30.0, 20.0, 10.0], [12.0, 30.0, 5.0]]], [[1, 0]])
        assert seen["labels"].tolist() == [[1, 0]]
    finally:
        model.point_class = None
        hook.remove()
    assert not torch.allclose(plain, special) and not torch.allclose(plain, zero_shot)


def test_a_prompt_session_runs_on_the_crop(model, monkeypatch):
    monkeypatch.setattr(model, "crop_shape", (32, 32, 32), raising=False)
    volume = Volume(np.random.default_rng(1).normal(0, 300, (30, 36, 40)).astype(np.float32), (1.5, 1.5, 1.5))
    session = PromptSession3D(volume, model, "cpu")
    first = session.segment(SegmentPrompts("organ", points=[PointPrompt((20.0, 18.0, 15.0))]))
    second = session.segment(SegmentPrompts("organ", points=[PointPrompt((20.0, 18.0, 15.0)),
                                                            PointPrompt((10.0, 10.0, 10.0), False)]))
    assert first.shape == second.shape == volume.array.shape and first.dtype == bool
    assert session.timings.encoded == 1 and session.timings.decoded == 2


# ---------------------------------------------------------------------------------------------- automatic
def test_segment_classes_gives_the_asked_classes(model, encoded):
    x, _ = encoded
    with torch.inference_mode():
        logits = model.segment_classes(x, [1, 3, 6])
        spleen = model.segment_classes(x, [3])
    assert logits.shape == (1, 3, *CROP)
    assert_close(logits[:, 1:2], spleen.numpy(), 1e-4)
    assert not torch.allclose(logits[:, 0], logits[:, 1])


def test_segment_volume_matches_monais_postprocessing(model):
    """A 1.5 mm volume of one window: the label map = ``VistaPostTransformd`` of the class logits (classes run
    two at a time, so the running arg-max across chunks is checked too)."""
    image = np.random.default_rng(2).normal(0, 400, (32, 32, 32)).astype(np.float32)
    ids = [1, 3, 6]
    labels = segment_volume(model, image, (1.5, 1.5, 1.5), ids, roi_size=(32, 32, 32), class_chunk=2)
    with torch.inference_mode():
        logits = model.network_forward_classes(model.preprocess(image)[None].transpose(2, 4), ids)
    reference = VistaPostTransformd(keys="pred")({"pred": logits[0].clone(), "label_prompt": torch.tensor(ids)})
    expected = reference["pred"][0].permute(2, 1, 0).numpy()
    assert labels.dtype == np.uint16 and labels.shape == image.shape
    assert np.array_equal(labels, expected)
    assert set(np.unique(labels)) <= {0, *ids} and len(np.unique(labels)) > 1


def test_segment_volume_resamples_and_reorients(model):
    image = np.random.default_rng(3).normal(0, 400, (12, 20, 30)).astype(np.float32)
    spacing = (1.0, 1.2, 3.0)
    kwargs = {"class_ids": [1, 3], "roi_size": (32, 32, 32)}
    plain = segment_volume(model, image, spacing, **kwargs)
    assert plain.shape == image.shape and set(np.unique(plain)) <= {0, 1, 3}
    ras = segment_volume(model, image, spacing, direction=np.diag([-1.0, -1.0, 1.0]), **kwargs)
    assert np.array_equal(ras, plain)  # I already points right, J anterior: nothing to do
    lps = segment_volume(model, image, spacing, direction=np.eye(3), **kwargs)
    flipped = segment_volume(model, np.ascontiguousarray(image[:, ::-1, ::-1]), spacing, **kwargs)
    assert np.array_equal(lps, flipped[:, ::-1, ::-1])
