"""Slicer markups files (written by slicer-core, see Testing/Data/markups/make_fixtures.py) as prompts.

Expected voxel indices are computed by hand from the image's geometry: ``ct_abdomen_pelvis`` has direction
diag(-1, -1, 1) (LPS), spacing 3 mm, so i = (origin_x - x) / 3, j = (origin_y - y) / 3, k = (z - origin_z) / 3.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from FMSegCore.errors import InputError
from FMSegCore.io.markups import prompts_from_markups, read_markups
from FMSegCore.io.volume import read_volume
from FMSegCore.prompts import rasterise_curve

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "Resources" / "SampleData" / "ct_abdomen_pelvis"
FIXTURES = ROOT / "Testing" / "Data" / "markups"


@pytest.fixture(scope="module")
def image():
    volume = read_volume(CASE / "image.nii.gz")
    assert np.array_equal(volume.direction, np.diag([-1.0, -1.0, 1.0])) and volume.spacing == (3.0, 3.0, 3.0)
    return volume


@pytest.fixture(scope="module")
def labels():
    return read_volume(CASE / "label.nii.gz", allow_empty=True).array


@pytest.fixture(scope="module")
def value_of():
    return {name: int(v) for v, name in json.loads((CASE / "labels.json").read_text()).items()}


def fixture_json(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def hand_ijk(image, lps) -> np.ndarray:
    x, y, z = lps
    ox, oy, oz = image.origin
    return np.array([(ox - x) / 3.0, (oy - y) / 3.0, (z - oz) / 3.0])


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def label_at(labels, ijk) -> int:
    i, j, k = (int(round(c)) for c in ijk)
    return int(labels[k, j, i])


def test_lps_points_land_in_the_structures_they_name(image, labels, value_of):
    raw = fixture_json("points_lps.mrk.json")["markups"][0]
    assert raw["coordinateSystem"] == "LPS"
    (markup,) = read_markups(FIXTURES / "points_lps.mrk.json")
    assert markup.type == "Fiducial" and markup.name == "points_lps"
    prompts = prompts_from_markups(FIXTURES / "points_lps.mrk.json", image)["points_lps"]
    assert [p.include for p in prompts.points] == [True, False]
    for raw_point, point in zip(raw["controlPoints"], prompts.points):
        np.testing.assert_allclose(point.ijk, hand_ijk(image, raw_point["position"]), atol=1e-9)
        assert label_at(labels, point.ijk) == value_of[raw_point["label"]]
    assert prompts.boxes == []


def test_ras_points_are_converted_to_lps(image, labels, value_of):
    raw = fixture_json("points_ras.mrk.json")["markups"][0]
    assert raw["coordinateSystem"] == "RAS"
    (markup,) = read_markups(FIXTURES / "points_ras.mrk.json")
    for raw_point, point in zip(raw["controlPoints"], markup.control_points):
        r, a, s = raw_point["position"]
        np.testing.assert_allclose(point.position, (-r, -a, s))
    prompts = prompts_from_markups(FIXTURES / "points_ras.mrk.json", image)["points_ras"]
    assert [raw_point["description"] for raw_point in raw["controlPoints"]] == ["include", " Exclude "]
    assert [p.include for p in prompts.points] == [True, False]
    for raw_point, point in zip(raw["controlPoints"], prompts.points):
        r, a, s = raw_point["position"]
        np.testing.assert_allclose(point.ijk, hand_ijk(image, (-r, -a, s)), atol=1e-9)
        assert label_at(labels, point.ijk) == value_of[raw_point["label"]]


def test_axis_aligned_roi_becomes_a_box_around_the_structure(image, labels, value_of):
    raw = fixture_json("roi_liver.mrk.json")["markups"][0]
    (box,) = prompts_from_markups(FIXTURES / "roi_liver.mrk.json", image)["roi_liver"].boxes
    centre, half = np.array(raw["center"]), np.array(raw["size"]) / 2
    ends = np.sort([hand_ijk(image, centre - half), hand_ijk(image, centre + half)], axis=0)
    top = np.array(image.shape_ijk) - 1
    np.testing.assert_allclose(box.lo, np.clip(ends[0], 0, top), atol=1e-9)
    np.testing.assert_allclose(box.hi, np.clip(ends[1], 0, top), atol=1e-9)
    liver = np.argwhere(labels == value_of["liver"])[:, ::-1]
    assert np.all(liver.min(axis=0) >= box.lo) and np.all(liver.max(axis=0) <= box.hi)
    assert box.slice_axis() is None


def test_rotated_roi_gives_its_axis_aligned_bounding_box(image):
    raw = fixture_json("roi_rotated.mrk.json")["markups"][0]
    assert raw["size"] == [60.0, 30.0, 45.0]
    (box,) = prompts_from_markups(FIXTURES / "roi_rotated.mrk.json", image)["roi_rotated"].boxes
    cos, sin = math.cos(math.radians(30)), math.sin(math.radians(30))
    expected_extent = np.array([60 * cos + 30 * sin, 60 * sin + 30 * cos, 45.0]) / 3.0
    np.testing.assert_allclose(box.extent, expected_extent, atol=1e-9)
    centre = (np.array(box.lo) + np.array(box.hi)) / 2
    np.testing.assert_allclose(centre, hand_ijk(image, raw["center"]), atol=1e-9)
    # Rotated about S: it keeps its corners; its extent on an axial slice is the whole enclosing box, and on a
    # sagittal slice through the centre it is narrower than the enclosing box.
    assert box.corners is not None and len(box.corners) == 8
    lo, hi = box.section(2, round(centre[2]))
    np.testing.assert_allclose(lo[:2], box.lo[:2], atol=1e-9)
    np.testing.assert_allclose(hi[:2], box.hi[:2], atol=1e-9)
    lo, hi = box.section(0, round(centre[0]))
    assert hi[1] - lo[1] < box.extent[1] - 2


def test_rotated_roi_saved_in_ras_reads_the_same_as_in_lps(image):
    (lps,) = read_markups(FIXTURES / "roi_rotated.mrk.json")
    (ras,) = read_markups(FIXTURES / "roi_rotated_ras.mrk.json")
    np.testing.assert_allclose(ras.center, lps.center, atol=1e-9)
    np.testing.assert_allclose(ras.orientation, lps.orientation, atol=1e-12)
    np.testing.assert_allclose(lps.orientation[:, 0], [math.cos(math.radians(30)), math.sin(math.radians(30)), 0])
    box_lps = prompts_from_markups(FIXTURES / "roi_rotated.mrk.json", image)["roi_rotated"].boxes[0]
    box_ras = prompts_from_markups(FIXTURES / "roi_rotated_ras.mrk.json", image)["roi_rotated_ras"].boxes[0]
    np.testing.assert_allclose(box_ras.lo, box_lps.lo, atol=1e-9)
    np.testing.assert_allclose(box_ras.hi, box_lps.hi, atol=1e-9)


def test_flat_roi_becomes_a_2d_box_on_the_nearest_slice(image, labels, value_of):
    raw = fixture_json("roi_flat.mrk.json")["markups"][0]
    assert raw["size"][2] < image.spacing[2]
    (box,) = prompts_from_markups(FIXTURES / "roi_flat.mrk.json", image)["roi_flat"].boxes
    k = hand_ijk(image, raw["center"])[2]
    assert abs(k - round(k)) > 0.1  # the ROI sits off the slice centre
    assert box.slice_axis() == 2
    assert box.lo[2] == box.hi[2] == round(k)
    (i0, i1), (j0, j1) = box.voxel_range(0), box.voxel_range(1)
    kidney = labels[round(k), j0 : j1 + 1, i0 : i1 + 1] == value_of["kidney_left"]
    assert kidney.sum() == np.count_nonzero(labels[round(k)] == value_of["kidney_left"]) > 0


def test_demo_prompts_box_their_structures(image, labels, value_of):
    names = ["liver", "spleen", "kidney_left"]
    prompts = prompts_from_markups([CASE / "prompts" / f"{n}.mrk.json" for n in names], image)
    assert list(prompts) == names
    top = np.array(image.shape_ijk) - 1
    for name in names:
        (box,) = prompts[name].boxes
        voxels = np.argwhere(labels == value_of[name])[:, ::-1]
        lo, hi = voxels.min(axis=0), voxels.max(axis=0)
        assert np.all(np.asarray(box.lo) <= lo) and np.all(np.asarray(box.hi) >= hi)
        # 5 mm margin: at most two voxels more on each side (unless clipped at the image border)
        assert np.all(np.asarray(box.lo) >= np.maximum(lo - 2, 0)) and np.all(np.asarray(box.hi) <= np.minimum(hi + 2, top))


def test_name_key_overrides_the_file_name_and_segments_collect_all_their_prompts(tmp_path, image):
    liver_roi = write_json(tmp_path / "liver.mrk.json", fixture_json("roi_liver.mrk.json"))
    flat = fixture_json("roi_flat.mrk.json")
    flat["markups"][0]["name"] = "liver"
    second = write_json(tmp_path / "another box.mrk.json", flat)
    prompts = prompts_from_markups([FIXTURES / "points_ras.mrk.json", liver_roi, second], image)
    assert list(prompts) == ["points_ras", "liver"]
    assert len(prompts["liver"].boxes) == 2 and prompts["liver"].points == []
    assert [m.name for m in read_markups(second)] == ["liver"]


def test_roi_partly_outside_is_clipped(tmp_path, image):
    content = fixture_json("roi_rotated.mrk.json")
    content["markups"][0]["center"][2] = image.ijk_to_lps([[0, 0, image.shape_ijk[2] - 1]])[0][2]  # top slice
    path = write_json(tmp_path / "top.mrk.json", content)
    (box,) = prompts_from_markups(path, image)["top"].boxes
    assert box.hi[2] == image.shape_ijk[2] - 1
    assert box.lo[2] == pytest.approx(image.shape_ijk[2] - 1 - 22.5 / 3)


def broken(tmp_path: Path, name: str, change) -> Path:
    content = copy.deepcopy(fixture_json(name))
    change(content["markups"][0])
    return write_json(tmp_path / f"broken_{name}", content)


def assert_error(path: Path, image, *words: str) -> None:
    with pytest.raises(InputError) as caught:
        prompts_from_markups(path, image)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message


def test_point_outside_the_image_names_the_file_and_the_point(tmp_path, image):
    path = broken(tmp_path, "points_lps.mrk.json", lambda m: m["controlPoints"][1]["position"].__setitem__(2, 900.0))
    assert_error(path, image, "kidney_right", "outside")


def test_roi_wholly_outside_the_image_is_an_error(tmp_path, image):
    path = broken(tmp_path, "roi_liver.mrk.json", lambda m: m["center"].__setitem__(0, -2000.0))
    assert_error(path, image, "ROI", "outside")


def test_unknown_coordinate_system_is_an_error(tmp_path, image):
    assert_error(broken(tmp_path, "points_lps.mrk.json", lambda m: m.update(coordinateSystem="IJK")), image, "IJK")


def test_malformed_files_are_errors_naming_the_file_and_problem(tmp_path, image):
    truncated = tmp_path / "truncated.mrk.json"
    truncated.write_text((FIXTURES / "points_lps.mrk.json").read_text()[:200])
    assert_error(truncated, image, "JSON")
    assert_error(write_json(tmp_path / "empty.mrk.json", {"markups": []}), image, "no markups")
    assert_error(write_json(tmp_path / "other.mrk.json", {"points": []}), image, "markups")
    text = broken(tmp_path, "points_lps.mrk.json", lambda m: m["controlPoints"][0].update(position=["1", 2, 3]))
    assert_error(text, image, "position", "numbers")
    line = broken(tmp_path, "roi_liver.mrk.json", lambda m: m.update(type="Line"))
    assert_error(line, image, "Line")
    no_size = broken(tmp_path, "roi_rotated.mrk.json", lambda m: m.pop("size"))
    assert_error(no_size, image, "size")
    no_points = broken(tmp_path, "points_ras.mrk.json", lambda m: m.update(controlPoints=[]))
    assert_error(no_points, image, "control points")
    assert_error(tmp_path / "absent.mrk.json", image, "not found")


# ------------------------------------------------------------------------------------------------ curves


def test_curve_is_a_scribble_on_the_slice_it_was_drawn_on(image, labels, value_of):
    raw = fixture_json("curve_kidney.mrk.json")["markups"][0]
    (segment,) = prompts_from_markups(FIXTURES / "curve_kidney.mrk.json", image).values()
    assert segment.name == "curve_kidney" and not segment.boxes and not segment.points and not segment.is_empty()
    (curve,) = segment.curves
    assert curve.include and not curve.closed and curve.source == str(FIXTURES / "curve_kidney.mrk.json")
    expected = np.array([hand_ijk(image, p["position"]) for p in raw["controlPoints"]])
    np.testing.assert_allclose(curve.array(), expected, atol=1e-6)
    k = curve.slice_index(2)
    assert k == int(round(expected[0, 2])) and abs(expected[0, 2] - k) > 0.1  # 0.4 mm off the slice centre
    assert curve.slice_axis() == 2 and curve.slice_index(0) is None and curve.slice_index(1) is None
    drawn = rasterise_curve(curve, 2, labels.shape[1:])
    assert drawn.sum() >= 10 and (labels[k][drawn] == value_of["kidney_left"]).all()


def test_curve_saved_in_ras_with_an_exclude_point_is_an_exclude_scribble(tmp_path, image, labels, value_of):
    raw = fixture_json("curve_stomach_exclude_ras.mrk.json")["markups"][0]
    assert raw["coordinateSystem"] == "RAS" and raw["controlPoints"][0]["description"] == "exclude"
    (curve,) = prompts_from_markups(FIXTURES / "curve_stomach_exclude_ras.mrk.json", image)[
        "curve_stomach_exclude_ras"].curves
    assert not curve.include
    lps = [np.array(p["position"]) * (-1.0, -1.0, 1.0) for p in raw["controlPoints"]]
    np.testing.assert_allclose(curve.array(), [hand_ijk(image, p) for p in lps], atol=1e-6)
    ijk = curve.array()[len(lps) // 2]
    assert label_at(labels, (ijk[0], ijk[1], curve.slice_index(2))) == value_of["stomach"]
    # A segment with only an exclude curve has nothing to start from; without the description the curve includes.
    assert prompts_from_markups(FIXTURES / "curve_stomach_exclude_ras.mrk.json", image)[
        "curve_stomach_exclude_ras"].is_empty()
    plain = broken(tmp_path, "curve_stomach_exclude_ras.mrk.json", lambda m: m["controlPoints"][0].update(description=""))
    (again,) = prompts_from_markups(plain, image)["broken_curve_stomach_exclude_ras"].curves
    assert again.include and again.points == curve.points


def test_closed_curve_is_a_lasso_around_the_structure(image, labels, value_of):
    (curve,) = prompts_from_markups(FIXTURES / "lasso_spleen.mrk.json", image)["lasso_spleen"].curves
    assert curve.closed and curve.include and curve.kind == "lasso"
    k = curve.slice_index(2)
    inside = rasterise_curve(curve, 2, labels.shape[1:])
    spleen = labels[k] == value_of["spleen"]
    assert spleen.sum() > 50 and (inside & spleen).sum() >= 0.95 * spleen.sum()
    assert inside.sum() < 4 * spleen.sum()  # around it, not the whole slice


def _curve_file(tmp_path: Path, name: str, positions, kind: str = "Curve") -> Path:
    content = copy.deepcopy(fixture_json("curve_kidney.mrk.json"))
    markup = content["markups"][0]
    markup["type"] = kind
    template = markup["controlPoints"][0]
    markup["controlPoints"] = [dict(template, id=str(n), label=f"p{n}", position=list(p))
                               for n, p in enumerate(positions, start=1)]
    return write_json(tmp_path / name, content)


def test_bad_curves_are_one_line_naming_the_file_and_the_problem(tmp_path, image):
    centre = image.ijk_to_lps(np.array(image.shape_ijk, float) / 2)[0]
    one = _curve_file(tmp_path, "one.mrk.json", [centre])
    assert_error(one, image, "Curve markup 'one'", "at least 2", "has 1")
    twice = _curve_file(tmp_path, "twice.mrk.json", [centre, centre])
    assert_error(twice, image, "at least 2", "has 1")
    two = _curve_file(tmp_path, "two.mrk.json", [centre, centre + (9, 0, 0)], kind="ClosedCurve")
    assert_error(two, image, "ClosedCurve markup 'two'", "at least 3")
    flat = _curve_file(tmp_path, "flat.mrk.json", [centre, centre + (9, 0, 0), centre + (18, 0, 0)], "ClosedCurve")
    assert_error(flat, image, "encloses no area")
    far = _curve_file(tmp_path, "far.mrk.json", [centre, centre + (0, 0, 5000.0)])
    assert_error(far, image, "Curve markup 'far'", "point 'p2'", "outside the image")
    ok = _curve_file(tmp_path, "ok.mrk.json", [centre, centre + (9, 0, 0), centre + (9, 9, 0)], "ClosedCurve")
    assert prompts_from_markups(ok, image)["ok"].curves[0].closed
