"""Promptable segmentation: boxes, ROIs and points per named segment, carried through volumes."""

from FMSegCore.engines.prompting.prompts import BoxPrompt, PointPrompt, SegmentPrompts
from FMSegCore.engines.prompting.session import PromptSession, PropagationSettings

__all__ = ["BoxPrompt", "PointPrompt", "PromptSession", "PropagationSettings", "SegmentPrompts"]
