"""``fmseg incontext`` end to end on real scans, and its refusals of bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FMSegCore.bench.metrics import dice
from FMSegCore.cli.main import main
from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import read_volume
from FMSegCore.zoo.cache import resources_dir

DATA = resources_dir() / "SampleData"
CHEST = DATA / "ct_chest_small"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def half_labelled_chest(tmp_path: Path, keep: slice = slice(None, None, 4)) -> tuple[Path, np.ndarray]:
    """The chest CT's label map with only the axial slices ``keep`` labelled (default every fourth: a sparse
    support on the same scan), and the full labels."""
    image = sitk.ReadImage(str(CHEST / "label.nii.gz"))
    labels = sitk.GetArrayFromImage(image)
    sparse = np.zeros_like(labels)
    sparse[keep] = labels[keep]
    out = sitk.GetImageFromArray(sparse)
    out.CopyInformation(image)
    path = tmp_path / "sparse.nii.gz"
    sitk.WriteImage(out, str(path))
    (tmp_path / "sparse.labels.json").write_text((CHEST / "labels.json").read_text())
    return path, labels


def test_segments_named_structures_into_a_seg_nrrd(tmp_path, capsys):
    support_labels, truth = half_labelled_chest(tmp_path)
    output = tmp_path / "result.seg.nrrd"
    uncertainty = tmp_path / "uncertainty.nii.gz"
    code, out, err = run_cli(capsys, "incontext", "--image", CHEST / "image.nii.gz",
                             "--support", CHEST / "image.nii.gz", support_labels,
                             "--labels", "right lung", "left lung", "--output", output, "--support-size", "4",
                             "--ensemble", "2", "--uncertainty", uncertainty, "--no-progress")
    assert code == 0, err
    assert "right lung" in out and "left lung" in out
    labels, segments = read_labelmap(output, reference=read_volume(CHEST / "image.nii.gz"))
    names = json.loads((CHEST / "labels.json").read_text())
    expected = {int(v): n for v, n in names.items() if n in ("right lung", "left lung")}
    assert {s.value: s.name for s in segments} == expected  # the support's values and names
    for value in expected:
        assert dice(labels.array[1::4] == value, truth[1::4] == value) > 0.8
    spread = read_volume(uncertainty).array
    assert spread.shape == truth.shape and 0 <= spread.min() and spread.max() <= 0.5


def test_label_map_output_gets_labels_json(tmp_path, capsys):
    support_labels, _ = half_labelled_chest(tmp_path)
    output = tmp_path / "result.nii.gz"
    code, _, err = run_cli(capsys, "incontext", "--image", CHEST / "image.nii.gz", "--support",
                           CHEST / "image.nii.gz", support_labels, "--labels", "6", "--output", output,
                           "--support-size", "2", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "result.labels.json").read_text()) == {"6": "left lung"}


def _expect_refusal(capsys, tmp_path: Path, argv: list, fragment: str) -> None:
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, "incontext", *argv, "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_bad_input_is_refused(tmp_path, capsys):
    image = CHEST / "image.nii.gz"
    output = tmp_path / "out.nii.gz"
    other_grid = DATA / "mr_abdomen" / "label.nii.gz"
    _expect_refusal(capsys, tmp_path, ["--image", image, "--support", image, other_grid, "--output", output],
                    str(other_grid))
    empty = tmp_path / "empty.nii.gz"
    template = sitk.ReadImage(str(CHEST / "label.nii.gz"))
    blank = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(template).shape, np.uint8))
    blank.CopyInformation(template)
    sitk.WriteImage(blank, str(empty))
    _expect_refusal(capsys, tmp_path, ["--image", image, "--support", image, empty, "--output", output],
                    "empty")
    labels = CHEST / "label.nii.gz"
    _expect_refusal(capsys, tmp_path, ["--image", image, "--support", image, labels, "--labels", "liver",
                                       "--output", output], "unknown label 'liver'")
    _expect_refusal(capsys, tmp_path, ["--image", image, "--support", image, labels, "--labels", "99",
                                       "--output", output], "absent from every support")
    _expect_refusal(capsys, tmp_path, ["--image", image, "--support", image, labels, "--uncertainty",
                                       tmp_path / "u.nii.gz", "--output", output], "--ensemble 2")
    _expect_refusal(capsys, tmp_path, ["--image", tmp_path / "missing.nii.gz", "--support", image, labels,
                                       "--output", output], "missing.nii.gz")
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(b"keep me")
    _expect_refusal(capsys, tmp_path, ["--image", image, "--support", image, labels, "--output", existing],
                    "exists already")
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(SystemExit):
        main(["incontext", "--image", str(image), "--output", str(output)])  # no --support at all


def test_tyche_draws_candidates_written_beside_the_output_and_their_spread_is_the_uncertainty(
        tmp_path, capsys, monkeypatch):
    from reference_fixtures import official_checkpoint

    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "tyche_v1_model_weights_CVPR.pt"
    weights.write_bytes(official_checkpoint("tyche"))  # the official layout (fixture weights)
    assert run_cli(capsys, "models", "import", "tyche", weights)[0] == 0
    support_labels, truth = half_labelled_chest(tmp_path, keep=slice(20, 22))
    output, uncertainty = tmp_path / "result.nii.gz", tmp_path / "spread.nii.gz"
    common = ("incontext", "--model", "tyche", "--image", CHEST / "image.nii.gz", "--support",
              CHEST / "image.nii.gz", support_labels, "--labels", "right lung", "--output", output,
              "--support-size", "2", "--match", "index", "--no-progress")
    code, out, err = run_cli(capsys, *common, "--candidates", "1")
    assert code == 2 and "at least 2" in err and not output.exists()
    code, out, err = run_cli(capsys, *common, "--candidates", "3", "--uncertainty", uncertainty)
    assert code == 0, err
    drawn = [tmp_path / f"result.candidate{k}.nii.gz" for k in (1, 2, 3)]
    assert all(path.is_file() for path in drawn) and "3 candidate segmentations" in out
    maps = [read_labelmap(path)[0].array for path in drawn]
    assert all(m.shape == truth.shape for m in maps)
    spread = read_volume(uncertainty).array  # synthetic weights: the candidates' probabilities differ, the
    assert spread.shape == truth.shape and spread.max() > 1e-3  # thresholded maps may not
    output.unlink(), (tmp_path / "result.labels.json").unlink()
    code, _, err = run_cli(capsys, *common, "--candidates", "3")
    assert code == 2 and "candidate1" in err and not output.exists()  # no overwrite of an earlier candidate
    code, _, err = run_cli(capsys, "incontext", "--image", CHEST / "image.nii.gz", "--support",
                           CHEST / "image.nii.gz", support_labels, "--labels", "right lung", "--output",
                           tmp_path / "other.nii.gz", "--candidates", "2", "--no-progress")
    assert code == 2 and "draws no candidates" in err and not (tmp_path / "other.nii.gz").exists()
