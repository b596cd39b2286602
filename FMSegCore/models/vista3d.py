"""VISTA3D (NVIDIA / MONAI, "Versatile Imaging SegmenTation and Annotation", arXiv 2406.05285) as an FMSeg model
family: a 3-D CT foundation model that segments 132 supported classes automatically from a class prompt, and any
structure interactively from include/exclude clicks (zero-shot for classes it was not trained on).

The network is MONAI's own :func:`monai.networks.nets.vista3d132` (not a re-implementation; 217,964,982
parameters): a SegResNetDS2 ``image_encoder`` with two decoder branches over a shared encoder (a *point* branch
and an *auto* branch, both 48-channel maps at the input's full resolution), a ``class_head``
(``ClassMappingClassify``: class-embedding x image-feature dot products, one logit map per asked class) and a
``point_head`` (``PointMappingSAM``: SAM's two-way transformer on the point branch's features, downsampled x2,
with random-Fourier point encodings). This module wraps it as a
:class:`~FMSegCore.models.interfaces.PromptableModel3D` (:class:`VISTA3DModel`) and adds automatic segmentation
(:meth:`VISTA3DModel.segment_classes`, :func:`segment_volume` with MONAI's ``sliding_window_inference``).

Weights: the MONAI model-zoo bundle ``vista3d`` ships ``models/model.pt``, a plain state_dict of
``vista3d132()`` (the bundle's ``CheckpointLoader`` loads it into the network as is; keys are the network's own,
``image_encoder.*``, ``class_head.*``, ``point_head.*``). :func:`load_vista3d` reads it (or one wrapped under
``"model"``/``"state_dict"``) with ``weights_only=True`` and strict keys. The *code* is Apache-2.0 (MONAI); the
*weights* are under the NVIDIA License (``LICENSE.weights`` of the bundle): non-commercial use only, i.e. research
or evaluation.

Conventions of the bundle (``configs/inference.json``, ``scripts/inferer.py``) that this wrapper follows:

- Preprocessing: CT resampled to 1.5 mm (``Spacingd``, bilinear), HU clipped to [-963.82, 1053.68] and scaled to
  [0, 1] (``ScaleIntensityRanged``; :data:`HU_RANGE`), RAS orientation, 128^3 patches. :meth:`preprocess` does the
  intensity part; the engine's crops are already at :attr:`crop_spacing_mm`. (The bundle's ``CropForegroundd``
  is a speed-up and is not reproduced.)
- Axes: MONAI arrays after ``LoadImage`` + ``Orientation("RAS")`` are ``(C, x, y, z)``, i.e. the network's
  spatial dims are the I, J, K axes of the (RAS-ordered) volume. FMSeg crops are ``(K, J, I)`` arrays, so
  :meth:`encode` transposes them to ``(I, J, K)``; points (i, j, k) are passed unchanged as the network's point
  coordinates (indices along its dims 2, 3, 4, voxel centres at integers) and logits are transposed back. The
  interactive crops follow the scan's stored axes (the engine does not reorient them); :func:`segment_volume`
  reorients to RAS when given the scan's direction, which matters for left/right classes.
- Points: labels 1 (include) and 0 (exclude); with :attr:`VISTA3DModel.point_class` set to one of the special
  classes (:data:`SPECIAL_CLASSES`: tumours, vessels, trachea, lesions) they become 3 and 2, as the network's
  ``convert_point_label`` does; a class above 132 selects the zero-shot embedding. Points outside the crop are
  dropped, as MONAI's ``point_based_window_inferer`` drops points outside its window (that inferer also sums one
  window per click, so on a crop the size of its window it returns N x these logits for N clicks: the same
  mask). VISTA3D has no box prompt: a box becomes an include point at its centre.
- Class ids: :data:`VISTA3D_CLASSES` (the bundle's label dictionary, 1..132; ``vista3d132`` has 512 class
  embeddings, ids above 132 are zero-shot). The bundle's default "everything" set leaves out merged, ambiguous
  and lesion classes (:data:`EVERYTHING_CLASSES`, 117 ids); :data:`SUBCLASSES` are the bundle's expansions.

What is cached: :meth:`VISTA3DModel.encode` returns the point branch of the image encoder (``out`` in
``VISTA3D.forward``), ``(B, 48, I, J, K)`` at the crop's full resolution (48 x 128^3 x 4 bytes = 403 MB per crop
in float32, half under autocast); :meth:`VISTA3DModel.decode` runs only ``point_head`` on it, exactly as
``VISTA3D.forward`` does for point prompts without a class prompt. :meth:`decode` ignores ``mask_logits``: the
point head takes no mask (every click of the segment is decoded again), and the bundle's inference passes no
previous mask. VISTA3D predicts no quality score: the quality returned is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import vista3d132
from monai.networks.nets.vista3d import VISTA3D
from scipy import ndimage
from torch import nn

from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.models.checkpoints import load_strict
from FMSegCore.models.interfaces import PromptBatch3D

#: The patch the bundle works on: voxels per side and mm.
CROP_SIZE = 128
CROP_SPACING_MM = 1.5
#: HU window of the bundle's ``ScaleIntensityRanged`` (clipped, scaled to [0, 1]).
HU_RANGE = (-963.8247715525971, 1053.678477684517)
#: Logit of "no prediction" (``VISTA3D.NINF_VALUE``): rows without any point inside the crop.
NO_PREDICTION = -9999.0
#: Highest class id with a trained embedding (``point_head.last_supported``); higher ids are zero-shot.
LAST_SUPPORTED = 132

#: The bundle's label dictionary (``metadata.json`` ``channel_def`` / ``docs/labels.json``): class id -> name.
VISTA3D_CLASSES: dict[int, str] = {
    1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas", 5: "right kidney", 6: "aorta",
    7: "inferior vena cava", 8: "right adrenal gland", 9: "left adrenal gland", 10: "gallbladder",
    11: "esophagus", 12: "stomach", 13: "duodenum", 14: "left kidney", 15: "bladder",
    16: "prostate or uterus", 17: "portal vein and splenic vein", 18: "rectum", 19: "small bowel", 20: "lung",
    21: "bone", 22: "brain", 23: "lung tumor", 24: "pancreatic tumor", 25: "hepatic vessel",
    26: "hepatic tumor", 27: "colon cancer primaries", 28: "left lung upper lobe", 29: "left lung lower lobe",
    30: "right lung upper lobe", 31: "right lung middle lobe", 32: "right lung lower lobe",
    33: "vertebrae L5", 34: "vertebrae L4", 35: "vertebrae L3", 36: "vertebrae L2", 37: "vertebrae L1",
    38: "vertebrae T12", 39: "vertebrae T11", 40: "vertebrae T10", 41: "vertebrae T9", 42: "vertebrae T8",
    43: "vertebrae T7", 44: "vertebrae T6", 45: "vertebrae T5", 46: "vertebrae T4", 47: "vertebrae T3",
    48: "vertebrae T2", 49: "vertebrae T1", 50: "vertebrae C7", 51: "vertebrae C6", 52: "vertebrae C5",
    53: "vertebrae C4", 54: "vertebrae C3", 55: "vertebrae C2", 56: "vertebrae C1", 57: "trachea",
    58: "left iliac artery", 59: "right iliac artery", 60: "left iliac vena", 61: "right iliac vena",
    62: "colon", 63: "left rib 1", 64: "left rib 2", 65: "left rib 3", 66: "left rib 4", 67: "left rib 5",
    68: "left rib 6", 69: "left rib 7", 70: "left rib 8", 71: "left rib 9", 72: "left rib 10",
    73: "left rib 11", 74: "left rib 12", 75: "right rib 1", 76: "right rib 2", 77: "right rib 3",
    78: "right rib 4", 79: "right rib 5", 80: "right rib 6", 81: "right rib 7", 82: "right rib 8",
    83: "right rib 9", 84: "right rib 10", 85: "right rib 11", 86: "right rib 12", 87: "left humerus",
    88: "right humerus", 89: "left scapula", 90: "right scapula", 91: "left clavicula", 92: "right clavicula",
    93: "left femur", 94: "right femur", 95: "left hip", 96: "right hip", 97: "sacrum",
    98: "left gluteus maximus", 99: "right gluteus maximus", 100: "left gluteus medius",
    101: "right gluteus medius", 102: "left gluteus minimus", 103: "right gluteus minimus",
    104: "left autochthon", 105: "right autochthon", 106: "left iliopsoas", 107: "right iliopsoas",
    108: "left atrial appendage", 109: "brachiocephalic trunk", 110: "left brachiocephalic vein",
    111: "right brachiocephalic vein", 112: "left common carotid artery", 113: "right common carotid artery",
    114: "costal cartilages", 115: "heart", 116: "left kidney cyst", 117: "right kidney cyst",
    118: "prostate", 119: "pulmonary vein", 120: "skull", 121: "spinal cord", 122: "sternum",
    123: "left subclavian artery", 124: "right subclavian artery", 125: "superior vena cava",
    126: "thyroid gland", 127: "vertebrae S1", 128: "bone lesion", 129: "kidney mass", 130: "liver tumor",
    131: "vertebrae L6", 132: "airway",
}
#: The bundle's default automatic set (``everything_labels``): 1..132 without merged parents, ambiguous classes
#: and lesions.
EVERYTHING_CLASSES: tuple[int, ...] = tuple(sorted(
    set(range(1, LAST_SUPPORTED + 1)) - {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132}))
#: Class prompts the bundle expands to their parts (kidney, lung, bone).
SUBCLASSES: dict[int, tuple[int, ...]] = {
    2: (14, 5),
    20: (28, 29, 30, 31, 32),
    21: tuple(range(33, 57)) + tuple(range(63, 98)) + (114, 120, 122),
}
#: Classes whose clicks use the special point labels 3 / 2 (the network's ``convert_point_label`` default).
SPECIAL_CLASSES: tuple[int, ...] = (23, 24, 25, 26, 27, 57, 128)


class VISTA3DModel(nn.Module):
    """MONAI's VISTA3D (``network``), implementing :class:`~FMSegCore.models.interfaces.PromptableModel3D`;
    :meth:`segment_classes` is its automatic (class-prompt) branch."""

    crop_shape = (CROP_SIZE, CROP_SIZE, CROP_SIZE)
    crop_spacing_mm = (CROP_SPACING_MM, CROP_SPACING_MM, CROP_SPACING_MM)

    def __init__(self, network: Optional[VISTA3D] = None) -> None:
        super().__init__()
        self.network: VISTA3D = network if network is not None else vista3d132()
        #: The class the clicks are for (``prompt_class``): None: a supported structure, as the bundle's
        #: point-only inference; a :data:`SPECIAL_CLASSES` id switches to the special point labels; an id above
        #: :data:`LAST_SUPPORTED` uses the zero-shot embedding.
        self.point_class: Optional[int] = None

    # ------------------------------------------------------------------ PromptableModel3D
    def preprocess(self, crop: np.ndarray) -> torch.Tensor:
        """A (K, J, I) crop of HU -> (1, K, J, I) float32: clipped to :data:`HU_RANGE`, scaled to [0, 1]."""
        low, high = HU_RANGE
        array = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
        return ((array - low) / (high - low)).clamp_(0.0, 1.0)[None]

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """Preprocessed crops (B, 1, K, J, I) -> the image encoder's point branch (B, 48, I, J, K), on the
        network's axes. Each side must be a multiple of 16."""
        out, _ = self.network.image_encoder(crops.transpose(2, 4), with_point=True, with_label=False)
        return out

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch3D) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, 1, K, J, I) at the crop's full resolution, and a quality of 1 (B,).

        Points are crop voxel indices (i, j, k); boxes become include points at their centres; points outside the
        crop are dropped (a prompt left without points gets :data:`NO_PREDICTION` everywhere). ``mask_logits`` is
        ignored (see the module's notes)."""
        index = prompts.embedding_index.to(embeddings.device)
        points, labels = _points_and_labels(prompts)
        device, batch = embeddings.device, index.shape[0]
        size = embeddings.shape[2:]
        points, labels = points.float().to(device), labels.long().to(device)
        # the bundle's point window keeps the points inside it and drops the columns that are padding everywhere
        extent = torch.tensor([float(s) for s in size], device=device) - 0.5
        inside = ((points >= -0.5) & (points <= extent)).all(-1)
        labels = torch.where(inside, labels, torch.full_like(labels, -1))
        points = torch.where(inside[..., None], points, torch.zeros_like(points))
        kept = (labels != -1).any(0)
        points, labels = points[:, kept], labels[:, kept]
        prompt_class = None
        if self.point_class is not None:
            prompt_class = torch.full((batch, 1), int(self.point_class), dtype=torch.long, device=device)
            labels = self.network.convert_point_label(labels.clone(), [int(self.point_class)] * batch)
        logits = torch.full((batch, 1, *size), NO_PREDICTION, device=device)
        valid = (labels != -1).any(1)
        weight_dtype = next(self.network.point_head.parameters()).dtype
        for value in torch.unique(index[valid]).tolist():
            rows = valid & (index == value)
            features = embeddings[value][None]
            if not torch.is_autocast_enabled(device.type):
                features = features.to(weight_dtype)
            classes = None if prompt_class is None else prompt_class[rows]
            logits[rows] = self.network.point_head(features, points[rows], labels[rows], class_vector=classes).float()
        return logits.transpose(2, 4), torch.ones(batch, device=device)

    # ------------------------------------------------------------------ automatic segmentation
    def segment_classes(self, crops: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
        """Class-head logits (B, C, K, J, I) of the classes ``class_ids`` (C) for preprocessed crops
        (B, 1, K, J, I): ``VISTA3D.forward`` with a class prompt (the encoder's auto branch and ``class_head``)."""
        return self.network_forward_classes(crops.transpose(2, 4), class_ids).transpose(2, 4)

    def network_forward_classes(self, patches: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
        """The same on the network's axes: (B, 1, I, J, K) -> (B, C, I, J, K); a predictor for MONAI's
        ``sliding_window_inference``."""
        vector = torch.as_tensor([int(c) for c in class_ids], dtype=torch.long, device=patches.device)[:, None]
        return self.network(patches, class_vector=vector, transpose=True)


def _points_and_labels(prompts: PromptBatch3D) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' points (B, N, 3) and labels (B, N), each box appended as an include point at its centre."""
    points, labels = prompts.points, prompts.point_labels
    if prompts.boxes is not None:
        boxes = prompts.boxes.float()
        centres = ((boxes[:, :3] + boxes[:, 3:]) / 2)[:, None]
        ones = torch.ones(centres.shape[:2], dtype=torch.long, device=centres.device)
        points = centres if points is None else torch.cat([points.float(), centres.to(points.device)], dim=1)
        labels = ones if labels is None else torch.cat([labels.long(), ones.to(labels.device)], dim=1)
    if points is None or labels is None:
        raise ValueError("VISTA3D needs points or boxes")
    return points, labels


# ---------------------------------------------------------------------------------------------- whole volumes
def _ras_order(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """Array transpose (of a KJI array) and the flipped axes (of the transposed array) that put a volume with
    the ITK ``direction`` (columns = I, J, K in LPS) in RAS order: I to the right, J anterior, K superior."""
    direction = np.asarray(direction, dtype=float)
    axes = anatomical_axes(direction)  # the stored IJK axis along L-R, A-P, S-I
    flips = (direction[0, axes[0]] > 0, direction[1, axes[1]] > 0, direction[2, axes[2]] < 0)
    order = tuple(2 - axes[2 - n] for n in range(3))
    return order, tuple(2 - row for row in range(3) if flips[row])  # type: ignore[return-value]


def segment_volume(model: VISTA3DModel, image: np.ndarray, spacing: Sequence[float],
                   class_ids: Sequence[int] = EVERYTHING_CLASSES, *, direction: Optional[np.ndarray] = None,
                   overlap: float = 0.25, sw_batch_size: int = 1, class_chunk: Optional[int] = None,
                   roi_size: Optional[Sequence[int]] = None, memory_bytes: int = 4 << 30) -> np.ndarray:
    """Automatic segmentation of a whole CT ``image`` (K, J, I) of HU with voxel ``spacing`` (I, J, K) mm: a
    (K, J, I) uint16 label map of class ids (0: background).

    As the bundle: reoriented to RAS when ``direction`` (ITK, LPS columns) is given (else the array's I, J, K are
    taken as RAS-ordered), resampled to 1.5 mm (linear), scaled as :meth:`VISTA3DModel.preprocess`, MONAI's
    ``sliding_window_inference`` (``roi_size`` I, J, K: default the 128^3 patch, replicate padding), and
    ``VistaPostTransformd``'s rule: a voxel takes the class of the highest logit where one is > 0. Classes run
    ``class_chunk`` at a time (memory: ``class_chunk`` floats per 1.5 mm voxel; default: as many as fit
    ``memory_bytes``, since each chunk runs the encoder over every window again). The label map goes back to the
    input grid by nearest neighbour, as the bundle's ``Invertd``."""
    device = next(model.parameters()).device
    image = np.asarray(image)
    spacing = tuple(float(s) for s in spacing)
    order, flips = (0, 1, 2), ()
    if direction is not None:
        order, flips = _ras_order(direction)
        image = np.transpose(image, order)
        spacing = tuple(spacing[2 - axis] for axis in order[::-1])  # type: ignore[assignment]
        image = np.flip(image, flips) if flips else image
    kji_spacing = np.asarray(spacing[::-1], dtype=float)
    zoom = kji_spacing / CROP_SPACING_MM
    shape = tuple(max(1, int(round(n * z))) for n, z in zip(image.shape, zoom))
    resampled = ndimage.affine_transform(np.ascontiguousarray(image, dtype=np.float32), 1.0 / zoom,
                                         output_shape=shape, order=1, mode="nearest")
    inputs = model.preprocess(resampled)[None].to(device).transpose(2, 4)  # (1, 1, I, J, K)
    roi = tuple(int(r) for r in (roi_size or model.crop_shape[::-1]))
    ids = [int(c) for c in class_ids]
    if class_chunk is None:
        class_chunk = max(1, min(len(ids), memory_bytes // (4 * max(1, int(np.prod(inputs.shape[2:]))))))
    best = torch.full(inputs.shape[2:], 0.0, device="cpu")
    labels = torch.zeros(inputs.shape[2:], dtype=torch.int32)
    with torch.inference_mode():
        for start in range(0, len(ids), max(1, class_chunk)):
            chunk = ids[start:start + max(1, class_chunk)]
            logits = sliding_window_inference(
                inputs, roi, sw_batch_size, model.network_forward_classes, overlap=overlap, mode="constant",
                padding_mode="replicate", class_ids=chunk)
            value, which = torch.as_tensor(logits)[0].float().cpu().max(0)
            better = value > best
            best[better] = value[better]
            labels[better] = torch.as_tensor(chunk, dtype=torch.int32)[which[better]]
    label_kji = labels.permute(2, 1, 0).numpy().astype(np.uint16)
    # nearest 1.5 mm voxel of every input voxel
    picks = [np.clip(np.round(np.arange(n) * z).astype(int), 0, m - 1) for n, z, m in zip(image.shape, zoom, shape)]
    out = label_kji[np.ix_(*picks)]
    if direction is not None:
        out = np.flip(out, flips) if flips else out
        out = np.transpose(out, np.argsort(order))
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------- loading
def build_vista3d() -> VISTA3DModel:
    """An untrained VISTA3D (MONAI's ``vista3d132()``) in eval mode."""
    return VISTA3DModel().eval()


def load_vista3d(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 trainable: bool = False) -> VISTA3DModel:
    """Build VISTA3D and load the bundle's ``model.pt`` (a plain state_dict of ``vista3d132()``, or one wrapped
    under ``"model"``/``"state_dict"``) with ``weights_only=True`` and strict keys, in eval mode.

    Raises :class:`~FMSegCore.errors.ModelError` with a one-line message on an unreadable or wrong checkpoint.
    ``trainable`` changes nothing: the same network trains."""
    del trainable
    model = VISTA3DModel()
    load_strict(model.network, checkpoint, "VISTA3D")
    return model.eval().to(device)
