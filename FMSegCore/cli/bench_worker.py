"""``fmseg bench worker``: what a prompt round trip through the worker adds to the same prompt in-process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from FMSegCore.device import DEVICE_CHOICES
from FMSegCore.zoo.cache import resources_dir

DEFAULT_STRUCTURES = ["spleen", "kidney_left", "kidney_right"]


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("worker", help="prompt round trips through a worker process vs in-process")
    parser.add_argument("--data", type=Path, default=resources_dir() / "SampleData" / "ct_abdomen_pelvis",
                        help="a case folder (image.nii.gz, label.nii.gz, labels.json); default: the bundled CT")
    parser.add_argument("--structures", nargs="*", default=DEFAULT_STRUCTURES)
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--clicks", type=int, default=5, help="corrective clicks per structure")
    parser.add_argument("--upload", action="store_true", help="also time sending a 512x512x300 volume")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.prompt_bench import load_case
    from FMSegCore.bench.worker_bench import run_worker_bench, upload_speed
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.engines.prompting.session import PromptSession
    from FMSegCore.models.factory import load_model
    from FMSegCore.server.launcher import LocalWorker

    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    case = load_case(args.data)
    image = case[0]
    local = PromptSession(image, load_model("litemedsam", device), device,
                          autocast_dtype=inference_dtype(device, args.precision))
    with LocalWorker(device=str(device)) as worker:
        figures = {"device": str(device), "precision": args.precision, "case": args.data.name,
                   **run_worker_bench(worker.client, local, case, args.structures, args.clicks)}
        if args.upload:
            figures["large_upload"] = upload_speed(worker.client)
    print(f"Worker process vs in-process on {device} ({args.data.name}, {figures['volume_mb']} MB volume sent once "
          f"in {figures['upload_ms']:.0f} ms); identical results: {'yes' if figures['identical_results'] else 'NO'}")
    print("Medians; 'transport' is the worker's round trip minus its own compute (HTTP, JSON, the mask's "
          "encoding and decoding); 'difference' also holds the two processes' compute noise.")
    print(f"{'prompt':<36} {'n':>3} {'in-process':>11} {'worker':>10} {'transport (max)':>16} "
          f"{'difference (max)':>17} {'answer':>8}")
    for kind, row in figures["kinds"].items():
        print(f"{kind:<36} {row['count']:>3} {row['in_process_ms']:>8.1f} ms {row['worker_ms']:>7.1f} ms "
              f"{row['transport_ms_median']:>6.1f} ({row['transport_ms_max']:>5.1f}) ms "
              f"{row['overhead_ms_median']:>7.1f} ({row['overhead_ms_max']:>6.1f}) ms {row['response_kb_median']:>5.1f} kB")
    if "large_upload" in figures:
        up = figures["large_upload"]
        print(f"Sending a {up['shape_kji']} int16 volume ({up['mb']} MB): raw {up['raw_s']} s, zlib {up['zlib_s']} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0
