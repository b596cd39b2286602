"""``--preview PNG``: a picture of the result (three slices with the segments overlaid) for users without Slicer,
checked before any work and written like the result; shared by ``prompt``, ``incontext`` and ``segment``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.io.volume import PathLike, Volume


def add_preview_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preview", default=None, metavar="PNG",
                        help="also write a PNG of three slices with the result overlaid (to look without Slicer)")


def check_preview(preview: Optional[PathLike], inputs: Sequence[PathLike], overwrite: bool,
                  others: Sequence[Optional[PathLike]] = ()) -> Optional[Path]:
    """The preview's path when one is asked: a new ``.png`` (unless ``overwrite``), never an input or another
    result; a one-line :class:`InputError` otherwise."""
    from FMSegCore.cli.prompt_cmd import check_not_input, check_output
    from FMSegCore.errors import InputError

    if preview is None:
        return None
    path = check_output(preview, overwrite, (".png",))
    check_not_input(path, inputs)
    if any(other is not None and Path(other).resolve() == path.resolve() for other in others):
        raise InputError(path, "the preview and another result need different file names")
    return path


def write_preview(image: Volume, labels: np.ndarray, segments: Sequence[SegmentInfo], preview: Optional[Path],
                  overwrite: bool) -> None:
    """Write the preview (when asked) and say so."""
    if preview is None:
        return
    from FMSegCore.io.overlay import write_overlay_png

    write_overlay_png(image, labels, {s.value: s.name for s in segments}, preview,
                      {s.value: s.color for s in segments}, overwrite=overwrite)
    print(f"Wrote {preview} (preview)")
