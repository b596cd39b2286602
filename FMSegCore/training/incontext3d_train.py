"""Training of the 3-D in-context network (:mod:`FMSegCore.models.iris`) on episodes: resumable, logged,
configured by a JSON file (``fmseg train incontext3d``).

Each step draws ``batch_size`` episodes (:mod:`FMSegCore.training.incontext3d_data`: a reference patch with its
classes and a query patch of another subject or another crop), encodes each reference into task embeddings and
segments its query, and takes a Dice + cross-entropy step (MONAI ``DiceCELoss``, softmax over background and
the episode's classes) with AdamW under a warm-up + cosine schedule, in bf16 autocast when ``bf16`` is set.

Every ``validate_every`` steps a fixed set of held-out episodes (a training brain template labelled with a
held-out atlas as the reference, the held-out MNI152 template as the query; the held-out CT abdomen against
another crop of itself) is scored: the mean Dice of the episode's classes. ``checkpoint.pt`` (model, optimiser,
step) is written atomically every ``checkpoint_every`` steps and when the run stops (``max_minutes``); the same
command resumes from it. The random stream of step ``n`` is seeded by ``(seed, n)``. The final weights (fp16)
are ``iris3d.pt``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from monai.losses import DiceCELoss

from FMSegCore.models.iris import IrisConfig, IrisNet, iris_checkpoint, load_iris
from FMSegCore.training.incontext3d_data import Episode3D, training_source, validation_episodes
from FMSegCore.training.run_parts import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RunConfig,
    RunLog,
    checkpoint_step,
    open_run,
    save_atomic,
)

WEIGHTS_NAME = "iris3d.pt"


@dataclass
class InContext3DConfig(RunConfig):
    steps: int = 6000
    batch_size: int = 2
    # the network's shape (defaults: the shipped network's, IrisConfig)
    patch_size: int = IrisConfig.patch_size
    spacing_mm: float = IrisConfig.spacing_mm
    features: list[int] = field(default_factory=lambda: list(IrisConfig.features))
    embed_dim: int = IrisConfig.embed_dim
    query_tokens: int = IrisConfig.query_tokens
    heads: int = IrisConfig.heads
    max_classes: int = 3
    learning_rate: float = 1e-3
    final_learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    gradient_clip: float = 1.0
    bf16: bool = False
    source_weights: dict[str, float] = field(default_factory=lambda: {"brain": 0.45, "body": 0.3,
                                                                      "synthetic": 0.25})
    seed: int = 0
    threads: int = 1  # torch threads (0: leave as is)
    checkpoint_every: int = 100
    log_every: int = 20
    validate_every: int = 200  # 0: no validation
    validation_episodes: int = 24
    query_anywhere: float = 0.0  # share of pair episodes whose query is cut anywhere in the body
    initial_weights: str = ""  # a fresh run starts from these weights (an iris checkpoint) instead of random

    def network(self) -> IrisConfig:
        return IrisConfig(patch_size=self.patch_size, spacing_mm=self.spacing_mm, features=tuple(self.features),
                          embed_dim=self.embed_dim, query_tokens=self.query_tokens, heads=self.heads)


def episode_logits(model: IrisNet, episode: Episode3D, device: torch.device) -> torch.Tensor:
    """Logits ``(1, K + 1, P, P, P)`` of an episode's query."""
    task = model.encode_task(episode.reference[None].to(device), episode.reference_masks[None].to(device))
    return model.predict(episode.query[None].to(device), task)


def class_dice(logits: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Dice of each class (1..K) of the arg-max prediction (1 when a class is absent from both)."""
    predicted = logits.argmax(dim=1)[0].cpu()
    scores = []
    for value in range(1, logits.shape[1]):
        a, b = predicted == value, target == value
        total = int(a.sum() + b.sum())
        scores.append(1.0 if total == 0 else 2 * float((a & b).sum()) / total)
    return scores


@torch.no_grad()
def validate(model: IrisNet, episodes: list[Episode3D], device: torch.device) -> dict[str, float]:
    """Mean class Dice over the held-out episodes, overall and per source."""
    model.eval()
    by_source: dict[str, list[float]] = {}
    for episode in episodes:
        by_source.setdefault(episode.source, []).extend(class_dice(episode_logits(model, episode, device),
                                                                   episode.target))
    model.train()
    result = {"val_dice": float(np.mean([d for scores in by_source.values() for d in scores]))}
    result.update({f"val_dice_{source}": float(np.mean(scores)) for source, scores in by_source.items()})
    return {key: round(value, 4) for key, value in result.items()}


def train(config: InContext3DConfig, output: Path, device: torch.device, max_minutes: Optional[float] = None,
          progress: bool = True) -> Path:
    """Run (or resume) training into ``output``; returns the path of the final weights."""
    model, optimizer, scheduler, step = open_run(config, output, lambda: IrisNet(config.network()), device)
    if step == 0 and config.initial_weights:
        model.load_state_dict(load_iris(Path(config.initial_weights)).to(device).state_dict())
    checkpoint_path, log_path = output / CHECKPOINT_NAME, output / LOG_NAME
    loss_function = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    source = training_source(config.source_weights, config.patch_size, config.spacing_mm, config.max_classes,
                             query_anywhere=config.query_anywhere)
    validation = (validation_episodes(config.validation_episodes, config.seed, config.patch_size,
                                      config.spacing_mm, config.max_classes) if config.validate_every > 0 else [])
    log = RunLog(log_path, config.log_every, config.validate_every if validation else 0, progress)
    while step < config.steps:
        rng = np.random.default_rng([config.seed, step])
        began = time.time()
        episodes = [source.sample(rng) for _ in range(config.batch_size)]
        log.data_seconds += time.time() - began
        optimizer.zero_grad(set_to_none=True)
        step_loss, dices = 0.0, []
        for episode in episodes:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                logits = episode_logits(model, episode, device)
            loss = loss_function(logits.float(), episode.target[None, None].to(device)) / len(episodes)
            loss.backward()
            step_loss += float(loss.detach())
            dices.append(float(np.mean(class_dice(logits.detach(), episode.target))))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        log.add(step_loss, dices)
        log.step_done(step, scheduler.get_last_lr()[0], lambda: validate(model, validation, device))
        if checkpoint_step(checkpoint_path, model, optimizer, step, config.steps, config.checkpoint_every, log,
                           max_minutes):
            break
    weights = output / WEIGHTS_NAME
    save_atomic(iris_checkpoint(model, half=True), weights)
    return weights
