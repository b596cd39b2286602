"""Corrections of an in-context result with prompts (MultiverSeg): ``fmseg incontext --corrections`` predicts the
prompted slices again with the clicks and scribbles, leaves the others, and refuses what it cannot do in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from reference_fixtures import official_state_dict

from FMSegCore.cli.main import main
from FMSegCore.engines.incontext.corrections import slice_masks
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.prompts import CurvePrompt, PointPrompt, SegmentPrompts
from FMSegCore.zoo.cache import resources_dir

CHEST = resources_dir() / "SampleData" / "ct_chest_small"


def _markup(path: Path, image: Volume, kind: str, points_ijk, name: str, description: str = "") -> Path:
    """A Slicer markups file (LPS) of ``kind`` (Fiducial, Curve, ClosedCurve) at IJK positions."""
    points = []
    for number, ijk in enumerate(points_ijk, start=1):
        lps = np.asarray(image.origin) + np.asarray(image.direction) @ (np.asarray(image.spacing) * ijk)
        points.append({"id": str(number), "label": f"{name}-{number}", "position": [float(v) for v in lps],
                       "positionStatus": "defined", "description": description})
    markup = {"type": kind, "name": name, "coordinateSystem": "LPS", "controlPoints": points,
              "description": description}
    path.write_text(json.dumps({"markups": [markup]}))
    return path


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "MultiverSeg_v1_nf256_res128.pt"
    torch.save({"model": official_state_dict("multiverseg")}, weights)  # official layout, fixture weights
    assert main(["models", "import", "multiverseg", str(weights)]) == 0
    label_image = sitk.ReadImage(str(CHEST / "label.nii.gz"))
    labels = sitk.GetArrayFromImage(label_image)
    sparse = np.zeros_like(labels)
    sparse[10:12] = labels[10:12]
    out = sitk.GetImageFromArray(sparse)
    out.CopyInformation(label_image)
    sitk.WriteImage(out, str(tmp_path / "sparse.nii.gz"))
    (tmp_path / "sparse.labels.json").write_text((CHEST / "labels.json").read_text())
    return tmp_path, read_volume(CHEST / "image.nii.gz")


def _run(tmp_path: Path, output: str, model: str, corrections: list[Path], capsys) -> tuple[int, str, str]:
    code = main(["incontext", "--model", model, "--image", str(CHEST / "image.nii.gz"), "--support",
                 str(CHEST / "image.nii.gz"), str(tmp_path / "sparse.nii.gz"), "--labels", "right lung",
                 "--support-size", "2", "--match", "index", "--no-progress", "--output", str(tmp_path / output),
                 *(["--corrections", *map(str, corrections)] if corrections else [])])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def test_a_scribble_changes_its_slice_and_nothing_else(setup, capsys):
    tmp_path, image = setup
    k = 20
    scribble = _markup(tmp_path / "fix.mrk.json", image, "Curve", [(30, 60, k), (50, 64, k), (70, 70, k)],
                       "right lung")
    assert _run(tmp_path, "plain.nii.gz", "multiverseg", [], capsys)[0] == 0
    code, err, out = _run(tmp_path, "fixed.nii.gz", "multiverseg", [scribble], capsys)
    assert code == 0, err
    assert "Corrected 1 slice(s) with the prompts of right lung" in out
    plain = read_labelmap(tmp_path / "plain.nii.gz")[0].array
    fixed = read_labelmap(tmp_path / "fixed.nii.gz")[0].array
    others = [index for index in range(plain.shape[0]) if index != k]
    assert np.array_equal(plain[others], fixed[others])  # only the prompted slice is predicted again


def test_corrections_are_refused_in_one_line_where_they_cannot_apply(setup, capsys):
    tmp_path, image = setup
    off_slice = _markup(tmp_path / "tilted.mrk.json", image, "Curve", [(30, 60, 5), (50, 64, 9)], "right lung")
    code, err, _ = _run(tmp_path, "a.nii.gz", "multiverseg", [off_slice], capsys)
    assert code == 2 and "one slice" in err and err.count("\n") == 1 and not (tmp_path / "a.nii.gz").exists()
    click = _markup(tmp_path / "click.mrk.json", image, "Fiducial", [(40, 60, 20)], "right lung")
    code, err, _ = _run(tmp_path, "b.nii.gz", "universeg-fmseg", [click], capsys)
    assert code == 2 and "interactive" in err and not (tmp_path / "b.nii.gz").exists()
    wrong = _markup(tmp_path / "wrong.mrk.json", image, "Fiducial", [(40, 60, 20)], "liver")
    code, err, _ = _run(tmp_path, "c.nii.gz", "multiverseg", [wrong], capsys)
    assert code == 2 and "'liver'" in err and not (tmp_path / "c.nii.gz").exists()


def test_prompts_become_masks_on_their_slices():
    prompts = SegmentPrompts("x", points=[PointPrompt((3, 4, 2)), PointPrompt((5, 1, 2), include=False)],
                             curves=[CurvePrompt(((1, 1, 7), (6, 1, 7)))])
    masks = slice_masks(prompts, 2, (10, 8, 9))  # K, J, I: axial slices are 8 rows (J) x 9 columns (I)
    assert sorted(masks) == [2, 7]
    assert masks[2].include[4, 3] and masks[2].exclude[1, 5] and masks[2].include.sum() == 1
    assert masks[7].include[1, 1:7].all() and not masks[7].box.any()
    with pytest.raises(InputError, match="outside"):
        slice_masks(SegmentPrompts("x", points=[PointPrompt((3, 4, 12))]), 2, (10, 8, 9))
