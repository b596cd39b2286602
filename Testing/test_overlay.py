"""The PNG preview: written whole, laid out as asked, coloured where the labels are, radiologically oriented."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from FMSegCore.errors import FMSegError, InputError
from FMSegCore.io.colors import distinct_colors
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.overlay import (
    choose_slices,
    display_plan,
    write_overlay_png,
)
from FMSegCore.io.volume import Volume

image_module = pytest.importorskip("matplotlib.image")

RED = (1.0, 0.0, 0.0)
LPS_FLIPPED = np.diag([-1.0, -1.0, 1.0])  # as NIfTI files usually are: i towards the patient's right


def _volume(direction=None, spacing=(1.0, 1.0, 1.0)) -> tuple[Volume, np.ndarray]:
    """A CT-like box (body of 40 HU in air) of 40 x 32 x 6 voxels and a block label in its i<15, j<10 corner."""
    array = np.full((6, 32, 40), -1000.0, dtype=np.float32)
    array[:, 2:30, 2:38] = 40.0
    array[:, 12:20, 18:24] = 300.0
    labels = np.zeros(array.shape, dtype=np.uint16)
    labels[1:5, :10, :15] = 1
    volume = Volume(array, spacing=spacing, direction=np.eye(3) if direction is None else direction)
    return volume, labels


def _red_pixels(path) -> tuple[np.ndarray, np.ndarray]:
    """Pixel image (rows, cols, RGB[A]) and a mask of the strongly red pixels."""
    pixels = image_module.imread(str(path))
    rgb = pixels[..., :3]
    return pixels, (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 0.3


def test_overlay_png_is_written_with_one_panel_per_slice(tmp_path):
    volume, labels = _volume()
    one = write_overlay_png(volume, labels, ["block"], tmp_path / "one.png", colors=[RED], slices=1)
    three = write_overlay_png(volume, labels, ["block"], tmp_path / "three.png", colors=[RED], slices=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "three.png"]  # no temporary files left
    height1, width1 = image_module.imread(str(one)).shape[:2]
    height3, width3 = image_module.imread(str(three)).shape[:2]
    assert height1 == height3 and 200 < height1 < 1000
    assert width1 < 2 * height1 and width3 > 2 * height3
    assert 2.5 < width3 / width1 < 3.5


def test_overlay_colours_lie_where_the_labels_are(tmp_path):
    volume, labels = _volume()
    _, red = _red_pixels(write_overlay_png(volume, labels, ["block"], tmp_path / "a.png", colors=[RED], slices=1))
    assert red.sum() > 500
    rows, cols = np.nonzero(red)
    # Identity (LPS) direction: i runs to the patient's left and j to posterior, so no flip: top left.
    assert cols.mean() < red.shape[1] / 2 and rows.mean() < red.shape[0] / 2

    empty = np.zeros_like(labels)
    _, none = _red_pixels(write_overlay_png(volume, empty, ["block"], tmp_path / "b.png", colors=[RED], slices=1))
    assert none.sum() < 0.05 * red.sum()  # only the legend's swatch


def test_overlay_puts_the_patients_right_on_the_viewers_left(tmp_path):
    volume, labels = _volume(direction=LPS_FLIPPED)
    _, red = _red_pixels(write_overlay_png(volume, labels, ["block"], tmp_path / "a.png", colors=[RED], slices=1))
    rows, cols = np.nonzero(red)
    # i runs to the patient's right and j anterior: the corner is shown bottom right.
    assert cols.mean() > red.shape[1] / 2 and rows.mean() > red.shape[0] * 0.4


def test_overlay_respects_in_plane_spacing(tmp_path):
    square, labels = _volume(spacing=(1.0, 1.0, 1.0))
    wide, _ = _volume(spacing=(2.0, 1.0, 1.0))
    narrow_png = image_module.imread(str(write_overlay_png(square, labels, ["b"], tmp_path / "a.png", slices=1)))
    wide_png = image_module.imread(str(write_overlay_png(wide, labels, ["b"], tmp_path / "b.png", slices=1)))
    assert wide_png.shape[1] / wide_png.shape[0] > 1.6 * narrow_png.shape[1] / narrow_png.shape[0]


def test_display_plan_follows_the_direction_matrix():
    assert anatomical_axes(np.eye(3)) == (0, 1, 2)
    assert display_plan(np.eye(3)) == (2, (1, 0), (False, False))
    assert display_plan(LPS_FLIPPED) == (2, (1, 0), (True, True))
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # K runs anterior-posterior
    assert anatomical_axes(coronal) == (0, 2, 1)
    assert display_plan(coronal)[0] == 1


def test_choose_slices_prefers_where_segments_are_largest():
    labels = np.zeros((30, 8, 8), dtype=np.uint8)
    labels[5:15, 2:4, 2:4] = 1
    labels[10, :, :] = 1  # the big segment peaks on slice 10
    labels[20:25, 1:3, 1:3] = 2
    labels[22, :6, :6] = 2
    chosen = choose_slices(labels, 0, 3)
    assert 10 in chosen and 22 in chosen and len(chosen) == 3 and chosen == sorted(chosen)
    unlabelled = choose_slices(np.zeros((4, 2, 2), dtype=np.uint8), 0, 3)
    assert len(set(unlabelled)) == 3 and all(0 <= s < 4 for s in unlabelled)
    assert choose_slices(labels, 0, 50) == list(range(5, 25))  # never more than the labelled range has


def test_distinct_colors_separate_look_alike_structures():
    liver, kidney = distinct_colors(["liver", "kidney_left"])
    assert np.linalg.norm(np.subtract(liver, kidney)) >= 0.3


def test_overlay_rejects_labels_off_the_grid(tmp_path):
    volume, labels = _volume()
    with pytest.raises(InputError, match="does not match"):
        write_overlay_png(volume, labels[:, :, :5], ["b"], tmp_path / "a.png")
    assert not list(tmp_path.iterdir())


def test_overlay_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    volume, labels = _volume()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(FMSegError, match="pip install matplotlib"):
        write_overlay_png(volume, labels, ["b"], tmp_path / "a.png")
    assert not list(tmp_path.iterdir())
