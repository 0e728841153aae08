"""Ensemble selection on the dev prompts: every configuration of the members, on both splits.

Which ensemble to deploy is a measurement, not a belief (UniTE, arXiv 2410.03777;
SLM-MUX, arXiv 2510.05077; Self-MoA, arXiv 2502.00674). This reads the harness's
cache and tabulates, on the knob split (prompts 101-150) and the report split
(1-100): each member alone, every subset of two or more members fused every round
(`fuse`, the paper's loop) and gated (`default`), and self-fusion of the lead
(`self`). Each row is paired per prompt and per instruction against the best
member alone, with an exact sign test.

The configuration to deploy is named on the knob split by a rule fixed before the
subset answers were seen, the one `specfuse select` applies (`selection.ranking`):
most prompts passed, then most paired wins net of losses, then fewer calls; it is
named over the best member alone only if it won more paired prompts than it lost.
It is then reported on the report split, untouched.

It calls no model: a configuration missing answers on a split is listed with the
harness command that computes them.

    .venv/bin/python -m benchmarks.ifeval.subsets
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.ifeval.cache import Cache
from benchmarks.ifeval.data import DEFAULT_DATA, load_prompts, setup_environment
from benchmarks.ifeval.modes import DEFAULT_MEMBERS, BenchSettings, Mode, expand_modes
from benchmarks.ifeval.report import ModeReport, build_reports, paired
from benchmarks.ifeval.run import DEFAULT_CACHE
from specfuse.selection import ranking, sign_test

#: (name, start, limit): knobs are chosen on the first, results reported on the second.
SPLITS: tuple[tuple[str, int, int], ...] = (("knob split 101-150", 100, 50), ("report split 1-100", 0, 100))

SHORT = {"smollm2-135m": "smollm2", "qwen2.5-coder-0.5b": "qwen", "gemma3-270m": "gemma"}


@dataclass(frozen=True)
class Configuration:
    label: str
    mode: Mode
    #: The harness arguments that compute its answers.
    members: tuple[str, ...]
    mode_name: str


def configurations(members: Sequence[str], settings: BenchSettings) -> list[Configuration]:
    """Each member alone, every subset fused and gated, and self-fusion of the lead."""
    out = [
        Configuration(f"{_short(m.members[0])} alone", m, m.members, "solo")
        for m in expand_modes(["solo"], members, settings)
    ]
    for size in range(2, len(members) + 1):
        for subset in itertools.combinations(members, size):
            names = " + ".join(_short(m) for m in subset)
            fuse, gated = expand_modes(["fuse", "default"], subset, settings)
            out.append(Configuration(f"fused every round: {names}", fuse, subset, "fuse"))
            out.append(Configuration(f"gated (default): {names}", gated, subset, "default"))
    (self_mode,) = expand_modes(["self"], members, settings)
    lead = self_mode.members[0]
    label = f"self-fusion: {_short(lead)} x{settings.self_copies}"
    out.append(Configuration(label, self_mode, tuple(members), "self"))
    return out


def _short(member: str) -> str:
    return SHORT.get(member, member)


@dataclass(frozen=True)
class Row:
    config: Configuration
    report: ModeReport
    prompt: tuple[int, int]
    instruction: tuple[int, int]
    #: Calls an answer as today's engine makes them, counted from the round logs.
    calls_now: float


def engine_calls(row: dict[str, Any]) -> int:
    """An answer's calls as today's engine makes them: each round's drafts plus one
    scoring call per verifier that scored. Answers cached before one scoring call per
    verifier recorded more (a call per candidate that arrived apart); their round logs
    hold what today's engine would call. Gated answers (all made by today's engine: a
    full round there reuses the lead's draft) and rows without verifiers' scores keep
    their count."""
    log = row.get("round_log")
    if not log or not all("s" in r and "gated" not in r for r in log):
        return int(row["summary"]["calls"])
    return sum(len(r["candidates"]) + len(r["s"]) for r in log)


def split_rows(
    configs: Sequence[Configuration], cache: Cache, start: int, limit: int
) -> tuple[list[Row], list[Configuration], ModeReport | None]:
    """The complete configurations' rows against the best member alone, and the incomplete ones."""
    prompts = load_prompts(DEFAULT_DATA, limit, start)
    complete = [c for c in configs if all(cache.get(c.mode, p) is not None for p in prompts)]
    missing = [c for c in configs if c not in complete]
    reports = build_reports([c.mode for c in complete], prompts, cache)
    solos = [r for c, r in zip(complete, reports, strict=True) if c.mode_name == "solo"]
    if not solos:
        return [], missing, None
    best = max(solos, key=lambda r: (r.prompt_strict, r.instr_strict))
    rows = [
        Row(
            c,
            r,
            paired(r, best),
            paired(r, best, "instruction"),
            statistics.fmean(engine_calls(cache.get(c.mode, p) or {}) for p in prompts),
        )
        for c, r in zip(complete, reports, strict=True)
    ]
    return rows, missing, best


def choose(rows: Sequence[Row], best: ModeReport) -> Row | None:
    """The rule fixed in advance, `specfuse select`'s; None = the best member alone."""
    top = max(rows, key=lambda r: ranking(r.report.prompt_strict, *r.prompt, r.calls_now))
    if top.report is best or top.prompt[0] <= top.prompt[1]:
        return None
    return top


def table(rows: Sequence[Row], best: ModeReport) -> str:
    lines = [
        "| configuration | prompt strict | vs best member: prompts won/lost, p | instr strict "
        "| instructions won/lost, p | calls/answer | s/answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.report
        (pw, pl), (iw, il) = row.prompt, row.instruction
        versus = "–" if r is best else f"{pw}/{pl}, p={sign_test(pw, pl):.2f}"
        instr = "–" if r is best else f"{iw}/{il}, p={sign_test(iw, il):.2f}"
        # Counts recorded by an older engine are shown beside today's.
        calls = f"{row.calls_now:.1f}" + (
            f" (recorded {r.calls:.1f})" if abs(r.calls - row.calls_now) > 0.05 else ""
        )
        lines.append(
            f"| {row.config.label} | {r.prompt_strict}/{r.n} | {versus} | {r.instr_strict}/{r.instr_total} "
            f"| {instr} | {calls} | {r.total_time:.1f} |"
        )
    return "\n".join(lines)


def command(config: Configuration, start: int, limit: int, settings: BenchSettings) -> str:
    span = f"--start {start} --limit {limit}" if start else f"--limit {limit}"
    extra = f" --self-copies {settings.self_copies}" if config.mode_name == "self" else ""
    members = " ".join(config.members)
    return (
        f".venv/bin/python -m benchmarks.ifeval --members {members} --modes solo {config.mode_name} "
        f"{span}{extra} --workers 2"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ifeval.subsets", description=__doc__)
    parser.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS))
    parser.add_argument("--self-copies", type=int, default=BenchSettings.self_copies)
    args = parser.parse_args(argv)
    setup_environment()
    settings = BenchSettings(self_copies=args.self_copies)
    cache = Cache(DEFAULT_CACHE, settings)
    configs = configurations(args.members, settings)
    chosen: Configuration | None = None
    for i, (name, start, limit) in enumerate(SPLITS):
        rows, missing, best = split_rows(configs, cache, start, limit)
        print(f"## {name}\n")
        if best is None:
            print("no member alone is cached on this split\n")
            continue
        print(table(rows, best) + "\n")
        if i == 0:
            pick = choose(rows, best)
            chosen = pick.config if pick else next(r.config for r in rows if r.report is best)
            print(f"Chosen on this split: **{chosen.label}**\n")
        elif chosen is not None:
            row = next((r for r in rows if r.config == chosen), None)
            if row is None:
                print(f"The chosen configuration ({chosen.label}) is not complete on this split.\n")
            elif row.report is best:
                print(f"The chosen configuration is the best member alone: {best.prompt_strict}/{best.n}.\n")
            else:
                (pw, pl), (iw, il) = row.prompt, row.instruction
                print(
                    f"The chosen configuration ({chosen.label}): {row.report.prompt_strict}/{row.report.n} "
                    f"against {best.prompt_strict}/{best.n} for the best member alone; prompts "
                    f"{pw} won / {pl} lost (p={sign_test(pw, pl):.2f}), instructions {iw} won / {il} lost "
                    f"(p={sign_test(iw, il):.2f}).\n"
                )
        for c in missing:
            print(f"- not complete: {c.label}: `{command(c, start, limit, settings)}`")
        if missing:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
