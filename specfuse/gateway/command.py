"""The `specfuse gateway` command: parse the options, build the engine, run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from specfuse.config import DEFAULT_LOCAL_MODELS, EnsembleConfig, MemberConfig
from specfuse.engine import SpecFuse
from specfuse.errors import SpecfuseError

#: The environment variable read when --api-key is not given (keeps the key off the process list).
API_KEY_ENV = "SPECFUSE_GATEWAY_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        help="ensemble config file (.toml or .json); default: -m members or the embedded ensemble",
    )
    parser.add_argument(
        "-m", "--member", action="append", metavar="MODEL", help="a local model short name (repeat)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on /v1/* (default: ${API_KEY_ENV}; unset: no auth)",
    )
    parser.add_argument(
        "--model-name", default=None, help="the model id clients ask for (default specfuse:<members>)"
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=32,
        help="fusions at once per replica; beyond it 429 (default 32)",
    )
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds a 429 asks clients to wait")
    parser.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds the members get to answer their probes"
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds open streams get to finish before they are cut (default 30)",
    )
    parser.add_argument("--log-level", default="info")


def build_engine(args: argparse.Namespace) -> SpecFuse:
    if args.config:
        return SpecFuse(EnsembleConfig.from_file(args.config))
    models = args.member or list(DEFAULT_LOCAL_MODELS)
    return SpecFuse(EnsembleConfig.build([MemberConfig(model=m) for m in models]))


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from specfuse.gateway.app import GatewayOptions, create_app

    if args.max_concurrent < 1:
        raise SystemExit("--max-concurrent must be at least 1")
    engine = build_engine(args)
    name = args.model_name or "specfuse:" + "+".join(engine.member_names)
    options = GatewayOptions(
        model_name=name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_concurrent=args.max_concurrent,
        retry_after=args.retry_after,
        start_timeout=args.start_timeout,
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().level > logging.DEBUG:
        # One line per member call would drown the gateway's own log; debug shows them.
        for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(engine, options)
    # The access log prints method, path and status only: never headers, so never a key.
    # SIGTERM (a rolling update) stops new connections at once and lets answers in flight end.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0


def register(subparsers: Any) -> None:
    """Add the `gateway` subcommand (used by specfuse.cli)."""
    parser = subparsers.add_parser(
        "gateway",
        help="serve the fused model over an OpenAI-compatible API (/v1/chat/completions, ...)",
        description="The ensemble as one OpenAI-compatible model; see docs/gateway.md.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specfuse.gateway")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except SpecfuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
