"""A PNG preview of a segmentation: a few axial slices, the image in grey with the segments overlaid in colour.

Slices are shown as radiologists read them: the patient's anterior up and the patient's right on the viewer's
left, whatever the order in which the file stores its voxels (decided from the volume's direction matrix),
with the in-plane spacing respected. matplotlib is optional: it is imported only here, with the Agg backend
and without pyplot (so a caller's own matplotlib state is left alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np

from FMSegCore.errors import FMSegError, InputError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.io.colors import Color, distinct_colors
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.volume import PathLike, Volume

Names = Union[Sequence[str], Mapping[int, str]]
Colors = Union[Sequence[Color], Mapping[int, Color]]

#: Opacity of the filled overlay (contours are drawn opaque).
FILL_ALPHA = 0.4
#: Height of one slice panel in inches (at ``DPI``); panels keep the slices' physical aspect ratio.
PANEL_INCHES = 4.0
DPI = 100


def require_matplotlib():
    """matplotlib's Figure, FigureCanvasAgg and Patch; an :class:`FMSegError` saying how to install it if absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise FMSegError("writing a PNG overlay needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg, Patch


def _by_value(items: Union[Sequence, Mapping, None]) -> dict[int, object]:
    """Value -> item for a mapping keyed by label value, or a sequence giving values 1, 2, ... in order."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {int(k): v for k, v in items.items()}
    return dict(zip(range(1, len(items) + 1), items))


# ------------------------------------------------------------------------------------------------ orientation


def display_plan(direction: np.ndarray) -> tuple[int, tuple[int, int], tuple[bool, bool]]:
    """How to show axial slices: (axial IJK axis, IJK axes shown as (rows, columns), flip (rows, columns)).

    Rows run from anterior (top) to posterior, columns from the patient's right (viewer's left) to the
    patient's left: in LPS terms, rows along +P and columns along +L.
    """
    direction = np.asarray(direction, dtype=float)
    cols, rows, axial = anatomical_axes(direction)
    return axial, (rows, cols), (bool(direction[1, rows] < 0), bool(direction[0, cols] < 0))


def _slice_2d(array: np.ndarray, axial: int, index: int, axes: tuple[int, int], flips: tuple[bool, bool]) -> np.ndarray:
    """One axial slice of a KJI array, as (rows, columns) for display."""
    kji_axis = 2 - axial
    plane = np.take(array, index, axis=kji_axis)
    remaining = [a for a in (2, 1, 0) if a != axial]  # IJK axes of the plane's dimensions, in KJI order
    plane = plane if remaining == list(axes) else plane.T
    if flips[0]:
        plane = plane[::-1, :]
    if flips[1]:
        plane = plane[:, ::-1]
    return plane


# ------------------------------------------------------------------------------------------------ slice choice


def choose_slices(labels: np.ndarray, axial_kji: int, count: int) -> list[int]:
    """Up to ``count`` slice indices (along KJI axis ``axial_kji``) that show the segments well.

    First the slice where each segment is largest (biggest segments first), skipping slices close to one
    already chosen; then evenly spaced slices through the labelled range; without labels, through the volume.
    Returned in increasing index order.
    """
    total = labels.shape[axial_kji]
    count = max(1, min(count, total))
    foreground = labels > 0
    values, inverse, sizes = np.unique(labels[foreground], return_inverse=True, return_counts=True)
    # Voxels of each value on each slice (one pass, whatever the number of values).
    slice_of = np.nonzero(foreground)[axial_kji]
    areas = np.bincount(inverse.ravel() * total + slice_of, minlength=values.size * total).reshape(-1, total)
    labelled = np.flatnonzero(areas.sum(axis=0))
    first, last = (int(labelled[0]), int(labelled[-1])) if labelled.size else (0, total - 1)
    gap = max(1, (last - first + 1) // (2 * count))
    chosen: list[int] = []

    def add(index: int) -> None:
        if len(chosen) < count and all(abs(index - c) >= gap for c in chosen):
            chosen.append(index)

    for row in np.argsort(-sizes, kind="stable"):
        add(int(np.argmax(areas[row])))
    for index in np.linspace(first, last, count + 2)[1:-1]:
        add(int(round(index)))
    for index in range(first, last + 1):  # still short (a thin labelled range): fill in order
        if len(chosen) >= count:
            break
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------ rendering


def _grey(image: Volume) -> np.ndarray:
    """The image scaled to [0, 1]: a soft-tissue window for CT, percentiles for MR."""
    from FMSegCore.preprocessing.intensity import normalize

    return normalize(image)


def write_overlay_png(image: Volume, labels: np.ndarray, names: Names, path: PathLike,
                      colors: Optional[Colors] = None, slices: int = 3, overwrite: bool = True) -> PathLike:
    """Write a PNG of ``slices`` axial slices side by side with the segments overlaid, and a legend.

    ``labels`` is a KJI integer array on the image's grid; ``names`` gives each label value's name (a list
    for values 1..N, or a mapping value -> name); ``colors`` likewise (RGB in 0..1), defaulting to the same
    colours as :func:`distinct_colors`. Written atomically; an existing file is an error unless ``overwrite``.
    """
    Figure, FigureCanvasAgg, Patch = require_matplotlib()
    labels = np.asarray(labels)
    if labels.shape != image.array.shape:
        raise InputError(path, f"label array shape {labels.shape} does not match the image {image.array.shape}")
    present = [int(v) for v in np.unique(labels) if v > 0]
    name_of = _by_value(names)
    values = sorted(set(present) | set(name_of))
    name_of = {v: str(name_of.get(v, f"Segment_{v}")) for v in values}
    given = _by_value(colors)
    defaults = dict(zip(values, distinct_colors([name_of[v] for v in values])))
    color_of = {v: tuple(float(c) for c in given.get(v, defaults[v])) for v in values}

    axial, axes, flips = display_plan(image.direction)
    indices = choose_slices(labels, 2 - axial, slices)
    grey = _grey(image)
    row_mm, col_mm = float(image.spacing[axes[0]]), float(image.spacing[axes[1]])
    first = _slice_2d(grey, axial, indices[0], axes, flips)
    panel_aspect = (first.shape[1] * col_mm) / (first.shape[0] * row_mm)  # width / height

    legend_rows = max(1, int(np.ceil(len(values) / 4)))
    legend_inches = 0.3 + 0.25 * legend_rows if values else 0.0
    width = PANEL_INCHES * panel_aspect * len(indices)
    figure = Figure(figsize=(width, PANEL_INCHES + 0.3 + legend_inches), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    bottom = legend_inches / (PANEL_INCHES + 0.3 + legend_inches)
    top = 1.0 - 0.3 / (PANEL_INCHES + 0.3 + legend_inches)
    grid = figure.add_gridspec(1, len(indices), left=0.0, right=1.0, bottom=bottom, top=top, wspace=0.02)
    for column, index in enumerate(indices):
        axis = figure.add_subplot(grid[0, column])
        axis.set_axis_off()
        axis.imshow(_slice_2d(grey, axial, index, axes, flips), cmap="gray", vmin=0.0, vmax=1.0,
                    aspect=row_mm / col_mm, interpolation="bilinear")
        plane = _slice_2d(labels, axial, index, axes, flips)
        overlay = np.zeros(plane.shape + (4,), dtype=float)
        for value in values:
            mask = plane == value
            if not mask.any():
                continue
            overlay[mask] = color_of[value] + (FILL_ALPHA,)
            axis.contour(mask.astype(float), levels=[0.5], colors=[color_of[value]], linewidths=1.2)
        axis.imshow(overlay, aspect=row_mm / col_mm, interpolation="nearest")
        axis.set_title(f"slice {index}", color="white", fontsize=9, pad=3)
    if values:
        handles = [Patch(facecolor=color_of[v], edgecolor="white", label=f"{v}: {name_of[v]}"
                         + ("" if v in present else " (empty)")) for v in values]
        figure.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), frameon=False,
                      fontsize=9, labelcolor="white")
    with atomic_output(path, overwrite) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, facecolor="black")
    return path
