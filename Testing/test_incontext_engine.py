"""In-context engine: slice matching, support sets, and segmentation of a real CT with the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FMSegCore.bench.metrics import dice
from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
from FMSegCore.engines.incontext.slice_matching import SupportSlice, choose_supports, query_blocks
from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
from FMSegCore.errors import InputError
from FMSegCore.models.factory import load_model
from FMSegCore.training.sources import sample_case

STRUCTURES = ("liver", "spleen", "kidney_left")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return load_model("universeg-fmseg", "cpu")


@pytest.fixture(scope="module")
def ct():
    image, labels, names = sample_case("ct_abdomen_pelvis")
    return image, labels, {name: value for value, name in names.items()}


def sparse_support(image: np.ndarray, labels: np.ndarray, every: int) -> tuple[SupportSet, np.ndarray]:
    """The CT itself as support, labelled on every ``every``-th axial slice only; returns the unlabelled slices."""
    kept = np.arange(0, labels.shape[0], every)
    sparse = np.zeros_like(labels)
    sparse[kept] = labels[kept]
    unlabelled = np.setdiff1d(np.arange(labels.shape[0]), kept)
    return SupportSet([example_from_arrays(image, sparse, None, "ct")]), unlabelled


def test_query_blocks_group_consecutive_slices_near_supports():
    supports = [SupportSlice(0, k, k / 99, 10.0) for k in range(40, 61)]  # structure on slices 40..60 of 100
    blocks = query_blocks(supports, 100, tolerance=0.05, block_size=8)
    covered = [q for block in blocks for q in block.slices]
    assert covered == list(range(36, 65))  # within 5 % of the axis (4.95 slices) of a labelled slice
    assert all(len(block.slices) <= 8 for block in blocks)
    assert all(b - a == 1 for block in blocks for a, b in zip(block.slices, block.slices[1:]))
    first = blocks[0]
    nearest = choose_supports(first.pool, first.centre, 4, 0, np.random.default_rng(0))
    assert sorted(s.index for s in nearest) == [40, 41, 42, 43]


def test_sparsely_labelled_examples_serve_the_slices_between():
    supports = [SupportSlice(0, k, k / 99, 10.0) for k in (20, 30, 40)] + [SupportSlice(1, 80, 80 / 99, 5.0)]
    covered = {q for block in query_blocks(supports, 100, tolerance=0.02, block_size=8) for q in block.slices}
    assert set(range(19, 42)) <= covered and set(range(79, 82)) <= covered
    assert not covered & (set(range(0, 18)) | set(range(43, 78)) | set(range(83, 100)))


def test_position_free_supports_match_every_slice_and_subsets_differ():
    pool = [SupportSlice(i, -1, None, float(i)) for i in range(6)]
    blocks = query_blocks(pool, 20, tolerance=0.01, block_size=32)
    assert [b.slices for b in blocks] == [list(range(20))]
    rng = np.random.default_rng(0)
    first = choose_supports(pool, None, 3, 0, rng)
    assert [s.example for s in first] == [5, 4, 3]  # largest first when positions are unknown
    others = {tuple(s.example for s in choose_supports(pool, None, 3, m, rng)) for m in range(1, 6)}
    assert len(others) > 1


def test_support_labels_resolved_by_name_and_value(ct):
    image, labels, by_name = ct
    support = SupportSet([example_from_arrays(image, labels, None, "ct")])
    value = by_name["spleen"]
    assert [s.value for s in support.resolve([str(value)])] == [value]
    with pytest.raises(InputError, match="absent from every support"):
        support.resolve([str(int(labels.max()) + 7)])
    with pytest.raises(InputError, match="unknown label 'gizzard'"):
        support.resolve(["gizzard"])
    with pytest.raises(InputError, match="no support examples"):
        SupportSet([]).resolve(None)
    with pytest.raises(InputError, match="shape"):
        example_from_arrays(image, labels[:-1], None, "ct")


def test_a_support_example_is_a_labelled_case_like_a_training_case(ct):
    from FMSegCore.engines.adaptation.cases import TrainingCase, case_from_arrays

    image, labels, by_name = ct
    example = example_from_arrays(image, labels, None, "ct")
    case = case_from_arrays(image, labels, None, "ct")
    assert isinstance(example, TrainingCase) and type(example) is type(case)
    assert example.is_volume and example.modality == case.modality == "CT"
    spleen = by_name["spleen"]
    assert np.array_equal(example.image, case.image) and example.value_of(f"segment_{spleen}") == spleen
    # the case's slicing serves supports too: the annotated axial slices are those with a label
    assert example.annotated_slices() == [k for k in range(labels.shape[0]) if labels[k].any()]
    mr = example_from_arrays(np.abs(image) + 10.0, labels, None, "mr")
    assert mr.modality == "MR" and float(mr.image.max()) <= 1.0


def test_sparse_labels_propagate_through_the_same_scan(model, ct):
    image, labels, by_name = ct
    support, unlabelled = sparse_support(image, labels, every=8)
    classes = [by_name[name] for name in STRUCTURES]
    session = InContextSession(model, support, classes, axis=2, settings=InContextSettings(support_size=8))
    result = session.segment_volume(image)
    assert result.labels.shape == image.shape
    assert set(np.unique(result.labels)) <= {0, *classes}
    for name in STRUCTURES:
        value = by_name[name]
        score = dice(result.labels[unlabelled] == value, labels[unlabelled] == value)
        assert score > 0.7, (name, score)
    # slices far from every labelled slice of a structure stay background
    liver = np.flatnonzero((labels == by_name["liver"]).any(axis=(1, 2)))
    far = np.arange(labels.shape[0]) > liver.max() + 0.05 * labels.shape[0] + 1
    assert not (result.labels[far] == by_name["liver"]).any()


def test_one_pass_per_block_and_batching_equals_one_by_one(model, ct):
    image, labels, by_name = ct
    value = by_name["spleen"]
    rows = np.flatnonzero((labels == value).any(axis=(1, 2)))
    middle = int(rows[len(rows) // 2])
    support = SupportSet([example_from_arrays(image[k], labels[k], None, f"slice {k}") for k in rows[::3]])
    query = image[middle - 2:middle + 3]
    batched = InContextSession(model, support, [value], settings=InContextSettings(support_size=4, block_slices=8))
    single = InContextSession(model, support, [value], settings=InContextSettings(support_size=4, block_slices=1))
    a = batched.segment_volume(query, keep_probabilities=True)
    b = single.segment_volume(query, keep_probabilities=True)
    assert a.model_passes == 1 and b.model_passes == 5
    np.testing.assert_allclose(a.probabilities[value], b.probabilities[value], atol=1e-4)


def test_ensemble_uncertainty_and_single_slice_query(model, ct):
    image, labels, by_name = ct
    value = by_name["kidney_left"]
    support, _ = sparse_support(image, labels, every=6)
    settings = InContextSettings(support_size=4, ensemble=3)
    session = InContextSession(model, support, [value], settings=settings)
    rows = np.flatnonzero((labels == value).any(axis=(1, 2)))
    query = image[rows[0]:rows[-1] + 1]
    result = session.segment_volume(query, uncertainty=True)
    assert result.uncertainty is not None and result.uncertainty.shape == query.shape
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 0.5
    assert result.uncertainty.max() > 0.05  # members disagree somewhere (the boundary)
    assert np.median(result.uncertainty[labels[rows[0]:rows[-1] + 1] == value]) < 0.2
    with pytest.raises(InputError, match="ensemble"):
        InContextSession(model, support, [value]).segment_volume(query, uncertainty=True)

    middle = int(rows[len(rows) // 2])
    single = session.segment_slice(image[middle])
    assert single.labels.shape == image[middle].shape
    assert dice(single.labels == value, labels[middle] == value) > 0.6
