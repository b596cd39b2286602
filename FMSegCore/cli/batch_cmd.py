"""``fmseg batch``: segment a cohort (a folder of scans or a CSV) with one method, on this machine or a Ray
cluster; resumable; a results table and a quality-control report beside the outputs (:mod:`FMSegCore.batch`)."""

from __future__ import annotations

import argparse

from FMSegCore.cli.option_args import add_option, check_options, modality_name
from FMSegCore.errors import InputError
from FMSegCore.options import Batch, InContext


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch", help="segment a cohort of scans (folder or CSV), resumable, with a QC report",
        description="Segment every scan of a cohort with one method: an automatic adapter (--adapter), a 3-D "
                    "task file (--task), a support set (--support, repeated), or each case's own prompts "
                    "(--prompts-column, a CSV column of markups files). The model is loaded once per worker. "
                    "Results go to OUTDIR: <case><format> on each scan's own grid, results.csv (one row per "
                    "case: status, error, volumes, flags), qc/<case>.png overlays and report.html. A rerun "
                    "skips what is done and retries what failed. Exit status 0: every case done; 1: some "
                    "failed (see results.csv); 2: bad input, nothing run.")
    parser.add_argument("--inputs", required=True, metavar="FOLDER|CSV",
                        help="a folder of scans (NIfTI, NRRD, MetaImage; DICOM series as sub-folders) or a CSV "
                             "with an 'image' column (optional 'case' column and per-case columns)")
    parser.add_argument("--output", required=True, metavar="OUTDIR", help="the results folder (made if absent)")
    method = parser.add_mutually_exclusive_group(required=True)
    method.add_argument("--adapter", metavar="ADAPTER", help="an automatic adapter ('fmseg adapt --mode auto')")
    method.add_argument("--task", metavar="TASK", help="a task file ('fmseg task create')")
    method.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labelled example (repeat for more): in-context segmentation of each scan")
    method.add_argument("--prompts-column", metavar="COLUMN",
                        help="the CSV column naming each case's markups file(s) (';' between several): a "
                             "promptable model segments what they prompt")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="the structures to segment (--task, --support; default: all)")
    parser.add_argument("--model", default=None,
                        help=f"--support: an in-context model (default {InContext.model}); --prompts-column: a "
                             "promptable model (default litemedsam)")
    add_option(parser, Batch, "engine", "local: worker processes here; ray: Ray Data actors (pip install "
                                        "'fmseg[ray]'), on a cluster with --address")
    add_option(parser, Batch, "workers", "workers, each with the model loaded once (default: one per GPU, else "
                                         "one)", metavar="N")
    add_option(parser, Batch, "gpus_per_worker", "ray: GPUs each actor asks for (0 on CPU-only clusters)",
               metavar="G")
    parser.add_argument("--address", default=None,
                        help="ray: the cluster to join (HOST:PORT, ray://HOST:PORT or auto; default $RAY_ADDRESS, "
                             "else a local Ray on this machine)")
    add_option(parser, Batch, "device", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    add_option(parser, Batch, "precision", "auto: bf16/fp16 on CUDA, fp32 on CPU")
    add_option(parser, Batch, "modality", "how to normalise the scans (auto: guessed per scan)",
               type=modality_name)
    add_option(parser, Batch, "format", "the results' format (.seg.nrrd: names and colours for Slicer; .nii.gz "
                                        "plus <case>.labels.json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of another task in OUTDIR (never an input)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.batch.methods import ADAPTER, PROMPTS, SUPPORT, TASK, MethodSpec
    from FMSegCore.batch.run import BatchSettings, run_batch

    check_options(Batch, {"engine": args.engine, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
                          "format": args.format, "modality": args.modality, "precision": args.precision,
                          "device": args.device})
    if args.adapter:
        kind, files = ADAPTER, (args.adapter,)
    elif args.task:
        kind, files = TASK, (args.task,)
    elif args.support:
        kind, files = SUPPORT, tuple(path for pair in args.support for path in pair)
    else:
        kind, files = PROMPTS, ()
    if args.labels and kind in (ADAPTER, PROMPTS):
        raise InputError(None, "--labels goes with --task or --support (an adapter segments what it learned; "
                               "prompts name their structures)")
    if args.model and kind in (ADAPTER, TASK):
        raise InputError(None, "--model goes with --support or --prompts-column (adapters and tasks carry their "
                               "model)")
    spec = MethodSpec(kind, files, tuple(args.labels) if args.labels else None, args.model, args.prompts_column,
                      args.precision, args.modality)
    summary = run_batch(BatchSettings(args.inputs, args.output, spec, args.engine, args.workers,
                                      args.gpus_per_worker, args.device, args.format, args.overwrite, args.address,
                                      progress=False if args.no_progress else None))
    print(f"{summary.done} case(s) done now, {summary.skipped} done before, {summary.failed} failed "
          f"({summary.seconds:.0f} s; {summary.extras.get('workers', '')})")
    for row in summary.rows:
        if row.get("status") == "failed":
            print(f"  failed: {row['case']}: {row.get('error')}")
    print(f"Wrote {summary.results} and {summary.report}"
          + (f" (and {summary.extras['parquet']})" if "parquet" in summary.extras else ""))
    return 1 if summary.failed else 0
