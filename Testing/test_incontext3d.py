"""3-D in-context segmentation (``iris-fmseg``): tasks from reference volumes, task files, tasks applied to query
volumes on any grid, ``fmseg task create`` and ``fmseg incontext --task`` / ``--model iris-fmseg`` end to end,
and their refusals of bad input.

The model's weights may be untrained placeholders: these tests check behaviour (shapes, determinism, grids,
label values, files), never the quality of the segmentation. Crops of the bundled CT keep them fast on one core.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from FMSegCore.cli.main import main
from FMSegCore.engines.incontext.task_file import (
    MAX_TASK_BYTES,
    TASK_FORMAT,
    TaskMetadata,
    load_task,
    save_task,
    select_classes,
)
from FMSegCore.engines.incontext.volume3d import apply_task, create_task, to_model_grid
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import read_labelmap, write_labelmap
from FMSegCore.io.volume import Volume, read_volume, write_volume
from FMSegCore.models.factory import load_model
from FMSegCore.zoo.cache import resources_dir
from FMSegCore.zoo.registry import get_card

CT = resources_dir() / "SampleData" / "ct_abdomen_pelvis"
MODEL = "iris-fmseg"
LIVER, SPLEEN = 5, 1


def crop(volume: Volume, start_kji: tuple[int, int, int], stop_kji: tuple[int, int, int]) -> Volume:
    """A sub-volume with its geometry (origin moved to its first voxel)."""
    box = tuple(slice(a, b) for a, b in zip(start_kji, stop_kji))
    origin = volume.ijk_to_lps(np.array(start_kji[::-1], dtype=float))[0]
    return Volume(np.ascontiguousarray(volume.array[box]), volume.spacing, tuple(origin),
                  np.array(volume.direction, dtype=float))


def flip_i(volume: Volume) -> Volume:
    """The same voxels in the same physical places, stored with the I axis reversed (direction updated)."""
    direction = np.array(volume.direction, dtype=float)
    last = volume.array.shape[2] - 1
    origin = volume.ijk_to_lps(np.array([last, 0, 0], dtype=float))[0]
    direction[:, 0] = -direction[:, 0]
    return Volume(np.ascontiguousarray(volume.array[:, :, ::-1]), volume.spacing, tuple(origin), direction)


def resample(volume: Volume, spacing: tuple[float, float, float]) -> Volume:
    """The volume on a grid of another spacing (linear), same direction and extent."""
    import SimpleITK as sitk

    image = volume.to_sitk()
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    origin = volume.ijk_to_lps(np.array([(t / s - 1) / 2 for s, t in zip(volume.spacing, spacing)]))[0]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), spacing,
                        image.GetDirection(), -1000.0, sitk.sitkFloat32)
    return Volume.from_sitk(out)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(MODEL, "cpu")


@pytest.fixture(scope="module")
def ct():
    image = read_volume(CT / "image.nii.gz")
    labels, segments = read_labelmap(CT / "label.nii.gz", reference=image)
    return image, labels, {s.value: s for s in segments}


@pytest.fixture(scope="module")
def reference(ct):
    """A crop around the liver and the spleen (upper abdomen), as (image, labels)."""
    image, labels, _ = ct
    start, stop = (72, 20, 8), (112, 90, 106)
    return crop(image, start, stop), crop(labels, start, stop)


@pytest.fixture(scope="module")
def query(ct):
    """Another, smaller crop of the same scan (the model grid holds 8 windows)."""
    image, _, _ = ct
    return crop(image, (74, 28, 40), (112, 84, 100))


@pytest.fixture(scope="module")
def classes(ct):
    return [ct[2][LIVER], ct[2][SPLEEN]]


@pytest.fixture(scope="module")
def built(model, reference, classes):
    return create_task(model, [reference], classes, modality="CT")


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference, query, ct):
    """The reference and query crops as files (labels with their labels.json)."""
    folder = tmp_path_factory.mktemp("incontext3d")
    image, labels = reference
    write_volume(image, folder / "ref.nii.gz")
    write_labelmap(labels.array, image, folder / "ref_labels.nii.gz", list(ct[2].values()))
    write_volume(query, folder / "query.nii.gz")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def one_core(monkeypatch):
    """The CLI would use every core (tune_cpu_runtime): keep to one in the tests."""
    monkeypatch.setattr("FMSegCore.device.tune_cpu_runtime", lambda threads=None: None)


# --------------------------------------------------------------------------------------------- the engine


def test_task_has_one_embedding_per_class_and_is_reproducible(model, reference, classes, built):
    assert built.task.shape == (len(classes), *model.task_shape)
    assert built.task.dtype == torch.float32 and bool(torch.isfinite(built.task).all())
    assert built.weights.shape == (1, 2) and (built.weights > 0).all()
    assert 1 <= built.patches[0] <= 8
    again = create_task(model, [reference], classes, modality="CT")
    assert torch.equal(again.task, built.task)
    assert again.references_sha256 == built.references_sha256


def test_references_average_per_class_by_foreground(model, reference, classes, built, ct):
    image, labels = reference
    no_spleen = labels.with_array(np.where(labels.array == SPLEEN, 0, labels.array))
    mixed = create_task(model, [reference, (image, no_spleen)], classes, modality="CT")
    assert mixed.weights[1, 1] == 0 and mixed.weights[1, 0] > 0  # the spleen is absent from the second
    torch.testing.assert_close(mixed.task[1], built.task[1])  # ... so the spleen's task is the first one's
    assert mixed.references_sha256 != built.references_sha256
    with pytest.raises(InputError, match="spleen.*absent from every reference"):
        create_task(model, [(image, no_spleen)], classes, modality="CT")


def test_model_grid_is_the_same_for_a_flipped_copy(model, reference):
    image, labels = reference
    plain = to_model_grid(image, model, "CT", labels=labels.array)
    flipped = flip_i(image)
    turned = to_model_grid(flipped, model, "CT", labels=labels.array[:, :, ::-1])
    assert turned.origin == pytest.approx(plain.origin) and turned.shape == plain.shape
    assert turned.spacing == tuple(model.patch_spacing_mm)
    np.testing.assert_allclose(turned.image, plain.image, atol=1e-5)
    assert np.array_equal(turned.labels, plain.labels)
    # the grid covers the volume's physical extent at the model's spacing
    extent = np.array(image.shape_ijk) * np.array(image.spacing)
    assert np.all(np.abs(np.array(plain.shape[::-1]) * 2.5 - extent) < 2.5)
    # and an array on it maps back to the same physical places of either copy
    values = np.random.default_rng(0).random(plain.shape).astype(np.float32)
    np.testing.assert_allclose(turned.to_source(values)[:, :, ::-1], plain.to_source(values), atol=1e-5)


def test_applied_task_labels_lie_on_the_query_grid(model, built, query, classes):
    result = apply_task(model, built.task, query, classes, modality="CT", probabilities=True, uncertainty=True)
    assert result.labels.shape == query.array.shape and result.labels.dtype == np.uint16
    assert set(np.unique(result.labels)) <= {0, LIVER, SPLEEN}
    assert result.probabilities.shape == (3, *query.array.shape)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert 0.0 <= result.uncertainty.min() and result.uncertainty.max() <= 1.0
    # without probabilities, the labels come from the region where a class can win only: the same labels
    assert np.mean(apply_task(model, built.task, query, classes, modality="CT").labels == result.labels) > 0.9999
    # the same voxels stored with the I axis reversed give the same result in the same places
    turned = apply_task(model, built.task, flip_i(query), classes, modality="CT")
    assert np.mean(turned.labels[:, :, ::-1] == result.labels) > 0.999
    # another spacing: labels on that grid
    coarse = resample(query, (4.0, 3.5, 5.0))
    other = apply_task(model, built.task, coarse, classes, modality="CT")
    assert other.labels.shape == coarse.array.shape
    assert set(np.unique(other.labels)) <= {0, LIVER, SPLEEN}


def test_labels_computed_where_a_class_can_win_equal_the_whole_grid_argmax(model, query):
    from FMSegCore.engines.incontext.volume3d import _labels_in_region

    for volume in (query, flip_i(query), resample(query, (1.3, 2.2, 3.1))):
        grid = to_model_grid(volume, model, "CT")
        softmax = np.zeros((3, *grid.shape), np.float32)
        softmax[0] = 1.0
        k, j, i = (n // 3 for n in grid.shape)
        softmax[:, k:2 * k, j:2 * j, i:i + 3] = [[[[0.2]]], [[[0.7]]], [[[0.1]]]]  # class 1 wins in a block
        softmax[:, k:k + 2, j:j + 2, 2 * i:2 * i + 2] = [[[[0.3]]], [[[0.1]]], [[[0.6]]]]  # class 2 elsewhere
        values = np.array([0, 7, 9], np.uint16)
        expected = np.stack([grid.to_source(softmax[c], True, 1.0 if c == 0 else 0.0) for c in range(3)])
        full = values[expected.argmax(axis=0)]
        fast = _labels_in_region(grid, softmax, values)
        assert (full > 0).sum() > 50 and set(np.unique(full)) == {0, 7, 9}
        assert np.array_equal(fast, full)
    empty = np.zeros((3, *grid.shape), np.float32)
    empty[0] = 1.0
    assert not _labels_in_region(grid, empty, values).any()


def test_query_smaller_than_a_patch(model, built, query, classes):
    small = crop(query, (10, 10, 10), (18, 20, 22))  # 24 x 30 x 36 mm: less than one 120 mm patch
    result = apply_task(model, built, small, classes, modality="CT")  # create_task's result works as the task
    assert result.labels.shape == small.array.shape
    assert set(np.unique(result.labels)) <= {0, LIVER, SPLEEN}


# --------------------------------------------------------------------------------------------- task files


def metadata_of(built, classes) -> TaskMetadata:
    return TaskMetadata(model=MODEL, model_sha256=get_card(MODEL).sha256, classes=list(classes),
                        spacing_mm=(2.5, 2.5, 2.5), patch_shape=(48, 48, 48), references=1,
                        references_sha256=built.references_sha256, modality="CT",
                        class_voxels=[float(v) for v in built.class_weights], created="2025-01-01T00:00:00+00:00")


def test_task_file_round_trip(tmp_path, built, classes):
    path = tmp_path / "liver.fmseg-task"
    metadata = metadata_of(built, classes)
    save_task(path, built.task, metadata)
    assert path.stat().st_size < MAX_TASK_BYTES
    assert [p.name for p in tmp_path.iterdir()] == ["liver.fmseg-task"]  # no partial file left
    task, loaded = load_task(path, model=MODEL)
    assert torch.equal(task, built.task) and loaded == metadata
    raw = torch.load(str(path), weights_only=True)
    assert raw["format"] == TASK_FORMAT and raw["version"] == 1
    # never over an existing file unless asked
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists"):
        save_task(path, built.task * 2, metadata)
    assert path.read_bytes() == before
    save_task(path, built.task * 2, metadata, overwrite=True)
    assert torch.equal(load_task(path)[0], built.task * 2)
    # classes by name or value, in the order asked
    chosen, narrowed = load_task(path, classes=["Spleen", str(LIVER)])
    assert [c.value for c in narrowed.classes] == [SPLEEN, LIVER]
    assert torch.equal(chosen, built.task[[1, 0]] * 2)
    with pytest.raises(InputError, match="name must end"):
        save_task(tmp_path / "task.pt", built.task, metadata)


def _edited(path: Path, out: Path, **changes) -> Path:
    data = torch.load(str(path), weights_only=True)
    data.update(changes)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    out.write_bytes(buffer.getvalue())
    return out


def test_bad_task_files_are_refused_in_one_line(tmp_path, built, classes):
    good = tmp_path / "good.fmseg-task"
    save_task(good, built.task, metadata_of(built, classes))
    cases = {
        "not an FMSeg task file": tmp_path / "text.fmseg-task",
        "damaged or truncated": tmp_path / "cut.fmseg-task",
        "a torch file of something else": tmp_path / "tensor.fmseg-task",
        "made for model 'universeg-fmseg'": tmp_path / "other.fmseg-task",
        "other weights": tmp_path / "weights.fmseg-task",
        "2 task rows for 1 classes": tmp_path / "rows.fmseg-task",
    }
    cases["not an FMSeg task file"].write_text("hello")
    cases["damaged or truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(torch.zeros(3), str(cases["a torch file of something else"]))
    _edited(good, cases["made for model 'universeg-fmseg'"], model="universeg-fmseg")
    _edited(good, cases["other weights"], model_sha256="0" * 64)
    _edited(good, cases["2 task rows for 1 classes"], classes=[{"value": 1, "name": "x", "color": [1, 0, 0]}])
    for fragment, path in cases.items():
        with pytest.raises(InputError) as caught:
            load_task(path, model=MODEL)
        message = str(caught.value)
        assert fragment in message and str(path) in message and "\n" not in message, message
    with pytest.raises(InputError, match="no class 'kidney'"):
        load_task(good, classes=["kidney"])
    task, metadata = load_task(good)
    with pytest.raises(InputError, match="no class '7'"):
        select_classes(task, metadata, ["7"], good)


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_task_create_then_apply(tmp_path, capsys, files, one_core, query):
    task = tmp_path / "upper.fmseg-task"
    code, out, err = run_cli(capsys, "task", "create", "--support", files / "ref.nii.gz", files / "ref_labels.nii.gz",
                             "--labels", "liver", str(SPLEEN), "--output", task, "--modality", "ct",
                             "--no-progress")
    assert code == 0, err
    assert "liver" in out and "spleen" in out and task.exists()
    _, metadata = load_task(task, model=MODEL)
    assert [c.name for c in metadata.classes] == ["liver", "spleen"] and metadata.references == 1
    assert metadata.modality == "CT" and metadata.model_sha256 == get_card(MODEL).sha256
    code, out, err = run_cli(capsys, "task", "info", task)
    assert code == 0 and "liver" in out and MODEL in out, err
    output = tmp_path / "result.seg.nrrd"
    code, out, err = run_cli(capsys, "incontext", "--task", task, "--image", files / "query.nii.gz",
                             "--output", output, "--modality", "CT", "--no-progress")
    assert code == 0, err
    labels, segments = read_labelmap(output, reference=read_volume(files / "query.nii.gz"))
    assert {s.value: s.name for s in segments} == {LIVER: "liver", SPLEEN: "spleen"}
    assert labels.array.shape == query.array.shape
    assert set(np.unique(labels.array)) <= {0, LIVER, SPLEEN}
    # one class of the task only, with the task's model named explicitly
    single = tmp_path / "liver.nii.gz"
    code, _, err = run_cli(capsys, "incontext", "--task", task, "--model", MODEL, "--labels", "liver",
                           "--image", files / "query.nii.gz", "--output", single, "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "liver.labels.json").read_text()) == {str(LIVER): "liver"}
    assert set(np.unique(read_volume(single, allow_empty=True).array)) <= {0, LIVER}


def test_cli_incontext_with_3d_model_and_supports(tmp_path, capsys, files, one_core, query):
    output = tmp_path / "result.nii.gz"
    uncertainty = tmp_path / "entropy.nii.gz"
    code, out, err = run_cli(capsys, "incontext", "--model", MODEL, "--support", files / "ref.nii.gz",
                             files / "ref_labels.nii.gz", "--labels", "spleen", "--image", files / "query.nii.gz",
                             "--output", output, "--uncertainty", uncertainty, "--modality", "CT",
                             "--no-progress")
    assert code == 0, err
    assert "spleen" in out and "entropy" in out
    labels, segments = read_labelmap(output, reference=read_volume(files / "query.nii.gz"))
    assert [(s.value, s.name) for s in segments] == [(SPLEEN, "spleen")]
    entropy = read_volume(uncertainty, allow_empty=True).array
    assert entropy.shape == query.array.shape and 0 <= entropy.min() and entropy.max() <= 1


def _expect_refusal(capsys, folder: Path, argv: list, fragment: str) -> None:
    before = set(folder.rglob("*"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert set(folder.rglob("*")) == before  # nothing written


def test_cli_refuses_bad_input(tmp_path, capsys, files, built, classes):
    query = files / "query.nii.gz"
    output = tmp_path / "out.seg.nrrd"
    good = tmp_path / "good.fmseg-task"
    save_task(good, built.task, metadata_of(built, classes))
    text = tmp_path / "text.fmseg-task"
    text.write_text("not a task")
    cut = tmp_path / "cut.fmseg-task"
    cut.write_bytes(good.read_bytes()[:1000])
    other = _edited(good, tmp_path / "other.fmseg-task", model="universeg-fmseg")
    run = ["incontext", "--image", query, "--output", output, "--no-progress"]
    _expect_refusal(capsys, tmp_path, [*run, "--task", text], "not an FMSeg task file")
    _expect_refusal(capsys, tmp_path, [*run, "--task", cut], "damaged or truncated")
    _expect_refusal(capsys, tmp_path, [*run, "--task", other], "'universeg-fmseg'")
    _expect_refusal(capsys, tmp_path, [*run, "--task", good, "--model", "universeg-fmseg"],
                    "task made for model 'iris-fmseg', not 'universeg-fmseg'")
    _expect_refusal(capsys, tmp_path, [*run, "--task", good, "--labels", "kidney"], "no class 'kidney'")
    _expect_refusal(capsys, tmp_path, [*run, "--task", tmp_path / "missing.fmseg-task"], "file not found")
    _expect_refusal(capsys, tmp_path, [*run, "--model", MODEL, "--support", files / "ref.nii.gz",
                                       files / "ref_labels.nii.gz", "--labels", "heart"], "unknown label 'heart'")
    existing = tmp_path / "existing.seg.nrrd"
    existing.write_bytes(b"keep me")
    _expect_refusal(capsys, tmp_path, ["incontext", "--image", query, "--output", existing, "--task", good],
                    "exists already")
    assert existing.read_bytes() == b"keep me"
    _expect_refusal(capsys, tmp_path, ["task", "create", "--support", files / "ref.nii.gz",
                                       files / "ref_labels.nii.gz", "--output", tmp_path / "x.fmseg-task",
                                       "--model", "universeg-fmseg"], "2-D incontext model")
    _expect_refusal(capsys, tmp_path, ["task", "create", "--support", files / "ref.nii.gz",
                                       files / "ref_labels.nii.gz", "--output", tmp_path / "x.pt"],
                    "unknown output format")
    _expect_refusal(capsys, tmp_path, ["task", "create", "--support", files / "ref.nii.gz",
                                       files / "ref_labels.nii.gz", "--output", good], "exists already")
    # exactly one of --task and --support (argparse: usage, then the error line, exit 2)
    for extra in ([], ["--task", good, "--support", files / "ref.nii.gz", files / "ref_labels.nii.gz"]):
        before = set(tmp_path.rglob("*"))
        with pytest.raises(SystemExit) as stopped:
            main([str(a) for a in [*run, *extra]])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--support" in err and "--task" in err, err
        assert set(tmp_path.rglob("*")) == before
    # the library function says the same in one line
    from FMSegCore.cli.incontext_cmd import incontext_to_file

    with pytest.raises(InputError, match="either --support"):
        incontext_to_file(query, [(files / "ref.nii.gz", files / "ref_labels.nii.gz")], output, task=good)
    with pytest.raises(InputError, match="either --support"):
        incontext_to_file(query, [], output)


def test_a_ct_task_on_an_mr_is_refused_unless_asked(tmp_path, capsys, files, built, classes, one_core):
    from FMSegCore.cli.incontext3d import task_metadata

    task = tmp_path / "ct.fmseg-task"
    save_task(task, built.task, task_metadata(MODEL, load_model(MODEL, "cpu"), built, "CT", "abdomen"))
    mr = read_volume(resources_dir() / "SampleData" / "mr_abdomen" / "image.nii.gz")
    small = crop(mr, (0, 0, 0), (min(12, mr.array.shape[0]), 64, 64))
    write_volume(small, tmp_path / "mr.nii.gz")
    output = tmp_path / "mr_result.nii.gz"
    code, _, err = run_cli(capsys, "incontext", "--task", task, "--image", tmp_path / "mr.nii.gz",
                           "--output", output, "--no-progress")
    assert code == 2 and "mr.nii.gz" in err and "MR" in err and "--cross-modality" in err
    assert len(err.strip().splitlines()) == 1 and not output.exists()
    code, _, err = run_cli(capsys, "incontext", "--task", task, "--image", tmp_path / "mr.nii.gz",
                           "--output", output, "--cross-modality", "--no-progress")
    assert code == 0 and output.exists(), err
