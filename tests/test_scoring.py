"""The fusion math, checked against numbers worked out by hand.

No model is involved, so these are pure unit tests.
"""

from __future__ import annotations

import math

import pytest

from specfuse import scoring


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
