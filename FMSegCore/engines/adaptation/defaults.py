"""Adaptation's options and their defaults, defined once for ``fmseg adapt``, the worker, the benchmarks and the
Slicer module. Torch-free, so parsers and the Slicer panel can read them without loading a model.
"""

from __future__ import annotations

from typing import Optional

#: Every method, in the order the benchmark reports them.
METHODS = ("full", "decoder", "linear-probe", "spatial-adapter", "bitfit", "affine", "lora", "arena",
           "adaptformer")
#: Methods that change the foundation encoder (the rest keep it frozen, so its features can be cached).
ENCODER_METHODS = ("full", "bitfit", "affine", "lora", "arena", "adaptformer")
#: Methods that keep the encoder frozen and train a head (or, in prompt mode, the decoder).
FROZEN_METHODS = tuple(m for m in METHODS if m not in ENCODER_METHODS)
#: The methods as a user is offered them: the recommended one first.
METHOD_CHOICES = ("decoder", "spatial-adapter", "linear-probe", "lora", "arena", "bitfit", "affine", "adaptformer",
                  "full")
MODES = ("auto", "prompt")
#: The method each mode uses unless told: auto mode chosen across subjects on the development scenarios (README,
#: ``fmseg bench adapt --cross``), prompt mode on the same-scan benchmark (``fmseg bench adapt``).
DEFAULT_METHODS = {"auto": "decoder", "prompt": "decoder"}
#: Automatic mode's default (steps, slices per step) per method. A head from scratch needs hundreds of steps: 150
#: left the decoder finding only the liver, 600 found all six large organs on the development MR. The time each
#: takes on a whole labelled volume on 2 CPU cores is measured by ``fmseg bench adapt --cross`` (README: the
#: decoder 7.5 minutes, above the 5-minute aim). Encoder methods backpropagate through 8 transformer blocks,
#: seconds a step on a CPU, so their head is first trained alone (``AUTO_HEAD_STEPS``) and then fewer, smaller
#: steps adapt the encoder.
AUTO_DEFAULTS = {method: (600, 4) for method in FROZEN_METHODS} | {method: (30, 2) for method in ENCODER_METHODS}
#: Auto mode, encoder methods: steps training the new head alone on the frozen encoder first.
AUTO_HEAD_STEPS = 300
#: Prompt mode's default (steps, slices per step), every method.
PROMPT_DEFAULTS = (150, 4)
DEFAULT_RANK = 4
#: Auto mode: the pixel size (mm) slices are resampled to, and the augmented training views encoded.
DEFAULT_PIXEL_MM = 1.5
DEFAULT_VIEWS = 48


def default_method(mode: str, method: Optional[str] = None) -> str:
    """The method to train: the one given, else the mode's default."""
    return method or DEFAULT_METHODS[mode]


def default_schedule(mode: str, method: str, steps: Optional[int] = None,
                     batch_size: Optional[int] = None) -> tuple[int, int]:
    """(steps, slices per step): the ones given, else the defaults of the mode and method."""
    default_steps, default_batch = AUTO_DEFAULTS[method] if mode == "auto" else PROMPT_DEFAULTS
    return steps or default_steps, batch_size or default_batch


def default_head_steps(mode: str, method: str) -> int:
    """Steps training a new head alone before the method's: auto mode's encoder methods only."""
    return AUTO_HEAD_STEPS if mode == "auto" and method in ENCODER_METHODS else 0
