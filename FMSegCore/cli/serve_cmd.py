"""``fmseg serve``: run the inference worker (HTTP) that Slicer's module and scripts talk to."""

from __future__ import annotations

import argparse
import os

from FMSegCore.errors import InputError
from FMSegCore.server.defaults import EMBEDDING_BUDGET, SESSION_IDLE_S


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``fmseg`` parser."""
    parser = subparsers.add_parser(
        "serve", help="run the inference worker (HTTP) for Slicer and scripts",
        description="Serve FMSeg's models over HTTP: volumes are uploaded once, prompts are small requests and "
                    "keep the image embeddings cached, long jobs (in-context, adaptation) report progress and "
                    "can be cancelled. Binds 127.0.0.1 unless told otherwise; any other address needs a token.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--token", default=None,
                        help="require this token (default: the FMSEG_SERVER_TOKEN environment variable; "
                             "required when --host is not a loopback address)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cpu or mps")
    parser.add_argument("--max-upload-mb", type=int, default=2048, help="largest accepted upload (default 2048 MB)")
    parser.add_argument("--embedding-memory-gb", type=float, default=EMBEDDING_BUDGET / 2 ** 30,
                        help="memory all prompt sessions' image embeddings share, on the worker's device (default "
                             f"{EMBEDDING_BUDGET / 2 ** 30:g}); beyond it the least recently used ones are dropped")
    parser.add_argument("--session-idle-minutes", type=float, default=SESSION_IDLE_S / 60,
                        help=f"close a prompt session unused this long (default {SESSION_IDLE_S / 60:g})")
    parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.server.app import is_loopback, serve

    token = args.token if args.token is not None else os.environ.get("FMSEG_SERVER_TOKEN", "")
    if not is_loopback(args.host) and not token:
        raise InputError(None, f"--host {args.host} exposes the worker beyond this machine: give --token "
                               "(or set FMSEG_SERVER_TOKEN)")
    if not 0 <= args.port <= 65535 or args.max_upload_mb < 1:
        raise InputError(None, "--port must be 0..65535 and --max-upload-mb at least 1")
    if not args.embedding_memory_gb > 0 or not args.session_idle_minutes > 0:
        raise InputError(None, "--embedding-memory-gb and --session-idle-minutes must be positive")
    try:
        serve(args.host, args.port, token, args.device, args.max_upload_mb << 20, args.ready_file, args.verbose,
              embedding_budget_bytes=int(args.embedding_memory_gb * 2 ** 30),
              session_idle_s=args.session_idle_minutes * 60)
    except OSError as error:
        raise InputError(None, f"cannot listen on {args.host}:{args.port} ({error.strerror})") from None
    return 0
