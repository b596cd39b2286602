"""Running a 3-D in-context model (:class:`~FMSegCore.models.interfaces.InContextModel3D`) on whole volumes.

- :func:`to_model_grid`: a volume (and its label map) normalised to [0, 1], then resampled onto the model's grid:
  axis-aligned (identity direction) at the model's spacing, covering the volume's physical extent (linear for
  images, nearest for labels), with what maps results back onto the volume's own grid.
- :func:`create_task`: the task embeddings ``(K, T, D)`` of the requested classes from labelled reference volumes
  (patches around the classes, one ``encode_task`` call per reference; several references averaged per class,
  weighted by the foreground voxels each one showed the model).
- :func:`apply_task`: a task applied to a query volume: MONAI sliding-window inference (Gaussian blending) on the
  model grid, softmax, probabilities resampled back onto the query's grid (linear), arg-max, the classes' label
  values; optionally the probabilities and an uncertainty map.

The **uncertainty map** is the normalised entropy of the softmax over background and the K classes, per voxel
of the query: ``-sum_c p_c log p_c / log(K + 1)``, 0 where the model is sure of one class, 1 where every class
(background included) is equally likely.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch

from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.io.volume import Volume
from FMSegCore.preprocessing.intensity import DEFAULT_CT_WINDOW, Window, guess_modality, normalize
from FMSegCore.progress import ProgressCallback, ProgressClock

if TYPE_CHECKING:
    from FMSegCore.engines.incontext.support import SupportScan

#: Reference patches encoded per reference volume at most (see :func:`create_task`).
MAX_PATCHES = 8
#: Corners of a volume's extent are rounded to this many decimals of a mm, so that the same extent described
#: by another grid (an axis flipped, say) gives exactly the same model grid.
_EXTENT_DECIMALS = 4


# ------------------------------------------------------------------------------------------------ the grid


@dataclass
class ModelGrid:
    """A volume on the model's grid: ``image`` (K, J, I) in [0, 1] and, when given, ``labels`` (nearest), with
    the grid's geometry (identity direction; ``origin`` of voxel (0, 0, 0) in LPS, ``spacing`` I, J, K) and the
    ``source`` volume whose grid results go back to."""

    image: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    source: Volume
    modality: str
    labels: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid's shape (K, J, I)."""
        return tuple(self.image.shape)  # type: ignore[return-value]

    def as_sitk(self, array: np.ndarray) -> sitk.Image:
        """An array (K, J, I) of this grid as a SimpleITK image with the grid's geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        return image

    def to_source(self, array: np.ndarray, linear: bool = True, default: float = 0.0,
                  region: Optional[tuple[slice, slice, slice]] = None) -> np.ndarray:
        """An array of this grid resampled onto the source volume's grid (linear or nearest; ``default``
        outside the grid), or onto the part ``region`` (K, J, I slices) of it."""
        source = self.source
        if region is None:
            return _resample(self.as_sitk(array), source.spacing, source.origin, source.direction,
                             source.shape_ijk, linear, default)
        start = [region[2].start, region[1].start, region[0].start]
        size = [region[2].stop - region[2].start, region[1].stop - region[1].start, region[0].stop - region[0].start]
        origin = source.ijk_to_lps(np.array([start], dtype=float))[0]
        return _resample(self.as_sitk(array), source.spacing, origin, source.direction, size, linear, default)

    def source_region(self, mask: np.ndarray) -> Optional[tuple[slice, slice, slice]]:
        """The source volume's voxels (K, J, I slices) that linear interpolation of this grid can take from
        where ``mask`` (on this grid) is set: the mask's bounding box grown by one voxel, mapped onto the
        source's index space; None when the mask is empty or the region is empty."""
        found = np.nonzero(mask)
        if not found[0].size:
            return None
        low = np.array([found[a].min() for a in (2, 1, 0)], dtype=float) - 1  # I, J, K on this grid
        high = np.array([found[a].max() for a in (2, 1, 0)], dtype=float) + 1
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1])
                            for z in (low[2], high[2])])
        points = np.asarray(self.origin) + corners * np.asarray(self.spacing)
        indices = self.source.lps_to_ijk(points)
        shape = self.source.shape_ijk
        start = [max(0, int(np.floor(indices[:, a].min()))) for a in range(3)]
        stop = [min(shape[a], int(np.ceil(indices[:, a].max())) + 1) for a in range(3)]
        if any(b <= a for a, b in zip(start, stop)):
            return None
        return slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0])


def _resample(image: sitk.Image, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray,
              size_ijk: Sequence[int], linear: bool, default: float = 0.0) -> np.ndarray:
    """``image`` sampled on the grid given (no reference image allocated), as a KJI array of its pixel type."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in size_ijk])
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin([float(o) for o in origin])
    resampler.SetOutputDirection([float(d) for d in np.asarray(direction, dtype=float).ravel()])
    resampler.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(float(default))
    resampler.SetOutputPixelType(image.GetPixelID())
    return sitk.GetArrayFromImage(resampler.Execute(image))


def model_spacing(model: Any) -> tuple[float, float, float]:
    """The model's voxel spacing (I, J, K) in mm."""
    return tuple(float(s) for s in model.patch_spacing_mm)  # type: ignore[return-value]


def _extent(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest LPS corner of the volume's voxels (their outer faces, not their centres)."""
    size = np.asarray(volume.shape_ijk, dtype=float)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    points = np.round(volume.ijk_to_lps(corners), _EXTENT_DECIMALS)
    return points.min(axis=0), points.max(axis=0)


def modality_of(volume: Volume, modality: str = "auto") -> str:
    """``modality`` (CT or MR), or the volume's guessed one for ``auto``."""
    return guess_modality(volume.array) if modality.lower() == "auto" else modality.upper()


def to_model_grid(volume: Volume, model: Any, modality: str = "auto", window: Window = DEFAULT_CT_WINDOW,
                  labels: Optional[np.ndarray] = None) -> ModelGrid:
    """``volume`` normalised to [0, 1] (CT window or MR percentiles; ``auto`` guesses), then resampled (linear)
    onto an axis-aligned grid with identity direction at the model's spacing that covers the volume's physical
    extent; ``labels`` (an integer KJI array on the volume's grid), when given, resampled the same way (nearest).
    Outside the volume the image is 0 and the labels background."""
    spacing = model_spacing(model)
    chosen = modality_of(volume, modality)
    low, high = _extent(volume)
    size = [max(1, int(math.ceil((high[a] - low[a]) / spacing[a] - 1e-6))) for a in range(3)]
    origin = tuple(float(low[a] + spacing[a] / 2) for a in range(3))
    normalised = volume.with_array(normalize(volume.array, chosen, window)).to_sitk()
    image = _resample(normalised, spacing, origin, np.eye(3), size, linear=True).astype(np.float32)
    grid = ModelGrid(image, origin, spacing, volume, chosen)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != volume.array.shape:
            raise InputError(volume.path, f"label map shape {labels.shape} differs from the image's "
                                          f"{volume.array.shape}")
        source = volume.with_array(labels.astype(np.int32)).to_sitk()
        grid.labels = _resample(source, spacing, origin, np.eye(3), size, linear=False).astype(np.int32)
    return grid


# ------------------------------------------------------------------------------------------------ the task


@dataclass
class BuiltTask:
    """What :func:`create_task` gives: the task ``(K, T, D)`` (float32, CPU), its classes, the foreground
    voxels each reference showed the model per class ``weights`` (R, K) (its weight in the average), the
    patches encoded per reference, a sha256 over the reference arrays and the modality of each reference."""

    task: torch.Tensor
    classes: list[SegmentInfo]
    weights: np.ndarray
    patches: list[int]
    references_sha256: str
    modalities: list[str] = field(default_factory=list)

    @property
    def class_weights(self) -> np.ndarray:
        """Foreground voxels per class over all references (K,)."""
        return self.weights.sum(axis=0)


def references_digest(references: Sequence[tuple[Volume, Volume]]) -> str:
    """A sha256 over the reference images and label maps: their arrays (values, shape, type) and geometry."""
    digest = hashlib.sha256()
    for image, labels in references:
        for volume in (image, labels):
            array = np.ascontiguousarray(volume.array)
            digest.update(f"{array.dtype.str}{array.shape}{tuple(volume.spacing)}{tuple(volume.origin)}"
                          f"{np.asarray(volume.direction, dtype=float).round(6).tolist()}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``array`` padded with zeros at the end of each axis up to at least ``shape``."""
    pads = [(0, max(0, want - have)) for have, want in zip(array.shape, shape)]
    return np.pad(array, pads) if any(after for _, after in pads) else array


def _axis_starts(low: int, high: int, patch: int, size: int, overlap: float) -> list[int]:
    """Patch starts along one axis covering ``low``..``high`` (exclusive) inside an axis of ``size`` >= patch."""
    length = high - low
    if length <= patch:
        start = (low + high) // 2 - patch // 2
        return [min(max(start, 0), size - patch)]
    stride = max(1, int(patch * (1 - overlap)))
    count = math.ceil((length - patch) / stride) + 1
    starts = np.round(np.linspace(low, high - patch, count)).astype(int)
    return sorted({min(max(int(s), 0), size - patch) for s in starts})


def _choose_patches(masks: np.ndarray, patch: Sequence[int], max_patches: int,
                    overlap: float = 0.25) -> list[tuple[int, int, int]]:
    """Starts (k, j, i) of patches over the bounding box of the masks' union (masks: (K, k, j, i) bool): first
    the patch with the most voxels of each class, then those with the most foreground of any class, up to
    ``max_patches`` (more only when there are more classes than that)."""
    union = masks.any(axis=0)
    found = np.nonzero(union)
    low = [int(a.min()) for a in found]
    high = [int(a.max()) + 1 for a in found]
    starts = [_axis_starts(low[a], high[a], patch[a], union.shape[a], overlap) for a in range(3)]
    candidates = [(k, j, i) for k in starts[0] for j in starts[1] for i in starts[2]]

    def window(array: np.ndarray, start: tuple[int, int, int]) -> np.ndarray:
        return array[..., start[0]:start[0] + patch[0], start[1]:start[1] + patch[1], start[2]:start[2] + patch[2]]

    per_class = np.array([window(masks, c).sum(axis=(1, 2, 3)) for c in candidates])  # (C, K)
    total = np.array([window(union, c).sum() for c in candidates])
    chosen: list[int] = []
    for k in range(masks.shape[0]):
        best = int(np.argmax(per_class[:, k]))
        if per_class[best, k] > 0 and best not in chosen:
            chosen.append(best)
    for index in np.argsort(-total, kind="stable"):
        if len(chosen) >= max_patches or total[index] == 0:
            break
        if int(index) not in chosen:
            chosen.append(int(index))
    return [candidates[index] for index in chosen]


@torch.no_grad()
def create_task(model: Any, references: Sequence[tuple[Volume, Volume]], classes: Sequence[SegmentInfo],
                modality: str = "auto", window: Window = DEFAULT_CT_WINDOW,
                max_patches: int = MAX_PATCHES) -> BuiltTask:
    """The task embeddings of ``classes`` from labelled ``references`` ((image, label map) pairs on one grid).

    Each reference goes onto the model grid (:func:`to_model_grid`); patches of the model's patch shape cover
    the bounding box of the union of the classes (a regular grid, a quarter overlap), and the ``max_patches``
    with the most foreground (first the best one of each class) are encoded in one ``encode_task`` call. A class
    absent from a reference's patches gets weight 0 there; several references are averaged per class, weighted
    by the class's voxels in their patches. A class absent from every reference is an :class:`InputError`.
    """
    if not references:
        raise InputError(None, "no reference: give at least one labelled (image, label map) pair")
    if not classes:
        raise InputError(None, "no class to build a task for")
    if max_patches < 1:
        raise InputError(None, f"max_patches must be at least 1, got {max_patches}")
    patch = tuple(int(p) for p in model.patch_shape)
    device = _device(model)
    values = [int(c.value) for c in classes]
    tasks: list[Optional[torch.Tensor]] = []
    weights = np.zeros((len(references), len(classes)), dtype=np.float64)
    counts, modalities = [], []
    for r, (image, labels) in enumerate(references):
        if labels.array.shape != image.array.shape:
            raise InputError(labels.path, f"label map shape {labels.array.shape} differs from its image's "
                                          f"{image.array.shape}")
        grid = to_model_grid(image, model, modality, window, labels=labels.array)
        modalities.append(grid.modality)
        assert grid.labels is not None
        masks = _pad_to(np.stack([grid.labels == v for v in values]), (len(values), *patch))
        picture = _pad_to(grid.image, patch)
        if not masks.any():
            tasks.append(None)
            counts.append(0)
            continue
        starts = _choose_patches(masks, patch, max_patches)
        cut = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in starts]
        images = torch.from_numpy(np.stack([picture[c] for c in cut])[:, None].astype(np.float32))
        onehot = torch.from_numpy(np.stack([masks[(slice(None), *c)] for c in cut]).astype(np.float32))
        weights[r] = onehot.sum(dim=(0, 2, 3, 4)).double().numpy()
        task = model.encode_task(images.to(device), onehot.to(device))
        tasks.append(task.detach().float().cpu())
        counts.append(len(starts))
    missing = [c for c, total in zip(classes, weights.sum(axis=0)) if total <= 0]
    if missing:
        names = ", ".join(f"{c.name!r} ({c.value})" for c in missing)
        source = references[0][1].path if len(references) == 1 else None
        raise InputError(source, f"class {names} is absent from every reference label map")
    rows = []
    for k in range(len(classes)):
        total = weights[:, k].sum()
        rows.append(sum(float(weights[r, k] / total) * task[k] for r, task in enumerate(tasks)
                        if task is not None and weights[r, k] > 0))
    return BuiltTask(torch.stack(rows).contiguous(), list(classes), weights, counts,
                     references_digest(references), modalities)


def build_task(model: Any, scans: Sequence[SupportScan], classes: Sequence[SegmentInfo], modality: str = "auto",
               window: Window = DEFAULT_CT_WINDOW) -> BuiltTask:
    """The task of ``classes`` from labelled support scans (:class:`~FMSegCore.engines.incontext.support.SupportScan`:
    each image with its label map on its grid), by :func:`create_task`: what ``fmseg task create``, ``fmseg
    incontext --model iris-fmseg`` and the worker's task and 3-D in-context jobs encode."""
    references = [(scan.volume, scan.volume.with_array(scan.labels, path=scan.source)) for scan in scans]
    return create_task(model, references, classes, modality, window)


# ------------------------------------------------------------------------------------------------ applying


def check_query_modality(task_modalities: Sequence[str], query: Volume, modality: str = "auto",
                         allow_cross_modality: bool = False) -> str:
    """The query's modality (given, or guessed); an :class:`InputError` naming the query when no reference of
    the task had it (a CT task on an MR, say), unless ``allow_cross_modality``: the model is weak across CT and
    MR (``fmseg bench incontext3d``, ``mr_to_ct``)."""
    chosen = modality_of(query, modality)
    known = {m.upper() for m in task_modalities if m and m.lower() != "auto"}
    if known and chosen not in known and not allow_cross_modality:
        raise InputError(query.path, f"looks like {chosen} but the task's references are "
                                     f"{' and '.join(sorted(known))}; the 3-D model is weak across modalities "
                                     "(--cross-modality runs it anyway)")
    return chosen



@dataclass
class AppliedTask:
    """What :func:`apply_task` gives on the query's grid: ``labels`` (K, J, I) uint16 holding the classes' label
    values (0: background), and when asked the ``probabilities`` (K + 1, K, J, I) float32 (background first) and
    the ``uncertainty`` (normalised entropy, in [0, 1])."""

    labels: np.ndarray
    probabilities: Optional[np.ndarray] = None
    uncertainty: Optional[np.ndarray] = None


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding-window inference cuts from an image of ``shape`` (padded to the roi)."""
    from monai.data.utils import dense_patch_slices

    padded = [max(s, r) for s, r in zip(shape, roi)]
    interval = [r if r == s else max(1, int(r * (1 - overlap))) for s, r in zip(padded, roi)]
    return len(dense_patch_slices(padded, roi, interval))


@torch.no_grad()
def apply_task(model: Any, task: Union[torch.Tensor, BuiltTask], query: Volume, classes: Sequence[SegmentInfo],
               modality: str = "auto", window: Window = DEFAULT_CT_WINDOW, overlap: float = 0.25,
               sw_batch_size: int = 2, progress: Optional[ProgressCallback] = None,
               probabilities: bool = False, uncertainty: bool = False,
               autocast_dtype: Optional[torch.dtype] = None) -> AppliedTask:
    """Segment ``classes`` (the rows of ``task``, in order) in ``query``: sliding-window inference on the model
    grid (roi = the patch shape, Gaussian blending; a query smaller than a patch is padded), softmax,
    probabilities resampled onto the query's grid (linear), arg-max, label values. ``progress`` hears of each
    batch of windows. ``task`` is the tensor ``(K, T, D)`` or :func:`create_task`'s result."""
    from monai.inferers import sliding_window_inference

    if isinstance(task, BuiltTask):
        task = task.task
    if task.ndim < 2 or task.shape[0] != len(classes):
        raise ValueError(f"task of shape {tuple(task.shape)} does not hold {len(classes)} classes")
    device = _device(model)
    roi = tuple(int(p) for p in model.patch_shape)
    grid = to_model_grid(query, model, modality, window)
    image = torch.from_numpy(grid.image)[None, None]
    on_device = task.to(device)
    clock = ProgressClock(progress, _window_count(grid.shape, roi, overlap), "Segmenting")
    done = [0]
    clock(0)

    def predict(patches: torch.Tensor) -> torch.Tensor:
        context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
        with context:
            logits = model.predict(patches, on_device)
        done[0] += patches.shape[0]
        clock(done[0])
        return logits.float()

    logits = sliding_window_inference(image, roi, sw_batch_size, predict, overlap=overlap, mode="gaussian",
                                      sw_device=device, device="cpu")
    softmax = torch.softmax(torch.as_tensor(logits)[0].float(), dim=0).numpy()  # (K + 1, k, j, i)
    values = np.array([0, *(int(c.value) for c in classes)], dtype=np.uint16)
    if not probabilities and not uncertainty:
        return AppliedTask(_labels_in_region(grid, softmax, values))
    best: Optional[np.ndarray] = None
    index: Optional[np.ndarray] = None
    entropy = None
    kept = []
    for channel in range(softmax.shape[0]):
        p = grid.to_source(softmax[channel], linear=True, default=1.0 if channel == 0 else 0.0)
        if probabilities:
            kept.append(p)
        if uncertainty:
            term = -p * np.log(np.clip(p, 1e-12, 1.0))
            entropy = term if entropy is None else entropy + term
        if best is None:
            best, index = p.copy(), np.zeros(p.shape, dtype=np.uint8 if len(values) < 256 else np.uint16)
        else:
            better = p > best
            index[better] = channel  # type: ignore[index]
            np.maximum(best, p, out=best)
    assert index is not None
    result = AppliedTask(values[index])
    if probabilities:
        result.probabilities = np.stack(kept).astype(np.float32)
    if uncertainty and entropy is not None:
        result.uncertainty = np.clip(entropy / math.log(len(values)), 0.0, 1.0).astype(np.float32)
    return result


def _labels_in_region(grid: ModelGrid, softmax: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The arg-max labels on the query's grid, as the full path gives them, computed only where a class can win.
    Linear interpolation mixes neighbouring voxels with positive weights, and background stays the highest of
    any mix of voxels where it is the highest; so outside the source region of the voxels where some class wins
    (:meth:`ModelGrid.source_region`), the query is background, and the probabilities are resampled inside it
    only."""
    labels = np.zeros(grid.source.array.shape, dtype=np.uint16)
    region = grid.source_region(softmax.argmax(axis=0) > 0)
    if region is None:
        return labels
    best = grid.to_source(softmax[0], linear=True, default=1.0, region=region)
    index = np.zeros(best.shape, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for channel in range(1, softmax.shape[0]):
        p = grid.to_source(softmax[channel], linear=True, default=0.0, region=region)
        better = p > best
        index[better] = channel
        np.maximum(best, p, out=best)
    labels[region] = values[index]
    return labels

