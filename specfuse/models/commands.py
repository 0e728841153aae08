"""The offline model store's command line, once for both ways in.

``scripts/setup.sh`` runs ``python -m specfuse.models install``; users type
``specfuse models install``. Both build their parser with :func:`add_commands`,
so the two cannot drift apart::

    python -m specfuse.models list
    python -m specfuse.models install [NAME ...] [--cache-dir DIR] [--force]
    python -m specfuse.models path NAME
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from specfuse.errors import SpecfuseError
from specfuse.models.convert import missing_packages
from specfuse.models.registry import MODELS, get_model_spec, list_models
from specfuse.models.store import ensure_model, is_converted, models_root, sweep_orphans

__all__ = ["add_commands", "main"]


def _cmd_list(args: argparse.Namespace) -> int:
    for spec in list_models():
        missing = missing_packages(spec.name)
        if is_converted(spec.name, cache_dir=args.cache_dir):
            status = "converted"
        elif missing:
            status = "missing: " + " ".join(p.requirement for p in missing)
        else:
            status = "packages installed, not converted"
        print(f"{spec.name:<20} {spec.kind:<9} {status}")
        print(f"{'':<20} {spec.description}")
    print(f"cache: {models_root(args.cache_dir)}")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    names = args.names or list(MODELS)
    for name in names:
        get_model_spec(name)  # fail on a typo before a long conversion
    sweep_orphans(models_root(args.cache_dir))
    total = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - total:7.1f}s] {message}", flush=True)

    for name in names:
        started = time.perf_counter()
        was_done = not args.force and is_converted(name, cache_dir=args.cache_dir)
        path = ensure_model(name, cache_dir=args.cache_dir, progress=progress, force=args.force)
        state = "already converted" if was_done else f"ready in {time.perf_counter() - started:.1f} s"
        progress(f"{name}: {state}: {path}")
    progress(f"done: {len(names)} model(s)")
    return 0


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_path(args: argparse.Namespace) -> int:
    print(ensure_model(args.name, cache_dir=args.cache_dir, progress=_print_progress))
    return 0


def _run(args: argparse.Namespace) -> int:
    # A plain line and status 1, whichever command line parsed the arguments:
    # scripts/setup.sh and users of `specfuse models` read the same failure.
    try:
        return int(args.models_run(args))
    except SpecfuseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the subcommands list, install and path; ``args.func(args)`` runs the one chosen.

    ``parser`` is the whole command (``python -m specfuse.models``) or the
    ``models`` subcommand of ``specfuse``.
    """
    # Hidden here and shown on every subcommand, so `--cache-dir DIR install`
    # works as well as `install --cache-dir DIR`; SUPPRESS keeps a subcommand's
    # unset option from overwriting a value given before it.
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="default: $SPECFUSE_CACHE or ~/.cache/specfuse",
    )
    commands = parser.add_subparsers(dest="models_command", required=True)
    commands.add_parser(
        "list", parents=[common], help="show the registered models and their state"
    ).set_defaults(models_run=_cmd_list)
    install = commands.add_parser(
        "install", parents=[common], help="convert models (default: all) into the cache"
    )
    install.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(MODELS)}")
    install.add_argument("--force", action="store_true", help="convert again even if already converted")
    install.set_defaults(models_run=_cmd_install)
    path = commands.add_parser(
        "path",
        parents=[common],
        help="print a model's directory, converting it if needed",
    )
    path.add_argument("name", metavar="NAME")
    path.set_defaults(models_run=_cmd_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m specfuse.models``."""
    parser = argparse.ArgumentParser(
        prog="python -m specfuse.models", description="The offline model store: PyPI-shipped small models."
    )
    add_commands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))
