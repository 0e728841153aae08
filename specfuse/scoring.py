"""The fusion math, as pure functions (docs/design.md, "The algorithm").

No I/O and no models here: every function maps numbers to numbers, so each
step of a round can be checked by hand. Candidates and members are identified
by plain keys (member names); matrices are dicts of dicts.

    s[v][c]  candidate_score of candidate c as read by verifier v
    p[v][c]  softmax over the candidates v scored (step 3)
    S[c]     weighted average of p over the verifiers that scored c (step 4)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

Matrix = Mapping[str, Mapping[str, float]]


def candidate_score(token_logprobs: Sequence[float], marker_tokens: int = 0) -> float:
    """s_v(c): a verifier's mean log-prob per token of candidate c, the one formula
    every ranking uses (fusion rounds and the whole-answer baseline).

    A finished candidate is scored with its end-of-turn marker appended; the last
    ``marker_tokens`` log-probs are that marker. The marker counts as one unit,
    with its joint log-prob: "stop here" is one decision, however many tokens a
    tokenizer spends on "\nUser:". Counting each of its tokens would let the
    marker outvote a short finished candidate's text.
    """
    if not token_logprobs:
        raise ValueError("a candidate must cover at least one token")
    values = list(token_logprobs)
    # A marker can only be as long as what the verifier saw; with nothing else
    # left it is the whole candidate ("stop now").
    marker = min(max(marker_tokens, 0), len(values))
    if marker <= 1:
        return sum(values) / len(values)
    text = values[: len(values) - marker]
    return (sum(text) + sum(values[len(values) - marker :])) / (len(text) + 1)


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


def cross_probabilities(scores: Matrix, tau: float = 1.0) -> dict[str, dict[str, float]]:
    """Step 3 without self-votes: verifier v gives no probability to its own candidate.

    Verifiers and candidates are both keyed by member name. A verifier that drafted
    prefers its own sample far above chance, and that says little about quality,
    so its own candidate only serves as a reference:

    * two or more other candidates: softmax over those alone;
    * one other candidate: its share of the softmax against v's own candidate
      (with two drafters there is nothing else to compare it with);
    * no other candidate: v abstains (an empty row).

    A candidate that no other verifier scored (its drafter is the only member
    that verifies, the others only draft) keeps its drafter's vote, its share of
    that verifier's whole softmax: without it the candidate would get S = 0 and
    lose every round to a draft-only member's text, whatever the verifier thinks.
    """
    result: dict[str, dict[str, float]] = {}
    for v, row in scores.items():
        others = {c: s for c, s in row.items() if c != v}
        if len(others) >= 2:
            result[v] = softmax(others, tau)
        elif len(others) == 1 and v in row:
            (other,) = others
            result[v] = {other: softmax(dict(row), tau)[other]}
        else:
            result[v] = {}
    cross_voted = {c for row in result.values() for c in row}
    for v, row in scores.items():
        if v in row and v not in cross_voted and len(row) >= 2:
            result[v][v] = softmax(dict(row), tau)[v]
    return result


def pool_identical(aggregated: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Support of each candidate pooled with the candidates identical to it.

    ``groups`` maps each candidate to an identity key (its text and whether it
    finished). Identical proposals from independent drafters split a verifier's
    softmax between them; summing them back gives that text the mass of the
    mixture of proposals, so agreement counts instead of cancelling out.
    """
    totals: dict[str, float] = {}
    for c, value in aggregated.items():
        totals[groups[c]] = totals.get(groups[c], 0.0) + value
    return {c: totals[groups[c]] for c in aggregated}


_WORD = re.compile(r"\w+")


def repeats_words(answer: str, candidate: str, n: int) -> bool:
    """Whether appending ``candidate`` to ``answer`` repeats a run of ``n`` words.

    Words are case-folded ``\\w+`` runs. Only runs that touch the candidate count
    (a repetition already in the answer is not the candidate's doing), including
    one that ends in the answer's last word when the candidate extends that word.
    Why: once a text repeats itself, every model predicts the next repeat with
    high probability, so likelihood verification rewards a loop it should stop.
    """
    words = _WORD.findall((answer + candidate).lower())
    first_new = len(_WORD.findall(answer.lower()))
    if _WORD.match(candidate[:1]) and _WORD.match(answer[-1:]):
        first_new -= 1  # the candidate continues the answer's last word
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    for i, gram in enumerate(grams):
        if i + n - 1 >= first_new and gram in seen:
            return True
        seen.add(gram)
    return False


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
    """w_i <- w_i * exp(eta * r_i) for the rewarded members, renormalised among them.

    A member with no reward this round (a verify-only member, or a drafter with
    no comparable pair) keeps its weight: renormalising over everyone would shrink
    it every round for not drafting (SpecEM's reference code floors a member's
    wins at one for the same reason). Weights still sum to 1.
    """
    rewarded = {m: w for m, w in weights.items() if m in reward}
    if not rewarded:
        return dict(weights)
    raw = {m: w * math.exp(eta * reward[m]) for m, w in rewarded.items()}
    mass = sum(rewarded.values())
    total = sum(raw.values())
    return {m: raw[m] * mass / total if m in raw else w for m, w in weights.items()}


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


def evidence_exits(
    history: Sequence[Mapping[str, float]],
    active: Sequence[str],
    *,
    margin: float,
    patience: int,
    min_active: int,
) -> list[str]:
    """Model exit on evidence: which active drafters leave now.

    ``history`` holds each verified round's aggregated S per candidate member.
    Per round a member's deviation is its S minus the round's mean S; its lead
    L_i(T) is the sum of its deviations over the first T rounds. The
    round-to-round spread sigma is the standard deviation of all deviations so
    far. Were every member equally good, L_i(T) would wander about 0 with a
    spread of sigma * sqrt(T_i) (T_i: rounds in which i was scored), so a member
    trails on evidence when L_i(T) < -margin * sigma * sqrt(T_i). It leaves once
    that has held after each of the last ``patience`` rounds; the most-trailing
    member leaves first, and never so many that fewer than min_active stay.
    """
    if len(active) <= min_active or len(history) < max(patience, 2):
        return []
    deviations: list[dict[str, float]] = []
    for row in history:
        mean = sum(row.values()) / len(row) if row else 0.0
        deviations.append({m: v - mean for m, v in row.items()})
    pooled = [d for row in deviations for d in row.values()]
    centre = sum(pooled) / len(pooled)
    sigma = math.sqrt(sum((d - centre) ** 2 for d in pooled) / max(len(pooled) - 1, 1))
    if sigma == 0.0:
        return []

    def z(member: str, upto: int) -> float | None:
        seen = [row[member] for row in deviations[:upto] if member in row]
        if not seen:
            return None
        return sum(seen) / (sigma * math.sqrt(len(seen)))

    trailing: dict[str, float] = {}
    for m in active:
        zs = [z(m, upto) for upto in range(len(history) - patience + 1, len(history) + 1)]
        if all(v is not None and v < -margin for v in zs):
            trailing[m] = zs[-1]  # type: ignore[assignment]
    losers = sorted(trailing, key=lambda m: (trailing[m], m))
    return losers[: len(active) - min_active]
