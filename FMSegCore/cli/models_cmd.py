"""``fmseg models``: list the zoo, show one model, download a model into the cache, import a file downloaded by
hand."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Optional

from FMSegCore.zoo.cache import CACHE_ENV, cache_dir, cached_path, fetch, file_digest, is_cached
from FMSegCore.zoo.families import WEIGHTS_ONLY, model_dims, model_kind
from FMSegCore.zoo.registry import ModelCard, get_card, list_cards


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models`` (with ``list``, ``info`` and ``fetch``) to the ``fmseg`` parser."""
    parser = subparsers.add_parser("models", help="list, inspect and download the models of the zoo",
                                   description="The model zoo. Without an action: the table of models.")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    actions.add_parser("list", help="the table of models (the default)")
    info = actions.add_parser("info", help="everything known about one model")
    info.add_argument("name", help="model name (see `fmseg models`)")
    get = actions.add_parser("fetch", help="download a model into the cache and verify it")
    get.add_argument("name", help="model name (see `fmseg models`)")
    get.add_argument("--trust-unverified", action="store_true",
                     help="accept a download that cannot be verified because no sha256 is published")
    get.add_argument("--no-progress", action="store_true", help="no progress bar")
    put = actions.add_parser("import", help="install a checkpoint downloaded by hand (offline sites, "
                                            "licence-gated weights), checked before it is copied into the cache")
    put.add_argument("name", help="model name (see `fmseg models`)")
    put.add_argument("file", type=Path, help="the checkpoint file")
    put.add_argument("--replace", action="store_true", help="replace a file already installed for this model")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action; ``list`` when none is given."""
    action = getattr(args, "models_command", None)
    if action == "info":
        return show_info(get_card(args.name))
    if action == "fetch":
        return fetch_model(get_card(args.name), args.trust_unverified, not args.no_progress)
    if action == "import":
        return import_model(get_card(args.name), args.file, args.replace)
    return show_table(list_cards())


def _tilde(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if home != "/" and text.startswith(home + "/") else text


def _size(size: Optional[int]) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _state(card: ModelCard) -> str:
    """``yes: <path>`` when the file is there and passes its checks, else ``no``."""
    if not is_cached(card):
        return "no"
    return f"yes{'' if card.verifiable else ' (unverified)'}: {_tilde(cached_path(card))}"


def _runs(card: ModelCard) -> str:
    """``promptable 2-D`` / ``incontext 3-D`` when a family runs the card, else ``weights only``."""
    kind, dims = model_kind(card), model_dims(card)
    return kind if kind == WEIGHTS_ONLY else f"{kind} {dims}-D"


def show_table(cards: list[ModelCard]) -> int:
    """Print one row per model: name, task, whether FMSeg runs it, size, licence, checksum, whether it is here,
    what it is good for."""
    header = ("NAME", "TASK", "RUNS", "SIZE", "LICENCE", "SHA256", "HERE", "GOOD FOR")
    rows = [header]
    for card in cards:
        path = cached_path(card)
        size = card.size_bytes if card.size_bytes is not None or not path.is_file() else path.stat().st_size
        here = ("yes" if card.verifiable else "yes (unverified)") if is_cached(card) else "no"
        rows.append((card.name, card.task, _runs(card), _size(size), card.licence,
                     "pinned" if card.verifiable else "none", here, card.good_for))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\nCache folder: {_tilde(cache_dir())} (set {CACHE_ENV} to move it). Details and where a file is: "
          "`fmseg models info NAME`; download: `fmseg models fetch NAME`; a file downloaded by hand: "
          "`fmseg models import NAME FILE`. Licences marked non-commercial or research allow no commercial use.")
    return 0


def show_info(card: ModelCard) -> int:
    """Print every field of one card, wrapped for a terminal."""
    size = "unknown size" if card.size_bytes is None else f"{_size(card.size_bytes)}, {card.size_bytes:,} bytes"
    fields = (
        ("task", card.task),
        ("runs", _runs(card)),
        ("description", card.description),
        ("source", card.source),
        ("file", f"{card.filename} ({size})"),
        ("sha256", card.sha256 or "none published (fetching needs --trust-unverified)"),
        ("licence", card.licence),
        ("input", card.input_conventions),
        ("architecture", card.architecture or "none in FMSeg yet"),
        ("good for", card.good_for or "-"),
        ("homepage", card.homepage),
        ("cached", _state(card) if is_cached(card) else f"no (would be saved to {_tilde(cached_path(card))})"),
    )
    print(f"{card.name}: {card.title}")
    for label, value in fields:
        prose = label in ("description", "input")
        lines = textwrap.wrap(value, width=96, break_long_words=False, break_on_hyphens=False) if prose else [value]
        print(f"  {label + ':':<14}{lines[0]}")
        for line in lines[1:]:
            print(f"  {'':<14}{line}")
    return 0


def fetch_model(card: ModelCard, trust_unverified: bool, progress: bool) -> int:
    """Download (or find) one model and say where it is and whether it was verified."""
    if is_cached(card):
        print(f"{card.name}: already available at {cached_path(card)}")
        return 0
    if card.verifiable or trust_unverified:
        if card.restricted_licence:
            print(f"{card.name}: note: its licence is {card.licence}: no commercial use", flush=True)
        print(f"{card.name}: fetching {card.filename} from {card.source}", flush=True)
    path = fetch(card, allow_unverified=trust_unverified, progress=progress)
    if card.verifiable:
        print(f"{card.name}: {path} (sha256 verified)")
    else:
        print(f"{card.name}: {path} (NOT verified: no sha256 is published; this file's sha256 is "
              f"{file_digest(path)})")
    return 0


def import_model(card: ModelCard, path: Path, replace: bool) -> int:
    """Check a hand-downloaded checkpoint and install it into the cache (:mod:`FMSegCore.zoo.import_weights`)."""
    from FMSegCore.zoo.import_weights import import_weights

    if card.restricted_licence:
        print(f"{card.name}: note: its licence is {card.licence}: no commercial use", flush=True)
    installed = import_weights(card, path, replace)
    checked = "sha256 and layout checked" if card.verifiable else "layout checked; no sha256 is published"
    print(f"{card.name}: installed {path} as {_tilde(installed)} ({checked})")
    return 0
