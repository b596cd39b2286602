"""Intensity normalisation to [0, 1] per modality: CT windows, MR percentiles, and MedSAM's per-slice min-max.

Every function returns a new float32 array of the input's shape; the input is never changed.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles
from monai.utils import convert_to_numpy

from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume

ArrayOrVolume = Union[np.ndarray, Volume]
Window = Union[str, tuple[float, float]]

#: CT windows (lowest, highest HU) from the usual level/width: abdomen L40/W400 (MedSAM's soft tissue
#: window), lung L-600/W1500, bone L400/W1800.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
}
DEFAULT_CT_WINDOW = "abdomen"
#: Share of voxels below -500 (air in HU: outside the body, lungs, bowel gas, scanner padding) that marks a CT.
CT_AIR_FRACTION = 0.01


def _array(data: ArrayOrVolume) -> np.ndarray:
    return np.asarray(data.array if isinstance(data, Volume) else data)


def _constant(array: np.ndarray) -> bool:
    return array.size == 0 or float(array.min()) == float(array.max())


def ct_window(window: Window = DEFAULT_CT_WINDOW) -> tuple[float, float]:
    """The (lowest, highest) HU of a named preset or of an explicit pair."""
    if isinstance(window, str):
        if window.lower() not in CT_WINDOWS:
            raise InputError(None, f"unknown CT window {window!r} (use one of {', '.join(CT_WINDOWS)} or (low, high))")
        return CT_WINDOWS[window.lower()]
    low, high = (float(v) for v in window)
    if not high > low:
        raise InputError(None, f"CT window ({low:g}, {high:g}) must have its lower bound below its upper bound")
    return low, high


def normalize_ct(array: np.ndarray, window: Window = DEFAULT_CT_WINDOW) -> np.ndarray:
    """Clip HU to the window and scale linearly to [0, 1] (MONAI ``ScaleIntensityRange``)."""
    low, high = ct_window(window)
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return convert_to_numpy(scale(np.asarray(array, dtype=np.float32)), dtype=np.float32)


def normalize_mr(array: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Scale the ``lower``..``upper`` percentiles to [0, 1] and clip (MONAI ``ScaleIntensityRangePercentiles``).

    A constant image becomes all zeros.
    """
    array = np.asarray(array, dtype=np.float32)
    if not 0.0 <= lower < upper <= 100.0:
        raise InputError(None, f"MR percentiles must satisfy 0 <= lower < upper <= 100, got {lower:g}, {upper:g}")
    if _constant(array) or np.percentile(array, lower) == np.percentile(array, upper):
        return np.zeros(array.shape, dtype=np.float32)
    scale = ScaleIntensityRangePercentiles(lower, upper, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return convert_to_numpy(scale(array), dtype=np.float32)


def guess_modality(data: ArrayOrVolume) -> str:
    """``"CT"`` when at least 1% of the voxels lie below -500 (air in Hounsfield units), else ``"MR"``.

    MR intensities are arbitrary but practically never far below zero; CT of a body holds air. A CT cropped
    tightly inside the body may be taken for MR: pass the modality explicitly then.
    """
    array = _array(data)
    if array.size == 0:
        return "MR"
    return "CT" if float(np.mean(array < -500)) >= CT_AIR_FRACTION else "MR"


def normalize(data: ArrayOrVolume, modality: str = "auto", window: Window = DEFAULT_CT_WINDOW) -> np.ndarray:
    """Float32 array in [0, 1]: CT through ``window``, MR through percentiles; ``"auto"`` guesses the modality."""
    array = _array(data)
    chosen = modality.upper()
    if chosen == "AUTO":
        chosen = guess_modality(array)
    if chosen == "CT":
        return normalize_ct(array, window)
    if chosen == "MR":
        return normalize_mr(array)
    raise InputError(None, f"unknown modality {modality!r} (use CT, MR or auto)")


def minmax_slice(image: np.ndarray) -> np.ndarray:
    """Scale one slice (or any array) to [0, 1] by its own minimum and maximum, as MedSAM does."""
    image = np.asarray(image, dtype=np.float32)
    if _constant(image):
        return np.zeros(image.shape, dtype=np.float32)
    low = image.min()
    return ((image - low) / max(float(image.max() - low), 1e-8)).astype(np.float32)
