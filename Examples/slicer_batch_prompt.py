"""Headless Slicer batch job: segment the structures that Markups files prompt, with FMSeg's module Logic.

    Slicer --no-splash --no-main-window --python-script Examples/slicer_batch_prompt.py \\
        --image CT.nii.gz --prompts liver.mrk.json spleen.mrk.json --output result.seg.nrrd [--device cpu] \\
        [--server http://gpu-host:8765 --token TOKEN]

Each Markups file is one segment, named after the file as Slicer names the node it loads (ROIs are boxes,
point lists include points; a point described 'exclude' excludes). The same job without Slicer:
``fmseg prompt --image CT.nii.gz --prompts liver.mrk.json spleen.mrk.json --output result.seg.nrrd``.
The script exits 0 on success and 2 with one line on stderr for bad input; an existing output is never replaced.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slicer_batch_prompt.py", description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompts", required=True, nargs="+")
    parser.add_argument("--output", required=True, help="a .seg.nrrd file (not replaced if it exists)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--server", default="", help="a running 'fmseg serve' (default: start a local worker)")
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)

    import slicer
    from FMSegSlicerLib.logic import FMSegLogic

    output = Path(args.output)
    if not output.name.endswith(".seg.nrrd"):
        return _fail(output, "the output must be a .seg.nrrd file")
    if output.exists():
        return _fail(output, "exists already; choose another name")
    for path in [args.image, *args.prompts]:
        if not Path(path).is_file():
            return _fail(path, "no such file")
    volume = slicer.modules.volumes.logic().AddArchetypeVolume(str(args.image), Path(args.image).name.split(".")[0])
    if volume is None:
        return _fail(args.image, "Slicer cannot read this volume")
    segments: dict[str, dict[str, list]] = {}
    for path in args.prompts:
        node_id = slicer.modules.markups.logic().LoadMarkups(str(path))
        node = slicer.mrmlScene.GetNodeByID(node_id) if node_id else None
        if node is None:
            return _fail(path, "Slicer cannot read these markups")
        prompts = segments.setdefault(node.GetName(), {"rois": [], "points": []})
        prompts["rois" if node.IsA("vtkMRMLMarkupsROINode") else "points"].append(node)

    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", output.name[:-len(".seg.nrrd")])
    logic = FMSegLogic(slicer.mrmlScene, device=args.device)
    try:
        logic.connect(args.server, args.token)
        for name, prompts in segments.items():
            points = prompts["points"][0] if prompts["points"] else None
            if len(prompts["points"]) > 1:
                return _fail(args.prompts[0], f"segment '{name}': give one point list per segment")
            logic.prompt(volume, segmentation, name, include_points=points, rois=prompts["rois"])
            print(f"segmented {name}", flush=True)
    except Exception as error:  # one line for the user, whatever went wrong
        return _fail(args.image, str(error))
    finally:
        logic.shutdown()

    partial = output.with_name(f".{output.name}.partial.seg.nrrd")
    storage = segmentation.CreateDefaultStorageNode()
    storage.SetFileName(str(partial))
    if not storage.WriteData(segmentation):
        partial.unlink(missing_ok=True)
        return _fail(output, "could not be written")
    partial.replace(output)  # atomically: a half-written result never appears
    print(f"wrote {output} ({len(segments)} segments)")
    return 0


def _fail(path: object, problem: str) -> int:
    print(f"{path}: {' '.join(str(problem).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
