"""``fmseg adapt`` then ``fmseg segment`` / ``fmseg prompt --adapter`` end to end on real scans, and refusals of
bad input (exit 2, one line naming the file, nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from FMSegCore.bench.metrics import dice
from FMSegCore.cli.main import main
from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import read_volume
from FMSegCore.zoo.cache import resources_dir

DATA = resources_dir() / "SampleData"
CHEST = DATA / "ct_chest_small"
ABDOMEN = DATA / "ct_abdomen_pelvis"
MR = DATA / "mr_abdomen"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sparse_chest(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The chest CT's labels kept on every eighth axial slice only (a few painted slices)."""
    from test_incontext_cli import half_labelled_chest

    return half_labelled_chest(tmp_path_factory.mktemp("chest"), keep=slice(4, None, 8))


@pytest.fixture(scope="module")
def auto_adapter(sparse_chest, tmp_path_factory) -> tuple[Path, str]:
    labels, _ = sparse_chest
    output = tmp_path_factory.mktemp("adapter") / "lungs.fmseg-adapter.pt"
    code = main(["adapt", "--method", "decoder", "--mode", "auto", "--train", str(CHEST / "image.nii.gz"), str(labels),
                 "--labels", "right lung", "left lung", "--steps", "120", "--views", "8", "--output", str(output),
                 "--no-progress"])
    assert code == 0
    return output, ""


def test_adapter_file_is_small_and_describes_itself(auto_adapter):
    from FMSegCore.engines.adaptation.adapter_file import load_adapter

    path, _ = auto_adapter
    assert path.stat().st_size < 5e6
    meta = load_adapter(path).metadata
    assert meta["base_model"] == "litemedsam" and len(meta["base_sha256"]) == 64
    assert meta["mode"] == "auto" and meta["method"]["method"] == "decoder"
    assert [s["name"] for s in meta["structures"]] == ["right lung", "left lung"]
    assert [s["value"] for s in meta["structures"]] == [5, 6]  # the cases' own label values
    assert meta["cases"] == 1 and len(meta["cases_sha256"]) == 64
    assert meta["modality"] == "CT" and {"torch", "monai", "numpy", "fmseg"} <= set(meta["versions"])
    assert 0 < meta["trainable_parameters"] < 1_000_000 and meta["fit"]["steps"] <= 120
    assert meta["geometry"]["pixel_mm"] == 1.5 and meta["geometry"]["orientation"] == "LPS" and meta["views"] == 8


def test_segment_learns_the_unlabelled_slices(auto_adapter, sparse_chest, tmp_path, capsys):
    path, _ = auto_adapter
    _, truth = sparse_chest
    output = tmp_path / "lungs.seg.nrrd"
    code, out, err = run_cli(capsys, "segment", "--image", CHEST / "image.nii.gz", "--adapter", path,
                             "--output", output, "--no-progress")
    assert code == 0, err
    assert "right lung" in out and "left lung" in out
    labels, segments = read_labelmap(output, reference=read_volume(CHEST / "image.nii.gz"))
    assert {s.value: s.name for s in segments} == {5: "right lung", 6: "left lung"}
    _, trained = read_labelmap(sparse_chest[0])
    colors = {s.name: s.color for s in trained}
    assert all(segment.color == colors[segment.name] for segment in segments)  # the cases' colours carried over
    unlabelled = [k for k in range(truth.shape[0]) if k % 8 != 4]
    for value in (5, 6):
        assert dice(labels.array[unlabelled] == value, truth[unlabelled] == value) > 0.7



def test_a_cohort_run_with_the_adapter_gives_what_fmseg_segment_gives(auto_adapter, tmp_path, capsys):
    """``fmseg batch --adapter`` over a folder: voxel-equal to ``fmseg segment --adapter`` on the same scan (a
    12-slice slab of the chest CT, to keep the test short), the adapter's structures named, volumes in the table."""
    import SimpleITK as sitk

    path, _ = auto_adapter
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(CHEST / "image.nii.gz"))[:, :, 10:22], str(scans / "chest.nrrd"))
    code, out, err = run_cli(capsys, "batch", "--inputs", scans, "--output", tmp_path / "cohort", "--adapter", path,
                             "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "1 case(s) done now" in out
    single = tmp_path / "single.seg.nrrd"
    assert run_cli(capsys, "segment", "--image", scans / "chest.nrrd", "--adapter", path, "--output", single,
                   "--device", "cpu", "--no-progress")[0] == 0
    expected, _ = read_labelmap(single)
    labels, segments = read_labelmap(tmp_path / "cohort" / "chest.seg.nrrd")
    assert {s.value: s.name for s in segments} == {5: "right lung", 6: "left lung"}
    assert (expected.array > 0).sum() > 1000
    assert np.array_equal(labels.array, expected.array)
    table = (tmp_path / "cohort" / "results.csv").read_text()
    assert "right lung_ml" in table and "left lung_ml" in table


def test_prompt_mode_adapter_plugs_into_fmseg_prompt(tmp_path, capsys):
    from test_cli_prompt import KIDNEY_BOX, roi_markup

    labels = ABDOMEN / "label.nii.gz"
    adapter = tmp_path / "kidney.pt"
    code, out, err = run_cli(capsys, "adapt", "--mode", "prompt", "--method", "decoder", "--train",
                             ABDOMEN / "image.nii.gz", labels, "--labels", "kidney_left", "--steps", "3",
                             "--batch-size", "2", "--output", adapter, "--no-progress")
    assert code == 0, err
    assert "prompt mode" in out and adapter.exists()
    image = read_volume(ABDOMEN / "image.nii.gz")
    roi = roi_markup(tmp_path / "kidney_left.mrk.json", image, KIDNEY_BOX)
    result = tmp_path / "kidney.nii.gz"
    code, out, err = run_cli(capsys, "prompt", "--image", ABDOMEN / "image.nii.gz", "--prompts", roi,
                             "--adapter", adapter, "--output", result, "--no-progress")
    assert code == 0, err
    predicted = read_volume(result).array > 0
    truth = read_labelmap(labels, reference=image)[0].array == 3
    region = slice(KIDNEY_BOX[2][0], KIDNEY_BOX[2][1] + 1)
    assert dice(predicted[region], truth[region]) > 0.6
    # the adapter's mode decides where it can be used
    code, _, err = run_cli(capsys, "segment", "--image", ABDOMEN / "image.nii.gz", "--adapter", adapter,
                           "--output", tmp_path / "no.nii.gz")
    assert code == 2 and "fmseg prompt --adapter" in err and not (tmp_path / "no.nii.gz").exists()
    code, _, err = run_cli(capsys, "prompt", "--image", ABDOMEN / "image.nii.gz", "--prompts", roi, "--adapter",
                           adapter, "--model", "universeg-fmseg", "--output", tmp_path / "no.nii.gz")
    # an in-context model is refused before the adapter is read (the engine test checks the base-model rule)
    assert code == 2 and "'universeg-fmseg' is not a promptable model" in err and not (tmp_path / "no.nii.gz").exists()


def test_auto_adapter_is_refused_by_fmseg_prompt(auto_adapter, tmp_path, capsys):
    from test_cli_prompt import KIDNEY_BOX, roi_markup

    path, _ = auto_adapter
    roi = roi_markup(tmp_path / "k.mrk.json", read_volume(ABDOMEN / "image.nii.gz"), KIDNEY_BOX)
    code, _, err = run_cli(capsys, "prompt", "--image", ABDOMEN / "image.nii.gz", "--prompts", roi, "--adapter", path,
                           "--output", tmp_path / "out.nii.gz")
    assert code == 2 and "fmseg segment" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.nii.gz").exists()


def _bad(name: str, tmp_path: Path):
    image, labels = ABDOMEN / "image.nii.gz", ABDOMEN / "label.nii.gz"
    output = tmp_path / "out.pt"
    if name == "grid":
        return ["--train", image, MR / "label.nii.gz", "--output", output], "label.nii.gz"
    if name == "structure":
        return ["--train", image, labels, "--labels", "heart", "--output", output], "unknown structure 'heart'; closest"
    if name == "holdout":
        return ["--train", image, labels, "--holdout", "1", "--output", output], "too few cases for a validation split"
    if name == "exists":
        output.write_bytes(b"keep me")
        return ["--train", image, labels, "--output", output], "exists already"
    if name == "missing":
        return ["--train", tmp_path / "nope.nii.gz", labels, "--output", output], "nope.nii.gz"
    if name == "ending":
        return ["--train", image, labels, "--output", tmp_path / "out"], "end in .pt: use --output " + str(
            tmp_path / "out.fmseg-adapter.pt")
    if name == "pixel-size":
        return ["--train", image, labels, "--pixel-mm", "0", "--output", output], "--pixel-mm must be at least 0.05"
    if name == "linear-probe-prompt":
        return ["--train", image, labels, "--method", "linear-probe", "--mode", "prompt", "--output", output], "--mode auto"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["grid", "structure", "holdout", "exists", "missing", "ending", "pixel-size",
                                  "linear-probe-prompt"])
def test_bad_input_is_refused_with_one_line_and_nothing_written(name, tmp_path, capsys):
    arguments, expected = _bad(name, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = run_cli(capsys, "adapt", *arguments, "--no-progress")
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced


def test_adapt_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = capsys.readouterr().out
    for method in ("lora", "arena", "bitfit", "affine", "adaptformer", "linear-probe", "spatial-adapter",
                   "decoder", "full"):
        assert method in text
