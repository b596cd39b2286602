"""Training of the 3-D refiner (:mod:`FMSegCore.models.refiner3d`) on simulated interaction: resumable, logged,
configured by a JSON file.

Each step draws ``batch_size`` samples (:mod:`FMSegCore.training.refine3d_data`: a structure of the training
split or a synthetic one, a flawed prior and corrective clicks), turns them into patches with inference's own
crop and resampling, and takes a Dice + BCE step (the adaptation's loss, one Dice per sample) with AdamW under
the adaptation's warm-up + cosine schedule.

Every ``validate_every`` steps a fixed set of held-out samples (MNI152 brain structures of the held-out atlases
and CT abdomen organs, never trained on) is refined end to end (:func:`FMSegCore.engines.prompting.refine3d.refine`:
crop, network, paste back) and scored: the Dice of the prior and the Dice after refinement, so the log shows
whether the network beats its input. ``checkpoint.pt`` (model, optimiser, step) is written atomically every
``checkpoint_every`` steps and when the run stops (``max_minutes``); the same command resumes from it. The
random stream of step ``n`` is seeded by ``(seed, n)``. The final weights (fp16) are ``refiner3d.pt``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from FMSegCore.engines.adaptation.losses import dice_bce_loss
from FMSegCore.engines.prompting.refine3d import refine
from FMSegCore.models.refiner3d import Refiner3D, RefinerConfig, checkpoint_dict
from FMSegCore.preprocessing.overlap import dice
from FMSegCore.training.refine3d_data import Sample, held_out_samples, training_pair, training_source
from FMSegCore.training.run_parts import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RunConfig,
    RunLog,
    checkpoint_step,
    hard_dice,
    open_run,
    save_atomic,
)

WEIGHTS_NAME = "refiner3d.pt"


@dataclass
class Refine3DConfig(RunConfig):
    steps: int = 8000
    batch_size: int = 2
    patch_size: int = 64
    features: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    residual_units: int = 1
    learning_rate: float = 1e-3
    final_learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    gradient_clip: float = 1.0
    source_weights: dict[str, float] = field(default_factory=lambda: {"brain": 0.45, "body": 0.35,
                                                                      "synthetic": 0.2})
    empty_probability: float = 0.15
    min_voxels: int = 200
    seed: int = 0
    threads: int = 1  # torch threads (0: leave as is)
    checkpoint_every: int = 200
    log_every: int = 20
    validate_every: int = 250  # 0: no validation
    validation_samples: int = 32
    validation_sources: list[str] = field(default_factory=lambda: ["brain", "body"])

    def network(self) -> RefinerConfig:
        return RefinerConfig(patch_size=self.patch_size, features=tuple(self.features),
                             residual_units=self.residual_units)


def validate(model: Refiner3D, samples: list[Sample], device: torch.device) -> dict[str, float]:
    """Mean Dice of the priors and of their refinements (whole pipeline, on each sample's grid), over all
    samples and apart for the empty priors (first click) and the others."""
    model.eval()
    rows = []
    for sample in samples:
        refined = refine(model, sample.image, sample.prior, sample.clicks, sample.spacing, device)
        rows.append((sample.kind == "empty", dice(sample.prior, sample.truth), dice(refined, sample.truth)))
    model.train()
    empty = np.array([r[0] for r in rows])
    scores = np.array([r[1:] for r in rows], dtype=float)
    result = {"val_prior_dice": scores[:, 0].mean(), "val_refined_dice": scores[:, 1].mean()}
    if (~empty).any():
        result["val_prior_dice_nonempty"] = scores[~empty, 0].mean()
        result["val_refined_dice_nonempty"] = scores[~empty, 1].mean()
    if empty.any():
        result["val_refined_dice_first_click"] = scores[empty, 1].mean()
    return {key: round(float(value), 4) for key, value in result.items()}


def train(config: Refine3DConfig, output: Path, device: torch.device, max_minutes: Optional[float] = None,
          progress: bool = True) -> Path:
    """Run (or resume) training into ``output``; returns the path of the final weights."""
    model, optimizer, scheduler, step = open_run(config, output, lambda: Refiner3D(config.network()), device)
    checkpoint_path, log_path = output / CHECKPOINT_NAME, output / LOG_NAME
    source = training_source(config.source_weights, config.min_voxels, config.empty_probability)
    validation = (held_out_samples(config.validation_samples, config.seed, tuple(config.validation_sources),
                                   config.min_voxels) if config.validate_every > 0 else [])
    log = RunLog(log_path, config.log_every, config.validate_every if validation else 0, progress)
    while step < config.steps:
        rng = np.random.default_rng([config.seed, step])
        began = time.time()
        pairs = [training_pair(source.sample(rng), config.patch_size, rng) for _ in range(config.batch_size)]
        x = torch.stack([p[0] for p in pairs]).to(device)
        target = torch.stack([p[1] for p in pairs]).to(device)
        log.data_seconds += time.time() - began
        logits = model(x)
        loss = dice_bce_loss(logits, target, batch=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        log.add(float(loss.detach()), [float(hard_dice(logits.detach(), target).mean())])
        log.step_done(step, scheduler.get_last_lr()[0], lambda: validate(model, validation, device))
        if checkpoint_step(checkpoint_path, model, optimizer, step, config.steps, config.checkpoint_every, log,
                           max_minutes):
            break
    weights = output / WEIGHTS_NAME
    save_atomic(checkpoint_dict(model, half=True), weights)
    return weights
