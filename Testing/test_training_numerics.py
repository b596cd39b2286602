"""The shared Dice + BCE loss (MONAI's Dice) and warm-up + cosine schedule (torch's schedulers) give the numbers
the published adapters and weights were trained with: checked against the formulas, written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from FMSegCore.engines.adaptation.losses import dice_bce_loss
from FMSegCore.engines.adaptation.trainer import TrainSettings, fit, warmup_cosine
from FMSegCore.training.meta_train import Stage, TrainConfig, hard_dice, schedule


def _bce(logit: float, target: float) -> float:
    return max(logit, 0.0) - logit * target + math.log1p(math.exp(-abs(logit)))


def _sigmoid(logit: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit))


def reference_loss(logits: np.ndarray, target: np.ndarray, known: np.ndarray, batch: bool) -> float:
    """In float64: BCE averaged over the known (sample, structure) pairs' pixels, plus 1 - (2I + 1) / (P + T + 1),
    summed over the known samples per structure (batch) or per known pair, averaged."""
    samples, classes = logits.shape[:2]
    logits = logits.reshape(samples, classes, -1).astype(np.float64)
    target = target.reshape(samples, classes, -1).astype(np.float64)
    pairs = [(b, c) for b in range(samples) for c in range(classes) if known[b, c]]
    bce = np.mean([np.mean([_bce(x, y) for x, y in zip(logits[b, c], target[b, c])]) for b, c in pairs])
    probability = _sigmoid(logits)
    if batch:
        groups = [[(b, c) for b in range(samples) if known[b, c]] for c in range(classes)]
        groups = [group for group in groups if group]
    else:
        groups = [[pair] for pair in pairs]
    losses = []
    for group in groups:
        intersection = sum(float((probability[b, c] * target[b, c]).sum()) for b, c in group)
        total = sum(float(probability[b, c].sum() + target[b, c].sum()) for b, c in group)
        losses.append(1 - (2 * intersection + 1) / (total + 1))
    return float(bce + np.mean(losses))


@pytest.mark.parametrize("batch", [True, False], ids=["batch-dice", "per-sample-dice"])
def test_the_loss_matches_the_formula_with_partial_labels_and_empty_masks(batch):
    rng = np.random.default_rng(3)
    worst = 0.0
    for trial in range(12):
        samples, classes = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        logits = rng.normal(0.0, 3.0, (samples, classes, 12, 10)).astype(np.float32)
        target = (rng.random((samples, classes, 12, 10)) > rng.uniform(0.3, 0.95)).astype(np.float32)
        target[0, 0] = 0  # an empty mask
        if trial % 3 == 0:
            target[:] = 0  # nothing at all in the batch
        known = rng.random((samples, classes)) > 0.3
        known[0, 0] = True
        for mask in (np.ones_like(known), known):
            value = float(dice_bce_loss(torch.from_numpy(logits), torch.from_numpy(target), torch.from_numpy(mask),
                                        batch=batch))
            worst = max(worst, abs(value - reference_loss(logits, target, mask, batch)))
    assert worst < 1e-6


def test_the_loss_leaves_unknown_pairs_out_and_needs_one_known():
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(size=(2, 2, 8, 8)).astype(np.float32))
    target = torch.from_numpy((rng.random((2, 2, 8, 8)) > 0.5).astype(np.float32))
    known = torch.tensor([[True, False], [True, True]])
    flipped = target.clone()
    flipped[0, 1] = 1 - flipped[0, 1]
    for batch in (True, False):
        assert float(dice_bce_loss(logits, target, known, batch)) == pytest.approx(
            float(dice_bce_loss(logits, flipped, known, batch)), abs=1e-7)
    with pytest.raises(ValueError, match="no labelled structure"):
        dice_bce_loss(logits, target, torch.zeros(2, 2, dtype=torch.bool))
    # the gradient reaches the logits of known pairs only
    logits.requires_grad_(True)
    dice_bce_loss(logits, target, known).backward()
    assert float(logits.grad[0, 1].abs().sum()) == 0.0 and float(logits.grad[0, 0].abs().sum()) > 0


def reference_rate(step: int, steps: int, warmup: int, base: float, final: float = 0.0) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then half a cosine down to ``final`` at ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    share = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * share))


@pytest.mark.parametrize(("steps", "warmup", "final"), [(150, 15, 0.0), (5100, 100, 1e-5), (20, 2, 0.0), (10, 1, 0.0),
                                                        (10, 0, 0.0), (4, 6, 0.0), (1, 1, 0.0)])
def test_the_schedule_gives_every_steps_rate(steps, warmup, final):
    parameters = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    bases = (1e-2, 3e-4) if final == 0.0 else (3e-4,)
    optimiser = torch.optim.AdamW([{"params": [p], "lr": base} for p, base in zip(parameters, bases)])
    scheduler = warmup_cosine(optimiser, steps, warmup, final)
    for step in range(steps):
        for group, base in zip(optimiser.param_groups, bases):
            assert group["lr"] == pytest.approx(reference_rate(step, steps, warmup, base, final), rel=1e-12, abs=1e-18)
        optimiser.step()
        scheduler.step()


def test_meta_training_resumes_its_schedule_at_the_checkpoints_step():
    config = TrainConfig(stages=[Stage(until=60, size=32, batch_size=2)], warmup_steps=8, learning_rate=3e-4,
                         final_learning_rate=1e-5)
    model = torch.nn.Linear(2, 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    running = schedule(optimiser, config)
    rates = []
    for _ in range(30):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        running.step()
    resumed = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    resumed.load_state_dict(optimiser.state_dict())
    resumed.param_groups[0]["lr"] = 1.0  # whatever the checkpoint held
    schedule(resumed, config, step=30)
    assert resumed.param_groups[0]["lr"] == optimiser.param_groups[0]["lr"]
    assert rates[:3] == pytest.approx([3e-4 / 8, 2 * 3e-4 / 8, 3 * 3e-4 / 8], rel=1e-12)
    assert rates == pytest.approx([reference_rate(s, 60, 8, 3e-4, 1e-5) for s in range(30)], rel=1e-12)


def test_hard_dice_scores_each_episode():
    logits = torch.full((3, 1, 4, 4), -1.0)
    target = torch.zeros(3, 1, 4, 4)
    logits[0, 0, :2] = 1.0  # 8 pixels predicted, 4 of them right
    target[0, 0, 1:2] = 1.0
    logits[1, 0, 0, 0] = 1.0  # a pixel predicted where there is nothing
    assert hard_dice(logits, target).tolist() == pytest.approx([2 * 4 / 12, 0.0, 1.0], abs=1e-6)


class _Quadratic:
    """The smallest learner: one parameter pulled towards 1 (fit's loop, not a model, is under test). Its loss
    notes the rate of the step (the optimiser keeps the group dictionaries it is given)."""

    def __init__(self) -> None:
        self.root = torch.nn.Module()
        self.root.weight = torch.nn.Parameter(torch.zeros(1))
        self.groups: list[dict] = []
        self.rates: list[float] = []

    def parameter_groups(self, learning_rate: float, head_learning_rate: float) -> list[dict]:
        self.groups = [{"params": [self.root.weight], "lr": learning_rate}]
        return self.groups

    def sample(self, generator: torch.Generator, batch_size: int) -> None:
        return None

    def loss(self, batch: None) -> torch.Tensor:
        self.rates.append(self.groups[0]["lr"])
        return ((self.root.weight - 1) ** 2).sum()


def test_fit_trains_at_the_scheduled_rates():
    learner = _Quadratic()
    result = fit(learner, TrainSettings(steps=30, warmup_steps=5, patience=None, precision="fp32"), 0.1,
                 torch.device("cpu"))
    assert result.steps == 30 and learner.rates == pytest.approx([reference_rate(s, 30, 5, 0.1) for s in range(30)],
                                                                 rel=1e-12)
    assert 0.5 < float(learner.root.weight.detach()) < 1.5  # it trained
