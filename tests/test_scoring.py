"""The fusion math, checked against numbers worked out by hand.

No model is involved, so these are pure unit tests.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from specfuse import scoring


def test_candidate_score_is_the_per_token_mean() -> None:
    # (-1 - 2 - 3) / 3 = -2; a one-token marker changes nothing
    assert scoring.candidate_score([-1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    assert scoring.candidate_score([-1.0, -2.0, -3.0], marker_tokens=1) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="at least one token"):
        scoring.candidate_score([])


def test_a_finished_candidates_marker_counts_as_one_stop_decision() -> None:
    # "." then the three tokens of "\nUser:": (-1 + (-2 - 0.1 - 0.1)) / 2 = -1.6,
    # where a plain mean would have diluted the stop over three tokens: -3.2 / 4 = -0.8
    assert scoring.candidate_score([-1.0, -2.0, -0.1, -0.1], marker_tokens=3) == pytest.approx(-1.6)
    # "stop now" with nothing before it: the marker's joint log-prob; a marker
    # longer than what was scored is capped at the whole candidate
    assert scoring.candidate_score([-2.0, -0.5], marker_tokens=5) == pytest.approx(-2.5)


def test_backend_candidate_score_mean_is_the_same_formula() -> None:
    from specfuse.backends.base import CandidateScore

    assert CandidateScore((-1.0, -2.0, -3.0)).mean == scoring.candidate_score([-1.0, -2.0, -3.0])


def test_softmax_two_candidates() -> None:
    # p_a = e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1) = 0.7310585786
    p = scoring.softmax({"a": -1.0, "b": -2.0})
    assert p["a"] == pytest.approx(0.7310585786)
    assert p["b"] == pytest.approx(0.2689414214)
    # tau = 0.5 doubles the gap: 1 / (1 + e^-2) = 0.8807970780
    p = scoring.softmax({"a": -1.0, "b": -2.0}, tau=0.5)
    assert p["a"] == pytest.approx(0.8807970780)


def test_softmax_is_stable_for_very_negative_scores() -> None:
    p = scoring.softmax({"a": -10_000.0, "b": -10_001.0})
    assert p["a"] == pytest.approx(0.7310585786)


def test_softmax_single_candidate_gets_all_mass() -> None:
    assert scoring.softmax({"a": -7.3}) == {"a": 1.0}


def test_normalise_per_verifier_is_separate_per_row() -> None:
    p = scoring.normalise_per_verifier({"v1": {"a": -1.0, "b": -2.0}, "v2": {"a": -3.0, "b": -3.0}})
    assert p["v1"]["a"] == pytest.approx(0.7310585786)
    assert p["v2"] == {"a": 0.5, "b": 0.5}


def test_aggregate_weighted_mean() -> None:
    p = {"v1": {"a": 0.7, "b": 0.3}, "v2": {"a": 0.2, "b": 0.8}}
    w = {"v1": 0.75, "v2": 0.25}
    # S_a = 0.75*0.7 + 0.25*0.2 = 0.575 ; S_b = 0.75*0.3 + 0.25*0.8 = 0.425
    s = scoring.aggregate(p, w, ["a", "b"])
    assert s["a"] == pytest.approx(0.575)
    assert s["b"] == pytest.approx(0.425)


def test_aggregate_only_over_verifiers_that_scored_the_candidate() -> None:
    p = {"v1": {"a": 0.7, "b": 0.3}, "v2": {"b": 1.0}}
    w = {"v1": 0.75, "v2": 0.25}
    # S_a = 0.75*0.7 / 0.75 = 0.7 ; S_b = (0.75*0.3 + 0.25*1.0) / 1.0 = 0.475
    s = scoring.aggregate(p, w, ["a", "b", "c"])
    assert s["a"] == pytest.approx(0.7)
    assert s["b"] == pytest.approx(0.475)
    assert s["c"] == 0.0  # nobody scored it


def test_winner_is_argmax_then_weight_then_order() -> None:
    order = ["a", "b", "c"]
    assert scoring.pick_winner({"a": 0.2, "b": 0.5, "c": 0.3}, {}, order) == "b"
    # tie on S: the higher drafter weight wins
    assert scoring.pick_winner({"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.6}, order) == "b"
    # tie on S and weight: member order decides
    assert scoring.pick_winner({"b": 0.5, "a": 0.5}, {"a": 0.5, "b": 0.5}, order) == "a"


PAIRWISE = {
    "a": {"a": 0.5, "b": 0.3, "c": 0.2},
    "b": {"a": 0.2, "b": 0.5, "c": 0.3},
    "c": {"a": 0.4, "b": 0.4, "c": 0.2},
}


def test_rewards_count_pairs_by_hand() -> None:
    r = scoring.rewards(PAIRWISE, ["a", "b", "c"])
    # r_a: j=b: 0.2>=0.5 no, 0.2>=0.3 no; j=c: 0.4>=0.4 yes, 0.4>=0.2 yes -> 2/4
    assert r["a"] == pytest.approx(0.5)
    # r_b: j=a: 0.3>=0.5 no, 0.3>=0.2 yes; j=c: 0.4>=0.4 yes, 0.4>=0.2 yes -> 3/4
    assert r["b"] == pytest.approx(0.75)
    # r_c: j=a: 0.2>=0.5 no, 0.2>=0.3 no; j=b: 0.3>=0.2 yes, 0.3>=0.5 no -> 1/4
    assert r["c"] == pytest.approx(0.25)


def test_rewards_skip_a_drafter_with_no_comparable_pair() -> None:
    # only verifier a scored, and only its own candidate against b
    r = scoring.rewards({"a": {"a": 0.6, "b": 0.4}}, ["a", "b"])
    assert "a" not in r  # a's only verifier is itself
    assert r["b"] == 0.0  # 0.4 >= 0.6 is false


def test_learning_rate_decays_with_rounds() -> None:
    # eta_t = lam * sqrt(1/N) / t ; N=3: sqrt(1/3) = 0.5773502692
    assert scoring.learning_rate(1.0, 3, 1) == pytest.approx(0.5773502692)
    assert scoring.learning_rate(1.0, 3, 2) == pytest.approx(0.2886751346)
    assert scoring.learning_rate(0.0, 3, 1) == 0.0
    with pytest.raises(ValueError):
        scoring.learning_rate(1.0, 3, 0)


def test_update_weights_by_hand() -> None:
    eta = 1 / math.sqrt(3)  # round 1 of 3 members, lam = 1
    w = scoring.update_weights({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"a": 0.5, "b": 0.75, "c": 0.25}, eta)
    # exp(0.5*eta)=1.334658, exp(0.75*eta)=1.541896, exp(0.25*eta)=1.155274; sum 4.031828
    assert w["a"] == pytest.approx(0.3310305165)
    assert w["b"] == pytest.approx(0.3824309574)
    assert w["c"] == pytest.approx(0.2865385261)
    assert sum(w.values()) == pytest.approx(1.0)


def test_update_weights_leaves_unrewarded_members_in_proportion() -> None:
    w = scoring.update_weights({"a": 0.5, "b": 0.5}, {}, eta=0.9)
    assert w == {"a": 0.5, "b": 0.5}


def test_initial_weights_scale_configured_weights() -> None:
    assert scoring.initial_weights({"a": 1.0, "b": 3.0}) == {"a": 0.25, "b": 0.75}


def test_exit_keeps_min_active_and_drops_lowest_first() -> None:
    q = {"a": 3.0, "b": 1.5, "c": 1.4}
    # pi = softmax(Q) = (0.7017, 0.1566, 0.1417); threshold 0.5/3 = 0.1667: b and c are under
    out = scoring.exit_decisions(q, ["a", "b", "c"], temperature=1.0, ratio=0.5, min_active=2)
    assert out == ["c"]  # lowest pi leaves, b stays to keep two members
    out = scoring.exit_decisions(q, ["a", "b", "c"], temperature=1.0, ratio=0.5, min_active=1)
    assert out == ["c", "b"]


def test_exit_none_when_quality_is_balanced_or_at_minimum() -> None:
    q = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert scoring.exit_decisions(q, ["a", "b", "c"], temperature=1.0, ratio=0.5, min_active=1) == []
    assert (
        scoring.exit_decisions({"a": 9.0, "b": 0.0}, ["a", "b"], temperature=1.0, ratio=0.5, min_active=2)
        == []
    )


def test_exit_temperature_sharpens_decisions() -> None:
    q = {"a": 1.2, "b": 1.0, "c": 1.0}
    # T=1: pi_b = e^1/(e^1.2+2e^1) = 0.3168 > 0.1667: nobody leaves
    assert scoring.exit_decisions(q, ["a", "b", "c"], temperature=1.0, ratio=0.5, min_active=1) == []
    # T=0.05: pi_b = e^20/(e^24+2e^20) = 0.0179 < 0.1667: b and c leave
    out = scoring.exit_decisions(q, ["a", "b", "c"], temperature=0.05, ratio=0.5, min_active=1)
    assert sorted(out) == ["b", "c"]


def test_self_votes_can_decide_the_winner_and_cross_probabilities_remove_them() -> None:
    # Verifier a loves its own draft; b and c both prefer b's over the rest.
    scores = {
        "a": {"a": 0.0, "b": -4.0, "c": -5.0},
        "b": {"a": -2.0, "b": 0.0, "c": -2.5},
        "c": {"a": -2.0, "b": -1.5, "c": 0.0},
    }
    equal = {"a": 1.0, "b": 1.0, "c": 1.0}
    with_self = scoring.aggregate(scoring.normalise_per_verifier(scores), equal, ["a", "b", "c"])
    # (0.9756 + 0.1112 + 0.0996) / 3 = 0.3955 beats (0.0179 + 0.8214 + 0.1643) / 3 = 0.3345
    assert with_self["a"] == pytest.approx(0.3955, abs=1e-4)
    assert scoring.pick_winner(with_self, equal, ["a", "b", "c"]) == "a"
    p = scoring.cross_probabilities(scores)
    # each verifier's softmax over the other two: a: b 0.7311, c 0.2689; b: a 0.6225, c 0.3775
    assert p["a"] == pytest.approx({"b": 0.7310586, "c": 0.2689414})
    assert p["b"] == pytest.approx({"a": 0.6224593, "c": 0.3775407})
    cross = scoring.aggregate(p, equal, ["a", "b", "c"])
    # S(b) = (0.7311 + 0.6225) / 2 = 0.6768
    assert cross["b"] == pytest.approx(0.6767589)
    assert scoring.pick_winner(cross, equal, ["a", "b", "c"]) == "b"


def test_cross_probabilities_with_two_drafters_use_the_own_draft_as_reference() -> None:
    # a prefers b's text to its own; b finds a's text far worse than its own.
    scores = {"a": {"a": -1.0, "b": -0.5}, "b": {"a": -3.0, "b": -0.1}, "v": {"v": -1.0}}
    p = scoring.cross_probabilities(scores)
    assert p["a"] == pytest.approx({"b": 1 / (1 + math.exp(-0.5))})  # 0.6225
    assert p["b"] == pytest.approx({"a": 1 / (1 + math.exp(2.9))})  # 0.0522
    assert p["v"] == {}  # nothing but its own candidate: abstains
    # Plain per-verifier softmax over a single scored candidate is always 1: no information.
    assert scoring.normalise_per_verifier({"a": {"b": -7.0}, "b": {"a": -0.1}}) == {
        "a": {"b": 1.0},
        "b": {"a": 1.0},
    }


def test_a_candidate_only_its_drafter_verifies_keeps_that_vote() -> None:
    # q verifies, d only drafts: q prefers its own text (softmax 0.8176 against 0.1824).
    # Without q's vote its candidate would score 0 and d's text would win every round.
    scores = {"q": {"q": -0.5, "d": -2.0}}
    p = scoring.cross_probabilities(scores)
    assert p["q"] == pytest.approx({"d": 1 / (1 + math.exp(1.5)), "q": 1 / (1 + math.exp(-1.5))})
    s = scoring.aggregate(p, {"q": 1.0, "d": 1.0}, ["q", "d"])
    assert scoring.pick_winner(s, {}, ["d", "q"]) == "q"
    # ...and when q prefers d's text, d wins.
    flipped = scoring.cross_probabilities({"q": {"q": -2.0, "d": -0.5}})
    assert scoring.pick_winner(scoring.aggregate(flipped, {"q": 1.0}, ["q", "d"]), {}, ["q", "d"]) == "d"


def test_identical_candidates_pool_their_support() -> None:
    # Every verifier: x -1, y -0.5; x proposed twice splits its softmax mass:
    # e^-1 / (2 e^-1 + e^-0.5) = 0.2741 each against 0.4518 for y.
    p = {v: scoring.softmax({"a": -1.0, "b": -1.0, "c": -0.5}) for v in ("a", "b", "c")}
    s = scoring.aggregate(p, {"a": 1.0, "b": 1.0, "c": 1.0}, ["a", "b", "c"])
    assert scoring.pick_winner(s, {}, ["a", "b", "c"]) == "c"
    pooled = scoring.pool_identical(s, {"a": "x", "b": "x", "c": "y"})
    assert pooled["a"] == pooled["b"] == pytest.approx(0.5482, abs=1e-4)
    assert pooled["c"] == pytest.approx(0.4518, abs=1e-4)
    assert scoring.pick_winner(pooled, {}, ["a", "b", "c"]) == "a"


def test_update_weights_keeps_a_verify_only_members_weight() -> None:
    # v drafts nothing, so has no reward. a doubles (eta = ln 2, r = 1), b stays:
    # a and b share their previous mass 0.5 as 0.5 : 0.25, i.e. 1/3 and 1/6; v keeps 0.5.
    w = scoring.update_weights({"a": 0.25, "b": 0.25, "v": 0.5}, {"a": 1.0, "b": 0.0}, math.log(2))
    assert w == pytest.approx({"a": 1 / 3, "b": 1 / 6, "v": 0.5})
    assert sum(w.values()) == pytest.approx(1.0)


def test_evidence_exit_needs_a_lead_beyond_the_spread_for_patience_rounds() -> None:
    # c trails by the same amount every round: deviations (+1/15, +1/15, -2/15).
    # After 3 rounds sigma = sqrt(3 * 6/225 / 8) = 0.1 and c's z is -0.4 / (0.1 * sqrt 3) = -2.31;
    # after 2 rounds (same sigma) -0.2667 / (0.1 * sqrt 2) = -1.89.
    history = [{"a": 0.4, "b": 0.4, "c": 0.2}] * 3
    rule = {"margin": 2.0, "min_active": 2}
    assert scoring.evidence_exits(history, ["a", "b", "c"], patience=1, **rule) == ["c"]
    assert scoring.evidence_exits(history, ["a", "b", "c"], patience=2, **rule) == []
    # one more such round: z = -2.35 then -2.71, so two rounds in a row are enough
    assert scoring.evidence_exits(history + history[:1], ["a", "b", "c"], patience=2, **rule) == ["c"]
    # min_active caps the exits
    assert scoring.evidence_exits(history, ["a", "b", "c"], patience=1, margin=2.0, min_active=3) == []


def test_evidence_exit_ignores_noise_that_the_softmax_rule_acts_on() -> None:
    # The trailing member changes every round. The old defaults (T 0.1, min_active 1)
    # drop b after 4 rounds on a cumulative gap of 0.2; the evidence rule sees
    # b's z of -0.13 / (0.130 * 2) = -0.51 and keeps everyone.
    history = [{"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.2, "b": 0.3, "c": 0.5}] * 2
    quality = {m: sum(r[m] for r in history) for m in ("a", "b", "c")}
    old = scoring.exit_decisions(quality, ["a", "b", "c"], temperature=0.1, ratio=0.5, min_active=1)
    assert old == ["b"]
    assert scoring.evidence_exits(history, ["a", "b", "c"], margin=2.0, patience=1, min_active=1) == []


_names = st.sampled_from(["a", "b", "c", "d"])
_logprob = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)


@given(st.dictionaries(_names, st.dictionaries(_names, _logprob, min_size=1), min_size=1))
def test_cross_probabilities_never_vote_for_oneself_and_sum_to_at_most_one(
    scores: dict[str, dict[str, float]],
) -> None:
    p = scoring.cross_probabilities(scores)
    cross_voted = {c for v, row in p.items() for c in row if c != v}
    for v, row in p.items():
        if v in row:
            # a self-vote only for a candidate nobody else scored, from a verifier that compared it
            assert v not in cross_voted and len(scores[v]) >= 2
            assert row[v] == pytest.approx(scoring.softmax(scores[v])[v])
        assert all(0.0 <= x <= 1.0 for x in row.values())
        others = [c for c in scores[v] if c != v]
        if len(others) >= 2:
            assert sum(x for c, x in row.items() if c != v) == pytest.approx(1.0)


@given(
    st.dictionaries(_names, st.floats(min_value=0.01, max_value=1.0), min_size=1),
    st.dictionaries(_names, st.floats(min_value=0.0, max_value=1.0)),
    st.floats(min_value=0.0, max_value=2.0),
)
def test_update_weights_sum_to_one_and_spare_the_unrewarded(
    raw: dict[str, float], reward: dict[str, float], eta: float
) -> None:
    weights = scoring.initial_weights(raw)
    reward = {m: r for m, r in reward.items() if m in weights}
    out = scoring.update_weights(weights, reward, eta)
    assert sum(out.values()) == pytest.approx(1.0)
    for m in weights:
        if m not in reward:
            assert out[m] == pytest.approx(weights[m])


@given(
    st.lists(st.dictionaries(_names, st.floats(min_value=0.0, max_value=1.0), min_size=2), max_size=12),
    st.integers(min_value=1, max_value=4),
    st.floats(min_value=0.1, max_value=3.0),
    st.integers(min_value=1, max_value=4),
)
@example(history=[{"a": 0.4, "b": 0.4, "c": 0.2}] * 3, min_active=1, margin=0.5, patience=1)
def test_evidence_exits_keep_min_active_and_only_drop_active_members(
    history: list[dict[str, float]], min_active: int, margin: float, patience: int
) -> None:
    active = ["a", "b", "c", "d"][:3]
    out = scoring.evidence_exits(history, active, margin=margin, patience=patience, min_active=min_active)
    assert set(out) <= set(active)
    assert len(active) - len(out) >= min(min_active, len(active))
    assert len(out) == len(set(out))


def test_repeats_words_flags_only_repetition_the_candidate_makes() -> None:
    answer = "The ability to talk. The ability to"
    assert scoring.repeats_words(answer, " talk again.", 4)  # "the ability to talk" twice
    assert not scoring.repeats_words(answer, " fly.", 4)
    assert not scoring.repeats_words(answer, " fly.", 5)
    # Case and punctuation do not hide a repeat.
    assert scoring.repeats_words("I am happy. I", " AM HAPPY", 3)
    # A repeat inside the candidate alone counts; one already in the answer does not.
    assert scoring.repeats_words("", "go now go now", 2)
    assert not scoring.repeats_words("go now go now", " and rest", 2)
    # A candidate that extends the answer's last word: "ta" + "lk" is "talk".
    assert scoring.repeats_words("the ability to talk. the ability to ta", "lk", 4)
    assert not scoring.repeats_words("short", " text", 3)
