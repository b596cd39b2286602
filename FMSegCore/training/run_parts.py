"""What the trainers' runs share: checkpoints written atomically and resumed, the log as JSON lines, the learning-rate
schedule resumed at a step, and the Dice they log."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch.optim.lr_scheduler import LRScheduler

from FMSegCore.engines.adaptation.trainer import warmup_cosine


class ScheduleConfig(Protocol):
    """The settings of a run's learning-rate schedule."""

    learning_rate: float
    final_learning_rate: float
    warmup_steps: int

    @property
    def steps(self) -> int: ...


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` to a partial file, then rename it: a run stopped mid-write keeps its last checkpoint."""
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def resume(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           device: torch.device) -> int:
    """Load a run's checkpoint (model and optimiser) when there is one: the step it reached, else 0."""
    if not checkpoint.is_file():
        return 0
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def append_log(path: Path, record: dict) -> None:
    """One JSON line appended to the run's log."""
    with open(path, "a") as stream:
        stream.write(json.dumps(record) + "\n")


def schedule(optimizer: torch.optim.Optimizer, config: ScheduleConfig, step: int = 0) -> LRScheduler:
    """The learning-rate schedule (linear warm-up, cosine decay to ``final_learning_rate``) at ``step``: a run
    resumed from a checkpoint takes the rates an uninterrupted one would."""
    for group in optimizer.param_groups:  # a checkpoint's optimiser holds the rate of its last step
        group["lr"] = group["initial_lr"] = config.learning_rate
    scheduler = warmup_cosine(optimizer, config.steps, config.warmup_steps, config.final_learning_rate)
    with warnings.catch_warnings():  # catching up before any optimiser step is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


@torch.no_grad()
def hard_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item Dice of the thresholded prediction, for the log (1 when both masks are empty)."""
    hard = (logits > 0).float()
    dims = tuple(range(1, logits.ndim))
    return (2 * (hard * target).sum(dims) + 1e-6) / (hard.sum(dims) + target.sum(dims) + 1e-6)
