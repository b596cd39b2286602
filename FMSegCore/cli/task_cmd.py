"""``fmseg task``: task files of 3-D in-context models.

``fmseg task create`` encodes the structures labelled in reference scans into a task file (``.fmseg-task``, a few
kB: one embedding per class) that ``fmseg incontext --task`` applies to new scans without the references;
``fmseg task info`` prints what a task file holds.
"""

from __future__ import annotations

import argparse

from FMSegCore.cli.incontext3d import TASK_SUFFIX
from FMSegCore.cli.option_args import add_option, modality_name
from FMSegCore.options import InContext
from FMSegCore.zoo.registry import DEFAULT_INCONTEXT_3D


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "task", help="task files of 3-D in-context models (create, info)",
        description="Task files hold what a 3-D in-context model learnt from labelled reference scans (one "
                    "embedding per structure): create one once, apply it to any number of scans with "
                    "fmseg incontext --task FILE.")
    actions = parser.add_subparsers(dest="task_command", metavar="ACTION")
    create = actions.add_parser(
        "create", help="encode the structures of labelled reference scans into a task file",
        description="Encode the structures labelled in the reference scans (all of them, or those named by "
                    f"--labels) into a task file ({TASK_SUFFIX}) for a 3-D in-context model.")
    create.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labelled reference: image and label map (.seg.nrrd, or NIfTI/NRRD with a "
                             "labels.json beside it); repeat for more references (averaged per structure)")
    create.add_argument("--output", required=True, help=f"the task file ({TASK_SUFFIX})")
    create.add_argument("--labels", nargs="+", default=None, metavar="NAME|VALUE",
                        help="structures to encode, by name or label value (default: every label)")
    create.add_argument("--model", default=DEFAULT_INCONTEXT_3D,
                        help=f"3-D in-context zoo model (default {DEFAULT_INCONTEXT_3D})")
    add_option(create, InContext, "modality", "intensity normalisation (auto: guessed from each image)",
               type=modality_name)
    add_option(create, InContext, "window", "CT window: abdomen, lung or bone")
    add_option(create, InContext, "device", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    create.add_argument("--overwrite", action="store_true", help="replace an existing task file")
    create.add_argument("--no-progress", action="store_true", help="no progress messages")
    create.set_defaults(func=run_create)
    info = actions.add_parser("info", help="print what a task file holds")
    info.add_argument("file", help=f"a task file ({TASK_SUFFIX})")
    info.set_defaults(func=run_info)
    parser.set_defaults(func=lambda args: parser.print_help() or 1)


def run_create(args: argparse.Namespace) -> int:
    from FMSegCore.cli.incontext3d import task_to_file

    task_to_file([tuple(pair) for pair in args.support], args.output, labels=args.labels, model=args.model,
                 modality=args.modality, window=args.window, device=args.device, overwrite=args.overwrite,
                 progress=False if args.no_progress else None)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from FMSegCore.engines.incontext.task_file import load_task

    task, metadata = load_task(args.file)
    made = metadata.created or "at an unknown time"
    print(f"{args.file}: task for {metadata.model} {tuple(task.shape)}, made {made} from {metadata.references} "
          f"reference{'s' * (metadata.references != 1)} ({metadata.modality}, sha256 "
          f"{metadata.references_sha256[:12]}...)")
    voxels = metadata.class_voxels if len(metadata.class_voxels) == len(metadata.classes) else [None] * len(
        metadata.classes)
    for segment, count in zip(metadata.classes, voxels):
        note = f"  ({int(count):,} reference voxels)" if count is not None else ""
        print(f"{segment.value:>3}  {segment.name}{note}")
    return 0
