#!/usr/bin/env python3
"""Draw the module and extension icon, ``FMSegSlicer/Resources/Icons/FMSegSlicer.png`` (128x128 RGBA PNG).

The design: a rounded dark tile holding a stylised axial slice of the abdomen (grey body, bright spine and
aorta, a second organ), a liver-like organ outlined by a coloured segmentation contour over a translucent fill,
and a point prompt (a white dot in a green ring) on that organ, as a user clicks it. Drawn with Pillow at 4x and downsampled, so edges are antialiased.

    python Utilities/draw_icon.py            # writes the icon into the module's resources
    python Utilities/draw_icon.py --output other.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

SIZE = 128
SCALE = 4
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "FMSegSlicer" / "Resources" / "Icons" / "FMSegSlicer.png"

TILE = (28, 36, 52, 255)
BODY = (150, 156, 164, 255)
BODY_EDGE = (196, 200, 206, 255)
ORGAN = (112, 118, 128, 255)
SPINE = (232, 232, 226, 255)
CONTOUR = (255, 140, 40, 255)
FILL = (255, 140, 40, 90)
POINT = (255, 255, 255, 255)
POINT_RING = (60, 200, 120, 255)


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
    """An icon-pixel box scaled to the supersampled canvas."""
    return (round(x0 * SCALE), round(y0 * SCALE), round(x1 * SCALE), round(y1 * SCALE))


def _organ_outline(points: int = 96) -> list[tuple[float, float]]:
    """A smooth, liver-like closed outline on the image's left side, in supersampled pixels."""
    centre_x, centre_y, radius_x, radius_y = 47.0, 61.0, 22.0, 18.0
    outline = []
    for index in range(points):
        angle = 2 * math.pi * index / points
        bulge = 1 + 0.12 * math.cos(2 * angle) - 0.08 * math.sin(3 * angle)
        outline.append(((centre_x + radius_x * bulge * math.cos(angle)) * SCALE,
                        (centre_y + radius_y * bulge * math.sin(angle)) * SCALE))
    return outline


def draw() -> Image.Image:
    """The icon as a 128x128 RGBA image."""
    big = SIZE * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    canvas = ImageDraw.Draw(image)
    canvas.rounded_rectangle(_box(2, 2, 126, 126), radius=22 * SCALE, fill=TILE)

    # The slice: a body outline, the spine, the aorta and a second, unsegmented organ.
    canvas.ellipse(_box(12, 28, 116, 102), fill=BODY, outline=BODY_EDGE, width=3 * SCALE)
    canvas.ellipse(_box(57, 82, 71, 96), fill=SPINE)
    canvas.ellipse(_box(68, 70, 76, 78), fill=SPINE)
    canvas.ellipse(_box(82, 44, 104, 70), fill=ORGAN)

    # The segmented organ: a translucent fill under a bold contour.
    outline = _organ_outline()
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).polygon(outline, fill=FILL)
    image = Image.alpha_composite(image, overlay)
    canvas = ImageDraw.Draw(image)
    canvas.line(outline + outline[:2], fill=CONTOUR, width=4 * SCALE, joint="curve")

    # The point prompt on the organ.
    canvas.ellipse(_box(36, 50, 54, 68), outline=POINT_RING, width=3 * SCALE)
    canvas.ellipse(_box(42, 56, 48, 62), fill=POINT)

    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    draw().save(args.output, format="PNG", optimize=True)
    print(f"wrote {args.output} ({SIZE}x{SIZE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
