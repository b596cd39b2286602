"""Names users type for structures and classes (``--labels``, ``--classes``, ``--structures``): comma lists,
matching that ignores case, spaces and ``_``/``-``, and one message for an unknown name that offers the closest
known ones (never a truncated list). Shared by the in-context, adaptation and automatic-segmentation paths."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Union

#: How many close names an unknown name is answered with.
SUGGESTIONS = 5


def split_names(items: Iterable[Union[str, int]]) -> list[str]:
    """Each argument, comma lists split (``liver,spleen`` as two), stripped, empty parts dropped."""
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def name_key(name: str) -> str:
    """The form names are compared in: lower case, ``_`` and ``-`` as spaces, runs of spaces as one."""
    return re.sub(r"\s+", " ", re.sub(r"[_-]", " ", str(name).lower())).strip()


def closest_names(text: str, names: Iterable[str], count: int = SUGGESTIONS) -> list[str]:
    """The known names closest to ``text``, best first: difflib's near matches, else the names containing it,
    else simply the nearest few."""
    by_key = {name_key(name): name for name in names}
    key = name_key(text)
    found = difflib.get_close_matches(key, by_key, n=count, cutoff=0.6)
    if not found:
        found = [k for k in by_key if key and key in k][:count]
    if not found:
        found = difflib.get_close_matches(key, by_key, n=min(count, 3), cutoff=0.0)
    return [by_key[k] for k in found]


def unknown_name(kind: str, text: str, names: Sequence[str], where: str = "") -> str:
    """``unknown label 'splen' (the supports name 61: closest 'spleen', ...)``: the problem in one line."""
    if not names:
        return f"unknown {kind} {text!r}: {where or 'there'} name no structures"
    if len(names) <= 2 * SUGGESTIONS:  # few: all of them
        return f"unknown {kind} {text!r}; {where or 'they'} name {', '.join(repr(name) for name in names)}"
    closest = ", ".join(repr(name) for name in closest_names(text, names))
    return f"unknown {kind} {text!r}; closest: {closest} ({where + ' name ' if where else ''}{len(names)} in all)"
