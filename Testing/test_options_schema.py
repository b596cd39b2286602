"""One definition of each setting (FMSegCore.options): ``fmseg``'s parsers, the worker's request bodies and the
Slicer module take their defaults, choices and ranges from it, and a value out of range is refused by the CLI
and the worker in the same words."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from slicer_parameter_node import parameter_node_fields

from FMSegCore.cli.main import build_parser, main
from FMSegCore.cli.option_args import flag
from FMSegCore.engines.adaptation.defaults import MAX_RANK, default_method
from FMSegCore.options import (
    DEVICES,
    Adaptation,
    AutoSegmentation,
    InContext,
    Prompting,
    bounds,
    choices,
    options_of,
)
from FMSegCore.server.fields import RequestError, parse
from FMSegCore.server.schemas import AdaptRequest, IncontextRequest, SegmentRequest, SessionRequest

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "FMSegSlicer" / "Resources" / "UI" / "FMSegSlicer.ui"

#: command -> (option set, the worker's request body for it, a minimal body, minimal arguments)
COMMANDS: dict[str, tuple[type, type, dict[str, Any], list[str]]] = {
    "prompt": (Prompting, SessionRequest, {"volume": "v"}, ["--image", "i.nii.gz", "--prompts", "p.mrk.json"]),
    "incontext": (InContext, IncontextRequest, {"volume": "v", "supports": [{"image": "i", "labels": "l"}]},
                  ["--image", "i.nii.gz", "--support", "s.nii.gz", "l.nii.gz"]),
    "adapt": (Adaptation, AdaptRequest, {"cases": [{"image": "i", "labels": "l"}]}, ["--train", "i.nii.gz", "l.nii.gz"]),
    "segment": (AutoSegmentation, SegmentRequest, {"volume": "v", "adapter": "a"},
                ["--image", "i.nii.gz", "--adapter", "a.pt"]),
}
#: options the CLI spells differently: ``fmseg incontext --uncertainty`` takes the map's file name.
NOT_FLAGS = {("incontext", "uncertainty")}
RANGED = [(command, name) for command, (options, *_) in COMMANDS.items()
          for name, info in options_of(options).items() if info.range is not None]


def _output(command: str, folder: Path) -> str:
    return str(folder / ("out.pt" if command == "adapt" else "out.nii.gz"))


def _actions(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices[command]._actions}


def _cli_error(capsys, command: str, folder: Path, *extra: str) -> str:
    arguments = [command, *COMMANDS[command][3], "--output", _output(command, folder), *extra]
    code = main(arguments)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"fmseg {command}: error: ")
    return err.removeprefix(f"fmseg {command}: error: ")


def _worker_error(command: str, name: str, value: Any) -> str:
    _, request, body, _ = COMMANDS[command]
    with pytest.raises(RequestError) as refused:
        parse(request, {**body, name: value})
    assert refused.value.status == 400
    return refused.value.message


# ------------------------------------------------------------------------------------------------ the definitions


def test_options_need_neither_torch_nor_pydantic_and_neither_does_the_slicer_logic():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['pydantic'] = None; sys.path.insert(0, sys.argv[1]); "
            "import FMSegCore.options, FMSegCore.cli.option_args, FMSegSlicerLib.logic, FMSegSlicerLib.scene_segments; "
            "print(FMSegCore.options.InContext.support_size)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "FMSegSlicer")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "8", result.stderr[-1500:]


def test_the_lora_rank_has_one_default_and_one_cap_and_the_engines_agree():
    from FMSegCore.engines.adaptation.methods import MethodSettings
    from FMSegCore.engines.incontext.anatomical import AnatomicalSettings
    from FMSegCore.engines.incontext.session import InContextSettings

    assert bounds(Adaptation, "rank") == (1, MAX_RANK) and Adaptation.rank == MethodSettings("lora").rank == 4
    MethodSettings("lora", rank=MAX_RANK)
    with pytest.raises(ValueError, match=f"between 1 and {MAX_RANK}"):
        MethodSettings("lora", rank=MAX_RANK + 1)
    settings, anatomical = InContextSettings(), AnatomicalSettings()
    assert (settings.support_size, settings.ensemble, settings.match_tolerance, settings.seed) == \
        (InContext.support_size, InContext.ensemble, InContext.tolerance, InContext.seed)
    assert (anatomical.prior_margin_mm, anatomical.registration_weight) == \
        (InContext.prior_margin_mm, InContext.registration_weight)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_defaults_choices_and_ranges_are_the_options(command, tmp_path):
    options = COMMANDS[command][0]
    args = build_parser().parse_args([command, *COMMANDS[command][3], "--output", _output(command, tmp_path)])
    actions = _actions(command)
    for name, info in options_of(options).items():
        if (command, name) in NOT_FLAGS:
            assert args.uncertainty is None and info.default is False
            continue
        assert getattr(args, name) == info.default, name
        assert actions[name].option_strings == [flag(name)], name
        if info.choices is not None:
            assert tuple(actions[name].choices) == info.choices, name
        if info.range is not None:
            low, high = bounds(options, name)
            shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high)]
            assert f"{shown[0]} to {shown[1]}" in actions[name].help, name


def test_cli_spellings_are_read_into_the_options_values():
    args = build_parser().parse_args(["incontext", *COMMANDS["incontext"][3], "--output", "o.nii.gz",
                                      "--axis", "x", "--modality", "ct"])
    assert (args.axis, args.modality) == ("sagittal", "CT")
    args = build_parser().parse_args(["adapt", *COMMANDS["adapt"][3], "--output", "o.pt", "--modality", "mr"])
    assert args.modality == "MR"


@pytest.mark.parametrize("command, name", RANGED)
def test_a_value_out_of_range_is_refused_by_cli_and_worker_in_the_same_words(command, name, tmp_path, capsys):
    options = COMMANDS[command][0]
    where = COMMANDS[command][1].where
    low, high = bounds(options, name)
    for value, words in ((low - 1, f"must be at least {low}"), (high + 1, f"must be at most {high}")):
        worker = _worker_error(command, name, value)
        assert worker == f"{where}: field '{name}' {words}"
        assert _cli_error(capsys, command, tmp_path, f"{flag(name)}={value}") == f"{flag(name)} {words}"
    for value in (low, high):  # the bounds themselves pass: the command goes on to its input files
        parse(COMMANDS[command][1], {**COMMANDS[command][2], name: value})
        assert not _cli_error(capsys, command, tmp_path, f"{flag(name)}={value}").startswith(flag(name))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_device_is_refused_by_cli_and_worker_in_the_same_words(command, tmp_path, capsys):
    rule = "must be auto, cpu, cuda, cuda:N or mps"
    assert _cli_error(capsys, command, tmp_path, "--device=gpu") == f"--device {rule}"
    worker = _worker_error(command, "device", "gpu")
    assert worker == f"{COMMANDS[command][1].where}: field 'device' {rule} (empty: the worker's device)"


# ------------------------------------------------------------------------------------------------ worker


@pytest.mark.parametrize("command", list(COMMANDS))
def test_worker_bodies_hold_the_options_with_their_defaults(command):
    options, request, body, _ = COMMANDS[command]
    parsed = parse(request, body)
    for name, info in options_of(options).items():
        expected = "" if name == "device" else info.default  # empty: the worker's own device
        assert getattr(parsed, name) == expected, name
        if info.choices is not None:
            parse(request, {**body, name: info.choices[-1]})
            message = _worker_error(command, name, "no-such-choice")
            assert message.startswith(f"{request.where}: field '{name}' must be one of"), message


# ------------------------------------------------------------------------------------------------ Slicer


def test_slicer_parameter_node_takes_its_defaults_choices_and_ranges_from_the_options():
    fields = parameter_node_fields()
    expected = {
        "device": {"choices": list(DEVICES), "default": Prompting.device},
        "supportSize": {"range": bounds(InContext, "support_size"), "default": InContext.support_size},
        "ensemble": {"range": bounds(InContext, "ensemble"), "default": InContext.ensemble},
        "uncertainty": {"default": InContext.uncertainty},
        "adaptMode": {"choices": list(choices(Adaptation, "mode")), "default": Adaptation.mode},
        "method": {"choices": list(choices(Adaptation, "method")), "default": default_method(Adaptation.mode)},
        "rank": {"range": bounds(Adaptation, "rank"), "default": Adaptation.rank},
        "steps": {"range": (0, bounds(Adaptation, "steps")[1]), "default": 0},  # 0: the method's default
    }
    for name, want in expected.items():
        assert {key: fields[name][key] for key in want} == want, name
    assert fields["rank"]["range"] == (1, MAX_RANK)


def test_slicer_spin_boxes_in_the_ui_file_have_the_options_ranges():
    spins = {w.get("name"): w for w in ET.parse(UI_FILE).iter("widget") if w.get("class") == "QSpinBox"}

    def number(widget: ET.Element, prop: str) -> int:
        return int(widget.find(f"property[@name='{prop}']/number").text)

    for name, (options, option, low) in {"supportSizeSpinBox": (InContext, "support_size", None),
                                         "ensembleSpinBox": (InContext, "ensemble", None),
                                         "rankSpinBox": (Adaptation, "rank", None),
                                         "stepsSpinBox": (Adaptation, "steps", 0)}.items():
        widget = spins[name]
        lo, hi = bounds(options, option)
        assert (number(widget, "minimum"), number(widget, "maximum")) == (lo if low is None else low, hi), name
        default = getattr(options, option)
        assert number(widget, "value") == (0 if default is None else default), name


def test_slicer_logic_defaults_are_the_options():
    pytest.importorskip("slicer")
    from FMSegSlicerLib.logic import FMSegLogic

    def defaults(method) -> dict[str, Any]:
        return {name: p.default for name, p in inspect.signature(method).parameters.items()
                if p.default is not inspect.Parameter.empty}

    incontext = defaults(FMSegLogic._prepare_incontext)
    for name in ("support_size", "ensemble", "uncertainty", "model", "match"):
        assert incontext[name] == getattr(InContext, name), name
    adapt = defaults(FMSegLogic._prepare_adapt)
    assert {k: adapt[k] for k in ("mode", "method", "rank", "model")} == \
        {"mode": Adaptation.mode, "method": Adaptation.method, "rank": Adaptation.rank, "model": Adaptation.model}
    assert defaults(FMSegLogic.prompt)["model"] == Prompting.model


def test_a_new_slicer_segment_without_a_colour_gets_the_colour_rule_of_files():
    pytest.importorskip("slicer")
    import numpy as np
    import slicer
    from FMSegSlicerLib import scene_segments
    from slicer_scene import new_scene

    from FMSegCore.io.colors import default_color, distinct_colors

    new_scene()
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "colours")
    slicer.util.updateVolumeFromArray(volume, np.zeros((4, 5, 6), np.int16))
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "colours")
    scene_segments.prepare(segmentation, volume)
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 2:5] = True
    for name in ("liver", "kidney_left"):
        scene_segments.write_segment(segmentation, volume, name, mask)
    shown = [segmentation.GetSegmentation().GetNthSegment(n).GetColor() for n in range(2)]
    assert np.allclose(shown, distinct_colors(["liver", "kidney_left"]), atol=1e-6)
    assert not np.allclose(shown[1], default_color("kidney_left", 2), atol=1e-3)  # too close to the liver's


@pytest.mark.parametrize("command", ["prompt", "incontext", "adapt"])
def test_every_command_takes_the_same_axis_vocabulary(command):
    from FMSegCore.cli.main import build_parser

    parser = build_parser()
    required = {"prompt": ["--image", "a", "--prompts", "b", "--output", "c"],
                "incontext": ["--image", "a", "--support", "b", "c", "--output", "d"],
                "adapt": ["--train", "a", "b", "--output", "c"]}[command]
    for spelling, name in (("z", "axial"), ("Y", "coronal"), ("sagittal", "sagittal")):
        assert parser.parse_args([command, *required, "--axis", spelling]).axis == name
