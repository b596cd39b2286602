"""Physical units for automatic adapters: canonical orientation (against SimpleITK's DICOMOrient), pixel size and
tiles, training views that show the same anatomy at the same scale whatever the scan's spacing and storage, and an
adapter trained on the 3 mm CT that segments a 1 mm LAS copy as well as the original; old adapters keep working."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from FMSegCore.bench.metrics import dice
from FMSegCore.cli.main import main
from FMSegCore.engines.adaptation.adapter_file import load_adapter, save_adapter
from FMSegCore.engines.adaptation.auto_segment import segment_volume_auto, segment_with_adapter
from FMSegCore.engines.adaptation.cases import case_from_arrays, resolve_structures
from FMSegCore.engines.adaptation.engine import adapt, build_adapted, load_base
from FMSegCore.engines.adaptation.geometry import (
    Reorientation,
    SliceGeometry,
    body_region,
    canonical_case,
    tile_windows,
    to_pixel_size,
)
from FMSegCore.engines.adaptation.methods import MethodSettings
from FMSegCore.engines.adaptation.trainer import TrainSettings
from FMSegCore.engines.adaptation.views import Augmentation, ViewMaker
from FMSegCore.io.labelmap import default_segment, read_labelmap
from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.preprocessing.intensity import normalize
from FMSegCore.preprocessing.slicing import resample_volume
from FMSegCore.zoo.cache import resources_dir

DATA = resources_dir() / "SampleData"
CPU = torch.device("cpu")
STRUCTURES = ["liver", "kidney_right"]


def las_copy(volume: Volume, spacing: tuple[float, float, float], interpolation: str) -> Volume:
    """``volume`` resampled to ``spacing`` and stored with its I axis reversed (RAS <-> LAS, same anatomy)."""
    resampled = resample_volume(volume, spacing, interpolation)
    direction = np.array(resampled.direction, dtype=float)
    origin = resampled.ijk_to_lps([[resampled.shape_ijk[0] - 1, 0, 0]])[0]
    direction[:, 0] = -direction[:, 0]
    return Volume(np.ascontiguousarray(resampled.array[:, :, ::-1]), resampled.spacing, tuple(origin), direction)


@pytest.fixture(scope="module")
def abdomen() -> tuple[Volume, Volume, dict[str, int]]:
    """Six axial slices of the bundled CT (3 mm) through liver and right kidney, and their labels."""
    image = read_volume(DATA / "ct_abdomen_pelvis" / "image.nii.gz")
    labels, segments = read_labelmap(DATA / "ct_abdomen_pelvis" / "label.nii.gz", reference=image)
    values = {s.name: s.value for s in segments}
    both = [k for k in range(image.array.shape[0])
            if all((labels.array[k] == values[n]).sum() > 200 for n in STRUCTURES)]
    first = both[len(both) // 2] - 3
    origin = tuple(image.ijk_to_lps([[0, 0, first]])[0])

    def part(array: np.ndarray) -> Volume:
        return Volume(np.ascontiguousarray(array[first:first + 6]), image.spacing, origin, image.direction)

    return part(image.array), part(labels.array.astype(np.int16)), values


@pytest.fixture(scope="module")
def trained(abdomen, tmp_path_factory):
    """A physical-units adapter trained on the 3 mm slices (few views and steps, no augmentation: a test of the
    geometry, not a benchmark)."""
    image, labels, values = abdomen
    model, digest = load_base("litemedsam", CPU)
    case = case_from_arrays(image.array, labels.array, [default_segment(values[n], n) for n in STRUCTURES],
                            "ct", image.spacing, 2, "CT", direction=image.direction)
    result = adapt("litemedsam", "auto", [case], resolve_structures([case], STRUCTURES), MethodSettings("decoder"),
                   TrainSettings(steps=60, batch_size=2, precision="fp32"), CPU, modality="CT",
                   base=(copy.deepcopy(model), digest), geometry=SliceGeometry(), views=6,
                   augmentation=Augmentation.none())
    path = save_adapter(tmp_path_factory.mktemp("adapter") / "ct.fmseg-adapter.pt", result.metadata, result.state)
    return path, build_adapted(load_adapter(path), CPU)


def test_reorientation_matches_dicom_orient_and_inverts_exactly():
    import SimpleITK as sitk

    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            for column, row in enumerate(order):
                direction[row, column] = signs[column]
            volume = Volume(array, (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), direction)
            reference = sitk.DICOMOrient(volume.to_sitk(), "LPS")
            turn = Reorientation.of(direction)
            assert np.array_equal(turn.apply(array), sitk.GetArrayFromImage(reference))
            assert turn.spacing(volume.spacing) == reference.GetSpacing()
            assert np.array_equal(turn.invert(turn.apply(array)), array)


def test_tiles_cover_large_slices_with_overlap_and_pad_small_ones():
    geometry = SliceGeometry(pixel_mm=1.5, size=256)
    assert to_pixel_size(np.zeros((512, 512)), (0.8, 0.8), 1.5).shape == (273, 273)
    windows = tile_windows((273, 273), geometry)
    assert len(windows) == 4
    covered = np.zeros((273, 273), int)
    for w in windows:
        covered[max(0, int(w.row0)):int(w.row0) + 256, max(0, int(w.col0)):int(w.col0) + 256] += 1
    assert covered.min() >= 1 and covered.max() == 4
    (single,) = tile_windows((200, 150), geometry)
    assert (single.row0, single.col0) == (-28, -53)  # centred, padded
    image = np.zeros((3, 40, 50), np.float32)
    image[:, 10:20, 5:30] = 1
    assert body_region(image, 2, (2.0, 2.0), 4.0) == (slice(8, 22), slice(3, 32))


def test_views_show_the_same_anatomy_at_the_same_scale_whatever_spacing_and_storage(abdomen):
    image, labels, values = abdomen
    copy_image, copy_labels = las_copy(image, (1.0, 1.0, 3.0), "linear"), las_copy(labels, (1.0, 1.0, 3.0), "nearest")
    assert copy_image.array.shape[0] == image.array.shape[0]
    segments = [default_segment(values[n], n) for n in STRUCTURES]

    def case(volume: Volume, label_volume: Volume, direction=None):
        return case_from_arrays(volume.array, label_volume.array, segments, "case", volume.spacing, 2, "CT",
                                direction=direction)

    maker = ViewMaker(SliceGeometry(), resolve_structures([case(image, labels)], STRUCTURES),
                      lambda x: torch.from_numpy(x)[None], Augmentation.none())
    reference = maker.view(canonical_case(case(image, labels, image.direction)), 3, 0)
    seen = maker.view(canonical_case(case(copy_image, copy_labels, copy_image.direction)), 3, 0)
    for k in range(len(STRUCTURES)):
        assert dice(seen.targets[k].numpy(), reference.targets[k].numpy()) > 0.95
    assert np.abs(seen.image.numpy() - reference.image.numpy()).mean() < 0.03
    as_stored = maker.view(case(copy_image, copy_labels), 3, 0)  # direction unknown: the LAS copy stays mirrored
    assert dice(as_stored.targets[1].numpy(), reference.targets[1].numpy()) < 0.2  # the right kidney, mirrored


def test_adapter_trained_at_3mm_segments_a_1mm_las_copy_as_well(trained, abdomen):
    path, model = trained
    metadata = load_adapter(path).metadata
    assert metadata["geometry"]["pixel_mm"] == 1.5 and metadata["geometry"]["window_mm"] == 384
    assert metadata["geometry"]["orientation"] == "LPS" and metadata["views"] == 6
    image, labels, values = abdomen
    copy_image, copy_labels = las_copy(image, (1.0, 1.0, 3.0), "linear"), las_copy(labels, (1.0, 1.0, 3.0), "nearest")
    scores, predicted = {}, {}
    for name, (volume, truth) in {"3 mm": (image, labels), "1 mm LAS": (copy_image, copy_labels)}.items():
        predicted[name] = segment_with_adapter(model, metadata, volume, CPU)
        assert predicted[name].shape == volume.array.shape
        scores[name] = {n: dice(predicted[name] == values[n], truth.array == values[n]) for n in STRUCTURES}
    assert scores["3 mm"]["liver"] > 0.75, scores
    assert abs(scores["1 mm LAS"]["liver"] - scores["3 mm"]["liver"]) < 0.05, scores
    # storage alone (the same voxels transposed and flipped) changes nothing at all
    end_of_i = tuple(image.ijk_to_lps([[image.shape_ijk[0] - 1, 0, 0]])[0])
    turned = Volume(np.ascontiguousarray(image.array.transpose(0, 2, 1)[:, ::-1]), image.spacing, end_of_i,
                    np.asarray(image.direction)[:, [1, 0, 2]] * [1, -1, 1])
    again = segment_with_adapter(model, metadata, turned, CPU)
    assert np.array_equal(again[:, ::-1].transpose(0, 2, 1), predicted["3 mm"])


def test_old_adapter_without_geometry_loads_and_keeps_whole_slice_windows(trained, abdomen, tmp_path):
    path, _ = trained
    adapter = load_adapter(path)
    old_metadata = {k: v for k, v in adapter.metadata.items() if k not in ("geometry", "views")}
    old_path = save_adapter(tmp_path / "old.fmseg-adapter.pt", old_metadata, adapter.state)
    old = load_adapter(old_path)
    assert SliceGeometry.from_metadata(old.metadata) is None
    model = build_adapted(old, CPU)
    image, _, _ = abdomen
    two = Volume(image.array[2:4], image.spacing, image.origin, image.direction)
    values = [s["value"] for s in old.metadata["structures"]]
    expected = segment_volume_auto(model, normalize(two, "CT"), 2, two.spacing, values, CPU)
    assert np.array_equal(segment_with_adapter(model, old.metadata, two, CPU), expected)


def test_segment_refuses_a_scan_of_another_modality_in_one_line(trained, tmp_path, capsys):
    path, _ = trained
    output = tmp_path / "mr.seg.nrrd"
    code = main(["segment", "--image", str(DATA / "mr_abdomen" / "image.nii.gz"), "--adapter", str(path),
                 "--output", str(output), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "image.nii.gz" in err and "looks like MR" in err and "trained on CT" in err and "--modality MR" in err
    assert not output.exists()
