"""Replay model-exit rules offline on the round logs of cached ``fuse`` answers.

Why this exists: a real run of one exit setting costs minutes per prompt, so the
exit knobs (``exit_temperature``, ``exit_warmup``, ``exit_ratio``, ``min_active``)
are chosen here, on the per-round aggregated scores S that the ``fuse`` mode
already recorded, and then checked with one real run (``--modes exit``).
Use a held-out slice of the data (``--start``) so the knobs are not fitted to
the prompts they are judged on.

What a replay can and cannot know. It applies ``specfuse.scoring.exit_decisions``
round by round, exactly as the engine does, to the fuse run's S. After an exit the
real answer would differ (fewer candidates, another text), so past that point the
replay only estimates:

* calls: rounds before the exit cost what the fuse run measured; later rounds
  cost the fuse run's per-member-per-round calls times the members left; with one
  member left the rest of the answer is drafted alone in ``solo_segment_tokens``
  segments with no verification (one call each);
* lost wins: the share of the answer's later rounds that the fuse run gave to a
  member who would have left: text the exit run must replace with another
  member's. 0 means the exit only removed members who never won again;
* labels shuffled: in how many answers the same rule fires when each round's S
  values are dealt to the members at random (mean of 20 seeded draws), i.e. when
  no member is better than another. A rule that fires nearly as often on the real
  logs as on these fires on noise, not evidence.

    .venv/bin/python -m benchmarks.ifeval.exit_replay --start 100 --limit 50
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExitRule:
    warmup: int
    temperature: float
    ratio: float
    min_active: int
    #: "softmax" (the paper's rule: temperature, ratio) or "evidence" (margin, patience).
    kind: str = "softmax"
    margin: float = 2.0
    patience: int = 3

    def label(self) -> str:
        if self.kind == "evidence":
            return (
                f"evidence, warmup {self.warmup}, margin {self.margin:g}, patience {self.patience}, "
                f"min_active {self.min_active}"
            )
        return (
            f"warmup {self.warmup}, T {self.temperature:g}, ratio {self.ratio:g}, "
            f"min_active {self.min_active}"
        )


@dataclass(frozen=True)
class Replay:
    """One rule on one answer."""

    calls: float
    fuse_calls: int
    rounds: int
    member_rounds: float  # sum over rounds of members called
    exit_round: int | None  # the first round after which someone left
    lost_rounds: int  # later rounds the fuse run gave to a member who left
    later_rounds: int  # rounds after the first exit
    kept_top_winner: bool  # the fuse run's most frequent winner never left


def replay(
    round_log: Sequence[dict[str, Any]],
    rule: ExitRule,
    members: Sequence[str],
    solo_segment: int,
    segment: int,
) -> Replay:
    from specfuse import scoring

    active = list(members)
    quality = dict.fromkeys(members, 0.0)
    history: list[dict[str, float]] = []
    per_member_call = sum(r["calls"] for r in round_log) / (len(members) * len(round_log))
    calls = 0.0
    rounds = 0
    member_rounds = 0.0
    exited: set[str] = set()
    exit_round: int | None = None
    lost = later = 0
    wins = {m: sum(r["winner"] == m for r in round_log) for m in members}
    top = max(members, key=lambda m: (wins[m], -members.index(m)))
    for index, record in enumerate(round_log, start=1):
        if len(active) == 1:
            # Alone: the rest of the answer in long segments, one call each, no verification.
            left_tokens = segment * (len(round_log) - index + 1)
            solo_calls = math.ceil(left_tokens / solo_segment)
            calls += solo_calls
            rounds += solo_calls
            member_rounds += solo_calls
            later += len(round_log) - index + 1
            lost += sum(r["winner"] in exited for r in round_log[index - 1 :])
            break
        if exit_round is not None:
            later += 1
            lost += record["winner"] in exited
        calls += record["calls"] if not exited else per_member_call * len(active)
        rounds += 1
        member_rounds += len(active)
        s = {m: record["S"].get(m, 0.0) for m in active}
        total = sum(s.values()) or 1.0
        for m in active:  # S renormalised over the members still drafting
            quality[m] += s[m] / total
        history.append({m: s[m] / total for m in active})
        if index >= rule.warmup:
            keep = min(rule.min_active, len(active))
            if rule.kind == "evidence":
                leaving = scoring.evidence_exits(
                    history, active, margin=rule.margin, patience=rule.patience, min_active=keep
                )
            else:
                leaving = scoring.exit_decisions(
                    quality, active, temperature=rule.temperature, ratio=rule.ratio, min_active=keep
                )
            if leaving and exit_round is None:
                exit_round = index
            exited.update(leaving)
            active = [m for m in active if m not in leaving]
    return Replay(
        calls=calls,
        fuse_calls=sum(r["calls"] for r in round_log),
        rounds=rounds,
        member_rounds=member_rounds,
        exit_round=exit_round,
        lost_rounds=lost,
        later_rounds=later,
        kept_top_winner=top not in exited,
    )


def shuffled_labels(round_log: Sequence[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """The same rounds with each round's S values dealt to its members at random.

    A null model of "every member equally good": the round-to-round spread of S is
    kept, any lasting difference between members is destroyed. An exit that fires
    as often on these logs as on the real ones fires on noise.
    """
    shuffled = []
    for record in round_log:
        names = list(record["S"])
        values = [record["S"][m] for m in names]
        rng.shuffle(values)
        shuffled.append({**record, "S": dict(zip(names, values, strict=True))})
    return shuffled


def null_exit_rate(
    logs: Sequence[Sequence[dict[str, Any]]],
    rule: ExitRule,
    members: Sequence[str],
    solo_segment: int,
    segment: int,
    *,
    draws: int = 20,
    seed: int = 0,
) -> float:
    """Mean number of answers in which the rule fires on label-shuffled logs."""
    rng = random.Random(seed)
    fired = 0
    for _ in range(draws):
        for log in logs:
            result = replay(shuffled_labels(log, rng), rule, members, solo_segment, segment)
            fired += result.exit_round is not None
    return fired / draws


def rules(grid: dict[str, Iterable[Any]]) -> list[ExitRule]:
    """Every combination of the grid's values, fields named by the grid's keys."""
    return [ExitRule(**dict(zip(grid, values, strict=True))) for values in itertools.product(*grid.values())]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ifeval.exit_replay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS))
    parser.add_argument("--max-tokens", type=int, default=BenchSettings.max_tokens)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--mode",
        default="fuse",
        help="whose round logs to replay: fuse (the paper's verification, no exit) or default "
        "(the library's verification; rounds after an exit it made hold fewer members)",
    )
    args = parser.parse_args(argv)
    from specfuse.config import FusionSettings

    defaults = FusionSettings()
    settings = BenchSettings(max_tokens=args.max_tokens)
    members = tuple(args.members)
    cache = Cache(args.cache, settings)
    (source,) = expand_modes([args.mode], members)
    logs = []
    for prompt in load_prompts(args.data, args.limit, args.start):
        row = cache.get(source, prompt)
        if row is not None and row.get("round_log"):
            logs.append(row["round_log"])
    if not logs:
        raise SystemExit(
            f"no cached {args.mode} answers with round logs for these prompts: run --modes {args.mode} first"
        )
    grid = {
        "warmup": [2, 3, 4],
        "temperature": [1.0, 0.5, 0.25, 0.1],
        "ratio": [0.5],
        "min_active": [2, 1],
    }
    candidates = rules(grid) + [
        ExitRule(warmup, 0.0, 0.0, min_active, "evidence", margin, patience)
        for warmup in (3, 4)
        for margin in (1.0, 1.5, 2.0)
        for patience in (2, 3)
        for min_active in (2, 1)
    ]
    print(f"{len(logs)} {args.mode} answers; members {', '.join(members)}\n")
    print(
        "| rule | exits in | same rule, labels shuffled | mean exit round | calls cut | members/round "
        "| lost wins | top winner kept |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rule in candidates:
        results = [
            replay(log, rule, members, defaults.solo_segment_tokens, defaults.segment_tokens) for log in logs
        ]
        fired = [r for r in results if r.exit_round is not None]
        cut = 1 - sum(r.calls for r in results) / sum(r.fuse_calls for r in results)
        mpr = sum(r.member_rounds for r in results) / sum(r.rounds for r in results)
        later = sum(r.later_rounds for r in results)
        lost = sum(r.lost_rounds for r in results) / later if later else 0.0
        mean_exit = sum(r.exit_round for r in fired) / len(fired) if fired else float("nan")
        kept = sum(r.kept_top_winner for r in results)
        null = null_exit_rate(logs, rule, members, defaults.solo_segment_tokens, defaults.segment_tokens)
        print(
            f"| {rule.label()} | {len(fired)}/{len(results)} | {null:.1f} | {mean_exit:.1f} | {cut:.0%} "
            f"| {mpr:.2f} | {lost:.0%} | {kept}/{len(results)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
