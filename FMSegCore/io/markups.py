"""Slicer Markups JSON files (``.mrk.json``) and the prompts they give.

Supported markups: point lists (``Fiducial``), ROI boxes (``ROI``), scribbles (open curves, ``Curve``) and lassos
(closed curves, ``ClosedCurve``); any other type is rejected with an :class:`InputError`, since it cannot be turned
into a prompt. A curve runs straight between its control points (Slicer's spline through them is not redone). Positions are returned in LPS millimetres
whatever the file's ``coordinateSystem`` (``LPS`` or ``RAS``).

Slicer does not store a node's name in the file (it names a loaded node after the file), so a markup's
name, which becomes the segment it prompts, is its ``name`` key if present, else the file name without
``.mrk.json``. A control point whose description is ``exclude``, ``background`` or ``negative`` (any case, spaces
ignored) is an exclude point; every other point is an include point. Only placed points count (``positionStatus``
``defined``, the default when a file has none): as for Slicer's nodes (``prompts.excludes``, ``is_placed``).
A curve excludes when the description of one of its control points says so (the file has no description of
the whole curve).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from FMSegCore.errors import InputError
from FMSegCore.io.jsonfile import read_json
from FMSegCore.io.volume import LPS_TO_RAS, PathLike, Volume
from FMSegCore.prompts import (
    CORNER_SIGNS,
    PLACED_STATUS,
    BoxPrompt,
    CurvePrompt,
    PointPrompt,
    SegmentPrompts,
    box_from_corners,
    curve_problem,
    excludes,
    is_placed,
)

SUPPORTED_TYPES = ("Fiducial", "ROI", "Curve", "ClosedCurve")
CURVE_TYPES = ("Curve", "ClosedCurve")
MARKUPS_SUFFIX = ".mrk.json"


@dataclass
class ControlPoint:
    """A control point: position in LPS mm, its label and description."""

    position: tuple[float, float, float]
    label: str = ""
    description: str = ""

    @property
    def include(self) -> bool:
        return not excludes(self.description)


@dataclass
class Markup:
    """A point list or ROI read from a markups file; geometry in LPS mm."""

    type: str
    name: str
    path: str
    control_points: list[ControlPoint] = field(default_factory=list)
    center: Optional[tuple[float, float, float]] = None
    size: Optional[tuple[float, float, float]] = None
    #: 3x3 matrix whose columns are the ROI axes in LPS.
    orientation: Optional[np.ndarray] = None

    def describe(self) -> str:
        return f"{self.type} markup '{self.name}'"

    @property
    def include(self) -> bool:
        """A curve includes unless one of its control points' descriptions says exclude."""
        return all(point.include for point in self.control_points)

    def roi_corners(self) -> np.ndarray:
        """The 8 corners (LPS, shape (8, 3)) of a ROI box."""
        half = CORNER_SIGNS * (np.asarray(self.size) / 2.0)
        return np.asarray(self.center) + half @ np.asarray(self.orientation).T


def _name_from_file(path: Path) -> str:
    name = path.name
    return name[: -len(MARKUPS_SUFFIX)] if name.lower().endswith(MARKUPS_SUFFIX) else path.stem


def _numbers(path: Path, where: str, value: object, count: int) -> np.ndarray:
    ok = isinstance(value, list) and len(value) == count
    if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        array = np.asarray(value, dtype=float)
        if np.all(np.isfinite(array)):
            return array
    raise InputError(path, f"{where} must be {count} finite numbers, found {json.dumps(value)[:60]}")


def _to_lps(entry: dict, path: Path, where: str) -> np.ndarray:
    """Matrix that turns the entry's coordinates into LPS (identity for LPS, the x/y flip for RAS)."""
    system = entry.get("coordinateSystem", "LPS")
    if system not in ("LPS", "RAS"):
        raise InputError(path, f"{where}: unsupported coordinateSystem {system!r} (expected LPS or RAS)")
    units = entry.get("coordinateUnits", "mm")
    if units != "mm":
        raise InputError(path, f"{where}: unsupported coordinateUnits {units!r} (expected mm)")
    return np.eye(3) if system == "LPS" else LPS_TO_RAS


def _control_points(entry: dict, path: Path, where: str, to_lps: np.ndarray) -> list[ControlPoint]:
    raw = entry.get("controlPoints", [])
    if not isinstance(raw, list):
        raise InputError(path, f"{where}: controlPoints must be a list")
    points = []
    for number, point in enumerate(raw, start=1):
        if not isinstance(point, dict):
            raise InputError(path, f"{where}: control point {number} is not an object")
        if not is_placed(str(point.get("positionStatus", PLACED_STATUS))):
            continue
        label = str(point.get("label", "") or number)
        position = _numbers(path, f"{where}: position of point '{label}'", point.get("position"), 3)
        points.append(ControlPoint(tuple((to_lps @ position).tolist()), label, str(point.get("description", ""))))
    return points


def _roi_geometry(markup: Markup, entry: dict, path: Path, to_lps: np.ndarray) -> None:
    where = markup.describe()
    for key in ("center", "size", "orientation"):
        if key not in entry:
            raise InputError(path, f"{where}: missing key '{key}'")
    markup.center = tuple((to_lps @ _numbers(path, f"{where}: center", entry["center"], 3)).tolist())
    size = _numbers(path, f"{where}: size", entry["size"], 3)
    if np.any(size < 0):
        raise InputError(path, f"{where}: size must not be negative")
    markup.size = tuple(size.tolist())
    axes = _numbers(path, f"{where}: orientation", entry["orientation"], 9).reshape(3, 3)
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-3):
        raise InputError(path, f"{where}: orientation is not a rotation matrix")
    markup.orientation = to_lps @ axes


def _markup(entry: object, path: Path, number: int) -> Markup:
    if not isinstance(entry, dict):
        raise InputError(path, f"markup {number} is not a JSON object")
    name = entry.get("name") or _name_from_file(path)
    kind = entry.get("type")
    if kind not in SUPPORTED_TYPES:
        raise InputError(path, f"markup '{name}' has unsupported type {kind!r} (use a point list, a ROI, a curve "
                               "or a closed curve)")
    markup = Markup(type=kind, name=str(name), path=str(path))
    to_lps = _to_lps(entry, path, markup.describe())
    markup.control_points = _control_points(entry, path, markup.describe(), to_lps)
    if kind == "ROI":
        _roi_geometry(markup, entry, path, to_lps)
    elif kind in CURVE_TYPES:
        problem = curve_problem([p.position for p in markup.control_points], closed=kind == "ClosedCurve")
        if problem:
            raise InputError(path, f"{markup.describe()}: {problem}")
    elif not markup.control_points:
        raise InputError(path, f"{markup.describe()} has no placed control points")
    return markup


def read_markups(path: PathLike) -> list[Markup]:
    """Point lists, ROIs and curves of a Slicer markups file, in LPS mm; InputError on anything malformed."""
    path = Path(path)
    content = read_json(path, "markups JSON file")
    entries = content.get("markups") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise InputError(path, "not a markups file: no 'markups' list")
    if not entries:
        raise InputError(path, "markups file holds no markups")
    return [_markup(entry, path, number) for number, entry in enumerate(entries, start=1)]


# ------------------------------------------------------------------------------------------------------ prompts


def _below(ijk: np.ndarray) -> bool:
    """Whether a continuous index lies before the first voxel along some axis (voxel n spans n-0.5..n+0.5)."""
    return bool(np.any(ijk < -0.5))


def _above(ijk: np.ndarray, shape: np.ndarray) -> bool:
    """Whether a continuous index lies past the last voxel along some axis."""
    return bool(np.any(ijk > shape - 0.5))


def _box(markup: Markup, volume: Volume) -> BoxPrompt:
    """IJK box around the ROI's corners, clipped to the image; flat axes snap to one slice. A ROI not aligned
    with the voxel grid keeps its corners (the session then uses its extent on each slice)."""
    shape = np.asarray(volume.shape_ijk, dtype=float)
    oriented = box_from_corners(volume.lps_to_ijk(markup.roi_corners()))
    lo, hi = np.asarray(oriented.lo), np.asarray(oriented.hi)
    flat = hi - lo <= 1.0
    lo[flat] = hi[flat] = np.round((lo[flat] + hi[flat]) / 2.0)
    if _below(hi) or _above(lo, shape):
        raise InputError(markup.path, f"{markup.describe()} lies wholly outside the image")
    top = shape - 1
    return BoxPrompt(tuple(np.clip(lo, 0, top).tolist()), tuple(np.clip(hi, 0, top).tolist()),
                     None if flat.any() else oriented.corners)


def _voxels(markup: Markup, volume: Volume) -> list[tuple[float, float, float]]:
    """The control points as continuous voxel indices; InputError naming the first one outside the image."""
    shape = np.asarray(volume.shape_ijk, dtype=float)
    voxels = []
    for point in markup.control_points:
        ijk = volume.lps_to_ijk(np.asarray(point.position))[0]
        if _below(ijk) or _above(ijk, shape):
            raise InputError(markup.path, f"{markup.describe()}: point '{point.label}' lies outside the image")
        voxels.append(tuple(ijk.tolist()))
    return voxels


def _points(markup: Markup, volume: Volume) -> list[PointPrompt]:
    return [PointPrompt(ijk, include=point.include) for ijk, point in zip(_voxels(markup, volume), markup.control_points)]


def _curve(markup: Markup, volume: Volume) -> CurvePrompt:
    return CurvePrompt(tuple(_voxels(markup, volume)), include=markup.include, closed=markup.type == "ClosedCurve",
                       source=markup.path, label=markup.name)


def prompts_from_markups(paths: Union[PathLike, Iterable[PathLike]], volume: Volume) -> dict[str, SegmentPrompts]:
    """Prompts per segment (named after each markup) from markups files, in voxel index space of ``volume``.

    ROIs become boxes (flat ones 2D boxes on the nearest slice; boxes partly outside are clipped), point
    lists become include/exclude points, curves include/exclude scribbles and lassos (every point inside the
    image). Segments keep the order in which they first appear.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    prompts: dict[str, SegmentPrompts] = {}
    for path in paths:
        for markup in read_markups(path):
            segment = prompts.setdefault(markup.name, SegmentPrompts(markup.name))
            if markup.type == "ROI":
                segment.boxes.append(_box(markup, volume))
            elif markup.type in CURVE_TYPES:
                segment.curves.append(_curve(markup, volume))
            else:
                segment.points.extend(_points(markup, volume))
    return prompts


def load_prompts(paths: Sequence[PathLike], image: Volume) -> list[SegmentPrompts]:
    """Prompts per segment from markups files, in the order segments first appear; every file and segment
    is checked against the image (an error names the file)."""
    segments: dict[str, SegmentPrompts] = {}
    first_file: dict[str, PathLike] = {}
    for path in paths:
        for name, prompts in prompts_from_markups([path], image).items():
            segment = segments.setdefault(name, SegmentPrompts(name))
            first_file.setdefault(name, path)
            segment.boxes.extend(prompts.boxes)
            segment.points.extend(prompts.points)
            segment.curves.extend(prompts.curves)
    for name, segment in segments.items():
        if segment.is_empty():
            raise InputError(first_file[name], f"segment '{name}' has no box and no include point to start from")
    return list(segments.values())
