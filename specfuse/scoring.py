"""The fusion math, as pure functions (docs/design.md, "The algorithm").

No I/O and no models here: every function maps numbers to numbers, so each
step of a round can be checked by hand. Candidates and members are identified
by plain keys (member names); matrices are dicts of dicts.

    s[v][c]  mean log-prob per covering token of candidate c, read by verifier v
    p[v][c]  softmax over the candidates v scored (step 3)
    S[c]     weighted average of p over the verifiers that scored c (step 4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Matrix = Mapping[str, Mapping[str, float]]


def softmax(values: Mapping[str, float], tau: float = 1.0) -> dict[str, float]:
    """Numerically stable softmax of values / tau."""
    if tau <= 0:
        raise ValueError("tau must be positive")
    if not values:
        return {}
    top = max(values.values())
    exps = {k: math.exp((v - top) / tau) for k, v in values.items()}
    total = sum(exps.values())
    return {k: e / total for k, e in exps.items()}


def normalise_per_verifier(scores: Matrix, tau: float = 1.0) -> dict[str, dict[str, float]]:
    """Step 3: p_v(c) = softmax_c(s_v(c) / tau), separately for each verifier."""
    return {v: softmax(row, tau) for v, row in scores.items()}


def aggregate(p: Matrix, weights: Mapping[str, float], candidates: Sequence[str]) -> dict[str, float]:
    """Step 4: S(c) = sum_v w_v p_v(c) / sum_v w_v over the verifiers that scored c.

    A candidate nobody scored gets 0, so it only wins when nothing was scored.
    """
    result: dict[str, float] = {}
    for c in candidates:
        num = den = 0.0
        for v, row in p.items():
            if c in row:
                num += weights[v] * row[c]
                den += weights[v]
        result[c] = num / den if den > 0 else 0.0
    return result


def pick_winner(aggregated: Mapping[str, float], weights: Mapping[str, float], order: Sequence[str]) -> str:
    """argmax S; ties go to the higher drafter weight, then to member order."""
    if not aggregated:
        raise ValueError("no candidates to choose from")
    rank = {name: i for i, name in enumerate(order)}
    return max(aggregated, key=lambda c: (aggregated[c], weights.get(c, 0.0), -rank[c]))


def rewards(p: Matrix, drafters: Sequence[str]) -> dict[str, float]:
    """SpecEM reward r_i: share of pairs (verifier j != i, other candidate k != i)
    with p_j(c_i) >= p_j(c_k), over the pairs where j scored both.

    A drafter with no comparable pair gets no reward entry (its weight stays put).
    """
    result: dict[str, float] = {}
    for i in drafters:
        wins = pairs = 0
        for j, row in p.items():
            if j == i or i not in row:
                continue
            for k in row:
                if k == i:
                    continue
                pairs += 1
                wins += row[i] >= row[k]
        if pairs:
            result[i] = wins / pairs
    return result


def learning_rate(lam: float, n_members: int, round_number: int) -> float:
    """eta_t = lam * sqrt(1/N) / t, with rounds counted from 1."""
    if round_number < 1:
        raise ValueError("rounds are counted from 1")
    return lam * math.sqrt(1.0 / n_members) / round_number


def update_weights(weights: Mapping[str, float], reward: Mapping[str, float], eta: float) -> dict[str, float]:
    """w_i <- w_i * exp(eta * r_i), then renormalise to sum 1."""
    raw = {m: w * math.exp(eta * reward.get(m, 0.0)) for m, w in weights.items()}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


def initial_weights(members: Mapping[str, float]) -> dict[str, float]:
    """Configured weights scaled to sum 1 (1/|V| each when all are equal)."""
    total = sum(members.values())
    return {m: w / total for m, w in members.items()}


def exit_decisions(
    quality: Mapping[str, float],
    active: Sequence[str],
    *,
    temperature: float,
    ratio: float,
    min_active: int,
) -> list[str]:
    """Model exit: which active drafters leave now.

    pi = softmax(Q / temperature) over the active drafters; member i leaves when
    pi_i < ratio / n_active. The lowest pi leaves first, and never so many that
    fewer than min_active drafters stay.
    """
    if len(active) <= min_active:
        return []
    pi = softmax({m: quality[m] for m in active}, temperature)
    threshold = ratio / len(active)
    losers = sorted((m for m in active if pi[m] < threshold), key=lambda m: (pi[m], m))
    return losers[: len(active) - min_active]
