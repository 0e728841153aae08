"""Replay verification rules offline on the rounds of cached fusion answers.

Why this exists: the verification rule (self-votes counted or not, identical
candidates pooled or not) decides each round's winner from the same drafts and
the same per-verifier scores. The ``fuse`` rows record both (``candidates`` and
``s`` of each round), so every rule can be applied to the very rounds the paper's
rule saw, at no model cost. What it measures is how often a rule picks another
winner, and how strongly each verifier prefers its own draft; not what the
changed winner would have done to the rest of the answer (a real run of
``--modes default`` measures that).

With ``--gate-lead NAME`` it also prints, for gated fusion (``gate_logprob``),
the share of rounds each threshold would have skipped: the lead's self-score
in these rounds is the mean log-prob of its own draft on the same context, the
very number the gate reads (what a skipped round does to the rest of the
answer only a real run, ``--modes default+gate_logprob=...``, measures).

With ``--mode whole`` it replays the whole-answer re-ranker instead: the same
members' complete answers, picked with and without self-votes and by each
verifier alone, each pick scored by the IFEval checker, beside the ceiling of
any pick (prompts where some member's answer passes).

    .venv/bin/python -m benchmarks.ifeval.verify_replay --start 100 --limit 50
    .venv/bin/python -m benchmarks.ifeval.verify_replay --mode whole --limit 100
    .venv/bin/python -m benchmarks.ifeval.verify_replay --start 100 --limit 50 --gate-lead qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ifeval.modes import REPEAT_WORDS
from benchmarks.ifeval.run import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    DEFAULT_MEMBERS,
    BenchSettings,
    Cache,
    Mode,
    expand_modes,
    load_prompts,
)
from specfuse import scoring


@dataclass(frozen=True)
class VerificationRule:
    self_votes: bool
    pool: bool

    def label(self) -> str:
        votes = "self-votes" if self.self_votes else "no self-votes"
        return f"{votes}, {'pooled' if self.pool else 'not pooled'}"


#: The paper's rule first: the others are compared with it.
RULES = (
    VerificationRule(self_votes=True, pool=False),
    VerificationRule(self_votes=True, pool=True),
    VerificationRule(self_votes=False, pool=False),
    VerificationRule(self_votes=False, pool=True),
)


def winner(
    rule: VerificationRule,
    scores: Mapping[str, Mapping[str, float]],
    candidates: Mapping[str, Sequence[Any]],
    order: Sequence[str],
) -> str:
    """The engine's `_rank` with equal weights (lam = 0), under ``rule``."""
    matrix = {v: dict(row) for v, row in scores.items()}
    p = scoring.normalise_per_verifier(matrix) if rule.self_votes else scoring.cross_probabilities(matrix)
    weights = {m: 1.0 for m in order}
    support = scoring.aggregate(p, weights, list(candidates))
    if rule.pool:
        groups = {m: f"{int(bool(c[1]))}{c[0]}" for m, c in candidates.items()}
        support = scoring.pool_identical(support, groups)
    return scoring.pick_winner(support, weights, order)


@dataclass
class Replay:
    rounds: int = 0
    #: verified rounds left out: some verifier had not scored its own draft
    skipped: int = 0
    changed: dict[VerificationRule, int] = field(default_factory=dict)
    #: verifier -> [rounds where it ranked its own draft first, rounds it could]
    own_first: dict[str, list[int]] = field(default_factory=dict)
    #: verifier -> sum over rounds of (own draft's s - mean s of the others), and count
    own_margin: dict[str, list[float]] = field(default_factory=dict)
    candidates_per_round: float = 0.0


def replay(rows: Iterable[Mapping[str, Any]], members: Sequence[str]) -> Replay:
    """Every verified round (two or more candidates, scores recorded) of ``rows``."""
    result = Replay(changed={rule: 0 for rule in RULES})
    candidate_count = 0
    for row in rows:
        for rnd in row.get("round_log", []):
            candidates = rnd.get("candidates") or {}
            scores = rnd.get("s") or {}
            # Only rounds where every verifier also scored its own draft (the paper's
            # verification, as in `fuse`) can be replayed under every rule.
            complete = all(v not in candidates or v in row_s for v, row_s in scores.items())
            if len(candidates) < 2 or not scores or not complete:
                result.skipped += len(candidates) >= 2
                continue
            order = [m for m in members if m in candidates]
            result.rounds += 1
            candidate_count += len(candidates)
            paper = winner(RULES[0], scores, candidates, order)
            for rule in RULES[1:]:
                if winner(rule, scores, candidates, order) != paper:
                    result.changed[rule] += 1
            for v, row_s in scores.items():
                if v not in row_s or len(row_s) < 2:
                    continue
                others = [s for c, s in row_s.items() if c != v]
                counts = result.own_first.setdefault(v, [0, 0])
                counts[0] += int(row_s[v] > max(others))
                counts[1] += 1
                margin = result.own_margin.setdefault(v, [0.0, 0])
                margin[0] += row_s[v] - sum(others) / len(others)
                margin[1] += 1
    result.candidates_per_round = candidate_count / result.rounds if result.rounds else 0.0
    return result


def render(result: Replay) -> str:
    left_out = ""
    if result.skipped:
        left_out = f" ({result.skipped} left out: a verifier had not scored its own draft)"
    lines = [
        f"{result.rounds} verified rounds, {result.candidates_per_round:.2f} candidates per round{left_out}",
        "",
        "| rule | rounds whose winner differs from the paper's rule |",
        "|---|---|",
    ]
    for rule in RULES[1:]:
        n = result.changed[rule]
        share = n / result.rounds if result.rounds else 0.0
        lines.append(f"| {rule.label()} | {n} ({share:.0%}) |")
    lines += [
        "",
        "| verifier | own draft ranked first | chance | own draft's mean log-prob minus the others' (nats) |",
        "|---|---|---|---|",
    ]
    for v, (first, n) in sorted(result.own_first.items()):
        total, count = result.own_margin[v]
        chance = 1 / result.candidates_per_round if result.candidates_per_round else 0.0
        lines.append(f"| {v} | {first}/{n} ({first / n:.0%}) | {chance:.0%} | {total / count:+.2f} |")
    return "\n".join(lines)


def whole_pick(probabilities: Mapping[str, Mapping[str, float]], members: Sequence[str]) -> str:
    """The re-ranker's pick (`runner.rank_whole_answers`): mean probability, member order on ties."""
    weights = {v: 1.0 for v in probabilities}
    support = scoring.aggregate({v: dict(row) for v, row in probabilities.items()}, weights, list(members))
    return scoring.pick_winner(support, {}, list(members))


def rank_votes(probabilities: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each verifier's scores replaced by its ranking (Borda points, best = n-1).

    Rank-based aggregation: a verifier whose log-probabilities spread widely
    (a confident or a miscalibrated one) counts no more than one that spreads
    narrowly; only the order of its preferences is kept.
    """
    out = {}
    for v, row in probabilities.items():
        ranked = sorted(row, key=lambda c: row[c])
        out[v] = {c: float(i) for i, c in enumerate(ranked)}
    return out


def without_self_votes(probabilities: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each verifier's probabilities renormalised over the other members' answers."""
    out = {}
    for v, row in probabilities.items():
        others = {c: x for c, x in row.items() if c != v}
        total = sum(others.values())
        out[v] = {c: x / total for c, x in others.items()} if total > 0 else {}
    return out


def whole_rules(
    rows: Iterable[tuple[Mapping[str, Any], Mapping[str, bool]]], members: Sequence[str]
) -> dict[str, int]:
    """Prompts passed (prompt-level strict) by the answer each rule picks.

    ``rows``: a whole row (its per-verifier ``probabilities``, and ``answers``: each
    member's answer, where known) and whether each member's own answer passes.
    """
    passed = {
        "with self-votes (the re-ranker)": 0,
        "without self-votes": 0,
        "rank-based (Borda points per verifier)": 0,
        "rank-based, without self-votes": 0,
    }
    guard = f"the re-ranker among answers that repeat no {REPEAT_WORDS}-word run (all, if every one does)"
    passed[guard] = 0
    passed.update({f"{v} alone as judge": 0 for v in members})
    passed["some member passes (ceiling)"] = 0
    passed["prompts"] = 0
    for row, ok in rows:
        p = row["probabilities"]
        passed["prompts"] += 1
        passed["with self-votes (the re-ranker)"] += ok[whole_pick(p, members)]
        passed["without self-votes"] += ok[whole_pick(without_self_votes(p), members)]
        passed["rank-based (Borda points per verifier)"] += ok[whole_pick(rank_votes(p), members)]
        passed["rank-based, without self-votes"] += ok[whole_pick(rank_votes(without_self_votes(p)), members)]
        answers = row.get("answers", {})
        fresh = [m for m in members if not scoring.repeats_words("", answers.get(m, ""), REPEAT_WORDS)]
        passed[guard] += ok[whole_pick(p, fresh or members)]
        for v in members:
            if v in p:
                passed[f"{v} alone as judge"] += ok[max(members, key=lambda c, r=p[v]: r.get(c, 0.0))]
        passed["some member passes (ceiling)"] += any(ok.values())
    return passed


def _whole_main(prompts: Sequence[Any], cache: Cache, members: tuple[str, ...]) -> int:
    from benchmarks.ifeval.data import score_response, setup_environment

    setup_environment()
    whole = Mode("whole", "whole", members)
    rows = []
    for prompt in prompts:
        row = cache.get(whole, prompt)
        solos = {m: cache.get(Mode(f"solo:{m}", "solo", (m,)), prompt) for m in members}
        if row is None or any(s is None for s in solos.values()):
            continue
        ok = {m: score_response(prompt, s["response"]).prompt_strict for m, s in solos.items() if s}
        rows.append(({**row, "answers": {m: s["response"] for m, s in solos.items() if s}}, ok))
    if not rows:
        print("no cached whole answers (with every member's answer) for these prompts", file=sys.stderr)
        return 1
    passed = whole_rules(rows, members)
    n = passed.pop("prompts")
    print(f"{n} prompts with the whole-answer re-ranker's scores and every member's answer\n")
    print("| pick | prompt strict |\n|---|---|")
    for rule, count in passed.items():
        print(f"| {rule} | {count}/{n} |")
    return 0


#: Thresholds of ``gate_logprob`` the gate replay shows.
THRESHOLDS = (-0.1, -0.25, -0.5, -0.75, -1.0, -1.5)


def gate_replay(
    rows: Sequence[dict[str, Any]], lead: str, thresholds: Sequence[float] = THRESHOLDS
) -> list[dict]:
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


def render_gate(table: Sequence[dict]) -> str:
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
    parser.add_argument(
        "--mode", default="fuse", help="the fusion mode whose rounds are replayed, or 'whole'"
    )
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--gate-lead", help="also replay gated fusion with this member as the lead")
    args = parser.parse_args(argv)
    prompts = load_prompts(args.data, args.limit, start=args.start)
    cache = Cache(args.cache, BenchSettings())
    if args.mode == "whole":
        return _whole_main(prompts, cache, tuple(args.members))
    (mode,) = expand_modes([args.mode], tuple(args.members))
    rows = [row for p in prompts if (row := cache.get(mode, p)) is not None]
    if not rows:
        print(f"no cached {args.mode!r} answers for these prompts", file=sys.stderr)
        return 1
    print(f"{len(rows)} cached {args.mode!r} answers")
    print(render(replay(rows, args.members)))
    if args.gate_lead:
        print(f"\ngated fusion, lead {args.gate_lead}:")
        print(render_gate(gate_replay(rows, args.gate_lead)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
