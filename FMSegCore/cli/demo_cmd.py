"""``fmseg demo``: segment the bundled abdominal CT from its three bundled ROI prompts, exactly as ``fmseg prompt``
would, write the segmentation and a PNG preview, and compare each structure with the bundled reference."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from FMSegCore.bench.metrics import dice
from FMSegCore.cli.prompt_cmd import (
    PromptResult,
    add_segment_options,
    check_output,
    options_from_args,
    prompt_to_file,
)
from FMSegCore.errors import InputError
from FMSegCore.zoo.cache import resources_dir

#: The bundled case and the structures its prompts ask for (files in ``prompts/``, in this order).
DEMO_CASE = "ct_abdomen_pelvis"
DEMO_STRUCTURES = ("liver", "spleen", "kidney_left")
SEGMENTATION_NAME = "demo.seg.nrrd"
PREVIEW_NAME = "demo.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``fmseg`` parser."""
    parser = subparsers.add_parser(
        "demo", help="segment the bundled CT (liver, spleen, left kidney) and compare with its reference",
        description=f"Runs `fmseg prompt` on the bundled abdominal CT with its three ROI prompts, writes "
                    f"{SEGMENTATION_NAME} and {PREVIEW_NAME} into the output folder, and prints each structure's "
                    "Dice overlap with the bundled reference label map.")
    parser.add_argument("--output-dir", default="fmseg_output", type=Path, metavar="FOLDER",
                        help="where to write the results (created if needed; default: fmseg_output)")
    add_segment_options(parser, full=False)
    parser.set_defaults(func=run)


def demo_case() -> Path:
    """The bundled case's folder; an error if the installation lacks it."""
    folder = resources_dir() / "SampleData" / DEMO_CASE
    if not (folder / "image.nii.gz").is_file():
        raise InputError(folder, "the bundled demo case is missing from this installation")
    return folder


def reference_dice(result: PromptResult, case: Path) -> dict[str, float]:
    """Dice of each segment against the structure of the same name in the case's reference label map."""
    from FMSegCore.io.labelmap import read_labelmap

    reference, infos = read_labelmap(case / "label.nii.gz", reference=result.image)
    values = {info.name: info.value for info in infos}
    return {s.name: dice(result.labels == s.value, reference.array == values[s.name])
            for s in result.segments if s.name in values}


def run(args: argparse.Namespace) -> int:
    from FMSegCore.io.overlay import require_matplotlib, write_overlay_png

    require_matplotlib()
    case = demo_case()
    folder: Path = args.output_dir
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "is a file, not a folder")
    created = not folder.exists()
    try:
        if folder.is_dir():
            check_output(folder / SEGMENTATION_NAME, args.overwrite)
            check_output(folder / PREVIEW_NAME, args.overwrite, suffixes=(".png",))
        folder.mkdir(parents=True, exist_ok=True)
        prompts = [case / "prompts" / f"{name}.mrk.json" for name in DEMO_STRUCTURES]
        options = options_from_args(args)
        print("Same as: " + shlex.join([
            "fmseg", "prompt", "--image", str(case / "image.nii.gz"), "--prompts", *map(str, prompts),
            "--output", str(folder / SEGMENTATION_NAME), "--device", options.device]),
            flush=True)
        result = prompt_to_file(case / "image.nii.gz", prompts, folder / SEGMENTATION_NAME, options,
                                overwrite=args.overwrite)
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    preview = write_overlay_png(result.image, result.labels, {s.value: s.name for s in result.segments},
                                folder / PREVIEW_NAME, colors={s.value: s.color for s in result.segments},
                                overwrite=args.overwrite)
    print(f"Wrote {preview}")
    print("Dice against the bundled reference label map (TotalSegmentator output, not manual):")
    scores = reference_dice(result, case)
    for name, score in scores.items():
        print(f"  {name:<12} {score:.3f}")
    print(f"To inspect: load {case / 'image.nii.gz'} and {result.output} in 3D Slicer.")
    return 0
