"""Results into segmentation nodes (candidates of stochastic models into nodes of their own), label maps out of
them, and one-step undo. No Qt; MRML only.

A result replaces the content of the segment of the same name (or adds one with the structure's colour and,
for a known structure, its standard terminology); every other segment is left as it was. Before any change
the segmentation is copied, so :func:`restore` brings back exactly what the user had.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import slicer
import slicer.util

from FMSegCore.io.colors import segment_color as new_segment_color
from FMSegCore.io.terminology import terminology_entry

#: Marks the segmentation nodes that hold candidates: "<id of the result's segmentation node>:<number>".
CANDIDATE_ATTRIBUTE = "FMSeg.CandidateOf"


def snapshot(segmentation_node: Any) -> Any:
    """A deep copy of the node's segmentation (every segment, its voxels, names, colours and tags)."""
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation_node.GetSegmentation())
    return copy


def restore(segmentation_node: Any, saved: Any) -> None:
    """Put a :func:`snapshot` back."""
    segmentation_node.GetSegmentation().DeepCopy(saved)
    segmentation_node.Modified()


def prepare(segmentation_node: Any, volume_node: Any) -> None:
    """Give an empty segmentation the volume's grid (so results are stored at the volume's resolution)."""
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def write_segment(segmentation_node: Any, volume_node: Any, name: str, mask_kji: np.ndarray,
                  color: Optional[Sequence[float]] = None) -> str:
    """Store a boolean KJI mask (on the volume's grid) as the segment ``name``; its segment id. A new segment gets
    ``color``, else FMSeg's colour rule (``colors.segment_color``, as in its files) given the colours shown."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if not segment_id:
        if color is None:
            count = segmentation.GetNumberOfSegments()
            taken = [segmentation.GetNthSegment(n).GetColor() for n in range(count)]
            color = new_segment_color(name, count + 1, taken)
        segment_id = segmentation.AddEmptySegment(name, name, tuple(color))
        entry = terminology_entry(name)
        if entry:
            segment = segmentation.GetSegment(segment_id)
            if hasattr(segment, "SetTerminology"):  # Slicer >= 5.7
                segment.SetTerminology(entry)
            else:
                segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ascontiguousarray(mask_kji, dtype=np.uint8),
                                                     segmentation_node, segment_id, volume_node)
    return segment_id


def write_labels(segmentation_node: Any, volume_node: Any, labels: np.ndarray,
                 segments: Sequence[dict[str, Any]]) -> list[str]:
    """Store each segment (``{"value", "name", "color"}``) of a KJI label map on the volume's grid; the segment
    ids, in the order of ``segments``."""
    prepare(segmentation_node, volume_node)
    return [write_segment(segmentation_node, volume_node, str(s["name"]), labels == int(s["value"]), s.get("color"))
            for s in segments]


def write_candidates(scene: Any, segmentation_node: Any, volume_node: Any, candidates: Sequence[np.ndarray],
                     segments: Sequence[dict[str, Any]]) -> list[Any]:
    """Candidate segmentations (label maps drawn by a stochastic model) into segmentation nodes of their own,
    "<segmentation> candidate 1", 2..., the segments named and coloured as in the result, hidden at first (the
    result stays readable; show one in the Data module). A run replaces the candidate nodes FMSeg made for this
    segmentation before (marked by :data:`CANDIDATE_ATTRIBUTE`) and removes those beyond the new count."""
    owner = segmentation_node.GetID()
    earlier = {}
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode", scene):
        mark = node.GetAttribute(CANDIDATE_ATTRIBUTE) or ""
        if mark.rpartition(":")[0] == owner:
            earlier[int(mark.rpartition(":")[2])] = node
    nodes = []
    for number, labels in enumerate(candidates, start=1):
        node = earlier.pop(number, None)
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                           f"{segmentation_node.GetName()} candidate {number}")
            node.SetAttribute(CANDIDATE_ATTRIBUTE, f"{owner}:{number}")
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetVisibility(False)
        else:
            node.GetSegmentation().RemoveAllSegments()
        write_labels(node, volume_node, labels, segments)
        nodes.append(node)
    for node in earlier.values():
        scene.RemoveNode(node)
    return nodes


def segment_names(segmentation_node: Any, segment_ids: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the given segments (all of them by default)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids else [segmentation.GetNthSegmentID(i)
                                                 for i in range(segmentation.GetNumberOfSegments())]
    return [segmentation.GetSegment(segment_id).GetName() for segment_id in ids]


def segment_color(segmentation_node: Any, name: str) -> list[float]:
    segmentation = segmentation_node.GetSegmentation()
    return [float(c) for c in segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)).GetColor()]


def label_map(segmentation_node: Any, volume_node: Any, values: dict[str, int]) -> np.ndarray:
    """A KJI uint16 label map on the volume's grid: each named segment's voxels get its value (later names in
    ``values`` win where segments overlap)."""
    segmentation = segmentation_node.GetSegmentation()
    labels = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, dtype=np.uint16)
    for name, value in values.items():
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if not segment_id:
            raise ValueError(f"{segmentation_node.GetName()}: no segment named {name!r}")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
        labels[mask > 0] = value
    return labels
