"""Overlap metrics shared by the benchmarks and the demo (defined below the engines, which use them too)."""

from __future__ import annotations

from FMSegCore.preprocessing.overlap import dice

__all__ = ["dice"]
