"""``fmseg segment --model vista3d``: VISTA3D's automatic segmentation of its classes from the command line, with
the real network (MONAI's ``vista3d132``, random seeded weights of the bundle's layout) installed by the real
import flow (``fmseg models import vista3d FILE``) into a temporary cache, on a small crop of the bundled chest CT;
and refusals of bad input (exit 2, one line, nothing written), most of them before any model is loaded.

The 218 M parameter network takes about two minutes per 128^3 window on a small CPU, so the successful run
segments with 32^3 windows (``VISTA3DModel.crop_shape``, which only sets the sliding window's size) on a crop that
fits one window at 1.5 mm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from FMSegCore.cli.main import main
from FMSegCore.cli.segment_cmd import _vista3d, class_segments, resolve_classes
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import Volume, read_volume, write_volume
from FMSegCore.models import factory
from FMSegCore.models.vista3d import EVERYTHING_CLASSES, VISTA3D_CLASSES, VISTA3DModel, segment_volume
from FMSegCore.zoo.cache import resources_dir

CHEST = resources_dir() / "SampleData" / "ct_chest_small" / "image.nii.gz"
#: The crop of the chest CT (K, J, I slices): 4 x 15 x 15 voxels of 10 x 3.05 x 3.05 mm, i.e. 27 x 30 x 30 at
#: 1.5 mm: one 32^3 window. It holds lung, so it looks like CT.
CROP = (slice(15, 19), slice(56, 71), slice(30, 45))
WINDOW = (32, 32, 32)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, *argv, expect: str) -> str:
    """Run ``fmseg segment ARGV``: exit 2 and one line on stderr holding ``expect``."""
    code, _, err = run_cli(capsys, "segment", *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert expect in err, err
    return err


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    """A small crop of the chest CT, on its own grid (origin moved to the crop's first voxel)."""
    volume = read_volume(CHEST)
    k, j, i = (s.start for s in CROP)
    origin = tuple(float(x) for x in volume.ijk_to_lps([(i, j, k)])[0])
    crop = Volume(np.ascontiguousarray(volume.array[CROP]), volume.spacing, origin, volume.direction)
    return write_volume(crop, tmp_path_factory.mktemp("ct") / "small_ct.nii.gz")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Seeded ``vista3d132()`` weights saved as the bundle's ``model.pt`` (a plain state_dict) and installed with
    ``fmseg models import vista3d FILE`` into a temporary cache; loaded models are forgotten afterwards."""
    root = tmp_path_factory.mktemp("vista3d")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMSEG_CACHE_DIR", str(root / "cache"))
        patch.setenv("FMSEG_OFFLINE", "1")
        patch.setattr(factory, "_LOADED", {})
        torch.manual_seed(0)
        weights = root / "model.pt"
        torch.save(VISTA3DModel().network.state_dict(), weights)
        assert main(["models", "import", "vista3d", str(weights)]) == 0
        weights.unlink()
        yield root / "cache"


# ------------------------------------------------------------------------------------------------ classes


def test_classes_by_name_id_or_comma_list_and_merged_classes_expand():
    spec = _vista3d()
    assert resolve_classes(spec, None) == list(EVERYTHING_CLASSES)
    assert resolve_classes(spec, ["Liver,spleen", "right_kidney", "6", "liver", "RIGHT KIDNEY"]) == [1, 3, 5, 6]
    assert resolve_classes(spec, ["kidney"]) == [14, 5]  # as the bundle: kidney is left + right kidney
    with pytest.raises(InputError, match="has no class 999"):
        resolve_classes(spec, ["999"])
    segments = class_segments(spec, [1, 3, 62])
    assert [(s.value, s.name) for s in segments] == [(1, "liver"), (3, "spleen"), (62, "colon")]
    assert len({s.color for s in segments}) == 3


# ------------------------------------------------------------------------------------------------ refusals


def test_exactly_one_of_adapter_and_model(small_ct, tmp_path, capsys):
    output = tmp_path / "out.seg.nrrd"
    refused(capsys, "--image", small_ct, "--output", output, expect="exactly one of --adapter")
    refused(capsys, "--image", small_ct, "--adapter", tmp_path / "a.pt", "--model", "vista3d", "--output", output,
            expect="exactly one of --adapter")
    refused(capsys, "--image", small_ct, "--adapter", tmp_path / "a.pt", "--classes", "liver", "--output", output,
            expect="--classes goes with --model")
    assert not output.exists()


def test_a_model_that_does_not_segment_automatically_is_refused(small_ct, tmp_path, capsys):
    output = tmp_path / "out.seg.nrrd"
    err = refused(capsys, "--image", small_ct, "--model", "litemedsam", "--output", output,
                  expect="'litemedsam' is not an automatic-segmentation model")
    assert "fmseg prompt --model litemedsam" in err and "vista3d" in err
    refused(capsys, "--image", small_ct, "--model", "no-such-model", "--output", output, expect="unknown model")
    assert not output.exists()


def test_an_unknown_class_is_answered_with_the_closest_names(small_ct, tmp_path, capsys):
    output = tmp_path / "out.seg.nrrd"
    err = refused(capsys, "--image", small_ct, "--model", "vista3d", "--classes", "liver,splen", "--output", output,
                  expect="no class 'splen'")
    assert "'spleen'" in err
    err = refused(capsys, "--image", small_ct, "--model", "vista3d", "--classes", "vertebra l3", "--output", output,
                  expect="no class 'vertebra l3'")
    assert "'vertebrae L3'" in err and "..." not in err
    assert not output.exists()


def test_output_checks_come_first(small_ct, tmp_path, capsys):
    existing = tmp_path / "old.seg.nrrd"
    existing.write_bytes(b"keep")
    refused(capsys, "--image", small_ct, "--model", "vista3d", "--output", existing, expect="exists already")
    assert existing.read_bytes() == b"keep"
    refused(capsys, "--image", small_ct, "--model", "vista3d", "--output", tmp_path / "out.txt",
            expect="unknown output format")
    copy = tmp_path / "ct.nii.gz"
    copy.write_bytes(small_ct.read_bytes())
    refused(capsys, "--image", copy, "--model", "vista3d", "--output", copy, "--overwrite",
            expect="would replace the input")
    assert copy.read_bytes() == small_ct.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "old.seg.nrrd"]


def test_missing_weights_and_other_modalities_are_refused(small_ct, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("FMSEG_OFFLINE", "1")
    output = tmp_path / "out.seg.nrrd"
    err = refused(capsys, "--image", small_ct, "--model", "vista3d", "--output", output, expect="not installed")
    assert "fmseg models fetch vista3d --trust-unverified" in err and "fmseg models import vista3d FILE" in err
    refused(capsys, "--image", small_ct, "--model", "vista3d", "--modality", "mr", "--output", output,
            expect="segments CT only")
    assert not output.exists()


def test_a_scan_that_looks_like_mr_is_refused(installed, small_ct, tmp_path, capsys):
    volume = read_volume(small_ct)
    values = np.random.default_rng(0).integers(0, 800, volume.array.shape).astype(np.int16)  # no air
    mr = write_volume(volume.with_array(values), tmp_path / "mr.nii.gz")
    refused(capsys, "--image", mr, "--model", "vista3d", "--output", tmp_path / "out.nii.gz",
            expect="looks like MR")
    assert not (tmp_path / "out.nii.gz").exists()


# ------------------------------------------------------------------------------------------------ segmenting


def test_vista3d_segments_the_asked_classes_on_the_input_grid(installed, small_ct, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(VISTA3DModel, "crop_shape", WINDOW)
    output = tmp_path / "organs.seg.nrrd"
    code, out, err = run_cli(capsys, "segment", "--image", small_ct, "--model", "vista3d", "--classes",
                             "liver,spleen", "right kidney", "6", "--device", "cpu", "--output", output,
                             "--preview", tmp_path / "organs.png", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "organs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(preview)" in out
    assert all(name in out for name in ("liver", "spleen", "right kidney", "aorta")) and f"Wrote {output}" in out
    image = read_volume(small_ct)
    labels, segments = read_labelmap(output, reference=image)  # on the input grid, else an error
    assert labels.same_grid(image) and labels.array.shape == image.array.shape
    assert {s.value: s.name for s in segments} == {1: "liver", 3: "spleen", 5: "right kidney", 6: "aorta"}
    assert {s.value: s.name for s in segments} == {v: VISTA3D_CLASSES[v] for v in (1, 3, 5, 6)}
    # what VISTA3D's own sliding-window segmentation gives for the scan, with the model the command loaded
    model = factory._LOADED[("vista3d", "cpu")]
    expected = segment_volume(model, image.array, image.spacing, [1, 3, 5, 6], direction=image.direction)
    assert np.array_equal(labels.array, expected)
    assert set(np.unique(labels.array)) <= {0, 1, 3, 5, 6}
    # an existing result is kept without --overwrite, replaced with it
    before = output.read_bytes()
    refused(capsys, "--image", small_ct, "--model", "vista3d", "--classes", "liver", "--output", output,
            expect="exists already")
    assert output.read_bytes() == before
