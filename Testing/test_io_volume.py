"""Volume reading and writing on the bundled sample data, DICOM and MetaImage, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume, read_volume, write_volume

SAMPLES = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
SAMPLE_IMAGES = sorted(SAMPLES.glob("*/image.nii.gz")) + [SAMPLES / "ct_chest_small" / "image.nrrd"]


def small_volume() -> Volume:
    """A 6-slice crop of the abdominal CT with a rotated direction and an odd origin."""
    array = read_volume(SAMPLES / "ct_abdomen_pelvis" / "image.nii.gz").array[50:56, 30:70, 40:90].copy()
    angle = np.radians(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Volume(array, (0.8, 0.7, 2.5), (-12.5, 30.25, -101.0), direction)


def assert_same_geometry(actual: Volume, expected: Volume, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=atol)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=atol)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=atol)


def assert_input_error(path: Path, *words: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        read_volume(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message.lower()
    return caught.value


@pytest.mark.parametrize("path", SAMPLE_IMAGES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sample_images_read_as_3d_volumes_matching_sitk(path):
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    assert volume.shape_ijk == image.GetSize()
    assert volume.array.shape == image.GetSize()[::-1]
    np.testing.assert_allclose(volume.ijk_to_lps([[3, 5, 7]])[0], image.TransformIndexToPhysicalPoint((3, 5, 7)))
    np.testing.assert_array_equal(volume.array[7, 5, 3], image[3, 5, 7])
    assert volume.path == str(path)


def test_nrrd_and_nifti_copies_of_the_chest_ct_agree():
    nrrd = read_volume(SAMPLES / "ct_chest_small" / "image.nrrd")
    nifti = read_volume(SAMPLES / "ct_chest_small" / "image.nii.gz")
    assert nrrd.same_grid(nifti)
    np.testing.assert_array_equal(nrrd.array, nifti.array)


def test_lps_ijk_round_trip_on_a_rotated_grid():
    volume = small_volume()
    points = np.array([[0, 0, 0], [10.5, 3.25, 2], [49, 39, 5]], dtype=float)
    np.testing.assert_allclose(volume.lps_to_ijk(volume.ijk_to_lps(points)), points, atol=1e-9)
    # One step along J moves by the spacing along the direction's second column.
    step = volume.ijk_to_lps([[0, 1, 0]])[0] - volume.ijk_to_lps([[0, 0, 0]])[0]
    np.testing.assert_allclose(step, 0.7 * volume.direction[:, 1])


@pytest.mark.parametrize("name", ["volume.mha", "volume.nrrd", "volume.nii.gz"])
def test_write_read_round_trip_keeps_values_and_geometry(tmp_path, name):
    volume = small_volume()
    written = write_volume(volume, tmp_path / name)
    again = read_volume(written)
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.array.dtype == volume.array.dtype
    assert_same_geometry(again, volume, atol=1e-4 if name.endswith(".nii.gz") else 1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_write_mhd_leaves_only_the_header_and_its_data_file(tmp_path):
    write_volume(small_volume(), tmp_path / "volume.mhd")
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]


def write_dicom_series(volume: Volume, folder: Path) -> None:
    """One DICOM file per slice, with the position/orientation tags a scanner writes."""
    image = volume.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10g}" for v in np.asarray(volume.direction)[:, :2].T.ravel())
    for k in range(image.GetDepth()):
        frame = image[:, :, k]
        position = "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(k + 1), "0020|0032": position, "0020|0037": orientation,
            "0018|0050": str(volume.spacing[2]), "0028|0030": f"{volume.spacing[1]}\\{volume.spacing[0]}",
        }
        for tag, value in tags.items():
            frame.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(frame)


def test_dicom_series_folder_reads_back_with_values_and_geometry(tmp_path):
    volume = small_volume()
    write_dicom_series(volume, tmp_path)
    again = read_volume(tmp_path)
    np.testing.assert_array_equal(again.array, volume.array)
    assert_same_geometry(again, volume, atol=1e-4)


def test_folder_without_dicom_is_an_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    assert_input_error(tmp_path, "dicom")


def test_2d_image_is_rejected(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(4, 5)), str(path))
    assert_input_error(path, "2d")
    assert read_volume(path, require_3d=False).array.shape == (1, 4, 5)


def test_empty_volume_is_rejected_unless_allowed(tmp_path):
    path = tmp_path / "empty.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(path))
    assert_input_error(path, "empty")
    assert read_volume(path, allow_empty=True).array.max() == 0


def test_nan_volume_is_rejected(tmp_path):
    # NRRD: SimpleITK's NIfTI reader itself turns NaN into 0, so a NaN NIfTI file never shows NaN here.
    array = np.ones((3, 4, 5), np.float32)
    array[1, 2, 3] = np.nan
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert_input_error(path, "nan")


def test_missing_file_and_unsupported_format_name_the_file(tmp_path):
    assert_input_error(tmp_path / "absent.nii.gz", "not found")
    picture = tmp_path / "scan.png"
    picture.write_bytes(b"\x89PNG\r\n")
    assert_input_error(picture, "unsupported")


def test_corrupt_file_is_an_input_error(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not a NIfTI file")
    assert_input_error(path, "cannot read")


def test_failed_write_leaves_the_folder_as_it_was(tmp_path):
    target = tmp_path / "result.nii.gz"
    write_volume(small_volume(), target)
    before = target.read_bytes()
    broken = Volume(np.zeros((2, 3, 4), dtype=np.float16))  # a voxel type SimpleITK cannot write
    with pytest.raises(TypeError):
        write_volume(broken, target)
    assert [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]
    assert target.read_bytes() == before


def test_write_to_a_missing_folder_or_unknown_format_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_volume(small_volume(), tmp_path / "missing" / "out.nrrd")
    with pytest.raises(InputError, match="unsupported"):
        write_volume(small_volume(), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []
