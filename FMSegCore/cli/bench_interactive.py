"""``fmseg bench prompt --protocol interactive``: one ROI or one click, then corrective clicks; development scans
and held-out scans reported apart; the propagation of one plane as the baseline."""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

from FMSegCore.engines.prompting.session import PropagationSettings
from FMSegCore.errors import InputError

#: The engines compared (settings that differ from :class:`PropagationSettings`' defaults): propagation along
#: one slicing axis with clicks that change only their slice, every include point seeding a propagation again
#: (the baseline: FMSeg before issue 13), FMSeg's default (clicks carried to the neighbouring slices, applied
#: one by one) and the experimental vote of three planes (``fmseg prompt --three-planes``).
ENGINES = {
    "propagation": {"planes": 1, "click_reach_slices": 0, "click_growth_slices": 2, "include_points_seed": True,
                    "click_box_search": False},
    "fmseg": {"planes": 1},
    "three_planes": {"planes": 3},
}
#: Scans and structures. Development: the bundled scans, on which rules and defaults were chosen. Held-out:
#: a brain template never used to choose anything in prompting (MNI152, deformed, tilted, cut, 1.5 mm).
DEVELOPMENT = ("ct_abdomen_pelvis", "mr_abdomen", "ct_chest_small")
HELD_OUT = ("brain_mni152_shifted",)


def _scan(name: str):
    from FMSegCore.bench import cross_scenarios as scenarios

    if name == "brain_mni152_shifted":
        target = scenarios.brain_scan("mni152_fsl", "neuromorphometrics")
        scan = scenarios.shifted_copy(target, keep=(0.1, 0.95), spacing=(1.5, 1.5, 1.5), tilt_deg=8.0,
                                      deform_mm=3.0, seed=11, name=name)
        return scan, list(scenarios.BRAIN_STRUCTURES)
    from FMSegCore.bench.prompt_bench import DEFAULT_STRUCTURES

    scan = scenarios.sample_scan(name)
    structures = [s for s in DEFAULT_STRUCTURES[name] if s != "ribs"]  # ribs: no single structure to click
    return scan, structures


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from FMSegCore.bench import interactive_bench as bench
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.engines.prompting.session import PromptSession
    from FMSegCore.models.factory import load_model

    unknown = sorted(set(args.cases or ()) - set(DEVELOPMENT + HELD_OUT))
    if unknown:
        raise InputError(None, f"--cases: unknown scan {unknown[0]!r} (known: {', '.join(DEVELOPMENT + HELD_OUT)})")
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    model = load_model(args.model, device)
    figures: dict = {"device": str(device), "model": args.model, "protocol": "interactive",
                     "corrections": args.clicks, "engines": {e: ENGINES[e] for e in args.engines},
                     "protocols": list(args.protocols or bench.DEFAULT_PROTOCOLS), "development": list(DEVELOPMENT),
                     "held_out": list(HELD_OUT), "results": []}
    results = []
    started = time.perf_counter()
    for split, names in (("held-out", HELD_OUT), ("development", DEVELOPMENT)):
        for case in names:
            if args.cases and case not in args.cases:
                continue
            scan, structures = _scan(case)
            structures = [s for s in (args.structures or structures) if scan.mask(s).sum() >= 50]
            engines: dict[str, Callable] = {}
            cache = None
            for engine, settings in ((e, ENGINES[e]) for e in args.engines):
                session = PromptSession(scan.volume, model, device, context=args.context, planes=settings["planes"],
                                        settings=PropagationSettings(**{k: v for k, v in settings.items() if k != "planes"}),
                                        autocast_dtype=inference_dtype(device, args.precision))
                cache = session.cache = cache or session.cache  # same scan, same model: the embeddings are shared
                engines[engine] = session.segment
            for name in tqdm(structures, desc=case, unit="structure", leave=False):
                rows = bench.bench_structure(engines, case, split, name, scan.mask(name), args.clicks,
                                             args.protocols or bench.DEFAULT_PROTOCOLS)
                results.extend(rows)
                for row in rows:
                    print(f"{split} {case}/{name} {row.engine} {row.protocol}: "
                          + " -> ".join(f"{d:.3f}" for d in row.curve), flush=True)
            if args.json:  # after each scan: a long run that stops keeps what it measured
                figures["results"] = [r.as_dict() for r in results]
                figures["summary"] = bench.summarise(results)
                args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    figures["results"] = [r.as_dict() for r in results]
    figures["summary"] = bench.summarise(results)
    figures["bench_seconds"] = time.perf_counter() - started
    if args.large:
        figures["large"] = click_latency(model, device)
    _print(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
        print(f"Wrote {args.json}")
    return 0


def click_latency(model, device, clicks: int = 3) -> dict:
    """The bundled CT resampled to 512 x 512 x 300: one 2-D box on the liver, then corrective clicks; the
    seconds of the first result and of each click once it exists."""
    from FMSegCore.bench.interactive_bench import first_prompts, run_protocol
    from FMSegCore.bench.prompt_bench import large_case
    from FMSegCore.engines.prompting.session import PromptSession
    from FMSegCore.zoo.cache import resources_dir

    big, labels, names = large_case(resources_dir() / "SampleData" / "ct_abdomen_pelvis")
    liver = labels == {v: k for k, v in names.items()}["liver"]
    session = PromptSession(big, model, device)
    curve, seconds = run_protocol(session.segment, first_prompts("liver", liver)["box_2d_largest"], liver, clicks)
    return {"shape_kji": list(big.array.shape), "context": session.context_for(session.axis),
            "dice_curve": curve, "seconds_first": seconds[0], "seconds_per_click": seconds[1:],
            "encoded_slices": session.timings.encoded}


def _print(figures: dict) -> None:
    for split, engines in figures["summary"].items():
        print(f"\n{split}:")
        for engine, protocols in engines.items():
            for protocol, row in protocols.items():
                print(f"  {engine:12s} {protocol:15s} n={row['structures']:2d} first {row['first_dice']:.3f} "
                      f"final {row['final_dice']:.3f} AUC {row['dice_auc']:.3f} "
                      f"first {row['seconds_first']:.1f} s, {row['seconds_per_click']:.2f} s per click")
    if "large" in figures:
        big = figures["large"]
        print(f"\n512x512x300 CT, liver: first result {big['seconds_first']:.1f} s, clicks "
              + ", ".join(f"{s:.2f}" for s in big["seconds_per_click"]) + " s")
