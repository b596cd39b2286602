"""The adaptation engine on real models and scans: determinism, progress and cancel, adapter files that rebuild
the trained model exactly (LoRA merged), refusal of foreign adapters, partial labels, and the same methods on
the in-context model (UniverSeg) and a 3D backbone (Swin UNETR)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from FMSegCore.engines.adaptation.adapter_file import load_adapter, save_adapter
from FMSegCore.engines.adaptation.cases import case_from_arrays, load_case, resolve_structures
from FMSegCore.engines.adaptation.defaults import HEAD_WARMUPS, WARMED_MAX_RATE
from FMSegCore.engines.adaptation.engine import (
    adapt,
    build_adapted,
    load_base,
    split_validation,
    train_settings,
    warmed_rates,
)
from FMSegCore.engines.adaptation.lora import LoRALayer, merge_lora
from FMSegCore.engines.adaptation.methods import LEARNING_RATES, AdaptableParts, MethodSettings, apply_method
from FMSegCore.engines.adaptation.trainer import Cancelled, TrainSettings
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.zoo.cache import resources_dir

DATA = resources_dir() / "SampleData"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base():
    model, digest = load_base("litemedsam", CPU)
    return model, digest


@pytest.fixture(scope="module")
def abdomen():
    return load_case(DATA / "ct_abdomen_pelvis" / "image.nii.gz", DATA / "ct_abdomen_pelvis" / "label.nii.gz")


@pytest.fixture(scope="module")
def index(abdomen) -> int:
    """An axial slice through both the liver and the spleen."""
    liver, spleen = abdomen.value_of("liver"), abdomen.value_of("spleen")
    both = [i for i in abdomen.annotated_slices()
            if (abdomen.slice(i)[1] == liver).any() and (abdomen.slice(i)[1] == spleen).any()]
    return both[len(both) // 2]


def slice_case(volume, index: int):
    image, labels = volume.slice(index)
    raw = image * 400.0 - 160.0  # back to HU through the abdomen window the case was normalised with
    return case_from_arrays(raw, labels, volume.segments, f"slice{index}", (3.0, 3.0, 3.0), modality="CT")


def _adapt(base, cases, method="linear-probe", steps=3, mode="auto", **kwargs):
    structures = resolve_structures(cases, ["liver", "spleen"])
    model, digest = base
    return adapt("litemedsam", mode, cases, structures, MethodSettings(method),
                 TrainSettings(steps=steps, batch_size=2, precision="fp32"), CPU,
                 base=(copy.deepcopy(model), digest), **kwargs)


def test_training_is_seeded_and_deterministic(base, abdomen, index):
    cases = [slice_case(abdomen, index)]
    first, second = _adapt(base, cases), _adapt(base, cases)
    assert first.state.keys() == second.state.keys()
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert first.fit.losses == second.fit.losses


def test_progress_reports_every_step_and_cancel_stops(base, abdomen, index):
    cases = [slice_case(abdomen, index)]
    seen = []
    _adapt(base, cases, steps=4, progress=seen.append)
    assert [(p.step, p.total) for p in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)] and seen[-1].remaining == 0
    assert all(p.elapsed > 0 and np.isfinite(p.loss) and p.remaining is not None for p in seen)
    assert [p.elapsed for p in seen] == sorted(p.elapsed for p in seen)
    assert seen[0].message == "training (linear-probe)" and seen[0].describe().startswith("1/4, loss ")
    calls = []
    with pytest.raises(Cancelled):
        _adapt(base, cases, steps=50, cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3


def test_auto_mode_trains_every_step_and_warms_an_encoder_methods_head_first(base, abdomen, index):
    assert train_settings("auto", "decoder").patience is None and train_settings("auto", "decoder").head_steps == 0
    assert train_settings("auto", "lora").head_steps == HEAD_WARMUPS["lora"][1] > 0
    assert train_settings("prompt", "lora").head_steps == 0 and train_settings("prompt", "lora").patience == 40
    cases = [slice_case(abdomen, index)]
    structures = resolve_structures(cases, ["liver", "spleen"])
    model, digest = base
    seen = []
    result = adapt("litemedsam", "auto", cases, structures, MethodSettings("bitfit"),
                   TrainSettings(steps=2, batch_size=2, precision="fp32", head_steps=3), CPU,
                   base=(copy.deepcopy(model), digest), progress=seen.append)
    # one progress count over both phases: 3 head steps, then 2 of the method
    assert [(p.step, p.total) for p in seen] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert [p.message for p in seen] == ["warming up the head (decoder)"] * 3 + ["training (bitfit)"] * 2
    assert result.metadata["fit"]["head_steps"] == 3 and result.fit.steps == 2
    cold = _adapt(base, cases, method="bitfit", steps=2)
    # the warm head moved away from a fresh head's initialisation (same seed): its weights differ
    head = [k for k in result.state if k.startswith("head.") and k.endswith("weight")]
    assert head and any(not torch.equal(result.state[k], cold.state[k]) for k in head)


def test_spatial_adapter_refines_a_warmed_linear_probe(base, abdomen, index):
    assert train_settings("auto", "spatial-adapter").head_steps == HEAD_WARMUPS["spatial-adapter"][1] > 0
    assert train_settings("auto", "linear-probe").head_steps == 0
    cases = [slice_case(abdomen, index)]
    structures = resolve_structures(cases, ["liver", "spleen"])
    model, digest = base
    warmed = adapt("litemedsam", "auto", cases, structures, MethodSettings("spatial-adapter"),
                   TrainSettings(steps=1, batch_size=2, precision="fp32", head_steps=3, learning_rate=1e-12,
                                 head_learning_rate=1e-12),
                   CPU, base=(copy.deepcopy(model), digest))
    probe = adapt("litemedsam", "auto", cases, structures, MethodSettings("linear-probe"),
                  TrainSettings(steps=3, batch_size=4, precision="fp32", patience=None), CPU,
                  base=(copy.deepcopy(model), digest))
    # the probe under the adapter is the one 3 linear-probe steps train (the method's step barely moves it)
    for name in ("head.classifier.weight", "head.classifier.bias"):
        assert torch.allclose(warmed.state[name], probe.state[name], atol=1e-6)
    assert {k for k in warmed.state if k.startswith("head.adapter.")} == {"head.adapter.conv1.weight",
                                                                            "head.adapter.conv2.weight"}


def test_an_encoder_method_fine_tunes_its_warmed_head_at_its_own_capped_rate(base, abdomen, index):
    cases = [slice_case(abdomen, index)]
    structures = resolve_structures(cases, ["liver"])
    model, digest = base
    result = adapt("litemedsam", "auto", cases, structures, MethodSettings("bitfit"),
                   TrainSettings(steps=1, batch_size=2, precision="fp32", head_steps=1, patience=None), CPU,
                   base=(copy.deepcopy(model), digest))
    training = result.metadata["training"]
    assert LEARNING_RATES["bitfit"] > WARMED_MAX_RATE  # so the cap is what is exercised
    assert training["learning_rate"] == training["head_learning_rate"] == WARMED_MAX_RATE
    given = warmed_rates(TrainSettings(learning_rate=5e-5), LEARNING_RATES["bitfit"])
    assert given.learning_rate == given.head_learning_rate == 5e-5  # a rate the user gives is kept
    assert warmed_rates(TrainSettings(), LEARNING_RATES["full"]).head_learning_rate == LEARNING_RATES["full"]


def test_adapter_rebuilds_the_trained_model_with_lora_merged(base, abdomen, index, tmp_path):
    cases = [slice_case(abdomen, index)]
    result = _adapt(base, cases, method="lora", steps=2)
    assert any("lora_B" in name for name in result.state)
    assert any(float(t.abs().max()) > 0 for n, t in result.state.items() if "lora_B" in n)
    path = save_adapter(tmp_path / "liver.fmseg-adapter.pt", result.metadata, result.state)
    assert path.stat().st_size < 5e6
    adapter = load_adapter(path)
    assert adapter.metadata["method"]["method"] == "lora" and adapter.metadata["cases"] == 1
    assert [s["name"] for s in adapter.metadata["structures"]] == ["liver", "spleen"]
    rebuilt = build_adapted(adapter, CPU)
    assert not any(isinstance(m, LoRALayer) for m in rebuilt.modules())  # merged: no extra cost at inference
    image = result.model.preprocess(np.random.default_rng(0).random((256, 256)).astype(np.float32))[None]
    with torch.no_grad():
        expected = result.model.eval()(image)
        got = rebuilt(image.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=2e-3 * float(expected.abs().max()))
    with pytest.raises(InputError, match="exists already|output exists"):
        save_adapter(path, result.metadata, result.state)


def test_foreign_and_damaged_adapters_are_refused(base, abdomen, index, tmp_path):
    result = _adapt(base, [slice_case(abdomen, index)], steps=1)
    metadata = dict(result.metadata, base_sha256="0" * 64)
    path = save_adapter(tmp_path / "other.pt", metadata, result.state)
    with pytest.raises(InputError, match="different 'litemedsam' checkpoint"):
        build_adapted(load_adapter(path), CPU)
    good = save_adapter(tmp_path / "good.pt", result.metadata, result.state)
    with pytest.raises(InputError, match="trained on 'litemedsam', not 'universeg-fmseg'"):
        build_adapted(load_adapter(good), CPU, model_name="universeg-fmseg")
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"format": "fmseg-adapter", "payload": SegmentInfo(1, "x", (1, 0, 0))}))
    with pytest.raises(InputError, match="not an FMSeg adapter"):
        load_adapter(pickled)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated.pt: .*damaged or truncated PyTorch file"):
        load_adapter(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("my notes, not an adapter\n")
    with pytest.raises(InputError, match=r"notes.txt: not an FMSeg adapter file: not a PyTorch file") as caught:
        load_adapter(text)
    assert "pop from empty list" not in str(caught.value)


def test_partial_labels_and_structure_resolution(abdomen, index):
    with_spleen = slice_case(abdomen, index)
    image, labels = abdomen.slice(index)
    liver_value = abdomen.value_of("liver")
    only_liver = case_from_arrays(image * 400 - 160, np.where(labels == liver_value, liver_value, 0),
                                  [SegmentInfo(liver_value, "liver", (1, 0, 0))], "liver-only", modality="CT")
    structures = resolve_structures([with_spleen, only_liver], ["Liver", "spleen"])
    assert [s.name for s in structures] == ["liver", "spleen"]
    assert only_liver.value_of("spleen") is None and with_spleen.value_of("spleen") is not None
    with pytest.raises(InputError, match="unknown structure 'heart'; the training cases name 'liver'"):
        resolve_structures([only_liver], ["heart"])
    with pytest.raises(InputError, match="liver-only: labels none of the structures"):
        resolve_structures([with_spleen, only_liver], ["spleen"])
    with pytest.raises(InputError, match="too few cases for a validation split"):
        split_validation([only_liver], 1)
    train, val = split_validation([with_spleen, only_liver], 1)
    assert train == [with_spleen] and val == [only_liver]


def test_same_methods_adapt_the_in_context_model():
    from FMSegCore.models.universeg import UniverSeg

    torch.manual_seed(0)
    model = UniverSeg().eval()
    query, images = torch.rand(1, 1, 128, 128), torch.rand(4, 1, 128, 128)
    labels = (images > 0.5).float()
    with torch.no_grad():
        expected = model.predict(query, model.encode_support(images, labels))
    parts = AdaptableParts(model, "enc_blocks", (r"cross\.cross_conv$",), ())
    report = apply_method(parts, MethodSettings("lora", rank=2))
    assert len(report.wrapped) == 4 and 0 < report.trainable < 0.05 * report.total
    with torch.no_grad():
        assert torch.allclose(model.predict(query, model.encode_support(images, labels)), expected, atol=1e-6)
        for layer in model.modules():
            if isinstance(layer, LoRALayer):
                layer.lora_B.weight.normal_(0, 0.05)
        adapted = model.predict(query, model.encode_support(images, labels))
    merge_lora(model)
    with torch.no_grad():
        assert torch.allclose(model.predict(query, model.encode_support(images, labels)), adapted, atol=1e-4)
