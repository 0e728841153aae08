"""How often gated fusion would skip a round, replayed on the rounds of cached plain-fusion answers.

Gated fusion (`gate_logprob`) accepts the lead's segment without a round when
the lead's mean log-prob per token of it is at least the threshold. Plain
fusion (``fuse``, self-votes on) records every verifier's score of every
candidate, the lead's score of its own draft among them: the mean log-prob of
that draft on the same context, which is what the gate reads. So for each
threshold this prints the share of rounds the gate would have skipped, and in
those rounds how often fusion kept the lead's text anyway (it won, or an
identical candidate did). It cannot say what a skipped round would have done to
the rest of the answer: a real run (``--modes default+gate_logprob=...``) does.

    .venv/bin/python -m benchmarks.ifeval.gate_replay --start 100 --limit 50 --lead qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.ifeval.run import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    DEFAULT_MEMBERS,
    BenchSettings,
    Cache,
    expand_modes,
    load_prompts,
)

THRESHOLDS = (-0.1, -0.25, -0.5, -0.75, -1.0, -1.5)


def replay(rows: Sequence[dict[str, Any]], lead: str, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """Per threshold: rounds gated, and of those, rounds whose winning text was the lead's."""
    rounds = [
        r
        for row in rows
        for r in row["round_log"]
        if lead in r["candidates"] and lead in (r.get("s") or {}).get(lead, {})
    ]
    out = []
    for t in thresholds:
        gated = [r for r in rounds if r["s"][lead][lead] >= t]
        kept = sum(1 for r in gated if r["candidates"][r["winner"]][0] == r["candidates"][lead][0])
        out.append({"threshold": t, "rounds": len(rounds), "gated": len(gated), "kept": kept})
    return out


def render(table: Sequence[dict]) -> str:
    lines = [
        "| gate_logprob | rounds gated | fusion kept the lead's text in them |",
        "|---|---|---|",
    ]
    for r in table:
        share = r["gated"] / r["rounds"] if r["rounds"] else 0.0
        kept = r["kept"] / r["gated"] if r["gated"] else 0.0
        lines.append(
            f"| {r['threshold']:g} | {r['gated']}/{r['rounds']} ({share:.0%}) | {r['kept']} ({kept:.0%}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS))
    parser.add_argument("--lead", default="qwen2.5-coder-0.5b")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    (mode,) = expand_modes(["fuse"], tuple(args.members))
    cache = Cache(args.cache, BenchSettings())
    prompts = load_prompts(args.data, args.limit, start=args.start)
    rows = [row for p in prompts if (row := cache.get(mode, p)) is not None]
    if not rows:
        print("no cached 'fuse' answers for these prompts", file=sys.stderr)
        return 1
    print(f"{len(rows)} cached 'fuse' answers, lead {args.lead}")
    print(render(replay(rows, args.lead)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
