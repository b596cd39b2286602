"""What the trainers' runs share: checkpoints written atomically and resumed, the log as JSON lines (:class:`RunLog`),
the learning-rate schedule resumed at a step, the Dice they log, and JSON configurations (:class:`RunConfig`)."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from FMSegCore.engines.adaptation.trainer import warmup_cosine

#: File names inside a run folder.
CHECKPOINT_NAME, LOG_NAME = "checkpoint.pt", "train.log"


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


class RunConfig:
    """What the 3-D trainers' configurations share: read from a JSON object (unknown keys refused), written back
    as JSON. Subclasses are dataclasses."""

    @classmethod
    def from_json(cls, path: Path):  # noqa: ANN206 - the subclass
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("the configuration must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)  # type: ignore[call-overload]


class RunLog:
    """A run's figures between two log lines (mean loss and training Dice, seconds per step and in the data),
    written as one JSON line every ``log_every`` steps, with the validation's figures every ``validate_every``."""

    def __init__(self, path: Path, log_every: int, validate_every: int, progress: bool) -> None:
        self.path, self.log_every, self.validate_every, self.progress = path, log_every, validate_every, progress
        self.started = time.time()
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.dices: list[float] = []
        self.data_seconds = 0.0
        self.window_start = time.time()

    def add(self, loss: float, dices: list[float]) -> None:
        self.losses.append(loss)
        self.dices.extend(dices)

    def step_done(self, step: int, learning_rate: float, validate: Callable[[], dict]) -> None:
        """After step ``step``: the log line when one is due (``validate()`` runs when validation is due)."""
        if step % self.log_every:
            return
        count = len(self.losses)
        record = {"step": step, "loss": round(float(np.mean(self.losses)), 4),
                  "train_dice": round(float(np.mean(self.dices)), 4), "lr": round(learning_rate, 7),
                  "seconds_per_step": round((time.time() - self.window_start) / count, 3),
                  "data_seconds_per_step": round(self.data_seconds / count, 3),
                  "minutes": round(self.minutes, 2)}
        if self.validate_every > 0 and step % self.validate_every == 0:
            record.update(validate())
        append_log(self.path, record)
        if self.progress:
            print(json.dumps(record), flush=True)
        self._reset()

    @property
    def minutes(self) -> float:
        return (time.time() - self.started) / 60


def checkpoint_step(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    steps: int, every: int, log: RunLog, max_minutes: Optional[float]) -> bool:
    """Save the run's checkpoint when one is due (every ``every`` steps, at the end, or when the run is out of
    time); True when the run must stop for time."""
    out_of_time = max_minutes is not None and log.minutes > max_minutes
    if step % every == 0 or step == steps or out_of_time:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "config": model.config.to_dict()}, checkpoint)  # type: ignore[operator]
        return out_of_time
    return False


def open_run(config: Any, output: Path, build: Callable[[], torch.nn.Module], device: torch.device
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer, LRScheduler, int]:
    """Start or resume a run in ``output``: torch threads (``config.threads``, 0 leaves them), the config
    written beside the run, the network seeded and built, AdamW, the step reached and the schedule at it."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(config.to_json())
    torch.manual_seed(config.seed)
    model = build().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    step = resume(output / CHECKPOINT_NAME, model, optimizer, device)
    scheduler = schedule(optimizer, config, step)
    model.train()
    return model, optimizer, scheduler, step
