"""In-context benchmark: Dice per held-out structure against support size, with and without ensembling, beside
a copy baseline; speed per support image and query slice; a whole large volume.

Held-out tasks (never seen in training, :mod:`FMSegCore.training.sources`):

- **CT**: structures of the bundled abdomen/pelvis CT (a subject held out of training).
- **Brain**: structures of the held-out Neuromorphometrics and Juelich atlases, queried on the held-out
  MNI152 (FSL) template; supports come from all three templates.

For a query slice ``q``, the support pool is every slice showing the structure at least ``gap + 1`` slices away
from ``q`` (in any subject); the ``N`` nearest are the supports. The baseline copies the nearest support's
mask onto the query (the grids align). Dice is computed on the original slice grid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from FMSegCore.bench.metrics import dice
from FMSegCore.bench.reference_universeg import reference_forward
from FMSegCore.engines.incontext.session import predict_probabilities
from FMSegCore.engines.incontext.slice_matching import SupportSlice, choose_supports
from FMSegCore.preprocessing.intensity import normalize_ct
from FMSegCore.preprocessing.slicing import fit_square, unfit_square

SUPPORT_SIZES = (1, 2, 4, 8, 16, 32, 64)
CT_STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "aorta",
                 "inferior_vena_cava", "urinary_bladder", "vertebrae_L3", "femur_left", "iliopsoas_left",
                 "gluteus_maximus_right", "colon")
BRAIN_STRUCTURES = {
    "neuromorphometrics": ("Brain_Stem", "Left_Cerebellum_Exterior", "Right_Cerebral_White_Matter",
                           "Left_Hippocampus", "Right_Thalamus_Proper", "Left_Caudate", "Right_Putamen",
                           "Left_Lateral_Ventricle"),
    "juelich": ("WM_Callosal_body", "GM_Premotor_cortex_BA6_R", "GM_Visual_cortex_V1_BA17_L",
                "WM_Corticospinal_tract_L"),
}


@dataclass
class StackedTask:
    """One structure: per subject, axial slices (N, H, W) of the normalised image and of the binary mask."""

    dataset: str
    name: str
    images: list[np.ndarray]
    masks: list[np.ndarray]
    query_subject: int


@dataclass
class DiceRow:
    dataset: str
    structure: str
    support_size: int
    effective_support: float
    dice: float
    dice_ensemble: float
    dice_baseline: float


def ct_tasks(structures: Sequence[str] = CT_STRUCTURES) -> list[StackedTask]:
    from FMSegCore.training.sources import sample_case

    image, labels, names = sample_case("ct_abdomen_pelvis")
    by_name = {name: value for value, name in names.items()}
    normalised = normalize_ct(image, "abdomen")
    return [StackedTask("CT abdomen/pelvis", name, [normalised], [labels == by_name[name]], 0)
            for name in structures if name in by_name and (labels == by_name[name]).any()]


def brain_tasks(structures: Optional[dict[str, Sequence[str]]] = None) -> list[StackedTask]:
    from FMSegCore.training.brain_atlases import HELD_OUT_TEMPLATES, brain_subjects

    subjects = brain_subjects()
    query = next(i for i, s in enumerate(subjects) if s.name in HELD_OUT_TEMPLATES)
    axial = [np.moveaxis(s.image, 2, 0)[:, ::-1] for s in subjects]  # (k, i, j) -> slices of (i, j)
    tasks = []
    for atlas, names in (structures or BRAIN_STRUCTURES).items():
        by_name = {name: value for value, name in subjects[0].names[atlas].items()}
        labels = np.moveaxis(subjects[0].labels[atlas], 2, 0)[:, ::-1]
        for name in names:
            if name in by_name and (labels == by_name[name]).any():
                mask = labels == by_name[name]
                tasks.append(StackedTask(f"Brain ({atlas})", name, axial, [mask] * len(subjects), query))
    return tasks


def query_slices(mask: np.ndarray, count: int) -> list[int]:
    """``count`` slices spread over the middle 70 % of the structure's extent."""
    present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if len(present) == 0:
        return []
    low, high = np.percentile(present, 15), np.percentile(present, 85)
    picks = np.unique(np.round(np.linspace(low, high, count)).astype(int))
    return [int(p) for p in picks if p in set(present)]


class SliceCache:
    """Slices fitted to the model input, cached by (subject, slice)."""

    def __init__(self, task: StackedTask, size: int) -> None:
        self.task, self.size = task, size
        self._images: dict[tuple[int, int], np.ndarray] = {}
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    def image(self, subject: int, index: int) -> np.ndarray:
        key = (subject, index)
        if key not in self._images:
            self._images[key] = fit_square(self.task.images[subject][index], self.size, "antialias")[0]
        return self._images[key]

    def mask(self, subject: int, index: int) -> np.ndarray:
        key = (subject, index)
        if key not in self._masks:
            fitted = fit_square(self.task.masks[subject][index].astype(np.float32), self.size, "antialias")[0]
            self._masks[key] = np.clip(fitted, 0, 1)
        return self._masks[key]


def _pool(task: StackedTask, query: int, gap: int) -> list[SupportSlice]:
    pool = []
    for subject, mask in enumerate(task.masks):
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        count = mask.shape[0]
        for index in np.flatnonzero(areas):
            if abs(int(index) - query) > gap:
                pool.append(SupportSlice(subject, int(index), int(index) / max(1, count - 1), float(areas[index])))
    return pool


def _probability(model, cache: SliceCache, query: np.ndarray, chosen: list[SupportSlice], mirror: bool,
                 device: torch.device, dtype: Optional[torch.dtype]) -> np.ndarray:
    images = torch.from_numpy(np.stack([cache.image(s.example, s.index) for s in chosen]))[:, None]
    masks = torch.from_numpy(np.stack([cache.mask(s.example, s.index) for s in chosen]))[:, None]
    queries = torch.from_numpy(query)[None, None]
    if mirror:
        images, masks, queries = images.flip(-1), masks.flip(-1), queries.flip(-1)
    probability, _ = predict_probabilities(model, queries.to(device), images.to(device), masks.to(device), dtype)
    probability = probability.cpu()
    return (probability.flip(-1) if mirror else probability)[0].numpy()


def bench_task(model, task: StackedTask, sizes: Sequence[int], queries: int, ensemble: int, gap: int,
               device: torch.device, dtype: Optional[torch.dtype], seed: int = 0) -> list[DiceRow]:
    """Dice of one structure for every support size (mean over query slices)."""
    cache = SliceCache(task, model.input_size)
    subject = task.query_subject
    scores: dict[int, list[tuple[float, float, float, int]]] = {n: [] for n in sizes}
    for query in query_slices(task.masks[subject], queries):
        truth = task.masks[subject][query]
        fitted, fit = fit_square(task.images[subject][query], model.input_size, "antialias")
        pool = _pool(task, query, gap)
        if not pool:
            continue
        centre = query / max(1, task.masks[subject].shape[0] - 1)
        nearest = choose_supports(pool, centre, 1, 0, np.random.default_rng(0))[0]
        baseline = dice(task.masks[nearest.example][nearest.index], truth)
        rng = np.random.default_rng([seed, query])
        for n in sizes:
            members = []
            for member in range(ensemble):
                chosen = choose_supports(pool, centre, n, member, rng)
                members.append(_probability(model, cache, fitted, chosen, member % 2 == 1, device, dtype))
            single = unfit_square(members[0], fit, "bilinear") >= 0.5
            mean = unfit_square(np.mean(members, axis=0), fit, "bilinear") >= 0.5
            scores[n].append((dice(single, truth), dice(mean, truth), baseline, min(n, len(pool))))
    rows = []
    for n, values in scores.items():
        if values:
            array = np.array(values, dtype=float)
            rows.append(DiceRow(task.dataset, task.name, n, float(array[:, 3].mean()), float(array[:, 0].mean()),
                                float(array[:, 1].mean()), float(array[:, 2].mean())))
    return rows


# ------------------------------------------------------------------------------------------------- speed


def _timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


@torch.no_grad()
def time_support_sizes(model, sizes: Sequence[int], batch: int = 8, reference_sizes: Sequence[int] = (1, 8, 16),
                       dtype: Optional[torch.dtype] = None) -> dict:
    """Seconds per support image per 128x128 query: batched, one query at a time, and the straightforward
    (official-style) computation; and the largest difference between ours and it (fp32)."""
    size = model.input_size
    generator = torch.Generator().manual_seed(0)
    queries = torch.rand(batch, 1, size, size, generator=generator)
    largest = max(sizes)
    images = torch.rand(largest, 1, size, size, generator=generator)
    masks = (torch.rand(largest, 1, size, size, generator=generator) > 0.5).float()
    state = model.state_dict()
    table = []
    for n in sizes:
        row = {"support": n}
        repeats = 3 if n <= 16 else 1
        batched = _timed(lambda n=n: predict_probabilities(model, queries, images[:n], masks[:n], dtype, 10**6),
                         repeats)
        single = _timed(lambda n=n: predict_probabilities(model, queries[:1], images[:n], masks[:n], dtype),
                        repeats)
        row["batched_s"] = batched / (batch * n)
        row["one_at_a_time_s"] = single / n
        if n in reference_sizes:
            row["straightforward_s"] = _timed(
                lambda n=n: reference_forward(state, queries[:1], images[None, :n], masks[None, :n]), 1) / n
        table.append(row)
    n = min(8, largest)
    ours = model(queries[:2], images[None, :n], masks[None, :n])
    straightforward = reference_forward(state, queries[:2], images[None, :n].expand(2, -1, -1, -1, -1),
                                        masks[None, :n].expand(2, -1, -1, -1, -1))
    return {"threads": torch.get_num_threads(), "rows": table,
            "max_abs_logit_difference": float((ours - straightforward).abs().max())}


def time_large_volume(model, device: torch.device, dtype: Optional[torch.dtype], structures: int = 10,
                      support_size: int = 16, shape: tuple[int, int, int] = (100, 512, 512)) -> dict:
    """The bundled CT resampled to ``shape`` (KJI), labelled on every fifth slice: segment ``structures`` structures
    in the whole volume with ``support_size`` supports; seconds and Dice on the unlabelled slices."""
    import torch.nn.functional as F

    from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
    from FMSegCore.engines.incontext.support import SupportSet, example_from_arrays
    from FMSegCore.training.sources import sample_case

    image, labels, names = sample_case("ct_abdomen_pelvis")
    big_image = F.interpolate(torch.from_numpy(image.astype(np.float32))[None, None], size=shape,
                              mode="trilinear", align_corners=False)[0, 0].numpy()
    big_labels = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None], size=shape,
                               mode="nearest-exact")[0, 0].numpy().astype(np.int32)
    by_name = {name: value for value, name in names.items()}
    chosen = [by_name[n] for n in CT_STRUCTURES if n in by_name][:structures]
    sparse = np.zeros_like(big_labels)
    sparse[::5] = big_labels[::5]
    support = SupportSet([example_from_arrays(big_image, sparse, None, "ct")])
    session = InContextSession(model, support, chosen, settings=InContextSettings(support_size=support_size),
                               device=device, autocast_dtype=dtype)
    began = time.perf_counter()
    result = session.segment_volume(big_image)
    seconds = time.perf_counter() - began
    unlabelled = np.setdiff1d(np.arange(shape[0]), np.arange(0, shape[0], 5))
    scores = {names[v]: dice(result.labels[unlabelled] == v, big_labels[unlabelled] == v) for v in chosen}
    return {"shape": list(shape), "structures": len(chosen), "support_size": support_size, "seconds": seconds,
            "model_passes": result.model_passes, "dice_unlabelled_slices": scores}


def summarise(rows: Sequence[DiceRow]) -> dict[str, dict[int, dict[str, float]]]:
    """Mean Dice per dataset family (CT / Brain) and support size."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for family in ("CT", "Brain"):
        selected = [r for r in rows if r.dataset.startswith(family)]
        for n in sorted({r.support_size for r in selected}):
            at = [r for r in selected if r.support_size == n]
            out.setdefault(family, {})[n] = {
                "dice": float(np.mean([r.dice for r in at])),
                "dice_ensemble": float(np.mean([r.dice_ensemble for r in at])),
                "dice_baseline": float(np.mean([r.dice_baseline for r in at])),
                "effective_support": float(np.mean([r.effective_support for r in at])),
                "structures": len(at)}
    return out


def plot(summary: dict, path) -> None:
    """Mean Dice against support size, one panel per dataset family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(summary)
    figure, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for axis, family in zip(axes[0], families):
        sizes = sorted(summary[family])
        for key, label, style in (("dice", "UniverSeg (FMSeg weights)", "o-"),
                                  ("dice_ensemble", "+ ensemble", "s--"),
                                  ("dice_baseline", "baseline: nearest support mask copied", "k:")):
            axis.plot(sizes, [summary[family][n][key] for n in sizes], style, label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(n) for n in sizes])
        axis.set_ylim(0, 1)
        axis.set_xlabel("support slices")
        axis.set_ylabel("mean Dice (held-out structures)")
        axis.set_title(f"{family} ({summary[family][sizes[0]]['structures']} structures)")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def rows_as_dicts(rows: Sequence[DiceRow]) -> list[dict]:
    return [asdict(r) for r in rows]
