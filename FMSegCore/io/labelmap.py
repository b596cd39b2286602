"""Label maps (NIfTI / NRRD integer images with a ``labels.json``) and Slicer segmentations (``.seg.nrrd``).

A label map is returned as a :class:`Volume` holding a KJI integer array (0 = background) and a list of
:class:`SegmentInfo` (label value, name, colour), sorted by label value.

Segment names of a plain label map come from a JSON file beside it: ``<name>.labels.json`` (what
:func:`write_labelmap` writes, ``<name>`` being the file name without its ending) or else ``labels.json`` in
the same folder (as in the sample data). Its content maps label value -> name, e.g. ``{"1": "spleen"}``; a
value may also be ``{"name": "spleen", "color": [r, g, b]}`` (written only for colours other than the default
one). Values present in the image but not named are called ``Segment_<value>``.

Overlapping segments of a ``.seg.nrrd`` (several layers) are flattened into one label map: a segment listed
later in the file wins where segments overlap. Label values are kept when they are unique across layers,
otherwise segments are numbered 1, 2, ... in file order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import nrrd
import numpy as np
import slicerio

from FMSegCore.errors import InputError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.io.colors import Color, default_color
from FMSegCore.io.jsonfile import read_json
from FMSegCore.io.volume import PathLike, Volume, read_volume

LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
SEGMENTATION_SUFFIX = ".seg.nrrd"

if TYPE_CHECKING:
    import SimpleITK as sitk


@dataclass
class SegmentInfo:
    """One segment of a label map: its label value, name and display colour (RGB in 0..1)."""

    value: int
    name: str
    color: Color


def check_labelled_arrays(image: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """An image and its label map as arrays: same shape, 2-D or 3-D, finite intensities; else an InputError."""
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape != labels.shape:
        raise InputError(source, f"image shape {image.shape} and label shape {labels.shape} differ")
    if image.ndim not in (2, 3):
        raise InputError(source, f"expected a 2-D slice or a 3-D volume, got {image.ndim} dimensions")
    if not np.all(np.isfinite(image)):
        raise InputError(source, "the image holds NaN or infinite values")
    return image, labels


def default_segment(value: int, name: Optional[str] = None) -> SegmentInfo:
    """Segment with the default name ``Segment_<value>`` (unless given) and its default colour."""
    name = name or f"Segment_{value}"
    return SegmentInfo(int(value), name, default_color(name, value))


# ----------------------------------------------------------------------------------------------- labels.json


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (SEGMENTATION_SUFFIX, ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def labels_json_path(path: PathLike) -> Path:
    """Where :func:`write_labelmap` puts the names of ``path``: ``<name without ending>.labels.json`` beside it."""
    path = Path(path)
    return path.with_name(f"{_stem(path)}.labels.json")


def find_labels_json(path: PathLike) -> Optional[Path]:
    """The names file of a label map: ``<name>.labels.json``, else ``labels.json`` in its folder, else None."""
    for candidate in (labels_json_path(path), Path(path).with_name("labels.json")):
        if candidate.is_file():
            return candidate
    return None


def _segment_from_json(path: Path, key: str, entry: object) -> SegmentInfo:
    try:
        value = int(key)
    except ValueError:
        raise InputError(path, f"label value {key!r} is not an integer") from None
    if value <= 0:
        raise InputError(path, f"label value {value} must be positive (0 is the background)")
    color = None
    if isinstance(entry, dict):
        color, entry = entry.get("color"), entry.get("name")
    if not isinstance(entry, str) or not entry.strip():
        raise InputError(path, f"label {value} has no name (expected a non-empty string)")
    if color is None:
        return default_segment(value, entry)
    if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, (int, float)) for c in color)):
        raise InputError(path, f"colour of label {value} must be three numbers in 0..1")
    return SegmentInfo(value, entry, tuple(float(c) for c in color))


def read_labels_json(path: PathLike) -> list[SegmentInfo]:
    """Segments named in a labels JSON file (value -> name, or value -> {name, color}), sorted by value."""
    path = Path(path)
    content = read_json(path)
    if not isinstance(content, dict):
        raise InputError(path, "expected a JSON object mapping label values to names")
    return sorted((_segment_from_json(path, k, v) for k, v in content.items()), key=lambda s: s.value)


def _labels_json_content(segments: list[SegmentInfo]) -> dict[str, object]:
    content: dict[str, object] = {}
    for segment in segments:
        default = default_color(segment.name, segment.value)
        same = np.allclose(segment.color, default, atol=1e-6)
        color = [float(c) for c in segment.color]
        content[str(segment.value)] = segment.name if same else {"name": segment.name, "color": color}
    return content


# ------------------------------------------------------------------------------------------------------ reading


def _label_dtype(max_value: int) -> type:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def _as_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """The array as non-negative integers in the smallest unsigned type (InputError if not a label map)."""
    if array.dtype.kind not in "fiub":
        raise InputError(path, f"not a label map: voxel type {array.dtype}")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise InputError(path, "not a label map: voxel values are not whole numbers")
    if array.size and array.min() < 0:
        raise InputError(path, f"not a label map: negative label value {int(array.min())}")
    return array.astype(_label_dtype(int(array.max()) if array.size else 0))


def _complete_segments(segments: list[SegmentInfo], labels: np.ndarray) -> list[SegmentInfo]:
    """Segments plus a default one for every value present in ``labels`` but not named; sorted by value."""
    named = {s.value for s in segments}
    extra = [default_segment(int(v)) for v in np.unique(labels) if v != 0 and int(v) not in named]
    return sorted(list(segments) + extra, key=lambda s: s.value)


def _grid_differences(volume: Volume, reference: Volume) -> str:
    differences = []
    if volume.shape_ijk != reference.shape_ijk:
        differences.append(f"size {volume.shape_ijk} vs {reference.shape_ijk}")
    for name in ("spacing", "origin"):
        ours, theirs = np.asarray(getattr(volume, name)), np.asarray(getattr(reference, name))
        if not np.allclose(ours, theirs, atol=1e-3):
            differences.append(f"{name} {np.round(ours, 4).tolist()} vs {np.round(theirs, 4).tolist()}")
    if not np.allclose(volume.direction, reference.direction, atol=1e-4):
        differences.append("direction differs")
    return ", ".join(differences) or "grid differs slightly"


def _off_grid(volume: Volume, reference: Volume, path: Path) -> InputError:
    differences = _grid_differences(volume, reference)
    return InputError(path, f"label map is not on the image grid ({differences}; label map vs image)")


def _check_grid(volume: Volume, reference: Optional[Volume], path: Path) -> None:
    if reference is not None and not volume.same_grid(reference):
        raise _off_grid(volume, reference, path)


def _read_plain_labelmap(path: Path, reference: Optional[Volume]) -> tuple[Volume, list[SegmentInfo]]:
    volume = read_volume(path, allow_empty=True)
    volume.array = _as_labels(volume.array, path)
    _check_grid(volume, reference, path)
    names = find_labels_json(path)
    segments = read_labels_json(names) if names else []
    return volume, _complete_segments(segments, volume.array)


def _is_segmentation(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(SEGMENTATION_SUFFIX):
        return True
    if not name.endswith(".nrrd"):
        return False
    try:
        return any(key.startswith("Segment0_") for key in nrrd.read_header(str(path)))
    except Exception:  # unreadable: let the volume reader report it
        return False


def _geometry(ijk_to_lps: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Spacing, origin and direction (columns = I, J, K axes in LPS) of a 4x4 IJK-to-LPS matrix."""
    axes = np.asarray(ijk_to_lps, dtype=float)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return tuple(spacing.tolist()), tuple(np.asarray(ijk_to_lps)[:3, 3].tolist()), axes / spacing


def _flatten_layers(voxels: np.ndarray, segments: list[dict], path: Path) -> tuple[np.ndarray, list[SegmentInfo]]:
    """One IJK label array from slicerio voxels (3D, or 4D with layers first); later segments win overlaps."""
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    values = [int(s.get("labelValue", 1)) for s in segments]
    if len(set(values)) != len(values):
        values = list(range(1, len(segments) + 1))
    labels = np.zeros(layers.shape[1:], dtype=_label_dtype(max(values, default=0)))
    infos = []
    for index, (segment, value) in enumerate(zip(segments, values)):
        layer = int(segment.get("layer", index if voxels.ndim == 4 else 0))
        if not 0 <= layer < layers.shape[0]:
            raise InputError(path, f"segment {segment.get('name')!r} refers to missing layer {layer}")
        labels[layers[layer] == segment.get("labelValue", 1)] = value
        name = segment.get("name") or f"Segment_{value}"
        color = segment.get("color") or default_color(name, value)
        infos.append(SegmentInfo(value, name, tuple(float(c) for c in color)))
    return labels, infos


def _pad_onto(volume: Volume, reference: Volume, path: Path) -> Volume:
    """Place a segmentation cropped to its extent back onto the reference grid (same axes, whole-voxel shift)."""
    same_axes = np.allclose(volume.spacing, reference.spacing, atol=1e-4) and np.allclose(
        volume.direction, reference.direction, atol=1e-4
    )
    offset = reference.lps_to_ijk(np.asarray(volume.origin))[0]
    if not same_axes or not np.allclose(offset, np.round(offset), atol=1e-3):
        raise _off_grid(volume, reference, path)
    start = np.round(offset).astype(int)[::-1]  # KJI
    lo = np.maximum(start, 0)
    hi = np.maximum(np.minimum(start + volume.array.shape, reference.array.shape), lo)
    padded = np.zeros(reference.array.shape, dtype=volume.array.dtype)
    padded[tuple(slice(a, b) for a, b in zip(lo, hi))] = volume.array[
        tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    ]
    if np.count_nonzero(padded) != np.count_nonzero(volume.array):
        raise InputError(path, "segmentation extends beyond the image it should lie on")
    return reference.with_array(padded, path=str(path))


def _read_segmentation(path: Path, reference: Optional[Volume]) -> tuple[Volume, list[SegmentInfo]]:
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:
        raise InputError(path, f"cannot read segmentation ({str(error).strip().splitlines()[-1]})") from None
    voxels = segmentation.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise InputError(path, "segmentation has no 3D voxel data")
    labels, segments = _flatten_layers(voxels, segmentation.get("segments", []), path)
    spacing, origin, direction = _geometry(segmentation["ijkToLPS"])
    volume = Volume(np.ascontiguousarray(labels.transpose(2, 1, 0)), spacing, origin, direction, str(path))
    if reference is not None and not volume.same_grid(reference):
        volume = _pad_onto(volume, reference, path)
    return volume, sorted(segments, key=lambda s: s.value)


def read_labelmap(path: PathLike, reference: Optional[Volume] = None) -> tuple[Volume, list[SegmentInfo]]:
    """Read a label map (``.nii``, ``.nii.gz``, ``.nrrd``) or a Slicer segmentation (``.seg.nrrd``).

    With ``reference``, the result lies on its grid: a ``.seg.nrrd`` cropped to its extent (as Slicer writes
    it) is padded back; anything else off the grid is an :class:`InputError` naming what differs.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    name = path.name.lower()
    if not any(name.endswith(suffix) for suffix in LABELMAP_SUFFIXES):
        raise InputError(path, f"unsupported label map format (use {SEGMENTATION_SUFFIX}, .nii, .nii.gz or .nrrd)")
    if _is_segmentation(path):
        return _read_segmentation(path, reference)
    return _read_plain_labelmap(path, reference)


# ------------------------------------------------------------------------------------------------------ writing


def _checked_labels(
    labels: np.ndarray, reference: Volume, path: Path, segments: list[SegmentInfo]
) -> tuple[np.ndarray, list[SegmentInfo]]:
    """The labels as unsigned integers on the reference grid, and the segments completed for every value."""
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape:
        raise InputError(path, f"label array shape {labels.shape} does not match the image {reference.array.shape}")
    labels = _as_labels(labels, path)
    values = [s.value for s in segments]
    if len(set(values)) != len(values):
        raise InputError(path, "two segments share one label value")
    if any(v <= 0 for v in values):
        raise InputError(path, "segment label values must be positive (0 is the background)")
    return labels, _complete_segments(segments, labels)


def _terminology_tags(name: str) -> dict[str, dict[str, str]]:
    """Slicer's standard terminology (SNOMED CT) of a known structure name as a segment tag, as Slicer writes it."""
    from FMSegCore.io.terminology import terminology_entry

    entry = terminology_entry(name)
    return {"tags": {"TerminologyEntry": entry}} if entry else {}


def _write_segmentation(labels: np.ndarray, reference: Volume, temporary: Path, segments: list[SegmentInfo]) -> None:
    """A one-layer ``.seg.nrrd`` on the full reference grid (every segment's extent is the full grid, as
    slicerio recommends for compatibility with older Slicer versions)."""
    shape = reference.shape_ijk
    full_extent = [0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1]
    segmentation = {
        "voxels": np.ascontiguousarray(labels.transpose(2, 1, 0)),
        "ijkToLPS": reference.ijk_to_lps_matrix(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [
            {
                "id": f"Segment_{s.value}",
                "name": s.name,
                "color": [float(c) for c in s.color],
                "labelValue": int(s.value),
                "layer": 0,
                "extent": full_extent,
                "nameAutoGenerated": False,
                "colorAutoGenerated": False,
                **_terminology_tags(s.name),
            }
            for s in segments
        ],
    }
    slicerio.write_segmentation(str(temporary), segmentation)


def write_labelmap(
    labels: np.ndarray,
    reference: Volume,
    path: PathLike,
    segments: list[SegmentInfo],
    overwrite: bool = True,
) -> Path:
    """Write a KJI label array on the grid of ``reference``; atomic (nothing half-written on error).

    ``.seg.nrrd``: a one-layer Slicer segmentation with names, colours and label values, on the full grid.
    ``.nii``, ``.nii.gz``, ``.nrrd``: an integer label map plus ``<name>.labels.json`` beside it.
    Values without a segment get a default one (``Segment_<value>``).
    """
    import SimpleITK as sitk  # imported when used: the rest works without it
    path = Path(path)
    name = path.name.lower()
    if not any(name.endswith(suffix) for suffix in LABELMAP_SUFFIXES):
        raise InputError(path, f"unsupported label map format (use {SEGMENTATION_SUFFIX}, .nii, .nii.gz or .nrrd)")
    labels, segments = _checked_labels(labels, reference, path, segments)
    if name.endswith(SEGMENTATION_SUFFIX):
        with atomic_output(path, overwrite) as temporary:
            _write_segmentation(labels, reference, temporary, segments)
        return path
    image: sitk.Image = reference.with_array(labels).to_sitk()
    text = json.dumps(_labels_json_content(segments), indent=1) + "\n"
    with atomic_output(path, overwrite) as temporary, atomic_output(labels_json_path(path)) as names:
        sitk.WriteImage(image, str(temporary), True)
        names.write_text(text, encoding="utf-8")
    return path
