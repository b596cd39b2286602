"""Adaptation's rules and defaults (methods, steps, warm-ups), defined once for ``fmseg adapt``, the worker, the
benchmarks and the Slicer module; the options a user sets come from :mod:`FMSegCore.options`. Torch-free, so
parsers and the Slicer panel can read them without loading a model.
"""

from __future__ import annotations

from typing import Optional

from FMSegCore.options import (  # noqa: F401  (the user-facing adaptation options, re-exported here)
    DEFAULT_PIXEL_MM,
    DEFAULT_RANK,
    DEFAULT_VIEWS,
    MAX_RANK,
    METHOD_CHOICES,
    MODES,
)

#: Every method, in the order the benchmark reports them.
METHODS = ("full", "decoder", "linear-probe", "spatial-adapter", "bitfit", "affine", "lora", "arena",
           "adaptformer")
#: Methods that change the foundation encoder (the rest keep it frozen, so its features can be cached).
ENCODER_METHODS = ("full", "bitfit", "affine", "lora", "arena", "adaptformer")
#: Methods that keep the encoder frozen and train a head (or, in prompt mode, the decoder).
FROZEN_METHODS = tuple(m for m in METHODS if m not in ENCODER_METHODS)
#: The method each mode uses unless told: auto mode chosen across subjects on the development scenarios (README,
#: ``fmseg bench adapt --cross``), prompt mode on the same-scan benchmark (``fmseg bench adapt``).
DEFAULT_METHODS = {"auto": "decoder", "prompt": "decoder"}
#: Automatic mode's default (steps, slices per step) per method, chosen on the development MR (held out from the
#: reported scenarios) to fit 5 minutes on a whole labelled CT on 2 CPU cores (``fmseg bench adapt --cross``
#: times each). A head from scratch needs hundreds of steps; with its prior initialisation (``heads``) the
#: decoder found all six large organs within its default steps on the development MR (without it, more steps
#: still missed the aorta). Encoder methods backpropagate through 8 transformer blocks and the spatial adapter's
#: 3x3 convolutions run on 256 channels, both expensive steps on a CPU, so their heads are first trained alone
#: (``HEAD_WARMUPS``) and then fewer steps train the method.
AUTO_DEFAULTS = ({"decoder": (300, 4), "linear-probe": (600, 4), "spatial-adapter": (100, 4)}
                 | {method: (20, 2) for method in ENCODER_METHODS})
#: Auto mode: the cheaper method that first trains a method's new head alone, on cached frozen features, and for
#: how many steps: encoder methods' decoder head, and the spatial adapter's linear probe (the adapter starts as
#: the identity, so it refines a probe that already segments).
HEAD_WARMUPS = {method: ("decoder", 200) for method in ENCODER_METHODS} | {"spatial-adapter": ("linear-probe", 300)}
#: Auto mode, encoder methods after their head's warm-up: the encoder and the warmed head train together at one
#: rate, the method's but at most this one (linear probing then fine-tuning, "LP-FT"). At the new-head rate the
#: first steps undid the warm-up on the development MR (a lost spleen), and encoder rates of 1e-2 did the same.
WARMED_MAX_RATE = 1e-3
#: Prompt mode's default (steps, slices per step), every method.
PROMPT_DEFAULTS = (150, 4)


def default_method(mode: str, method: Optional[str] = None) -> str:
    """The method to train: the one given, else the mode's default."""
    return method or DEFAULT_METHODS[mode]


def default_schedule(mode: str, method: str, steps: Optional[int] = None,
                     batch_size: Optional[int] = None) -> tuple[int, int]:
    """(steps, slices per step): the ones given, else the defaults of the mode and method."""
    default_steps, default_batch = AUTO_DEFAULTS[method] if mode == "auto" else PROMPT_DEFAULTS
    return steps or default_steps, batch_size or default_batch


def default_head_steps(mode: str, method: str) -> int:
    """Steps training a new head alone before the method's (auto mode, methods in ``HEAD_WARMUPS``)."""
    return HEAD_WARMUPS[method][1] if mode == "auto" and method in HEAD_WARMUPS else 0


def head_warmup_method(method: str) -> str:
    """The method whose learner warms ``method``'s head (its own when it has no warm-up)."""
    return HEAD_WARMUPS[method][0] if method in HEAD_WARMUPS else method
