"""Label maps and Slicer segmentations: sample data, Slicer's own files, round trips and grid errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nrrd
import numpy as np
import pytest

from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import (
    SegmentInfo,
    labels_json_path,
    read_labelmap,
    read_labels_json,
    write_labelmap,
)
from FMSegCore.io.volume import Volume, read_volume

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "Resources" / "SampleData"
CHEST = SAMPLES / "ct_chest_small"
ABDOMEN = SAMPLES / "ct_abdomen_pelvis"
CROPPED = ROOT / "Testing" / "Data" / "segmentations" / "lungs_cropped.seg.nrrd"
CHEST_NAMES = ["ribs", "cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column",
               "right lung", "left lung", "tissue"]


@pytest.fixture(scope="module")
def abdomen() -> Volume:
    return read_volume(ABDOMEN / "image.nii.gz")


@pytest.fixture(scope="module")
def chest() -> Volume:
    return read_volume(CHEST / "image.nrrd")


def raw_labels(path: Path) -> np.ndarray:
    """Voxels of a NIfTI/NRRD label file read straight through SimpleITK (KJI)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("case", ["ct_abdomen_pelvis", "mr_abdomen", "ct_chest_small"])
def test_sample_label_maps_get_names_from_labels_json(case):
    image = read_volume(SAMPLES / case / "image.nii.gz")
    labels, segments = read_labelmap(SAMPLES / case / "label.nii.gz", reference=image)
    names = {int(k): v for k, v in json.loads((SAMPLES / case / "labels.json").read_text()).items()}
    assert {s.value: s.name for s in segments} == names
    assert [s.value for s in segments] == sorted(names)
    np.testing.assert_array_equal(labels.array, raw_labels(SAMPLES / case / "label.nii.gz"))
    assert set(np.unique(labels.array)) - {0} <= set(names)
    assert labels.same_grid(image)
    assert all(len(s.color) == 3 and all(0 <= c <= 1 for c in s.color) for s in segments)


def test_slicer_segmentation_has_its_seven_named_segments_on_the_image_grid(chest):
    labels, segments = read_labelmap(CHEST / "segmentation.seg.nrrd", reference=chest)
    assert [s.name for s in segments] == CHEST_NAMES
    assert [s.value for s in segments] == list(range(1, 8))
    assert labels.same_grid(chest)
    # The NIfTI label map of the sample set was converted from this file: same voxels, read another way.
    np.testing.assert_array_equal(labels.array, raw_labels(CHEST / "label.nii.gz"))
    header = nrrd.read_header(str(CHEST / "segmentation.seg.nrrd"))
    right_lung = [float(c) for c in header["Segment4_Color"].split()]
    np.testing.assert_array_equal(segments[4].color, right_lung)


def test_slicer_segmentation_without_reference_keeps_its_own_geometry(chest):
    labels, _ = read_labelmap(CHEST / "segmentation.seg.nrrd")
    np.testing.assert_allclose(labels.ijk_to_lps_matrix(), chest.ijk_to_lps_matrix(), atol=1e-9)


def test_overlapping_segments_are_flattened_with_the_later_segment_winning(chest):
    flat, _ = read_labelmap(CHEST / "segmentation.seg.nrrd", reference=chest)
    labels, segments = read_labelmap(CHEST / "segmentation_overlapping.seg.nrrd", reference=chest)
    assert [s.name for s in segments] == CHEST_NAMES + ["overlapping sphere"]
    values = [s.value for s in segments]
    assert len(set(values)) == len(values)
    voxels, header = nrrd.read(str(CHEST / "segmentation_overlapping.seg.nrrd"))
    assert header["Segment7_Layer"] == "1" and header["Segment7_LabelValue"] == "1"
    sphere = voxels[1].transpose(2, 1, 0) == 1
    assert np.count_nonzero(sphere & (flat.array > 0)) > 0  # the sphere really overlaps other segments
    assert np.all(labels.array[sphere] == segments[-1].value)
    np.testing.assert_array_equal(labels.array[~sphere], flat.array[~sphere])


def test_cropped_slicer_segmentation_is_padded_onto_the_image_grid(chest):
    cropped, _ = read_labelmap(CROPPED)
    assert cropped.array.shape != chest.array.shape
    labels, segments = read_labelmap(CROPPED, reference=chest)
    assert labels.same_grid(chest)
    assert [(s.value, s.name) for s in segments] == [(1, "right lung"), (2, "left lung")]
    header = nrrd.read_header(str(CROPPED))
    assert [s.color for s in segments] == [tuple(float(c) for c in header[f"Segment{n}_Color"].split()) for n in (0, 1)]
    truth = raw_labels(CHEST / "label.nii.gz")
    expected = np.where(np.isin(truth, [5, 6]), truth - 4, 0)
    np.testing.assert_array_equal(labels.array, expected)


def test_cropped_segmentation_off_by_half_a_voxel_is_rejected(chest):
    shifted = Volume(chest.array, chest.spacing, tuple(np.add(chest.origin, (1.5, 0, 0))), chest.direction)
    with pytest.raises(InputError) as caught:
        read_labelmap(CROPPED, reference=shifted)
    assert str(CROPPED) in str(caught.value) and "origin" in str(caught.value)


def sub_volume(volume: Volume, first_i: int, stop_i: int) -> Volume:
    """The part of ``volume`` with first_i <= I < stop_i, as an image of its own."""
    origin = tuple(volume.ijk_to_lps([[first_i, 0, 0]])[0])
    return Volume(volume.array[:, :, first_i:stop_i].copy(), volume.spacing, origin, volume.direction)


def test_cropped_segmentation_is_placed_on_a_shifted_image_grid(chest):
    part = sub_volume(chest, 10, 115)  # still holds both lungs (I from 13 to 111)
    labels, _ = read_labelmap(CROPPED, reference=part)
    truth = raw_labels(CHEST / "label.nii.gz")[:, :, 10:115]
    np.testing.assert_array_equal(labels.array, np.where(np.isin(truth, [5, 6]), truth - 4, 0))


def test_segmentation_reaching_beyond_a_smaller_image_is_rejected(chest):
    with pytest.raises(InputError, match="beyond"):
        read_labelmap(CROPPED, reference=sub_volume(chest, 0, 60))  # one lung is cut off


def test_label_map_on_another_grid_is_rejected_naming_what_differs(chest, abdomen):
    path = ABDOMEN / "label.nii.gz"
    with pytest.raises(InputError) as caught:
        read_labelmap(path, reference=chest)
    message = str(caught.value)
    assert message.startswith(str(path)) and "size" in message and "spacing" in message
    moved = Volume(abdomen.array, abdomen.spacing, tuple(np.add(abdomen.origin, (0, 0, 3.0))), abdomen.direction)
    with pytest.raises(InputError, match="origin"):
        read_labelmap(path, reference=moved)


def custom_segments() -> list[SegmentInfo]:
    return [
        SegmentInfo(1, "spleen", (0.1, 0.2, 0.3)),
        SegmentInfo(5, "liver", (0.867, 0.51, 0.396)),
        SegmentInfo(3, "kidney left", (1.0 / 3.0, 0.5, 0.9)),
        SegmentInfo(9, "never drawn", (0.5, 0.5, 0.5)),
    ]


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd", "out.seg.nrrd"])
def test_round_trip_keeps_values_names_colors_and_geometry(tmp_path, abdomen, name):
    truth = raw_labels(ABDOMEN / "label.nii.gz")
    labels = np.where(np.isin(truth, [1, 3, 5]), truth, 0).astype(np.uint16)
    segments = custom_segments()
    path = write_labelmap(labels, abdomen, tmp_path / name, segments)
    again, read_segments = read_labelmap(path, reference=abdomen)
    np.testing.assert_array_equal(again.array, labels)
    assert sorted(read_segments, key=lambda s: s.value) == sorted(segments, key=lambda s: s.value)
    assert again.spacing == abdomen.spacing and again.origin == abdomen.origin
    assert np.array_equal(again.direction, abdomen.direction)
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]


def test_seg_nrrd_on_a_rotated_grid_keeps_the_geometry(tmp_path):
    angle = np.radians(35)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    reference = Volume(np.zeros((4, 5, 6), np.int16), (0.7, 1.3, 2.9), (10.5, -3.25, 7.0), direction)
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 2:4, 0:5] = 2
    labels[0, 0, 0] = 1
    path = write_labelmap(labels, reference, tmp_path / "rotated.seg.nrrd", [SegmentInfo(2, "box", (1, 0, 0))])
    again, segments = read_labelmap(path)
    np.testing.assert_array_equal(again.array, labels)
    np.testing.assert_allclose(again.ijk_to_lps_matrix(), reference.ijk_to_lps_matrix(), atol=1e-12)
    assert [(s.value, s.name) for s in segments] == [(1, "Segment_1"), (2, "box")]


def test_seg_nrrd_is_one_layer_on_the_full_grid_with_slicer_fields(tmp_path, abdomen):
    labels = (raw_labels(ABDOMEN / "label.nii.gz") == 5).astype(np.uint8) * 5
    path = write_labelmap(labels, abdomen, tmp_path / "liver.seg.nrrd", [SegmentInfo(5, "liver", (1, 0, 0))])
    voxels, header = nrrd.read(str(path))
    assert voxels.shape == abdomen.shape_ijk
    assert header["space"] == "left-posterior-superior"
    assert header["Segment0_Name"] == "liver" and header["Segment0_LabelValue"] == "5"
    assert header["Segment0_Layer"] == "0"
    assert header["Segment0_Extent"] == "0 121 0 100 0 111"
    np.testing.assert_allclose(header["space origin"], abdomen.origin)
    assert "TerminologyEntry:" in header["Segment0_Tags"] and "SCT^10200004^Liver" in header["Segment0_Tags"]


def test_labels_json_is_written_beside_the_label_map_and_found_by_the_reader(tmp_path, abdomen):
    labels = np.zeros(abdomen.array.shape, np.uint8)
    labels[10:20, 10:20, 10:20] = 7
    labels[30:40, 30:40, 30:40] = 2
    path = write_labelmap(labels, abdomen, tmp_path / "pred.nii.gz", [SegmentInfo(7, "aorta", (0.2, 0.2, 0.2))])
    names_file = labels_json_path(path)
    assert names_file == tmp_path / "pred.labels.json"
    content = json.loads(names_file.read_text())
    assert content["7"] == {"name": "aorta", "color": [0.2, 0.2, 0.2]}
    assert content["2"] == "Segment_2"  # default colour: plain value -> name
    (tmp_path / "labels.json").write_text(json.dumps({"7": "something else"}))
    _, segments = read_labelmap(path)
    assert [(s.value, s.name) for s in segments] == [(2, "Segment_2"), (7, "aorta")]


def test_without_names_values_are_called_segment_value(tmp_path):
    path = tmp_path / "plain.nrrd"
    array = np.zeros((3, 4, 5), np.int16)
    array[1, 1, 1], array[2, 3, 4] = 4, 12
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    labels, segments = read_labelmap(path)
    assert [(s.value, s.name) for s in segments] == [(4, "Segment_4"), (12, "Segment_12")]
    assert len({s.color for s in segments}) == 2


def test_non_label_images_are_rejected(tmp_path):
    import SimpleITK as sitk

    fractional = tmp_path / "probabilities.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), 0.25, np.float32)), str(fractional))
    with pytest.raises(InputError, match="whole numbers"):
        read_labelmap(fractional)
    negative = tmp_path / "negative.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), -2, np.int16)), str(negative))
    with pytest.raises(InputError, match="negative"):
        read_labelmap(negative)


def test_bad_labels_json_names_the_file(tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text('{"one": "liver"}')
    with pytest.raises(InputError) as caught:
        read_labels_json(bad)
    assert str(bad) in str(caught.value) and "integer" in str(caught.value)
    bad.write_text('{"1": "liver",')
    with pytest.raises(InputError, match="JSON"):
        read_labels_json(bad)


def test_write_rejects_bad_requests_and_leaves_nothing_behind(tmp_path, abdomen):
    labels = np.zeros(abdomen.array.shape, np.uint8)
    with pytest.raises(InputError, match="unsupported"):
        write_labelmap(labels, abdomen, tmp_path / "out.png", [])
    with pytest.raises(InputError, match="shape"):
        write_labelmap(labels[:-1], abdomen, tmp_path / "out.nii.gz", [])
    with pytest.raises(InputError, match="negative"):
        write_labelmap(labels.astype(np.int16) - 1, abdomen, tmp_path / "out.seg.nrrd", [])
    with pytest.raises(InputError, match="share"):
        write_labelmap(labels, abdomen, tmp_path / "out.nrrd", [SegmentInfo(1, "a", (0, 0, 0))] * 2)
    assert list(tmp_path.iterdir()) == []


def test_write_without_overwrite_keeps_the_existing_file(tmp_path, abdomen):
    labels = np.zeros(abdomen.array.shape, np.uint8)
    path = write_labelmap(labels, abdomen, tmp_path / "out.seg.nrrd", [])
    before = path.read_bytes()
    labels[0, 0, 0] = 1
    with pytest.raises(InputError, match="exists"):
        write_labelmap(labels, abdomen, path, [], overwrite=False)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]


def test_slicer_reads_the_written_segmentation(tmp_path, abdomen):
    """Needs slicer-core (optional): Slicer's own reader sees our names, colours, voxels and geometry."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core")
    from vtk.util import numpy_support

    truth = raw_labels(ABDOMEN / "label.nii.gz")
    labels = np.where(np.isin(truth, [1, 5]), truth, 0).astype(np.uint8)
    segments = [SegmentInfo(1, "spleen", (0.25, 0.5, 0.75)), SegmentInfo(5, "liver", (0.9, 0.1, 0.1))]
    path = write_labelmap(labels, abdomen, tmp_path / "pred.seg.nrrd", segments)

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "Testing" / "Data" / "markups" / "make_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    _, logics = fixtures.make_scene()  # the scene set up as the Slicer application does
    node = logics["Segmentations"].LoadSegmentationFromFile(str(path), False, "pred")
    assert node is not None
    for info in segments:
        segment = node.GetSegmentation().GetSegment(f"Segment_{info.value}")
        assert segment.GetName() == info.name
        code = {"spleen": "78961009", "liver": "10200004"}[info.name]  # standard terminology, as Slicer writes it
        assert f"SCT^{code}^" in segment.GetTerminology()
        np.testing.assert_allclose(segment.GetColor(), info.color, atol=1e-6)
        image = slicer.vtkOrientedImageData()
        node.GetBinaryLabelmapRepresentation(f"Segment_{info.value}", image)
        mask = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(labels.shape) > 0
        np.testing.assert_array_equal(mask, labels == info.value)
        assert image.GetExtent() == (0, 121, 0, 100, 0, 111)
        ras_origin = np.multiply(abdomen.origin, (-1, -1, 1))
        np.testing.assert_allclose(image.GetOrigin(), ras_origin, atol=1e-4)
