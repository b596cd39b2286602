"""The 3-D refiner: crop/resample/paste geometry shared by training and inference, click maps, the simulated
interaction, resumable training and checkpoint loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from FMSegCore.engines.prompting.refine3d import click_maps, crop_for, inputs, paste, refine
from FMSegCore.errors import InputError
from FMSegCore.models.refiner3d import Refiner3D, RefinerConfig, load_refiner, save_refiner
from FMSegCore.preprocessing.overlap import dice
from FMSegCore.training.refine3d_data import (
    SampleSource,
    StructurePool,
    corrective_clicks,
    simulate,
    synthetic_region,
    training_pair,
)
from FMSegCore.training.refine3d_train import Refine3DConfig, train
from FMSegCore.training.sources import TRAINING_BODY_CASES, body_volumes

SHAPE = (40, 70, 60)  # K, J, I
SPACING = (1.5, 1.5, 3.0)  # I, J, K in mm


def ellipsoid(shape=SHAPE, centre=(20, 30, 28), radii=(6, 12, 9)) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1


def test_a_mask_survives_crop_resample_and_paste():
    prior = ellipsoid()
    crop = crop_for(prior, [], SHAPE, SPACING)
    # the box holds the mask with a margin of at least 10 mm (3-4 voxels along K, 6-7 along J, I)
    kk, jj, ii = np.nonzero(prior)
    assert crop.start[0] <= kk.min() - 3 and crop.stop[0] >= kk.max() + 4
    assert crop.start[1] <= jj.min() - 6 and crop.stop[1] >= jj.max() + 7
    assert crop.start[2] <= ii.min() - 6 and crop.stop[2] >= ii.max() + 7
    x = inputs(np.random.default_rng(0).random(SHAPE), prior, [], crop, 32)
    assert x.shape == (4, 32, 32, 32) and x[2:].abs().sum() == 0
    assert abs(float(x[0].mean())) < 1e-4 and abs(float(x[0].std()) - 1) < 0.01  # standardised in the patch
    back = paste(x[1] - 0.5, crop, SHAPE)
    assert back.shape == SHAPE and dice(back, prior) > 0.9
    outside = np.ones(SHAPE, dtype=bool)
    outside[crop.slices()] = False
    assert not paste(torch.ones(32, 32, 32), crop, SHAPE)[outside].any()  # nothing outside the box


def test_crops_are_clipped_shifted_and_sized_in_millimetres():
    corner = ellipsoid(centre=(2, 3, 3), radii=(3, 4, 4))
    crop = crop_for(corner, [], SHAPE, SPACING)
    assert crop.start == (0, 0, 0)
    assert all(0 < b <= s for b, s in zip(crop.stop, SHAPE))
    # at least 40 mm per side: a tiny mask still gets context
    dot = np.zeros(SHAPE, dtype=bool)
    dot[20, 35, 30] = True
    sides = np.array(crop_for(dot, [], SHAPE, SPACING).shape) * np.array(SPACING[::-1])
    assert (sides >= 40).all() and (sides < 50).all()
    # empty prior: a cube of about 80 mm around the include click
    crop = crop_for(np.zeros(SHAPE, bool), [(20, 35, 30, True), (5, 5, 5, False)], SHAPE, SPACING)
    sides = np.array(crop.shape) * np.array(SPACING[::-1])
    assert np.all((sides >= 80) & (sides < 84))
    assert crop.start[0] <= 20 < crop.stop[0] and crop.start[1] <= 35 < crop.stop[1]
    with pytest.raises(ValueError, match="nothing to refine"):
        crop_for(np.zeros(SHAPE, bool), [(5, 5, 5, False)], SHAPE, SPACING)


def test_click_maps_mark_the_clicked_voxels():
    prior = ellipsoid()
    clicks = [(20, 30, 28, True), (14, 40, 30, False), (0, 0, 0, True)]  # the last one is outside the box
    crop = crop_for(prior, clicks[:2], SHAPE, SPACING)
    assert crop.start != (0, 0, 0)
    maps = click_maps(clicks, crop, 48)
    for channel, (k, j, i, _) in zip((0, 1), clicks[:2]):
        expected = crop.to_patch((k, j, i), 48)
        centroid = np.array(ndimage.center_of_mass(maps[channel].numpy()))
        assert np.abs(centroid - expected).max() < 0.05
        volume = float(maps[channel].sum())  # one ball of radius 2-3 voxels, not two
        assert 4 / 3 * np.pi * 2**3 < volume < 4 / 3 * np.pi * 3**3
        back = paste(maps[channel] - 0.5, crop, SHAPE)
        assert back[k, j, i] and back.sum() < 200
    assert float(maps[0].sum()) == pytest.approx(float(click_maps(clicks[:1], crop, 48)[0].sum()))


def test_corrective_clicks_fall_on_the_largest_errors_with_the_right_sign():
    truth = ellipsoid()
    prior = truth.copy()
    prior[:17] = False  # a large missed slab
    blob = ellipsoid(centre=(20, 30, 42), radii=(3, 4, 4)) & ~truth  # a smaller leak
    prior |= blob
    clicks = corrective_clicks(prior, truth, 3)
    assert len(clicks) == 2  # two error components: then nothing is left
    (k0, j0, i0, include0), (k1, j1, i1, include1) = clicks
    assert include0 and truth[k0, j0, i0] and not prior[k0, j0, i0]
    assert not include1 and blob[k1, j1, i1]
    assert corrective_clicks(truth, truth, 3) == []


def test_simulated_samples_are_consistent():
    pool = StructurePool(body_volumes({"mr_abdomen": ("mr",)}))
    assert len(pool.structures) > 10 and all(s.voxels >= 200 for s in pool.structures)
    source = SampleSource({"body": pool}, {"body": 0.7, "synthetic": 0.3})
    rng = np.random.default_rng(3)
    kinds = set()
    for _ in range(24):
        sample = source.sample(rng)
        kinds.add(sample.kind.split("+")[0])
        assert sample.image.shape == sample.truth.shape == sample.prior.shape
        assert sample.truth.sum() >= 100 and ndimage.label(sample.truth)[1] == 1
        assert 0 <= sample.image.min() and sample.image.max() <= 1
        if sample.kind == "empty":
            assert not sample.prior.any() and len(sample.clicks) == 1
        for k, j, i, include in sample.clicks:
            if sample.prior[k, j, i] == sample.truth[k, j, i]:  # the click that started the propagation
                assert include and sample.truth[k, j, i]
            else:  # a corrective click: include on missed structure, exclude on over-segmentation
                assert include == bool(sample.truth[k, j, i])
        x, target = training_pair(sample, 32, rng)
        assert x.shape == (4, 32, 32, 32) and target.shape == (1, 32, 32, 32)
        assert set(torch.unique(target).tolist()) <= {0.0, 1.0} and target.sum() > 0
        if any(c[3] for c in sample.clicks):
            assert x[2].max() == 1
    assert {"empty", "slabs"} & kinds and len(kinds) >= 3


def test_synthetic_regions_hold_a_structure_with_neighbours():
    image, labels, truth, spacing, _ = synthetic_region(np.random.default_rng(5))
    assert image.shape == labels.shape == truth.shape and truth.sum() >= 200
    sample = simulate(image, labels, truth, spacing, np.random.default_rng(1), empty_probability=0.0)
    assert sample.kind != "empty" and sample.prior.any()


def test_refine_pastes_a_full_grid_mask():
    torch.manual_seed(0)
    model = Refiner3D(RefinerConfig(patch_size=32, features=(4, 8, 16))).eval()
    truth = ellipsoid()
    image = np.where(truth, 0.8, 0.2).astype(np.float32)
    refined = refine(model, image, truth, [], SPACING)
    assert refined.shape == SHAPE and refined.dtype == bool
    crop = crop_for(truth, [], SHAPE, SPACING)
    outside = np.ones(SHAPE, dtype=bool)
    outside[crop.slices()] = False
    assert not refined[outside].any()
    assert dice(refined, truth) > 0.5  # the prior's direct path: an untrained refiner keeps roughly its input
    assert not refine(model, image, np.zeros(SHAPE, bool), [(3, 3, 3, False)], SPACING).any()


def test_training_writes_checkpoints_and_resumes(tmp_path):
    config = Refine3DConfig(steps=4, batch_size=1, patch_size=32, features=[4, 8, 16], warmup_steps=2,
                            source_weights={"body": 0.5, "synthetic": 0.5}, checkpoint_every=2, log_every=1,
                            validate_every=2, validation_samples=2, validation_sources=["body"], threads=0)
    assert set(TRAINING_BODY_CASES) == {"mr_abdomen", "ct_chest_small"}
    first = train(config, tmp_path, torch.device("cpu"), max_minutes=0.0, progress=False)  # stops after 1 step
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    weights = train(config, tmp_path, torch.device("cpu"), progress=False)
    assert weights == first
    records = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    scored = [r for r in records if "val_refined_dice" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(0 <= r["val_prior_dice"] <= 1 and 0 <= r["val_refined_dice"] <= 1 for r in scored)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    model = load_refiner(weights)
    assert model.patch_size == 32 and not model.training
    assert model(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


def test_damaged_or_foreign_checkpoints_are_input_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_refiner(Refiner3D(RefinerConfig(patch_size=32, features=(4, 8, 16))), good)
    assert load_refiner(good).patch_size == 32
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"config": {"patch_size": 32, "features": [4, 8, 16]},
                "state_dict": {"weight": torch.zeros(3)}}, foreign)
    bad_config = tmp_path / "bad_config.pt"
    torch.save({"config": {"patch_size": 30, "features": [4, 8, 16]}, "state_dict": {}}, bad_config)
    for path in (truncated, garbage, foreign, bad_config, tmp_path / "missing.pt"):
        with pytest.raises(InputError) as caught:
            load_refiner(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_train_refine3d_command_refuses_a_bad_configuration(tmp_path, capsys):
    from FMSegCore.cli.main import main

    config = tmp_path / "config.json"
    config.write_text('{"steps": 10, "learning_rat": 1}')
    assert main(["train", "refine3d", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(config) in error[0] and "not a valid training configuration" in error[0]
    assert not (tmp_path / "run").exists()
