"""``fmseg``'s arguments for the settings of :mod:`FMSegCore.options`: each one's default, choices and range are
its option's, and the parsed values are checked by the worker's model of the option set, so a value out of range
is refused in the worker's words, naming the command's flag (``--support-size must be at most 64``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from FMSegCore.errors import InputError
from FMSegCore.options import OptionInfo, option

#: Flags that are not ``--`` + the option's name with dashes.
FLAGS = {"prior_margin_mm": "--prior-margin"}


def flag(name: str) -> str:
    """The command-line flag of an option."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def modality_name(text: str) -> str:
    """A modality as typed (``ct``, ``Auto``) in the options' spelling (``CT``, ``auto``)."""
    return "auto" if text.lower() == "auto" else text.upper()


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_help(info: OptionInfo, text: str = "") -> str:
    """``text`` followed by the option's default and range, from its option set."""
    notes = []
    if info.default is not None and info.kind is not bool:
        notes.append(f"default {_shown(info.default)}")
    if info.range is not None:
        notes.append(f"{_shown(info.kind(info.range.low))} to {_shown(info.kind(info.range.high))}")
    suffix = f"({'; '.join(notes)})".replace("%", "%%") if notes else ""
    return " ".join(part for part in (text, suffix) if part)


#: Other spellings the command line accepts for an option's values (one vocabulary in every command).
SPELLINGS: dict[str, dict[str, str]] = {
    "axis": {"x": "sagittal", "y": "coronal", "z": "axial", "i": "sagittal", "j": "coronal", "k": "axial"},
}


def add_option(parser: argparse.ArgumentParser, options: type, name: str, help: str = "",
               **extra: Any) -> argparse.Action:
    """Add the flag of option ``name`` of the option set ``options``: its default, choices, type and range (in the
    help); ``extra`` adds or overrides argparse settings (a ``type`` that normalises spelling, a ``metavar``)."""
    info = option(options, name)
    settings: dict[str, Any] = {"dest": name, "default": info.default}
    if info.kind is bool:
        settings["action"] = "store_true"
    else:
        settings["type"] = info.kind
        if info.choices is not None:
            settings["choices"] = info.choices
        if name in SPELLINGS:
            spelling = SPELLINGS[name]
            settings["type"] = lambda text: spelling.get(str(text).lower(), str(text).lower())
            help = f"{help} ({', '.join(f'{k}: {v}' for k, v in spelling.items() if k in 'xyz')} too)".strip()
    settings.update(extra)
    return parser.add_argument(flag(name), help=option_help(info, help), **settings)


def check_options(options: type, values: Mapping[str, Any]) -> None:
    """Refuse values their options do not allow, with :class:`InputError`: one line naming the flag, in the words
    the worker answers the same value with. Names the set lacks are ignored."""
    from pydantic import ValidationError

    from FMSegCore.server.fields import options_model, rule

    try:
        options_model(options).model_validate(dict(values))
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(None, f"{flag(str(first['loc'][0]))} {rule(first)}") from None
