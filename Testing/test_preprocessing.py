"""Intensity normalisation, slicing, 2D fitting to a model's square input and back, resampling, boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.preprocessing.intensity import (
    guess_modality,
    minmax_slice,
    normalize,
    normalize_ct,
    normalize_mr,
)
from FMSegCore.preprocessing.slicing import (
    bounding_box_2d,
    bounding_box_3d,
    fit_square,
    get_slice,
    in_plane_axes,
    pad_to_square,
    put_slice,
    resample_volume,
    resize_2d,
    unfit_square,
)

SAMPLES = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(SAMPLES / "ct_abdomen_pelvis" / "image.nii.gz")


@pytest.fixture(scope="module")
def liver_mask() -> np.ndarray:
    return read_volume(SAMPLES / "ct_abdomen_pelvis" / "label.nii.gz").array == 5


# ------------------------------------------------------------------------------------------------- intensity


def test_ct_window_maps_hounsfield_units_linearly_and_clips():
    hu = np.array([-1000, -160, 40, 140, 240, 3000], dtype=np.int16)
    np.testing.assert_allclose(normalize_ct(hu), [0, 0, 0.5, 0.75, 1, 1], atol=1e-6)
    np.testing.assert_allclose(normalize_ct(hu, window=(0, 100)), [0, 0, 0.4, 1, 1, 1], atol=1e-6)
    lung = normalize_ct(np.array([-1350, -600, 150]), window="lung")
    np.testing.assert_allclose(lung, [0, 0.5, 1], atol=1e-6)
    assert normalize_ct(hu).dtype == np.float32


def test_ct_window_errors():
    with pytest.raises(InputError, match="unknown CT window"):
        normalize_ct(np.zeros(3), window="liverish")
    with pytest.raises(InputError, match="lower bound"):
        normalize_ct(np.zeros(3), window=(200, 100))


def test_mr_percentiles_map_to_zero_and_one_with_outliers_clipped():
    rng = np.random.default_rng(0)
    array = rng.normal(300, 50, size=(20, 30, 40)).astype(np.float32)
    array[0, 0, :5] = 1e6  # bright outliers
    result = normalize_mr(array)
    low, high = np.percentile(array, [0.5, 99.5])
    np.testing.assert_allclose(result, np.clip((array - low) / (high - low), 0, 1), atol=1e-5)
    assert result[0, 0, 0] == 1.0 and result.dtype == np.float32
    assert np.all(normalize_mr(np.full((4, 4), 7.0)) == 0)
    with pytest.raises(InputError, match="percentiles"):
        normalize_mr(array, lower=60, upper=40)


def test_modality_is_guessed_from_the_sample_scans():
    assert guess_modality(read_volume(SAMPLES / "ct_abdomen_pelvis" / "image.nii.gz")) == "CT"
    assert guess_modality(read_volume(SAMPLES / "ct_chest_small" / "image.nrrd")) == "CT"
    assert guess_modality(read_volume(SAMPLES / "mr_abdomen" / "image.nii.gz")) == "MR"


def test_normalize_auto_chooses_the_modality(ct):
    mr = read_volume(SAMPLES / "mr_abdomen" / "image.nii.gz")
    np.testing.assert_array_equal(normalize(ct), normalize_ct(ct.array))
    np.testing.assert_array_equal(normalize(mr.array), normalize_mr(mr.array))
    np.testing.assert_array_equal(normalize(mr, modality="ct"), normalize_ct(mr.array))
    for result in (normalize(ct), normalize(mr)):
        assert result.dtype == np.float32 and result.min() == 0.0 and result.max() == 1.0
    with pytest.raises(InputError, match="modality"):
        normalize(ct, modality="PET")


def test_minmax_slice_as_medsam():
    image = np.array([[-5.0, 5.0], [0.0, 15.0]])
    np.testing.assert_allclose(minmax_slice(image), [[0, 0.5], [0.25, 1]])
    assert image[0, 0] == -5.0  # input untouched
    assert np.all(minmax_slice(np.full((3, 3), 4)) == 0)


# --------------------------------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("axis, name", [(0, "sagittal"), (1, "coronal"), (2, "axial")])
def test_slices_have_the_documented_row_and_column_axes(ct, axis, name):
    array = ct.array
    index = ct.shape_ijk[axis] // 2
    image = get_slice(array, name, index)
    np.testing.assert_array_equal(image, get_slice(array, axis, index))
    rows, cols = in_plane_axes(axis)
    assert image.shape == (ct.shape_ijk[rows], ct.shape_ijk[cols])
    rng = np.random.default_rng(axis)
    for _ in range(20):
        r, c = rng.integers(image.shape[0]), rng.integers(image.shape[1])
        ijk = [0, 0, 0]
        ijk[axis], ijk[rows], ijk[cols] = index, r, c
        assert image[r, c] == array[ijk[2], ijk[1], ijk[0]]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_put_slice_is_the_inverse_of_get_slice(ct, axis):
    array = ct.array.copy()
    index = 7
    replacement = np.arange(get_slice(array, axis, index).size, dtype=array.dtype).reshape(
        get_slice(array, axis, index).shape
    )
    put_slice(array, axis, index, replacement)
    np.testing.assert_array_equal(get_slice(array, axis, index), replacement)
    changed = np.argwhere(array != ct.array)
    assert np.all(changed[:, 2 - axis] == index)
    with pytest.raises(ValueError):
        put_slice(array, axis, index, replacement[:-1])


def test_bad_axis_and_index():
    array = np.zeros((2, 3, 4))
    with pytest.raises(InputError, match="axis"):
        get_slice(array, "transverse", 0)
    with pytest.raises(InputError, match="axis"):
        get_slice(array, 3, 0)
    with pytest.raises(IndexError):
        get_slice(array, "axial", 2)


def test_resize_bilinear_keeps_constants_and_ramps():
    assert np.allclose(resize_2d(np.full((10, 20), 3.5), (37, 41)), 3.5)
    ramp = np.tile(np.arange(8, dtype=np.float32), (4, 1))
    bigger = resize_2d(ramp, (4, 16))
    assert bigger.shape == (4, 16) and np.all(np.diff(bigger[0]) >= 0)
    assert bigger[0, 0] == 0 and bigger[0, -1] == 7
    channels = resize_2d(np.stack([ramp, 2 * ramp]), (8, 16))
    np.testing.assert_allclose(channels[1], 2 * channels[0], atol=1e-5)


def test_resize_nearest_keeps_labels_and_dtype():
    labels = np.zeros((20, 30), np.uint8)
    labels[3:9, 4:20] = 5
    labels[12:18, 22:29] = 9
    resized = resize_2d(labels, (77, 101), mode="nearest")
    assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 5, 9}


@pytest.mark.parametrize("shape, size", [((101, 122), 256), ((37, 250), 256), ((64, 64), 1024), ((122, 101), 1024)])
def test_mask_fit_to_square_and_back_is_exact(shape, size):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    square, fit = fit_square(mask, size, mode="nearest")
    assert square.shape == (size, size) and square.dtype == bool
    assert max(fit.scaled_shape) == size
    assert not square[fit.scaled_shape[0]:, :].any() and not square[:, fit.scaled_shape[1]:].any()
    np.testing.assert_array_equal(unfit_square(square, fit), mask)


def test_real_liver_slice_round_trip_and_point_mapping(liver_mask):
    k = int(np.argmax(liver_mask.sum(axis=(1, 2))))
    mask = get_slice(liver_mask, "axial", k)
    square, fit = fit_square(mask, 1024, mode="nearest")
    np.testing.assert_array_equal(unfit_square(square, fit), mask)
    (r0, c0), (r1, c1) = bounding_box_2d(mask)
    (s0, t0), (s1, t1) = bounding_box_2d(square)
    mapped = fit.to_square(np.array([[r0 - 0.5, c0 - 0.5], [r1 + 0.5, c1 + 0.5]]))  # outer pixel edges
    np.testing.assert_allclose(mapped, [[s0 - 0.5, t0 - 0.5], [s1 + 0.5, t1 + 0.5]], atol=1.0)


def test_pad_to_square_pads_bottom_and_right():
    image = np.arange(6).reshape(2, 3)
    padded = pad_to_square(image, value=-1)
    assert padded.shape == (3, 3)
    np.testing.assert_array_equal(padded[:2, :3], image)
    assert np.all(padded[2] == -1)
    assert pad_to_square(np.zeros((3, 4, 2))).shape == (3, 4, 4)


# ------------------------------------------------------------------------------------------------ resampling


def test_resample_to_finer_spacing_keeps_the_grid_and_the_original_values(ct):
    fine = resample_volume(ct, (1.5, 3.0, 3.0))
    assert fine.shape_ijk == (2 * ct.shape_ijk[0], ct.shape_ijk[1], ct.shape_ijk[2])
    assert fine.origin == ct.origin and np.array_equal(fine.direction, ct.direction)
    assert fine.array.dtype == np.float32
    np.testing.assert_allclose(fine.array[:, :, ::2], ct.array, atol=1e-3)  # old voxel centres
    middle = (ct.array[:, :, :-1].astype(np.float32) + ct.array[:, :, 1:]) / 2
    np.testing.assert_allclose(fine.array[:, :, 1:-1:2], middle, atol=1e-3)


def test_resample_labels_with_nearest_neighbour(liver_mask, ct):
    labels = ct.with_array(liver_mask.astype(np.uint8) * 5)
    coarse = resample_volume(labels, (6.0, 6.0, 6.0), interpolation="nearest")
    assert coarse.array.dtype == np.uint8 and set(np.unique(coarse.array)) == {0, 5}
    np.testing.assert_allclose(np.multiply(coarse.shape_ijk, coarse.spacing), np.multiply(ct.shape_ijk, 3.0), atol=3.0)
    back = coarse.lps_to_ijk(ct.ijk_to_lps([[40, 50, 60]]))[0]
    assert coarse.array[tuple(np.round(back).astype(int)[::-1])] == labels.array[60, 50, 40]
    with pytest.raises(InputError, match="spacing"):
        resample_volume(ct, (0.0, 1.0, 1.0))


# -------------------------------------------------------------------------------------------- bounding boxes


def test_bounding_boxes_are_inclusive_and_none_when_empty():
    mask = np.zeros((10, 12), bool)
    mask[2, 3] = mask[6, 9] = True
    assert bounding_box_2d(mask) == ((2, 3), (6, 9))
    assert bounding_box_2d(np.zeros((4, 4))) is None
    volume = np.zeros((5, 6, 7), np.uint8)
    volume[1, 4, 2] = volume[3, 2, 6] = 7
    assert bounding_box_3d(volume) == ((1, 2, 2), (3, 4, 6))
    assert bounding_box_3d(np.zeros((2, 2, 2))) is None
    with pytest.raises(ValueError):
        bounding_box_2d(volume)
