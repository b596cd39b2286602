"""Cross-subject scenarios: a support scan (or training scan) and a query scan that differ as a user's next
patient does: field of view, spacing, orientation, subject and modality.

Reported scenarios (never used to choose a default or a rule):

1. ``fov_shift``: support = the bundled abdominal CT; query = its upper 45 %, resampled to 1 x 1 x 2 mm and
   stored LAS (labels resampled nearest).
2. ``ct_to_mr`` / ``mr_to_ct``: the bundled abdominal CT and abdominal MR (two subjects), structures matched by
   name.
3. ``brain_cross``: the ICBM 2009c template labelled by the Neuromorphometrics atlas as the support; the MNI152
   (FSL) template as the query, warped by a smooth random deformation (a stand-in for another subject's
   anatomy), tilted 8 degrees, cut and resampled to 1.5 mm, LAS. Both are held out of the in-context training
   (template and atlas).

Development scenarios (``dev_*``), for choosing defaults: the small chest CT and the abdominal MR against
shifted copies of themselves, and ICBM 2009a (with skull) against a deformed copy of ICBM 2009c with a training
atlas. Every scenario is built at run time from ``Resources/SampleData`` and the pinned brain wheels; nothing
comes from the reserved sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from FMSegCore.io.volume import Volume

#: The large organs the cross-subject targets are stated on.
LARGE_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta")
ABDOMEN_STRUCTURES = LARGE_ORGANS + ("pancreas", "inferior_vena_cava", "autochthon_left", "spinal_cord")
BRAIN_STRUCTURES = ("Brain_Stem", "Left_Cerebellum_Exterior", "Right_Cerebral_White_Matter", "Left_Hippocampus",
                    "Right_Thalamus_Proper", "Left_Caudate", "Right_Putamen", "Left_Lateral_Ventricle")
DEV_BRAIN_STRUCTURES = ("Left-Thalamus", "Right-Caudate", "Left-Putamen", "Right-Hippocampus",
                        "Brain-Stem", "Left-Cerebellum-Cortex", "Left-Lateral-Ventricle",
                        "Right-Cerebral-White-Matter")
REPORTED = ("fov_shift", "ct_to_mr", "mr_to_ct", "brain_cross")
DEVELOPMENT = ("dev_chest_shift", "dev_mr_shift", "dev_brain")
#: How far (LPS mm) a shifted copy's world frame moves from its source's.
FRAME_SHIFT_MM = (23.0, -17.0, 64.0)
#: Fewest voxels a structure needs in both scans to be scored.
MIN_VOXELS = 20


@dataclass
class LabelledScan:
    """A scan with its label map on the same grid and the label names."""

    name: str
    volume: Volume
    labels: np.ndarray
    names: dict[int, str]
    modality: str

    def value_of(self, name: str) -> Optional[int]:
        for value, known in self.names.items():
            if known.lower() == name.lower():
                return value
        return None

    def mask(self, name: str) -> np.ndarray:
        value = self.value_of(name)
        return np.zeros(self.labels.shape, bool) if value is None else self.labels == value


@dataclass
class Scenario:
    """A support (or training) scan, a query scan, and the structures scored on the query (by name)."""

    name: str
    support: LabelledScan
    query: LabelledScan
    structures: list[str]
    description: str
    reported: bool = True
    notes: dict = field(default_factory=dict)


def _common_structures(support: LabelledScan, query: LabelledScan, candidates: Sequence[str]) -> list[str]:
    return [name for name in candidates
            if support.mask(name).sum() >= MIN_VOXELS and query.mask(name).sum() >= MIN_VOXELS]


def sample_scan(case: str) -> LabelledScan:
    """A bundled sample case as a labelled scan."""
    from FMSegCore.io.labelmap import read_labelmap
    from FMSegCore.io.volume import read_volume
    from FMSegCore.zoo.cache import resources_dir

    folder = resources_dir() / "SampleData" / case
    volume = read_volume(folder / "image.nii.gz")
    labels, segments = read_labelmap(folder / "label.nii.gz", reference=volume)
    modality = "MR" if case.startswith("mr") else "CT"
    return LabelledScan(case, volume, labels.array.astype(np.int32), {s.value: s.name for s in segments}, modality)


def _bspline(volume: Volume, amplitude_mm: float, seed: int, mesh: int = 3):
    """A smooth random deformation over the volume (B-spline, ``mesh`` cells per axis, coefficients ~ N(0, a))."""
    import SimpleITK as sitk

    transform = sitk.BSplineTransformInitializer(volume.to_sitk(), [mesh] * 3, 3)
    rng = np.random.default_rng(seed)
    parameters = rng.normal(0.0, amplitude_mm, len(transform.GetParameters()))
    transform.SetParameters([float(p) for p in parameters])
    return transform


def shifted_copy(scan: LabelledScan, keep: tuple[float, float] = (0.0, 1.0),
                 spacing: Sequence[float] = (1.0, 1.0, 2.0), flip_lr: bool = True, tilt_deg: float = 0.0,
                 deform_mm: float = 0.0, seed: int = 0, frame_shift_mm: Sequence[float] = FRAME_SHIFT_MM,
                 name: Optional[str] = None) -> LabelledScan:
    """A copy of ``scan`` cut to the fraction ``keep`` of its superior-inferior extent (0: most inferior),
    resampled to ``spacing`` (mm, i/j/k), its i axis reversed (RAS <-> LAS) when ``flip_lr``, its grid tilted
    by ``tilt_deg`` about the left-right axis, and optionally warped by a smooth deformation of about
    ``deform_mm``. Image linear, labels nearest neighbour. The copy is placed ``frame_shift_mm`` (LPS) away
    in world coordinates, as another session on another scanner table would be: nothing may rely on the two
    scans sharing a frame."""
    import SimpleITK as sitk

    source = scan.volume
    direction = np.asarray(source.direction, dtype=float)
    superior = int(np.argmax(np.abs(direction[2])))  # the ijk axis closest to S
    count = source.shape_ijk[superior]
    low, high = sorted(keep)
    first, last = int(round(low * (count - 1))), int(round(high * (count - 1)))
    if direction[2, superior] < 0:  # that axis runs from S to I: fractions count from its far end
        first, last = count - 1 - last, count - 1 - first
    box = [(0, n - 1) for n in source.shape_ijk]
    box[superior] = (first, last)
    corners = np.array([[box[0][a], box[1][b], box[2][c]] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    points = source.ijk_to_lps(corners)
    new_direction = direction.copy()
    if flip_lr:
        new_direction[:, 0] = -new_direction[:, 0]
    if tilt_deg:
        angle = np.deg2rad(tilt_deg)
        rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        new_direction = rotation @ new_direction
    along = points @ new_direction  # coordinates along the new axes
    lows, highs = along.min(axis=0), along.max(axis=0)
    spacing = np.asarray(spacing, dtype=float)
    size = [int(np.floor((h - lo) / s)) + 1 for lo, h, s in zip(lows, highs, spacing)]
    origin = new_direction @ lows
    transform = _bspline(source, deform_mm, seed) if deform_mm > 0 else sitk.Transform()
    background = -1024.0 if scan.modality == "CT" else float(np.min(source.array))

    def resample(array: np.ndarray, interpolator: int, default: float) -> np.ndarray:
        image = source.with_array(array).to_sitk()
        out = sitk.Resample(image, size, transform, interpolator, [float(o) for o in origin],
                            [float(s) for s in spacing], [float(d) for d in new_direction.ravel()], default)
        return sitk.GetArrayFromImage(out)

    image = resample(source.array.astype(np.float32), sitk.sitkLinear, background)
    if np.issubdtype(source.array.dtype, np.integer):
        image = np.round(image).astype(source.array.dtype)
    labels = resample(scan.labels.astype(np.int32), sitk.sitkNearestNeighbor, 0).astype(np.int32)
    origin = origin + np.asarray(frame_shift_mm, dtype=float)
    volume = Volume(image, tuple(float(s) for s in spacing), tuple(float(o) for o in origin), new_direction)
    return LabelledScan(name or f"{scan.name} (shifted)", volume, labels, dict(scan.names), scan.modality)


def brain_scan(template: str, atlas: str) -> LabelledScan:
    """A brain template on FMSeg's 2 mm MNI grid with one atlas as its label map (downloads two wheels once)."""
    from FMSegCore.training.brain_atlases import GRID_AFFINE, brain_subjects

    subject = next(s for s in brain_subjects() if s.name == template)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    direction = ras_to_lps @ (GRID_AFFINE[:3, :3] / np.linalg.norm(GRID_AFFINE[:3, :3], axis=0))
    spacing = tuple(float(s) for s in np.linalg.norm(GRID_AFFINE[:3, :3], axis=0))
    origin = tuple(float(o) for o in ras_to_lps @ GRID_AFFINE[:3, 3])
    image = np.ascontiguousarray(subject.image.transpose(2, 1, 0)).astype(np.float32)
    labels = np.ascontiguousarray(subject.labels[atlas].transpose(2, 1, 0)).astype(np.int32)
    return LabelledScan(f"{template}/{atlas}", Volume(image, spacing, origin, direction), labels,
                        dict(subject.names[atlas]), "MR")


def build_scenario(name: str) -> Scenario:
    """One scenario by name (:data:`REPORTED` or :data:`DEVELOPMENT`)."""
    if name == "fov_shift":
        ct = sample_scan("ct_abdomen_pelvis")
        query = shifted_copy(ct, keep=(0.55, 1.0), spacing=(1.0, 1.0, 2.0), name="CT upper 45 %, 1x1x2 mm, LAS")
        return Scenario(name, ct, query, _common_structures(ct, query, ABDOMEN_STRUCTURES),
                        "support: abdominal CT; query: its upper 45 %, resampled to 1 x 1 x 2 mm, LAS")
    if name in ("ct_to_mr", "mr_to_ct"):
        ct, mr = sample_scan("ct_abdomen_pelvis"), sample_scan("mr_abdomen")
        support, query = (ct, mr) if name == "ct_to_mr" else (mr, ct)
        return Scenario(name, support, query, _common_structures(support, query, ABDOMEN_STRUCTURES),
                        f"support: abdominal {support.modality}; query: abdominal {query.modality} of another "
                        "subject (structures by name)")
    if name == "brain_cross":
        support = brain_scan("icbm2009c", "neuromorphometrics")
        target = brain_scan("mni152_fsl", "neuromorphometrics")
        query = shifted_copy(target, keep=(0.1, 0.95), spacing=(1.5, 1.5, 1.5), tilt_deg=8.0, deform_mm=3.0,
                             seed=11, name="MNI152 (FSL), deformed, tilted 8 deg, 1.5 mm, LAS")
        return Scenario(name, support, query, _common_structures(support, query, BRAIN_STRUCTURES),
                        "support: ICBM 2009c + Neuromorphometrics; query: MNI152 (FSL), deformed (3 mm B-spline), "
                        "tilted 8 degrees, cut, 1.5 mm, LAS")
    if name == "dev_chest_shift":
        chest = sample_scan("ct_chest_small")
        query = shifted_copy(chest, keep=(0.0, 0.6), spacing=(1.5, 1.5, 5.0), flip_lr=False, tilt_deg=10.0,
                             name="chest CT lower 60 %, 1.5x1.5x5 mm, tilted")
        names = [n for n in chest.names.values()]
        return Scenario(name, chest, query, _common_structures(chest, query, names),
                        "development: small chest CT vs its lower 60 %, resampled and tilted", reported=False)
    if name == "dev_mr_shift":
        mr = sample_scan("mr_abdomen")
        query = shifted_copy(mr, keep=(0.35, 1.0), spacing=(1.5, 1.5, 3.0), name="MR upper 65 %, 1.5 mm, LAS")
        return Scenario(name, mr, query, _common_structures(mr, query, ABDOMEN_STRUCTURES),
                        "development: abdominal MR vs its upper 65 %, resampled, LAS", reported=False)
    if name == "dev_brain":
        support = brain_scan("icbm2009a_skull", "desikan_killiany")
        target = brain_scan("icbm2009c", "desikan_killiany")
        query = shifted_copy(target, keep=(0.0, 0.9), spacing=(1.5, 1.5, 1.5), tilt_deg=-6.0, deform_mm=3.0,
                             seed=5, name="ICBM 2009c, deformed, tilted, 1.5 mm, LAS")
        return Scenario(name, support, query, _common_structures(support, query, DEV_BRAIN_STRUCTURES),
                        "development: ICBM 2009a (skull) vs deformed ICBM 2009c, Desikan-Killiany+aseg",
                        reported=False)
    raise KeyError(f"unknown scenario {name!r} (known: {', '.join(REPORTED + DEVELOPMENT)})")
