"""``fmseg segment``: segment a scan automatically with an adapter trained by ``fmseg adapt --mode auto``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from FMSegCore.cli import option_args
from FMSegCore.cli.option_args import add_option, modality_name
from FMSegCore.cli.prompt_cmd import PromptResult, check_not_input, check_output, report
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SEGMENTATION_SUFFIX, SegmentInfo, write_labelmap
from FMSegCore.io.volume import read_volume
from FMSegCore.options import AutoSegmentation


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` to the ``fmseg`` parser."""
    parser = subparsers.add_parser(
        "segment", help="segment a scan automatically with an adapter (no prompt)",
        description="Segment the structures an automatic adapter ('fmseg adapt --mode auto') learned, slice by "
                    f"slice. The output's ending picks the format: {SEGMENTATION_SUFFIX} (names and colours), "
                    ".nii.gz, .nii or .nrrd (label map plus <name>.labels.json).")
    parser.add_argument("--image", required=True, help="the volume (NIfTI, NRRD, MetaImage or DICOM folder)")
    parser.add_argument("--adapter", required=True, help="an adapter file from 'fmseg adapt --mode auto'")
    parser.add_argument("--output", required=True, help=f"the result ({SEGMENTATION_SUFFIX}, .nii.gz, .nii or .nrrd)")
    add_option(parser, AutoSegmentation, "modality",
               "how to normalise the scan (auto: as the adapter was trained, and a scan that looks like another "
               "modality is refused)", type=modality_name)
    add_option(parser, AutoSegmentation, "device", "auto, cpu, cuda, cuda:N or mps")
    add_option(parser, AutoSegmentation, "precision", "auto: bf16/fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    segment_to_file(args.image, args.adapter, args.output, args.device, args.precision, args.overwrite,
                    progress=not args.no_progress, modality=args.modality)
    return 0


def segment_to_file(image_path: str, adapter_path: str, output: str, device: str = AutoSegmentation.device,
                    precision: str = AutoSegmentation.precision, overwrite: bool = False, progress: bool = True,
                    modality: str = AutoSegmentation.modality) -> PromptResult:
    """What ``fmseg segment`` does: check, load the adapted model, segment, write atomically, report."""
    option_args.check_options(AutoSegmentation, {"device": device, "precision": precision, "modality": modality})
    from tqdm import tqdm

    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.engines.adaptation.adapter_file import load_adapter
    from FMSegCore.engines.adaptation.auto_segment import scan_modality, segment_with_adapter
    from FMSegCore.engines.adaptation.engine import build_adapted
    from FMSegCore.progress import bar_callback

    began = time.perf_counter()
    output_path = check_output(output, overwrite)
    check_not_input(output_path, [image_path, adapter_path])
    adapter = load_adapter(adapter_path)
    if adapter.mode != "auto":
        raise InputError(adapter_path, "this adapter adapts a promptable model: use it with "
                                       "'fmseg prompt --adapter', or train one with --mode auto")
    torch_device = resolve_device(device)
    image = read_volume(image_path)
    modality = scan_modality(image, image_path, adapter.metadata, modality)
    if torch_device.type == "cpu":
        tune_cpu_runtime()
    model = build_adapted(adapter, torch_device)
    structures = adapter.metadata["structures"]
    show = progress and sys.stderr.isatty()
    bar = tqdm(total=None, unit="slice", desc="Segmenting", disable=not show, file=sys.stderr)
    try:
        labels = segment_with_adapter(model, adapter.metadata, image, torch_device,
                                      inference_dtype(torch_device, precision),
                                      progress=bar_callback(bar, describe=False), modality=modality)
    finally:
        bar.close()
    infos = [SegmentInfo(int(s["value"]), str(s["name"]), tuple(float(c) for c in s["color"])) for s in structures]
    write_labelmap(labels, image, output_path, infos, overwrite=overwrite)
    result = PromptResult(image, labels, infos, Path(output_path), time.perf_counter() - began)
    report(result)
    return result
