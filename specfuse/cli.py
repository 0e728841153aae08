"""The `specfuse` command.

specfuse generate "PROMPT"                 fuse the embedded local ensemble
specfuse generate "PROMPT" -m smollm2-135m -m gemma3-270m --max-tokens 64
specfuse generate "PROMPT" --config ensemble.toml --json
specfuse generate "PROMPT" --trace fusion.html
specfuse models list | install            the offline model store
specfuse serve MODEL --protocol tgi        a local model over HTTP
specfuse gateway ensemble.toml --port 8000 the fused model over an OpenAI-compatible API
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
except ModuleNotFoundError as exc:  # rich comes with the `cli` extra, not with the library
    _MISSING_CLI_EXTRA: ModuleNotFoundError | None = exc
else:
    _MISSING_CLI_EXTRA = None

from specfuse.config import DEFAULT_LOCAL_MODELS, EnsembleConfig, MemberConfig
from specfuse.engine import SpecFuse
from specfuse.errors import SpecfuseError
from specfuse.models import commands as models_commands
from specfuse.prompts import check_messages
from specfuse.request import FusionResult
from specfuse.trace import RICH_PALETTE, server_cost

#: The shell's exit status for a command stopped by SIGINT (128 + 2).
_INTERRUPTED = 130


def _fusion_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_tokens", "segment_tokens", "temperature", "top_p", "seed", "tau", "lam"]
    names += ["gate_logprob", "gate_tokens"]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.stop:
        overrides["stop"] = args.stop
    if args.no_exit:
        overrides["model_exit"] = False
    if args.self_verify:
        overrides["self_verify"] = True
    if args.no_gate:
        overrides["gate_logprob"] = None  # None is a value here: fuse every round
    return overrides


def _build(args: argparse.Namespace) -> SpecFuse:
    overrides = _fusion_overrides(args)
    if args.config:
        config = EnsembleConfig.from_file(args.config)
        fusion = config.fusion.with_overrides(**overrides)
        return SpecFuse(config.model_copy(update={"fusion": fusion}))
    models = args.member or list(DEFAULT_LOCAL_MODELS)
    members = [MemberConfig(model=m) for m in models]
    return SpecFuse(EnsembleConfig.build(members, **overrides))


def _generate(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    out = Console(highlight=False)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    check_messages(messages)  # a blank prompt fails before any model loads
    fuse = _build(args)
    colours = {m: RICH_PALETTE[i % len(RICH_PALETTE)] for i, m in enumerate(fuse.member_names)}
    with console.status(f"loading {len(colours)} member(s): {', '.join(colours)}"):
        started = time.perf_counter()
        fuse.start(lambda name, seconds: console.print(f"[dim]  {name} ready ({seconds:.1f}s)[/dim]"))
    console.print(f"[dim]members ready in {time.perf_counter() - started:.1f}s[/dim]")
    if not args.json:
        legend = Text("members: ")
        for name, colour in colours.items():
            legend.append(f" {name} ", style=f"black on {colour}")
            legend.append(" ")
        console.print(legend)

    result: FusionResult | None = None
    try:
        # closing(): on Ctrl-C the stream is cancelled here, before the message below.
        with contextlib.closing(fuse.stream(messages)) as segments:
            for segment in segments:
                if not args.json and segment.text:
                    out.print(Text(segment.text, style=colours.get(segment.member or "", "")), end="")
                result = segment.result
    except KeyboardInterrupt:
        if not args.json:
            out.print()  # end the partial answer's line
        console.print("[dim]interrupted[/dim]")
        return _INTERRUPTED
    assert result is not None  # the stream always ends with the result
    if not args.json:
        out.print()
        _print_summary(console, result, colours)
    else:
        payload = {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {"input_tokens": result.usage.input_tokens, "output_tokens": result.usage.output_tokens},
            "trace": result.trace.to_dict(),
        }
        # plain print: rich would wrap long lines and break the JSON
        print(json.dumps(payload, ensure_ascii=False, indent=2))
    if args.trace:
        Path(args.trace).write_text(result.trace.to_html(title=args.prompt[:80]), encoding="utf-8")
        console.print(f"[dim]trace written to {args.trace}[/dim]")
    return 0


def _print_summary(console: Console, result: FusionResult, colours: dict[str, str]) -> None:
    summary = result.trace.summary()
    table = Table(title="fusion summary", title_justify="left")
    columns = (
        "member",
        "rounds",
        "calls",
        "wins",
        "tokens won",
        "tokens drafted",
        "prompt computed",
        "exited at",
    )
    for column in columns:
        table.add_column(column, justify="right" if column != "member" else "left")
    for name, s in summary["members"].items():
        table.add_row(
            Text(name, style=colours.get(name, "")),
            str(s["rounds"]),
            str(s["calls"]),
            str(s["wins"]),
            str(s["tokens_won"]),
            str(s["tokens_drafted"]),
            server_cost(s),
            str(s["exited_at_round"] or "-"),
        )
    console.print(table)
    for name, why in summary["left_out"].items():
        console.print(Text(f"left out at start: {name}: {why}", style="yellow"))  # no markup in `why`
    ttfs = summary["time_to_first_segment"] or 0.0
    tps = summary["tokens_per_second"] or 0.0
    console.print(
        f"rounds {summary['rounds']} · calls {summary['calls']} · members/round "
        f"{summary['members_per_round']:.2f} ({summary['members_per_round_by_tokens']:.2f} by tokens) · "
        f"first segment {ttfs:.2f}s · "
        f"total {summary['total_time']:.2f}s · {tps:.1f} tokens/s · finish: {result.finish_reason} · "
        f"server prompt tokens computed: {server_cost(summary)}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specfuse", description="Fuse several LLMs into one.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="fuse an answer to one prompt and stream it")
    gen.add_argument("prompt")
    gen.add_argument(
        "-m",
        "--member",
        action="append",
        metavar="MODEL",
        help="a local model short name or directory (repeat); default: the embedded ensemble",
    )
    gen.add_argument("--config", help="ensemble config file (.toml or .json)")
    gen.add_argument("--system", help="a system message")
    gen.add_argument("--max-tokens", dest="max_tokens", type=int)
    gen.add_argument("--segment-tokens", dest="segment_tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", dest="top_p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--tau", type=float)
    gen.add_argument("--lam", type=float, help="SpecEM learning rate; 0 disables online weights")
    gen.add_argument("--stop", action="append", help="a stop sequence (repeat)")
    gen.add_argument("--no-exit", action="store_true", help="disable model exit")
    gen.add_argument(
        "--gate-logprob",
        dest="gate_logprob",
        type=float,
        help="gated fusion: a lead's token below this log-prob starts a fused round",
    )
    gen.add_argument(
        "--gate-tokens", dest="gate_tokens", type=int, help="tokens the lead drafts alone before the others"
    )
    gen.add_argument("--no-gate", action="store_true", help="fuse every round (the paper's loop)")
    gen.add_argument(
        "--self-verify", action="store_true", help="a verifier's vote on its own draft counts (paper's rule)"
    )
    gen.add_argument("--json", action="store_true", help="print the full result with its trace as JSON")
    gen.add_argument("--trace", metavar="FILE.html", help="write a self-contained HTML view of the fusion")
    gen.set_defaults(func=_generate)

    # The same parser as `python -m specfuse.models`, so the two commands cannot drift apart.
    models = sub.add_parser("models", help="the offline model store (list, install, path)")
    models_commands.add_commands(models)

    from specfuse import selection

    selection.register(sub)
    try:
        from specfuse import devserver as serve
    except ImportError:  # the server extra is not installed
        pass
    else:
        serve.register(sub)
    try:
        from specfuse import gateway
    except ImportError:  # the gateway extra (fastapi, uvicorn, prometheus-client) is not installed
        pass
    else:
        gateway.register(sub)
    return parser


#: What the command says when installed without its extra.
MISSING_CLI_EXTRA_MESSAGE = (
    "the specfuse command needs the 'cli' extra (rich): pip install 'specfuse[cli]' "
    "(scripts/setup.sh installs it)"
)


def main(argv: Sequence[str] | None = None) -> int:
    if _MISSING_CLI_EXTRA is not None:
        print(f"error: {MISSING_CLI_EXTRA_MESSAGE} ({_MISSING_CLI_EXTRA})", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecfuseError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}")
        return 2
    except KeyboardInterrupt:
        # Ctrl-C while the members load: no traceback, the shell's usual status.
        Console(stderr=True).print("[dim]interrupted[/dim]")
        return _INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
