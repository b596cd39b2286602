"""Align a support scan to a query scan in world coordinates (SimpleITK), and resample onto a grid.

:func:`align` finds the transform that maps query points (LPS mm) onto the corresponding anatomy of a support
scan, whatever the two scans' fields of view, spacings, orientations, subjects or modalities (CT/MR):

1. both scans are smoothed and resampled to ``working_mm`` (4 mm) and their body masks found (CT: above
   -400 HU; MR: a tenth of its intensity range), the largest connected part, holes filled;
2. initialisation: in-plane centres of the body masks matched, scale from their cross-sections, and an
   exhaustive search of the head-foot offset (scans rarely cover the same region) on Mattes mutual
   information, which works within and across modalities;
3. a similarity transform (rotation, isotropic scale, translation), then an affine one, multi-resolution,
   Mattes MI over the bodies; optionally a B-spline refinement.

The result says how well it went: the final metric and the overlap (Dice) of the two body masks after
alignment, measured where the scans overlap. :func:`check_alignment` refuses a support that did not align, in
one line naming its file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from scipy import ndimage

from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Body-mask overlap (Dice, where the scans overlap) below which a support is refused as not aligned.
MIN_BODY_DICE = 0.6
#: Share of the query's body that must lie inside the aligned support's field of view.
MIN_OVERLAP = 0.05
CT_BODY_HU = -400.0
#: The support is registered onto the query unless it is shorter (head-foot) than this share of it.
SWAP_RATIO = 0.8
#: Starting points optimised after the head-foot search (the best distinct ones).
STARTS = 4
#: CT intensities (HU) mutual information is computed on.
CT_SOFT_TISSUE_HU = (-250.0, 350.0)
#: MR body threshold: this fraction of the way from the 1st to the 99th intensity percentile.
MR_BODY_FRACTION = 0.1


@dataclass
class Alignment:
    """A transform mapping query points (LPS mm) to support points, and how well it fits."""

    transform: sitk.Transform
    metric: float  # final Mattes MI (more negative: better)
    body_dice: float  # Dice of the body masks where both scans have voxels, after alignment
    overlap: float  # share of the query's body inside the support's field of view
    seconds: float
    stages: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"body overlap Dice {self.body_dice:.2f}, {100 * self.overlap:.0f} % of the query covered"


def _sitk():
    import SimpleITK as sitk  # imported when used: the rest of FMSeg works without it
    return sitk


def registration_intensities(array: np.ndarray, modality: str) -> np.ndarray:
    """Intensities clipped to the soft-tissue range, so that mutual information sees organs, not only air and
    bone (CT: -250..350 HU; MR: the 0.5..99.5 percentiles)."""
    low, high = CT_SOFT_TISSUE_HU if modality.upper() == "CT" else np.percentile(array, [0.5, 99.5])
    return np.clip(array.astype(np.float32), low, high)


def working_image(volume: Volume, spacing_mm: float, modality: Optional[str] = None) -> sitk.Image:
    """The volume as float32 (clipped by :func:`registration_intensities` when ``modality`` is given),
    smoothed (anti-aliasing) and resampled to isotropic ``spacing_mm``."""
    sitk = _sitk()
    if modality is not None:
        volume = volume.with_array(registration_intensities(volume.array, modality))
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    sigmas = [max(0.0, (spacing_mm - s) / 2) for s in image.GetSpacing()]
    if max(sigmas) > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigmas])
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [spacing_mm] * 3,
                         image.GetDirection(), float(np.min(volume.array)), sitk.sitkFloat32)


def body_mask_array(array: np.ndarray, modality: str) -> np.ndarray:
    """Boolean body mask of a KJI array: CT above -400 HU, MR above a tenth of its intensity range; the largest connected
    part, with holes (lungs, bowel gas) filled slice by slice."""
    if modality.upper() == "CT":
        mask = array > CT_BODY_HU
    else:  # MR: air is dark; Otsu splits tissues, so take a tenth of the bright end instead
        low, high = np.percentile(array, [1, 99])
        mask = array > low + MR_BODY_FRACTION * (high - low)
    mask = ndimage.binary_opening(mask, iterations=1)
    parts, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, parts, index=np.arange(1, count + 1))
        mask = parts == (1 + int(np.argmax(sizes)))
    filled = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    return filled.astype(bool)


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    sitk = _sitk()
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(like)
    return image


def mask_points(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """LPS points (N, 3) of a KJI mask's voxels on ``image``'s grid."""
    kji = np.argwhere(mask)
    ijk = kji[:, ::-1].astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ijk * np.array(image.GetSpacing()) @ direction.T + np.array(image.GetOrigin())


def _registration(fixed_mask: sitk.Image, moving_mask: sitk.Image, iterations: int, seed: int,
                  shrink: Sequence[int], sigmas: Sequence[float]) -> sitk.ImageRegistrationMethod:
    sitk = _sitk()
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed + 1)  # SimpleITK takes seed 0 as "from the clock"
    method.SetMetricFixedMask(fixed_mask)
    method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01, numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _initial_transforms(fixed: sitk.Image, moving: sitk.Image, fixed_body: np.ndarray,
                        moving_body: np.ndarray, step_mm: float) -> list[sitk.Similarity3DTransform]:
    """Similarity transforms centred on the query body: in-plane centres matched, scale from the bodies'
    cross-sections, one candidate per head-foot offset every ``step_mm`` over the range where the scans overlap."""
    sitk = _sitk()
    fixed_points = mask_points(fixed_body, fixed)
    moving_points = mask_points(moving_body, moving)
    fixed_centre, moving_centre = fixed_points.mean(axis=0), moving_points.mean(axis=0)

    def cross_section(points: np.ndarray, spacing: float) -> float:
        heights = np.round(points[:, 2] / spacing)
        return float(len(points)) * spacing ** 3 / max(1, len(np.unique(heights)))  # mm^3 per mm of height

    fixed_area = cross_section(fixed_points, fixed.GetSpacing()[0])
    moving_area = cross_section(moving_points, moving.GetSpacing()[0])
    scale = float(np.clip(np.sqrt(moving_area / max(fixed_area, 1e-6)), 0.7, 1.4))
    fz, mz = fixed_points[:, 2], moving_points[:, 2]
    # where the query's centre may land: one scan's head-foot extent inside the other's, widened a little
    ends = (mz.min() - scale * (fz.min() - fixed_centre[2]), mz.max() - scale * (fz.max() - fixed_centre[2]))
    margin = 0.25 * min(np.ptp(mz), scale * np.ptp(fz))
    low, high = min(ends) - margin, max(ends) + margin
    candidates = []
    for factor in sorted({round(scale, 3), 1.0}):
        for z in np.arange(low, high + step_mm / 2, step_mm) if high > low else [moving_centre[2]]:
            transform = sitk.Similarity3DTransform()
            transform.SetCenter([float(c) for c in fixed_centre])
            transform.SetScale(factor)
            transform.SetTranslation([float(moving_centre[0] - fixed_centre[0]),
                                      float(moving_centre[1] - fixed_centre[1]), float(z - fixed_centre[2])])
            candidates.append(transform)
    return candidates


def _distinct_best(scored: list[tuple[float, sitk.Similarity3DTransform]], count: int,
                   separation_mm: float) -> list[sitk.Similarity3DTransform]:
    """The ``count`` best-scoring candidates whose head-foot offsets lie ``separation_mm`` apart (so that the
    starts are distinct local optima, not neighbours of one)."""
    chosen: list[sitk.Similarity3DTransform] = []
    for _, candidate in sorted(scored, key=lambda item: item[0]):
        z = candidate.GetTranslation()[2]
        if all(abs(z - other.GetTranslation()[2]) >= separation_mm for other in chosen):
            chosen.append(candidate)
        if len(chosen) == count:
            break
    return chosen


def _coverage(transform: sitk.Transform, fixed: sitk.Image, fixed_body: np.ndarray, moving: sitk.Image,
              moving_body: np.ndarray) -> tuple[float, float]:
    """(body Dice where the support has voxels, share of the query body inside the support's field of view)."""
    sitk = _sitk()
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    warped = sitk.GetArrayFromImage(sitk.Resample(_mask_image(moving_body, moving), fixed, transform,
                                                  sitk.sitkNearestNeighbor, 0)) > 0
    query = fixed_body & inside
    total = int(query.sum()) + int((warped & inside).sum())
    body_dice = 0.0 if total == 0 else 2.0 * int((query & warped).sum()) / total
    return body_dice, float(query.sum()) / max(1, int(fixed_body.sum()))


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The one linear transform inside an optimiser's result, as an affine transform (invertible)."""
    sitk = _sitk()
    inner = transform
    if transform.GetName() == "CompositeTransform":
        inner = sitk.CompositeTransform(transform).GetNthTransform(0)
    kinds = {"Similarity3DTransform": sitk.Similarity3DTransform, "AffineTransform": sitk.AffineTransform}
    linear = kinds[inner.GetName()](inner)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(linear.GetMatrix())
    affine.SetTranslation(linear.GetTranslation())
    affine.SetCenter(linear.GetCenter())
    return affine


def _linear_alignment(fixed: sitk.Image, moving: sitk.Image, fixed_body: np.ndarray, moving_body: np.ndarray,
                      affine: bool, iterations: int, seed: int, working_mm: float,
                      source: Optional[str]) -> tuple[sitk.AffineTransform, float, list[str]]:
    """Fixed points -> moving points: head-foot search, similarity from the best distinct starts, then affine."""
    sitk = _sitk()
    fixed_mask = _mask_image(ndimage.binary_dilation(fixed_body, iterations=2), fixed)
    moving_mask = _mask_image(ndimage.binary_dilation(moving_body, iterations=2), moving)
    probe = _registration(fixed_mask, moving_mask, 1, seed, [2], [1.0])
    scored = []
    for candidate in _initial_transforms(fixed, moving, fixed_body, moving_body, step_mm=2 * working_mm):
        probe.SetInitialTransform(candidate, inPlace=False)
        try:
            scored.append((probe.MetricEvaluate(fixed, moving), candidate))
        except RuntimeError:  # too few samples overlap
            continue
    if not scored:
        raise InputError(source, "does not overlap the query anywhere (no common anatomy to align)")
    best_metric, best = np.inf, None
    for candidate in _distinct_best(scored, STARTS, 8 * working_mm):
        method = _registration(fixed_mask, moving_mask, iterations, seed, [4, 2], [2.0, 1.0])
        method.SetInitialTransform(sitk.Similarity3DTransform(candidate), inPlace=False)
        try:
            transform = method.Execute(fixed, moving)
        except RuntimeError:
            continue
        if method.GetMetricValue() < best_metric:
            best_metric, best = method.GetMetricValue(), _as_affine(transform)
    if best is None:
        raise InputError(source, "alignment to the query failed (no overlap kept during optimisation)")
    # the best start refined at full working resolution: affine, or similarity again
    stages = ["similarity"]
    method = _registration(fixed_mask, moving_mask, iterations, seed, [2, 1], [1.0, 0.0])
    if affine:
        method.SetInitialTransform(sitk.AffineTransform(best), inPlace=False)
    else:
        similarity = sitk.Similarity3DTransform()
        similarity.SetCenter(best.GetCenter())
        similarity.SetMatrix(best.GetMatrix(), 1e-3)
        similarity.SetTranslation(best.GetTranslation())
        method.SetInitialTransform(similarity, inPlace=False)
    try:
        candidate = method.Execute(fixed, moving)
        best, best_metric = _as_affine(candidate), method.GetMetricValue()
        if affine:
            stages.append("affine")
    except RuntimeError:
        pass
    return best, float(best_metric), stages


def _height(body: np.ndarray, image: sitk.Image) -> float:
    """Head-foot extent (mm) of a body mask."""
    z = mask_points(body, image)[:, 2]
    return float(np.ptp(z)) if z.size else 0.0


@dataclass
class PreparedScan:
    """A scan at the working resolution: its body mask and its clipped intensities (mutual information)."""

    volume: Volume
    body: np.ndarray  # KJI, on the grid of ``image``
    image: sitk.Image

    def body_points(self) -> np.ndarray:
        """LPS points (N, 3) of the body's voxels."""
        return mask_points(self.body, self.image)


def prepare_scan(volume: Volume, modality: str, working_mm: float = 4.0) -> PreparedScan:
    """What alignment needs of a scan, computed once (a query serves every support and the work grid)."""
    sitk = _sitk()
    body = body_mask_array(sitk.GetArrayFromImage(working_image(volume, working_mm)), modality)
    return PreparedScan(volume, body, working_image(volume, working_mm, modality))


def align(support: Volume, query: Volume, support_modality: str, query_modality: str, working_mm: float = 4.0,
          affine: bool = True, deformable: bool = False, iterations: int = 120, seed: int = 0,
          prepared_query: Optional[PreparedScan] = None) -> Alignment:
    """The transform from ``query`` points to ``support`` points (raw intensities; modality CT or MR each);
    ``prepared_query``: :func:`prepare_scan` of the query at ``working_mm``, when the caller has it already.

    The scan with the shorter head-foot extent is registered onto the longer one (mutual information on a
    small overlap is unreliable the other way round); the transform is inverted when that is the support."""
    began = time.perf_counter()
    prepared_query = prepared_query or prepare_scan(query, query_modality, working_mm)
    prepared_support = prepare_scan(support, support_modality, working_mm)
    fixed_body, fixed = prepared_query.body, prepared_query.image
    moving_body, moving = prepared_support.body, prepared_support.image
    if not fixed_body.any() or not moving_body.any():
        empty = query if not fixed_body.any() else support
        raise InputError(empty.path, "no body found in the scan (nothing to align)")
    swap = _height(moving_body, moving) < SWAP_RATIO * _height(fixed_body, fixed)
    if swap:
        inverse, metric, stages = _linear_alignment(moving, fixed, moving_body, fixed_body, affine, iterations,
                                                    seed, working_mm, support.path)
        final: sitk.Transform = inverse.GetInverse()
    else:
        final, metric, stages = _linear_alignment(fixed, moving, fixed_body, moving_body, affine, iterations, seed,
                                                  working_mm, support.path)
    if deformable:
        fixed_mask = _mask_image(ndimage.binary_dilation(fixed_body, iterations=2), fixed)
        moving_mask = _mask_image(ndimage.binary_dilation(moving_body, iterations=2), moving)
        final, metric, refined = _bspline_refinement(final, fixed, moving, fixed_mask, moving_mask, seed,
                                                     _metric(final, fixed, moving, fixed_mask, moving_mask, seed))
        if refined:
            stages.append("b-spline")
    body_dice, overlap = _coverage(final, fixed, fixed_body, moving, moving_body)
    return Alignment(final, float(metric), body_dice, overlap, time.perf_counter() - began, tuple(stages))


def _metric(transform: sitk.Transform, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
            moving_mask: sitk.Image, seed: int) -> float:
    probe = _registration(fixed_mask, moving_mask, 1, seed, [1], [0.0])
    probe.SetInitialTransform(transform, inPlace=False)
    return float(probe.MetricEvaluate(fixed, moving))


def _bspline_refinement(initial: sitk.Transform, fixed: sitk.Image, moving: sitk.Image,
                        fixed_mask: sitk.Image, moving_mask: sitk.Image, seed: int,
                        metric: float) -> tuple[sitk.Transform, float, bool]:
    """A coarse B-spline (mesh of ~60 mm cells) on top of ``initial``; kept only when the metric improves."""
    sitk = _sitk()
    mesh = [max(1, int(round(n * s / 60.0))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, 3)
    method = _registration(fixed_mask, moving_mask, 40, seed, [2, 1], [1.0, 0.0])
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=40)
    method.SetMovingInitialTransform(initial)
    method.SetInitialTransform(bspline, inPlace=True)
    try:
        method.Execute(fixed, moving)
    except RuntimeError:
        return initial, metric, False
    if method.GetMetricValue() >= metric:
        return initial, metric, False
    composite = sitk.CompositeTransform(initial)
    composite.AddTransform(bspline)
    return composite, method.GetMetricValue(), True


def check_alignment(alignment: Alignment, source: Optional[str], min_body_dice: float = MIN_BODY_DICE,
                    min_overlap: float = MIN_OVERLAP) -> None:
    """Refuse, in one line naming the support, an alignment that did not find the query's anatomy."""
    if alignment.overlap < min_overlap:
        raise InputError(source, f"does not overlap the query after alignment ({alignment.describe()}): "
                                 "the scans show different body regions")
    if alignment.body_dice < min_body_dice:
        raise InputError(source, f"did not align to the query ({alignment.describe()}, below "
                                 f"{min_body_dice:.2f}); check that both scans show the same body region")


def resample_onto(volume: Volume, array: np.ndarray, grid: Volume, transform: Optional[sitk.Transform] = None,
                  nearest: bool = False, default: float = 0.0) -> np.ndarray:
    """``array`` (on ``volume``'s grid) resampled onto ``grid`` through ``transform`` (grid points -> volume
    points; identity when None): linear (with Gaussian anti-aliasing when ``grid`` is coarser) or nearest."""
    sitk = _sitk()
    image = volume.with_array(np.ascontiguousarray(array)).to_sitk()
    if not nearest:
        image = sitk.Cast(image, sitk.sitkFloat32)
        target = float(min(grid.spacing))
        sigmas = [max(0.0, (target - s) / 2) for s in image.GetSpacing()]
        if max(sigmas) > 0.05:
            image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigmas])
    out = sitk.Resample(image, grid.to_sitk(), transform or sitk.Transform(),
                        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, default)
    return sitk.GetArrayFromImage(out)
