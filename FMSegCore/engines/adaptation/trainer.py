"""The training loop every adaptation shares: AdamW with linear warm-up and cosine decay (torch's schedulers,
:func:`warmup_cosine`, which meta-training uses too), early stop on a plateau of the training loss, ARENA's
proximal step, progress callbacks and cooperative cancel.

What a batch is and how its loss is computed belong to a :class:`Learner` (prompted 2D, automatic 2D, 3D), so
new model families plug in without touching this loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from FMSegCore.device import inference_dtype
from FMSegCore.engines.adaptation.lora import arena_penalty, arena_soft_threshold
from FMSegCore.errors import FMSegError
from FMSegCore.progress import ProgressCallback, ProgressClock


class Cancelled(FMSegError):
    """The user cancelled an adaptation; nothing was saved."""


@dataclass
class TrainSettings:
    """How long and how fast to train (defaults: fit a 5-case adaptation in minutes on 2 CPU cores)."""

    steps: int = 150
    batch_size: int = 4
    #: None: the method's default (see ``methods.LEARNING_RATES``)
    learning_rate: Optional[float] = None
    #: learning rate of the new modules (heads, adapters) that start from scratch
    head_learning_rate: float = 1e-2
    warmup_steps: Optional[int] = None  # None: 10 % of the steps
    weight_decay: float = 1e-4
    #: stop when the smoothed training loss has not improved by ``min_delta`` for this many steps (None: never)
    patience: Optional[int] = 40
    min_delta: float = 1e-3
    seed: int = 0
    #: steps that first train the new head alone on the frozen encoder's cached features, before the method's
    #: steps (auto mode, encoder methods: a head from scratch needs hundreds of steps, too slow through the encoder)
    head_steps: int = 0
    #: bf16: autocast in bfloat16 (CUDA, and CPUs with bf16 units); fp16: CUDA mixed precision; fp32: none
    precision: str = "auto"

    @property
    def total_steps(self) -> int:
        """Every step a training runs: the head's warm-up, then the method's."""
        return self.head_steps + self.steps

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    """How training went."""

    steps: int
    seconds: float
    final_loss: float
    stopped_early: bool
    losses: list[float] = field(default_factory=list)


class Learner(Protocol):
    """What the loop needs from a model family: the module that trains, batches and their loss."""

    root: nn.Module

    def parameter_groups(self, learning_rate: float, head_learning_rate: float) -> list[dict[str, Any]]:
        """AdamW parameter groups of the trainable parameters."""

    def sample(self, generator: torch.Generator, batch_size: int) -> Any:
        """A random training batch."""

    def loss(self, batch: Any) -> torch.Tensor:
        """The training loss of a batch (a scalar tensor with gradient)."""


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype for training: as for inference, and ``auto`` on a CPU with AMX is bf16 too."""
    if precision == "auto" and device.type == "cpu":
        return torch.bfloat16 if _cpu_has_amx() else None
    return inference_dtype(device, precision)


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            return "amx_bf16" in handle.read(1 << 16)
    except OSError:
        return False


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int, warmup: int,
                  final_lr: float = 0.0) -> LRScheduler:
    """Each group's rate times (n + 1) / ``warmup`` at step n < ``warmup`` (linear warm-up), then cosine decay
    from the rate (step ``warmup``) towards ``final_lr`` (reached at step ``steps``). Call ``step()`` after each
    optimiser step; the rates start at step 0's."""
    cosine = CosineAnnealingLR(optimiser, T_max=max(1, steps - warmup), eta_min=final_lr)
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimiser, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimiser, [linear, cosine], milestones=[warmup])


def fit(learner: Learner, settings: TrainSettings, learning_rate: float, device: torch.device,
        arena_lambda: float = 0.0, progress: Optional[ProgressCallback] = None,
        cancel: Optional[Callable[[], bool]] = None) -> FitResult:
    """Train ``learner.root``'s trainable parameters; raises :class:`Cancelled` when ``cancel()`` turns true.
    ``progress`` hears of every step (1-based) with its loss."""
    generator = torch.Generator().manual_seed(settings.seed)
    groups = learner.parameter_groups(learning_rate, settings.head_learning_rate)
    if not any(group["params"] for group in groups):
        raise ValueError("nothing to train: the method left no trainable parameter")
    optimiser = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    warmup = settings.warmup_steps if settings.warmup_steps is not None else max(1, settings.steps // 10)
    schedule = warmup_cosine(optimiser, settings.steps, warmup)
    # the group whose rate tells the step's share of the base rate (ARENA's threshold follows the base rate)
    reference = next((g for g in optimiser.param_groups if g["initial_lr"] > 0), None)
    dtype = autocast_dtype(device, settings.precision)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    learner.root.eval()  # frozen statistics (BatchNorm) and no dropout: few cases cannot re-estimate them
    began = time.perf_counter()
    clock = ProgressClock(progress, settings.steps, "training")
    losses: list[float] = []
    smoothed, best, best_step, stopped_early = None, math.inf, 0, False
    step = 0
    for step in range(settings.steps):
        if cancel is not None and cancel():
            raise Cancelled("adaptation cancelled")
        batch = learner.sample(generator, settings.batch_size)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = learner.loss(batch)
        optimiser.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        else:
            loss.backward()
            optimiser.step()
        if arena_lambda > 0 and reference is not None:
            scale = reference["lr"] / reference["initial_lr"]
            arena_soft_threshold(learner.root, learning_rate * scale * arena_lambda)
        schedule.step()
        value = float(loss.detach())
        penalty = arena_penalty(learner.root) if arena_lambda > 0 else None
        if penalty is not None:
            value += arena_lambda * float(penalty.detach())
        losses.append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if smoothed < best - settings.min_delta:
            best, best_step = smoothed, step
        clock(step + 1, loss=value)
        if settings.patience is not None and step >= warmup and step - best_step >= settings.patience:
            stopped_early = True
            break
    return FitResult(step + 1, time.perf_counter() - began, losses[-1] if losses else math.nan, stopped_early,
                     losses)
