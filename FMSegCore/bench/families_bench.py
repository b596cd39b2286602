"""``fmseg bench families``: the forward speed of every model family on this CPU, beside the official code's timing
of the same call on the same input sizes.

Each family's network is loaded through its own loader (:mod:`FMSegCore.zoo.families`) from a checkpoint written
in the official layout and wrapping. Families with an official timing get the weights the official timing ran
with: every official tensor filled by the fixtures' seeded rule (:func:`seeded_tensor`, the ``reference_tensor``
of ``Testing/Data/reference/README.md``; our tensor names are the official ones). LiteMedSAM and the Iris-style
network use their cached zoo weights (seeded weights of their layout when those are missing).

The official figures (:data:`OFFICIAL`) are the ``timing_cpu_2threads`` fields of the fixtures'
``<name>.keys.json``: the official code at its pinned commit, torch 2.13.0+cpu, ``torch.set_num_threads(2)``,
float32 under ``torch.no_grad()``, median of 5 after 1 warm-up, with other jobs running (1-minute load average
3.7 to 5.7). Ours are measured the same way, and the load average is recorded around each measurement, so read
the ratio (official / ours: above 1 means FMSeg is faster) as rough. MedSAM and VISTA3D have no official timing.
Prompt decoders are also measured on one thread (:data:`ONE_THREAD`): on a loaded 2-core machine their 2-thread
figure measures the wait for the busy core more than the network.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

#: Where the official figures come from (relative to the repository root).
OFFICIAL_SOURCE = ("Testing/Data/reference/<name>.keys.json, field timing_cpu_2threads: the official code at its "
                   "pinned commit, torch 2.13.0+cpu, torch.set_num_threads(2), float32, torch.no_grad(), median of "
                   "5 after 1 warm-up, other jobs running (1-minute load average 3.7 to 5.7)")

#: The official CPU timings, copied from the fixtures (``Testing/test_families_bench.py`` checks they match).
OFFICIAL: dict[tuple[str, str], dict[str, Any]] = {
    ("universeg", "forward"): {
        "fixture": "universeg", "median_s": 2.305, "runs_s": [2.3629, 2.305, 2.2857, 2.3136, 2.2903],
        "loadavg_1min_before_after": [3.73, 3.79],
        "what": "model(target, support_images, support_labels), B=2, S=4, 128x128 (8 support images in all)"},
    ("tyche", "forward"): {
        "fixture": "tyche", "median_s": 3.3072, "runs_s": [3.3647, 3.2637, 3.3072, 3.3831, 3.2901],
        "loadavg_1min_before_after": [3.82, 3.88], "what": "model(**inputs), B=2, K=3, S=4, 128x128"},
    ("multiverseg", "predict_all_prompts"): {
        "fixture": "multiverseg", "key": "full", "median_s": 10.5643,
        "runs_s": [12.0272, 11.1893, 9.1068, 9.2831, 10.5643], "loadavg_1min_before_after": [3.93, 4.13],
        "what": "predict(), B=2, S=3, 128x128, all prompts"},
    ("multiverseg", "predict_one_click"): {
        "fixture": "multiverseg", "key": "click", "median_s": 5.1461,
        "runs_s": [5.4087, 5.1395, 5.1461, 5.119, 5.2198], "loadavg_1min_before_after": [4.13, 4.37],
        "what": "predict(), B=1, S=3, 128x128, one click"},
    ("sam-med3d", "image_encoder"): {
        "fixture": "sammed3d", "key": "image_encoder", "median_s": 16.1872,
        "runs_s": [15.184, 17.272, 16.1872, 15.5804, 17.0889], "loadavg_1min_before_after": [4.85, 5.66],
        "what": "image_encoder(x), x (1, 1, 128, 128, 128)"},
    ("sam-med3d", "prompt_encoder_plus_mask_decoder"): {
        "fixture": "sammed3d", "key": "prompt_encoder_plus_mask_decoder", "median_s": 0.0827,
        "runs_s": [0.1508, 0.0502, 0.318, 0.0593, 0.0827], "loadavg_1min_before_after": [5.66, 5.66],
        "what": "b_prev: 2 points + previous mask"},
}

#: Why small calls are measured on one thread too.
ONE_THREAD = ("a prompt decoder is many small operations; on a 2-core machine where another job holds a core, "
              "every operation's 2-thread barrier waits for that core, so it can run an order of magnitude slower "
              "on 2 threads than on 1 (the official SAM-Med3D decoder timing: 0.08 s, 0.99 s in a busier run)")

#: Every family the bench knows, in the order it runs them.
FAMILY_NAMES = ("universeg", "tyche", "multiverseg", "sam-med3d", "medsam", "vista3d", "litemedsam", "iris")
#: Measurements taken at most for the calls that take tens of seconds each here (MedSAM's encoder at 1024^2,
#: VISTA3D's point head at 128^3), and for VISTA3D's 218 M-parameter encoder (over a minute a call), so that
#: a whole run stays near a quarter of an hour on a shared 2-core machine.
HEAVY_REPEATS = 3
VISTA3D_ENCODER_REPEATS = 2


def seeded_tensor(key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The official-code fixtures' fill of tensor ``key``: normal noise seeded by the CRC-32 of the name, scaled
    by 1/sqrt(fan-in); vectors near 1 (weights, running variances) or near 0 (biases); integers zero."""
    if not dtype.is_floating_point:
        return torch.zeros(tuple(shape), dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if len(shape) == 0:
        return (0.1 * noise).to(dtype)
    if len(shape) == 1:
        if key.endswith("running_var"):
            return (1.0 + 0.1 * noise.abs()).to(dtype)
        if key.endswith("weight"):
            return (1.0 + 0.1 * noise).to(dtype)
        return (0.1 * noise).to(dtype)
    return (noise / math.sqrt(math.prod(shape[1:]))).to(dtype)


def seeded_state(network_builder: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor of the network's state_dict filled by :func:`seeded_tensor` (the layout is read from a
    network built on the meta device, so no memory or time goes to a default initialisation)."""
    try:
        with torch.device("meta"):
            layout = network_builder().state_dict()
    except Exception:  # noqa: BLE001 - a module that cannot be built on meta: build it for real
        layout = network_builder().state_dict()
    return {key: seeded_tensor(key, tuple(value.shape), value.dtype) for key, value in layout.items()}


# ------------------------------------------------------------------------------------------ the calls timed
@dataclass
class Call:
    """One timed call: ``run()`` under ``torch.no_grad()``; ``official`` is the key into :data:`OFFICIAL`."""

    name: str
    what: str
    run: Callable[[], Any]
    max_repeats: Optional[int] = None
    note: str = ""
    #: A call of many small operations (a prompt decoder): also measured on one thread (see :data:`ONE_THREAD`).
    small: bool = False


class _Kept:
    """A call that keeps its last result (an encoder whose embedding the decoder's measurement then uses)."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run, self.result = run, None

    def __call__(self) -> Any:
        self.result = self.run()
        return self.result

    def last(self) -> Any:
        """The last result (computed now if the call has not run yet)."""
        return self.result if self.result is not None else self()


def _images(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def _labels(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) > 0.5).float()


def _universeg_calls(net: Any) -> list[Call]:
    g = torch.Generator().manual_seed(0)
    target, images, labels = _images(g, 2, 1, 128, 128), _images(g, 2, 4, 1, 128, 128), _labels(g, 2, 4, 1, 128, 128)
    return [Call("forward", "model(target, support_images, support_labels), B=2, S=4, 128x128",
                 lambda: net(target, images, labels))]


def _tyche_calls(net: Any) -> list[Call]:
    g = torch.Generator().manual_seed(0)
    x = _images(g, 2, 1, 1, 128, 128).expand(-1, 3, -1, -1, -1).contiguous()
    images, labels = _images(g, 2, 4, 1, 128, 128), _labels(g, 2, 4, 1, 128, 128)
    noise = torch.randn((2, 3, 1, 128, 128), generator=torch.Generator().manual_seed(0))
    return [Call("forward", "model(support_images, support_labels, target_image, noise_image), B=2, K=3, S=4, "
                 "128x128", lambda: net(images, labels, x, noise))]


def _multiverseg_calls(net: Any) -> list[Call]:
    from FMSegCore.models.multiverseg import prompt_maps, target_input

    g = torch.Generator().manual_seed(0)
    image, images, labels = _images(g, 2, 1, 128, 128), _images(g, 2, 3, 1, 128, 128), _labels(g, 2, 3, 1, 128, 128)
    coords = torch.tensor([[[40, 50], [90, 80]], [[64, 64], [20, 100]]])
    point_labels = torch.tensor([[1, 0], [1, 0]])
    box = torch.tensor([[[30, 35, 80, 90]], [[40, 40, 100, 96]]])
    scribbles = (torch.rand((2, 2, 128, 128), generator=g) > 0.98).float()
    mask = torch.rand((2, 1, 128, 128), generator=g) * 16 - 8

    def full() -> torch.Tensor:
        maps = prompt_maps(128, coords, point_labels, box, scribbles, mask)
        return net(target_input(image, maps), images, labels)

    def click() -> torch.Tensor:
        maps = prompt_maps(128, coords[:1, :1], point_labels[:1, :1])
        return net(target_input(image[:1], maps), images[:1], labels[:1])

    return [Call("predict_all_prompts", "prompt_maps + target_input + model(target, context_images, "
                 "context_labels), B=2, S=3, 128x128, clicks, box, scribbles, previous logits", full),
            Call("predict_one_click", "the same, B=1, S=3, 128x128, one click", click)]


def _sam_med3d_calls(net: Any) -> list[Call]:
    g = torch.Generator().manual_seed(0)
    x = (_images(g, 1, 1, 128, 128, 128) - 0.5) * 4
    encode = _Kept(lambda: net.image_encoder(x))
    coords = torch.tensor([[[60.0, 64.0, 70.0], [30.0, 90.0, 50.0]]])
    point_labels = torch.tensor([[1, 0]])
    previous = torch.randn((1, 1, 32, 32, 32), generator=g) * 4

    def decode() -> Any:
        sparse, dense = net.prompt_encoder(points=(coords, point_labels), boxes=None, masks=previous)
        return net.mask_decoder(encode.last(), net.prompt_encoder.get_dense_pe(), sparse, dense,
                                multimask_output=False)

    return [Call("image_encoder", "image_encoder(x), x (1, 1, 128, 128, 128)", encode),
            Call("prompt_encoder_plus_mask_decoder", "prompt_encoder(2 points, previous 32^3 mask) + "
                 "mask_decoder(embedding, dense PE, ...), multimask_output=False", decode, small=True)]


def _prompt2d_calls(net: Any, side: int, encoder_repeats: Optional[int] = None) -> list[Call]:
    from FMSegCore.models.interfaces import PromptBatch2D

    g = torch.Generator().manual_seed(0)
    x = _images(g, 1, 3, side, side)
    encode = _Kept(lambda: net.encode(x))
    scale = side / 256
    prompts = PromptBatch2D(torch.zeros(1, dtype=torch.long),
                            boxes=torch.tensor([[60.0, 70.0, 150.0, 180.0]]) * scale)
    note = f"at most {encoder_repeats} measurements after the warm-up (to keep the run short)"
    return [Call("image_encoder", f"encode(x), x (1, 3, {side}, {side})", encode, encoder_repeats,
                 note if encoder_repeats else ""),
            Call("decoder_box", "decode(cached embedding, one box): prompt encoder + mask decoder",
                 lambda: net.decode(encode.last(), prompts), small=True)]


def _vista3d_calls(net: Any) -> list[Call]:
    from FMSegCore.models.interfaces import PromptBatch3D

    g = torch.Generator().manual_seed(0)
    x = _images(g, 1, 1, 128, 128, 128)
    encode = _Kept(lambda: net.encode(x))
    prompts = PromptBatch3D(torch.zeros(1, dtype=torch.long), points=torch.tensor([[[60.0, 64.0, 70.0]]]),
                            point_labels=torch.ones(1, 1, dtype=torch.long))
    return [Call("image_encoder", "encode(x): the image encoder's point branch, x (1, 1, 128, 128, 128)",
                 encode, max_repeats=VISTA3D_ENCODER_REPEATS,
                 note=f"218 M parameters, about a minute a call here: at most {VISTA3D_ENCODER_REPEATS} "
                      "measurements after the warm-up"),
            Call("point_head", "decode(cached 128^3 encoding, one click): the point head at full resolution",
                 lambda: net.decode(encode.last(), prompts), max_repeats=HEAVY_REPEATS,
                 note=f"at most {HEAVY_REPEATS} measurements after the warm-up (to keep the run short)")]


def _iris_calls(net: Any) -> list[Call]:
    g = torch.Generator().manual_seed(0)
    side = net.config.patch_size
    reference, mask, query = _images(g, 1, 1, side, side, side), _labels(g, 1, 1, side, side, side), \
        _images(g, 1, 1, side, side, side)
    with torch.no_grad():
        task = net.encode_task(reference, mask)
    return [Call("encode_task", f"encode_task(one {side}^3 reference patch, one class)",
                 lambda: net.encode_task(reference, mask)),
            Call("predict_patch", f"predict(one {side}^3 query patch, the task)", lambda: net.predict(query, task))]


# ------------------------------------------------------------------------------------------ the families
@dataclass(frozen=True)
class FamilyBench:
    """How the bench builds one family: its network's builder (for the layout), the official checkpoint's
    wrapping, an optional zoo card with real weights, and the calls it times."""

    builder: Callable[[], torch.nn.Module]
    wrap: Callable[[dict[str, torch.Tensor]], Any]
    calls: Callable[[Any], list[Call]]
    card: Optional[str] = None


def _plain(state: dict[str, torch.Tensor]) -> Any:
    return state


def _under(key: str) -> Callable[[dict[str, torch.Tensor]], Any]:
    return lambda state: {key: state}


def _iris_builder() -> torch.nn.Module:
    from FMSegCore.models.iris import IrisNet

    return IrisNet()


def _iris_wrap(state: dict[str, torch.Tensor]) -> Any:
    from FMSegCore.models.iris import IrisConfig

    return {"config": IrisConfig().to_dict(), "state_dict": state}


def _builders() -> dict[str, FamilyBench]:
    from FMSegCore.models import litemedsam, medsam, multiverseg, sam_med3d, tyche, universeg, vista3d

    return {
        "universeg": FamilyBench(universeg.build_universeg, _plain, _universeg_calls),
        "tyche": FamilyBench(tyche.build_tyche, _under("model"), _tyche_calls),
        "multiverseg": FamilyBench(multiverseg.build_multiverseg, _under("model"), _multiverseg_calls),
        "sam-med3d": FamilyBench(sam_med3d.SAMMed3D, lambda s: {"model_state_dict": s, "epoch": 0},
                                 _sam_med3d_calls),
        "medsam": FamilyBench(medsam.MedSAM, _plain, lambda net: _prompt2d_calls(net, 1024, HEAVY_REPEATS)),
        "vista3d": FamilyBench(lambda: vista3d.VISTA3DModel().network, _plain, _vista3d_calls),
        "litemedsam": FamilyBench(litemedsam.LiteMedSAM, _plain, lambda net: _prompt2d_calls(net, 256),
                                  card="litemedsam"),
        "iris": FamilyBench(_iris_builder, _iris_wrap, _iris_calls, card="iris-fmseg"),
    }


def _load(name: str, bench: FamilyBench, folder: Path) -> tuple[Any, str]:
    """The family's network through its loader, and where its weights came from."""
    from FMSegCore.zoo.cache import cached_path, is_cached
    from FMSegCore.zoo.families import families
    from FMSegCore.zoo.registry import get_card

    loader = {family.name: family for family in families()}[name].load_function()
    if bench.card is not None and is_cached(get_card(bench.card)):
        return loader(cached_path(get_card(bench.card)), device="cpu"), f"zoo card {bench.card} (cached weights)"
    path = folder / f"{name}.pt"
    torch.save(bench.wrap(seeded_state(bench.builder)), path)
    gc.collect()
    network = loader(path, device="cpu")
    path.unlink()
    source = "seeded, official layout (the fixtures' reference_tensor rule)"
    if any(family == name for family, _ in OFFICIAL):
        source += ": the weights the official timing ran with"
    if bench.card is not None:
        source = f"seeded, its layout (zoo card {bench.card} not cached)"
    return network, source


# ------------------------------------------------------------------------------------------ measuring
def _digits(value: float, significant: int = 4) -> float:
    """``value`` rounded to ``significant`` significant digits."""
    return float(f"{value:.{significant}g}")


def measure(run: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    """``warmup`` calls, then ``repeats`` timed ones under ``torch.no_grad()``: median, every run, and the 1-minute
    load average before the warm-up and after the last run."""
    before = os.getloadavg()[0]
    runs = []
    with torch.no_grad():
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            began = time.perf_counter()
            run()
            runs.append(time.perf_counter() - began)
    after = os.getloadavg()[0]
    return {"median_s": _digits(statistics.median(runs), 5), "runs_s": [_digits(r, 5) for r in runs],
            "repeats": repeats, "warmup": warmup, "loadavg_1min_before_after": [round(before, 2), round(after, 2)]}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(names: Sequence[str] = FAMILY_NAMES, repeats: int = 5, warmup: int = 1, threads: int = 2,
              allocator_tuned: bool = False, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Time every call of the families ``names``; the figures as a JSON-ready dict (see the module's notes)."""
    unknown = [name for name in names if name not in FAMILY_NAMES]
    if unknown:
        raise ValueError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)} "
                         f"(known: {', '.join(FAMILY_NAMES)})")
    from FMSegCore.zoo.families import families

    titles = {family.name: family.title for family in families()}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    began = time.perf_counter()
    figures: dict[str, Any] = {
        "what": "forward speed of each model family on this CPU beside the official code's timing of the same call "
                "(ratio = official / ours: above 1, FMSeg is faster)",
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "allocator_tuned": allocator_tuned,
        "precision": "float32", "grad": "torch.no_grad()", "repeats": repeats, "warmup": warmup,
        "official_source": OFFICIAL_SOURCE, "one_thread_too": ONE_THREAD,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "families": {},
    }
    builders = _builders()
    try:
        with tempfile.TemporaryDirectory(prefix="fmseg-bench-families-") as folder:
            for name in names:
                if progress:
                    progress(f"{name}: loading")
                loaded = time.perf_counter()
                network, weights = _load(name, builders[name], Path(folder))
                family: dict[str, Any] = {
                    "title": titles.get(name, name), "weights": weights,
                    "num_parameters": sum(p.numel() for p in network.parameters()),
                    "load_seconds": round(time.perf_counter() - loaded, 2), "calls": {}}
                for call in builders[name].calls(network):
                    count = min(repeats, call.max_repeats) if call.max_repeats else repeats
                    if progress:
                        progress(f"{name}: {call.name} ({warmup} warm-up + {count})")
                    ours = measure(call.run, count, warmup)
                    official = OFFICIAL.get((name, call.name))
                    entry: dict[str, Any] = {"what": call.what, "ours": ours, "official": official,
                                             "ratio_official_over_ours": None}
                    if official is not None:
                        entry["ratio_official_over_ours"] = _digits(official["median_s"] / ours["median_s"])
                    if call.small and threads > 1:
                        torch.set_num_threads(1)
                        try:
                            entry["ours_1_thread"] = measure(call.run, count, warmup)
                        finally:
                            torch.set_num_threads(threads)
                        if official is not None:
                            entry["ratio_official_over_ours_1_thread"] = _digits(
                                official["median_s"] / entry["ours_1_thread"]["median_s"])
                    if call.note or count != repeats:
                        entry["note"] = call.note or f"{count} measurements instead of {repeats}"
                    family["calls"][call.name] = entry
                if not any(entry["official"] for entry in family["calls"].values()):
                    family["official"] = "no official timing recorded: ours alone"
                figures["families"][name] = family
                del network
                gc.collect()
    finally:
        torch.set_num_threads(previous_threads)
    figures["bench_seconds"] = round(time.perf_counter() - began, 1)
    return figures


def table_rows(figures: dict[str, Any]) -> list[tuple[str, ...]]:
    """(family, call, ours, official, ratio, ours on 1 thread, load average) strings, one row per timed call."""
    rows = []
    for name, family in figures["families"].items():
        for call, entry in family["calls"].items():
            ours, official = entry["ours"], entry["official"]
            load = "-".join(f"{value:.1f}" for value in ours["loadavg_1min_before_after"])
            rows.append((name, call, f"{ours['median_s']:.3f} s",
                         f"{official['median_s']:.3f} s" if official else "-",
                         f"{entry['ratio_official_over_ours']:.2f}x" if official else "-",
                         f"{entry['ours_1_thread']['median_s']:.3f} s" if "ours_1_thread" in entry else "-", load))
    return rows


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    header = ("family", "call", "ours", "official", "official/ours", "ours, 1 thread", "load 1 min")
    rows = [header, *table_rows(figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"torch {figures['torch']}, {figures['threads']} threads, {figures['cpu_model']}, "
                 f"median of {figures['repeats']} after {figures['warmup']} warm-up; bench "
                 f"{figures.get('bench_seconds', 0):.0f} s")
    return "\n".join(lines)
