"""Display colours of structures: typical anatomy colours by name, else a palette by label value.

Plain Python (no I/O library), so Slicer's Logic uses the same colours as FMSeg's files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Color = tuple[float, float, float]

#: Typical colours (Slicer's generic anatomy colours) for common structures, matched on the name's words.
ANATOMY_COLORS: dict[str, Color] = {
    "liver": (0.867, 0.510, 0.396),
    "spleen": (0.616, 0.424, 0.635),
    "kidney": (0.725, 0.400, 0.325),
    "aorta": (0.847, 0.396, 0.310),
    "artery": (0.847, 0.396, 0.310),
    "vena": (0.000, 0.592, 0.808),
    "vein": (0.000, 0.592, 0.808),
    "gallbladder": (0.545, 0.588, 0.384),
    "pancreas": (0.976, 0.706, 0.435),
    "stomach": (0.847, 0.518, 0.412),
    "lung": (0.773, 0.647, 0.569),
    "bladder": (0.871, 0.604, 0.518),
}

#: Distinct colours (Tableau 10 then lighter variants) for everything else, chosen by label value.
PALETTE: tuple[Color, ...] = (
    (0.122, 0.467, 0.706), (1.000, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133), (0.090, 0.745, 0.812), (0.682, 0.780, 0.910), (1.000, 0.733, 0.471),
    (0.596, 0.875, 0.541), (1.000, 0.596, 0.588), (0.773, 0.690, 0.835), (0.969, 0.714, 0.824),
)


def default_color(name: str, value: int) -> Color:
    """A typical colour for a known structure name (e.g. ``kidney_left``), else a palette colour by value."""
    words = name.lower().replace("-", "_").replace(" ", "_").split("_")
    for key, color in ANATOMY_COLORS.items():
        if key in words:
            return color
    return PALETTE[(value - 1) % len(PALETTE)]


#: How far apart (RGB, 0-1) a new segment's colour must be from those already shown.
MIN_COLOR_DISTANCE = 0.3


def segment_color(name: str, value: int, taken: Sequence[Color] = ()) -> Color:
    """A new segment's colour: the structure's usual colour, replaced by a palette colour when it is too close to
    one already ``taken`` (liver and kidney, say). One rule for written segmentations, overlays and Slicer."""
    candidates = (default_color(name, value),) + PALETTE[(value - 1) % len(PALETTE):] + PALETTE
    return next((c for c in candidates if all(math.dist(c, o) >= MIN_COLOR_DISTANCE for o in taken)), candidates[0])


def distinct_colors(names: Sequence[str]) -> list[Color]:
    """Colours for segments 1..N named ``names``, each chosen by :func:`segment_color` given the earlier ones."""
    chosen: list[Color] = []
    for value, name in enumerate(names, start=1):
        chosen.append(segment_color(name, value, chosen))
    return chosen
