"""Promptable segmentation: boxes, ROIs, points, scribbles and lassos per named segment, carried through volumes.

The session (torch) is imported on first use, so prompt types serve clients that have no torch (Slicer's Logic).
"""

from typing import Any

from FMSegCore.prompts import BoxPrompt, CurvePrompt, PointPrompt, SegmentPrompts

__all__ = ["BoxPrompt", "CurvePrompt", "PointPrompt", "PromptSession", "PropagationSettings", "SegmentPrompts"]


def __getattr__(name: str) -> Any:
    if name in ("PromptSession", "PropagationSettings"):
        from FMSegCore.engines.prompting import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
