"""Meta-training of UniverSeg on many segmentation tasks: resumable, logged, configured by a JSON file.

Each step samples a batch of tasks (real brain and body structures, or synthetic ones), a query and a support
set per task, augments each image and each task, predicts the query from its supports and takes a Dice + BCE
step (the adaptation's loss, with a Dice per episode) under the adaptation's warm-up + cosine schedule. Held-out
subjects and atlases (``training.sources``) never enter training; a fixed set of their episodes is scored every
``validate_every`` steps for monitoring (not for choosing a checkpoint: the last one ships).

``checkpoint.pt`` (model, optimiser, step) is written every ``checkpoint_every`` steps, atomically; running the
same command again resumes from it. The random stream of step ``n`` is seeded by ``(seed, n)``, so a resumed run
draws the same episodes as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from FMSegCore.engines.adaptation.losses import dice_bce_loss
from FMSegCore.models.universeg import UniverSeg, build_universeg
from FMSegCore.training.augment import augment_episode
from FMSegCore.training.run_parts import (
    CHECKPOINT_NAME,
    LOG_NAME,
    append_log,
    hard_dice,
    resume,
    save_atomic,
    schedule,
)
from FMSegCore.training.sources import held_out_bank, training_banks
from FMSegCore.training.synthetic_tasks import synthetic_episode
from FMSegCore.training.task_bank import Episode, TaskBank


@dataclass
class Stage:
    """Train at ``size`` pixels with ``batch_size`` tasks per step until step ``until``."""

    until: int
    size: int
    batch_size: int


@dataclass
class TrainConfig:
    stages: list[Stage] = field(default_factory=lambda: [Stage(4600, 64, 8), Stage(5100, 128, 4)])
    support_min: int = 1
    support_max: int = 16
    learning_rate: float = 3e-4
    final_learning_rate: float = 1e-5
    warmup_steps: int = 100
    gradient_clip: float = 1.0
    source_weights: dict[str, float] = field(default_factory=lambda: {"brain": 0.45, "body": 0.25,
                                                                      "synthetic": 0.3})
    precision: str = "bf16"  # bf16 autocast on CPUs with bf16 units (and CUDA), else fp32
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 250
    log_every: int = 20
    validation_episodes: int = 48

    @property
    def steps(self) -> int:
        return self.stages[-1].until

    def stage_at(self, step: int) -> Stage:
        return next((stage for stage in self.stages if step < stage.until), self.stages[-1])

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        data = json.loads(Path(path).read_text())
        stages = [Stage(**stage) for stage in data.pop("stages", [])]
        config = cls(**data)
        if stages:
            config.stages = stages
        return config

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def init_weights(model: UniverSeg) -> None:
    """He initialisation for LeakyReLU convolutions, zero biases (the network has no normalisation layers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
            torch.nn.init.zeros_(module.bias)


def stack_episodes(episodes: list[Episode]) -> tuple[torch.Tensor, ...]:
    return (torch.stack([e.query_image for e in episodes]), torch.stack([e.query_label for e in episodes]),
            torch.stack([e.support_images for e in episodes]), torch.stack([e.support_labels for e in episodes]))


class EpisodeSampler:
    """Draws a batch of augmented episodes from the sources, by the configured weights."""

    def __init__(self, banks: dict[str, TaskBank], weights: dict[str, float], size: int) -> None:
        self.banks, self.size = banks, size
        names = [name for name in weights if name == "synthetic" or name in banks]
        total = sum(weights[name] for name in names)
        self.names, self.probabilities = names, [weights[name] / total for name in names]

    def batch(self, rng: np.random.Generator, batch_size: int, support_size: int) -> tuple[torch.Tensor, ...]:
        episodes = []
        for _ in range(batch_size):
            source = self.names[int(rng.choice(len(self.names), p=self.probabilities))]
            if source == "synthetic":
                episode = synthetic_episode(rng, support_size, self.size)
            else:
                episode = self.banks[source].sample(rng, support_size)
            episodes.append(augment_episode(episode, rng))
        return stack_episodes(episodes)


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def validate(model: UniverSeg, bank: TaskBank, config: TrainConfig, device: torch.device) -> float:
    """Mean Dice over fixed held-out episodes (support size 8, no augmentation)."""
    model.eval()
    rng = np.random.default_rng([config.seed, 999_999])
    scores = []
    for start in range(0, config.validation_episodes, 8):
        episodes = [bank.sample(rng, 8) for _ in range(min(8, config.validation_episodes - start))]
        query, label, images, labels = (t.to(device) for t in stack_episodes(episodes))
        with _autocast(device, config.precision):
            logits = model(query, images, labels)
        scores.append(hard_dice(logits.float(), label))
    model.train()
    return float(torch.cat(scores).mean())


def train(config: TrainConfig, output: Path, device: torch.device, max_minutes: Optional[float] = None,
          progress: bool = True) -> Path:
    """Run (or resume) meta-training into ``output``; returns the path of the final weights."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(config.to_json())
    checkpoint_path, log_path = output / CHECKPOINT_NAME, output / LOG_NAME
    model = build_universeg().to(device)
    init_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    step = resume(checkpoint_path, model, optimizer, device)
    scheduler = schedule(optimizer, config, step)
    model.train()
    started, window_start = time.time(), time.time()
    sampler: Optional[EpisodeSampler] = None
    validation_bank: Optional[TaskBank] = None
    losses: list[float] = []
    dices: list[float] = []
    while step < config.steps:
        stage = config.stage_at(step)
        if sampler is None or sampler.size != stage.size:
            real = tuple(name for name, weight in sorted(config.source_weights.items())
                         if weight > 0 and name != "synthetic")
            sampler = EpisodeSampler(training_banks(stage.size, real), config.source_weights, stage.size)
            validation_bank = held_out_bank(stage.size) if config.validate_every > 0 else None
        rng = np.random.default_rng([config.seed, step])
        support_size = int(rng.integers(config.support_min, config.support_max + 1))
        query, label, images, labels = (t.to(device) for t in sampler.batch(rng, stage.batch_size, support_size))
        with _autocast(device, config.precision):
            logits = model(query, images, labels)
        loss = dice_bce_loss(logits.float(), label, batch=False)
        dice = hard_dice(logits.float(), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(float(loss.detach()))
        dices.append(float(dice.mean()))
        if step % config.log_every == 0:
            seconds = (time.time() - window_start) / config.log_every
            record = {"step": step, "size": stage.size, "loss": round(float(np.mean(losses)), 4),
                      "train_dice": round(float(np.mean(dices)), 4), "lr": round(scheduler.get_last_lr()[0], 7),
                      "seconds_per_step": round(seconds, 3)}
            if validation_bank is not None and step % config.validate_every == 0:
                record["held_out_dice"] = round(validate(model, validation_bank, config, device), 4)
            append_log(log_path, record)
            if progress:
                print(json.dumps(record), flush=True)
            losses, dices, window_start = [], [], time.time()
        last = step == config.steps
        out_of_time = max_minutes is not None and time.time() - started > 60 * max_minutes
        if step % config.checkpoint_every == 0 or last or out_of_time:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                         checkpoint_path)
        if out_of_time:
            break
    weights = output / "universeg_fmseg.pt"
    save_atomic({key: value.detach().float().cpu() for key, value in model.state_dict().items()}, weights)
    return weights
