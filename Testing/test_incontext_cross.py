"""In-context segmentation across scans: alignment in world coordinates, the work grid, the anatomical path
against the old index matching, orientation invariance, the registration baseline and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FMSegCore.bench.cross_scenarios import sample_scan, shifted_copy
from FMSegCore.bench.metrics import dice
from FMSegCore.cli.main import main
from FMSegCore.engines.incontext.anatomical import (
    AnatomicalInContext,
    align_supports,
    registration_labels,
    work_grid,
)
from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
from FMSegCore.engines.incontext.support import SupportScan, SupportSet
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import default_segment, read_labelmap
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.volume import write_volume
from FMSegCore.preprocessing.alignment import Alignment, align, check_alignment, resample_onto
from FMSegCore.zoo.cache import resources_dir

STRUCTURES = ("liver", "spleen")


@pytest.fixture(scope="module")
def mr():
    return sample_scan("mr_abdomen")


@pytest.fixture(scope="module")
def shifted(mr):
    """The MR's upper 65 %, resampled to 1.5 x 1.5 x 3 mm, stored LAS, moved 23/-17/64 mm in world space."""
    return shifted_copy(mr, keep=(0.35, 1.0), spacing=(1.5, 1.5, 3.0), flip_lr=True)


def _support(scan, names=STRUCTURES) -> SupportScan:
    labels = np.zeros(scan.labels.shape, np.int32)
    for name in names:
        labels[scan.labels == scan.value_of(name)] = scan.value_of(name)
    return SupportScan(scan.volume, labels, [default_segment(scan.value_of(n), n) for n in names], "mr support")


def test_shifted_copy_keeps_the_anatomy_under_a_new_frame(mr, shifted):
    volume = shifted.volume
    assert volume.spacing == (1.5, 1.5, 3.0)
    assert volume.direction[0, 0] == -mr.volume.direction[0, 0]  # LPS -> RAS-like: i axis reversed
    # a voxel of the copy, moved back by the frame shift, lands on the same label in the source
    kji = np.argwhere(shifted.mask("liver"))[::500]
    points = volume.ijk_to_lps(kji[:, ::-1]) - np.array([23.0, -17.0, 64.0])
    source = np.round(mr.volume.lps_to_ijk(points)).astype(int)
    inside = np.all((source >= 0) & (source < np.array(mr.volume.shape_ijk)), axis=1)
    hits = mr.labels[source[inside, 2], source[inside, 1], source[inside, 0]] == mr.value_of("liver")
    assert hits.mean() > 0.9


def test_alignment_recovers_the_frame_shift_and_refuses_bad_fits(mr, shifted):
    alignment = align(mr.volume, shifted.volume, "MR", "MR")
    assert alignment.body_dice > 0.9 and alignment.overlap > 0.95
    centre = shifted.volume.ijk_to_lps(np.array(shifted.volume.shape_ijk, float)[None] / 2)[0]
    mapped = np.array(alignment.transform.TransformPoint([float(c) for c in centre]))
    assert np.linalg.norm(mapped - (centre - np.array([23.0, -17.0, 64.0]))) < 4.0  # mm
    warped = resample_onto(mr.volume, mr.labels, shifted.volume, alignment.transform, nearest=True)
    assert dice(warped == mr.value_of("liver"), shifted.mask("liver")) > 0.9
    with pytest.raises(InputError, match="support.nii.gz: did not align"):
        check_alignment(Alignment(alignment.transform, 0.0, 0.3, 1.0, 0.0), "support.nii.gz")
    with pytest.raises(InputError, match="support.nii.gz: does not overlap"):
        check_alignment(Alignment(alignment.transform, 0.0, 0.9, 0.01, 0.0), "support.nii.gz")


def test_work_grid_is_canonical_and_covers_the_body(shifted):
    grid, axis = work_grid(shifted.volume, "MR", 128)
    assert axis == 2 and grid.array.shape[1:] == (128, 128)
    assert np.allclose(grid.direction, np.eye(3))  # the query's LAS storage does not reach the work grid
    assert grid.spacing[0] == grid.spacing[1] and grid.spacing[2] == 3.0
    flipped = shifted_copy(sample_scan("mr_abdomen"), keep=(0.35, 1.0), spacing=(1.5, 1.5, 3.0), flip_lr=False)
    other, _ = work_grid(flipped.volume, "MR", 128)
    assert np.allclose(other.origin, grid.origin, atol=1.0) and other.array.shape == grid.array.shape


@pytest.fixture(scope="module")
def model():
    from FMSegCore.models.factory import load_model

    torch.manual_seed(0)
    return load_model("universeg-fmseg", torch.device("cpu"))


def test_aligned_supports_find_what_index_matching_misses_in_any_orientation(model, mr, shifted):
    support = _support(mr)
    settings = InContextSettings(support_size=4)
    engine = AnatomicalInContext(model, [support], ["liver", "spleen"], settings=settings)
    result, aligned = engine.segment(shifted.volume)
    scores = {n: dice(result.labels == mr.value_of(n), shifted.mask(n)) for n in STRUCTURES}
    assert min(scores.values()) > 0.75, scores
    # the old matching by relative index, on the same query: the cut field of view puts supports elsewhere
    session = InContextSession(model, SupportSet([support.example("MR")]), [mr.value_of("liver")],
                               axis=anatomical_axes(shifted.volume.direction)[2], settings=settings, modality="MR")
    index = session.segment_volume(shifted.volume.array).labels
    assert dice(index == mr.value_of("liver"), shifted.mask("liver")) < scores["liver"] - 0.3
    # the same query stored RAS instead of LAS gives the same voxels (up to resampling)
    ras = shifted_copy(mr, keep=(0.35, 1.0), spacing=(1.5, 1.5, 3.0), flip_lr=False)
    assert np.sign(ras.volume.direction[0, 0]) != np.sign(shifted.volume.direction[0, 0])
    again, _ = engine.segment(ras.volume)
    on_las_grid = resample_onto(ras.volume, again.labels, shifted.volume, nearest=True)
    for name in STRUCTURES:
        value = mr.value_of(name)
        assert dice(on_las_grid == value, result.labels == value) > 0.95
    # the registration baseline from the same alignment
    baseline = registration_labels(shifted.volume, [support], aligned, engine.classes)
    assert dice(baseline == mr.value_of("liver"), shifted.mask("liver")) > 0.9


def test_spatial_prior_keeps_classes_near_their_aligned_labels(model, mr, shifted):
    support = _support(mr, ("spleen",))
    engine = AnatomicalInContext(model, [support], ["spleen"], settings=InContextSettings(support_size=2))
    aligned = align_supports(shifted.volume, [support], 128)
    result, _ = engine.segment(shifted.volume, aligned=aligned)
    warped = registration_labels(shifted.volume, [support], aligned, engine.classes) > 0
    from scipy import ndimage

    spacing = shifted.volume.spacing[::-1]
    distance = ndimage.distance_transform_edt(~warped, sampling=spacing)
    found = result.labels > 0
    assert found.any() and distance[found].max() <= 20.0 + 2 * max(spacing)


def test_cli_registration_baseline_and_refusals(tmp_path, capsys, mr, shifted):
    query = tmp_path / "query.nii.gz"
    write_volume(shifted.volume, query)
    support_labels = tmp_path / "support_labels.nii.gz"
    write_volume(mr.volume.with_array(_support(mr).labels.astype(np.uint16)), support_labels)
    (tmp_path / "support_labels.labels.json").write_text('{"5": "liver", "1": "spleen"}')
    support_image = tmp_path / "support.nii.gz"
    write_volume(mr.volume, support_image)
    output = tmp_path / "out.nii.gz"
    code = main(["incontext", "--image", str(query), "--support", str(support_image), str(support_labels),
                 "--method", "registration", "--output", str(output), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "Aligned" in out and "body overlap Dice" in out
    labels, segments = read_labelmap(output)
    assert {s.name for s in segments} == {"liver", "spleen"}
    assert dice(labels.array == 5, shifted.mask("liver")) > 0.9
    refused = tmp_path / "refused.nii.gz"
    code = main(["incontext", "--image", str(query), "--support", str(support_image), str(support_labels),
                 "--method", "registration", "--match", "index", "--output", str(refused), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--match anatomy" in err[0] and not refused.exists()
    ct = resources_dir() / "SampleData" / "ct_abdomen_pelvis"
    code = main(["incontext", "--image", str(query), "--support", str(ct / "image.nii.gz"), str(ct / "label.nii.gz"),
                 "--labels", "liver", "--output", str(refused), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not refused.exists()
    assert "label.nii.gz: is CT and the query MR" in err[0] and "--method registration" in err[0]
