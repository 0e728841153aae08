"""The IFEval benchmark harness (benchmarks/ifeval) against real small models.

Why: the benchmark's numbers are only worth something if (1) answers go
through the if-verifiable checkers the way we think, NLTK data included,
(2) a rerun really reads the cache instead of calling models, and (3) the
reports get written. Two prompts, a few tokens, smollm2-135m + gemma3-270m.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.ifeval import run as bench  # noqa: E402

bench.setup_environment()

PAIR = ("smollm2-135m", "gemma3-270m")


def _prompt(instruction: str, kwargs: dict[str, object], text: str = "Write something.") -> bench.Prompt:
    return bench.Prompt(key=1, prompt=text, instruction_id_list=[instruction], kwargs=[kwargs])


@pytest.mark.parametrize(
    ("instruction", "kwargs", "good", "bad"),
    [
        (
            "detectable_format:number_bullet_lists",
            {"num_bullets": 3},
            "* one\n* two\n* three",
            "* only one bullet here",
        ),
        ("change_case:english_lowercase", {}, "all of this is lower case.", "This Has Capitals."),
        # Needs NLTK's punkt data: checks that NLTK_DATA points at llama-index-core's copy.
        (
            "length_constraints:number_sentences",
            {"relation": "less than", "num_sentences": 3},
            "One sentence. Two sentences.",
            "One. Two. Three. Four. Five.",
        ),
    ],
)
def test_checker_path_scores_obvious_answers(
    instruction: str, kwargs: dict[str, object], good: str, bad: str
) -> None:
    prompt = _prompt(instruction, kwargs)
    ok, ko = bench.score_response(prompt, good), bench.score_response(prompt, bad)
    assert (ok.prompt_strict, ok.prompt_loose, ok.strict) == (True, True, (True,))
    assert (ko.prompt_strict, ko.strict) == (False, (False,))


def test_empty_answer_fails_every_instruction() -> None:
    prompt = bench.Prompt(1, "x", ["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
    score = bench.score_response(prompt, "")
    assert score.strict == (False, False) and not score.prompt_loose


def test_a_language_check_gives_the_same_verdict_every_time() -> None:
    """langdetect samples at random; these cached answers (Arabic, Bengali) passed
    and failed their language check in turns before it was seeded."""
    prompts = {p.key: p for p in bench.load_prompts(bench.DEFAULT_DATA, limit=150)}
    ungated = bench.DEFAULT_CACHE / "default+gate_logprob_null-0db376df0c.jsonl"
    rows = ungated.read_text(encoding="utf-8").splitlines()
    answers = {json.loads(line)["key"]: json.loads(line)["response"] for line in rows}
    for key in (3241, 3744):
        verdicts = {bench.score_response(prompts[key], answers[key]) for _ in range(40)}
        assert len(verdicts) == 1, (key, verdicts)


def test_sign_test_is_exact() -> None:
    assert bench.sign_test(0, 0) == 1.0
    assert bench.sign_test(5, 0) == pytest.approx(2 / 32)
    assert bench.sign_test(3, 3) == 1.0


def test_harness_runs_resumes_from_cache_and_writes_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "two.jsonl"
    lines = bench.DEFAULT_DATA.read_text(encoding="utf-8").splitlines()[:2]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = bench.BenchSettings(max_tokens=4, segment_tokens=2, temperature=0.0, seed=3)
    kwargs = dict(
        data=data,
        members=PAIR,
        settings=settings,
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )

    first = bench.run_benchmark(**kwargs)
    n_modes = len(PAIR) + 1 + len(bench.ENSEMBLE_MODES)  # solos, whole, fusion modes
    assert first.stats.computed == 2 * n_modes and first.stats.cached == 0
    assert [r.n for r in first.reports] == [2] * n_modes
    assert all(r.calls >= 1 for r in first.reports)
    whole = next(r for r in first.reports if r.mode == "whole")
    assert sum(whole.extra["picked"].values()) == 2
    # Both members verified every round of both plain-fusion answers, each scoring both candidates.
    fuse = next(r for r in first.reports if r.mode == "fuse")
    assert fuse.extra["fewest_verifiers"] == {"2": 2}
    assert fuse.extra["scorings_per_round"] == 4.0
    # one cache file per mode, one row per prompt, keyed by the prompt key
    files = sorted((tmp_path / "cache").glob("*.jsonl"))
    assert len(files) == n_modes
    keys = {json.loads(line)["key"] for line in files[0].read_text().splitlines()}
    assert keys == {json.loads(line)["key"] for line in lines}
    assert first.table_path.read_text().count("\n| ") == n_modes + 1  # header + one row a mode
    assert first.chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Second run: count every real backend call; none may happen.
    from specfuse.backends.local import LocalBackend

    calls = {"draft": 0, "score": 0}
    for name in calls:
        original = getattr(LocalBackend, name)

        def counting(self, *args, _original=original, _name=name, **kw):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(self, *args, **kw)

        monkeypatch.setattr(LocalBackend, name, counting)
    first.table_path.unlink()
    second = bench.run_benchmark(**kwargs)
    assert second.stats.computed == 0 and second.stats.cached == 2 * n_modes
    assert second.stats.engines_built == 0
    assert calls == {"draft": 0, "score": 0}
    assert second.table == first.table
    assert second.table_path.exists()

    # The fuse rows record each round's candidates and scores: replaying the
    # paper's rule on them picks the winner the engine picked.
    from benchmarks.ifeval.verify_replay import RULES, replay, winner

    (fuse_file,) = (tmp_path / "cache").glob("fuse-*.jsonl")
    rows = [json.loads(line) for line in fuse_file.read_text().splitlines()]
    verified = [r for row in rows for r in row["round_log"] if len(r["candidates"]) >= 2]
    assert verified
    for r in verified:
        order = [m for m in PAIR if m in r["candidates"]]
        assert winner(RULES[0], r["s"], r["candidates"], order) == r["winner"]
    assert replay(rows, PAIR).rounds == len(verified)
    # ...and the whole-answer replay picks what the re-ranker picked.
    from benchmarks.ifeval.verify_replay import whole_pick

    (whole_file,) = (tmp_path / "cache").glob("whole-*.jsonl")
    for line in whole_file.read_text().splitlines():
        row = json.loads(line)
        assert whole_pick(row["probabilities"], list(PAIR)) == row["picked"]


def test_exit_knobs_change_only_the_exit_modes_cache_keys() -> None:
    """Choosing exit knobs must not invalidate the cached solo/whole/fuse answers,
    and must never reuse exit answers made under other knobs (library defaults included)."""
    from specfuse.config import FusionSettings

    modes = bench.expand_modes(bench.ALL_MODES, PAIR)
    base = bench.BenchSettings()
    tuned = bench.BenchSettings(exit_temperature=0.5, min_active=2)
    explicit = bench.BenchSettings(exit_temperature=FusionSettings().exit_temperature)
    for mode in modes:
        same = mode.cache_id(base) == mode.cache_id(tuned)
        assert same is ("exit" not in mode.name), mode.name
        assert mode.cache_id(base) == mode.cache_id(explicit)
    exit_mode = next(m for m in modes if m.name == "exit")
    assert exit_mode.fusion_settings(tuned)["min_active"] == 2
    assert exit_mode.fusion_settings(base)["exit_warmup"] == FusionSettings().exit_warmup


def test_solo_and_whole_cache_keys_stay_those_of_the_tracked_cache() -> None:
    """The tracked cache holds hours of solo answers: a change of fusion defaults or
    of the harness must not orphan them. `default` follows every library default."""
    from specfuse.config import FusionSettings

    modes = {m.name: m for m in bench.expand_modes(bench.ALL_MODES, bench.DEFAULT_MEMBERS)}
    s = bench.BenchSettings()
    assert modes["solo:smollm2-135m"].cache_id(s) == "solo_smollm2-135m-c2c8915d8a"
    assert modes["solo:qwen2.5-coder-0.5b"].cache_id(s) == "solo_qwen2.5-coder-0.5b-0bc8838e75"
    assert modes["solo:gemma3-270m"].cache_id(s) == "solo_gemma3-270m-be171829f8"
    for name in ("solo:smollm2-135m", "solo:gemma3-270m"):
        assert (bench.DEFAULT_CACHE / f"{modes[name].cache_id(s)}.jsonl").exists()
    default = modes["default"].fusion_settings(s)
    assert default == FusionSettings(
        max_tokens=128, temperature=0.6, top_p=0.9, seed=1234, lead=bench.DEFAULT_LEAD
    ).model_dump(mode="json")
    assert modes["fuse"].fusion_settings(s)["self_verify"] is True  # the paper's plain SpecFuse
    assert modes["fuse"].fusion_settings(s)["gate_logprob"] is None  # every round fused
    # A knob added at its inert value (no_repeat_words=0) keeps the 150 cached default
    # and fuse answers; change these names only with a default that changes answers.
    assert modes["default"].cache_id(s) == "default-c6bd46c1d3"
    assert modes["fuse"].cache_id(s) == "fuse-bab1915138"
    for name in ("default", "fuse"):
        assert (bench.DEFAULT_CACHE / f"{modes[name].cache_id(s)}.jsonl").exists()


def test_two_spellings_of_one_configuration_share_their_answers(tmp_path: Path) -> None:
    """The cache key hashes the resolved settings, not how the mode was written: the
    gated run cached as `default+gate_logprob=-4+lead=...` is the default's answers
    once the library's default gate is -4, and the ungated default stays reachable."""
    s = bench.BenchSettings()
    members = bench.DEFAULT_MEMBERS
    spelled_name = f"default+gate_logprob=-4+lead={bench.DEFAULT_LEAD}"
    names = ["default", spelled_name, "default+gate_logprob=null", "fuse"]
    modes = {m.name: m for m in bench.expand_modes(names, members)}
    default, spelled, ungated, fuse = (modes[n] for n in names)
    assert default.cache_digest(s) == spelled.cache_digest(s) != ungated.cache_digest(s)
    # The ungated default keeps the key of the answers cached before gating was the default.
    assert ungated.cache_digest(s) == "0db376df0c"
    # Without a gate, no lead changes an answer, so none is in the key.
    other_lead = bench.expand_modes(["default+gate_logprob=null+lead=gemma3-270m"], members)[-1]
    assert other_lead.cache_digest(s) == ungated.cache_digest(s)
    # A file written under one spelling is read under the other.
    cache = bench.Cache(tmp_path, s)
    prompt = bench.Prompt(key=7, prompt="Say hi.", instruction_id_list=[], kwargs=[])
    cache.put(spelled, prompt, {"response": "hi"})
    assert bench.Cache(tmp_path, s).get(default, prompt) == cache.get(spelled, prompt)
    assert bench.Cache(tmp_path, s).get(ungated, prompt) is None
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    assert fuse.cache_digest(s) not in {default.cache_digest(s), ungated.cache_digest(s)}


def test_self_fusion_fuses_the_lead_with_copies_of_itself(tmp_path: Path) -> None:
    """`self` is one model sampled several times and fused (Self-MoA's baseline): the
    lead's copies, each drafting with its own seed, every round fused, in a cache file
    of its own per number of copies."""
    from dataclasses import replace

    s = bench.BenchSettings(lead="smollm2-135m", max_tokens=6, segment_tokens=3)
    (mode,) = bench.expand_modes(["self"], PAIR, s)
    assert mode.name == "self:smollm2-135mx2" and mode.members == ("smollm2-135m",)
    assert [m.name for m in mode.ensemble_members()] == ["smollm2-135m#1", "smollm2-135m#2"]
    assert mode.fusion_settings(s)["gate_logprob"] is None
    (three,) = bench.expand_modes(["self"], PAIR, replace(s, self_copies=3))
    (other,) = bench.expand_modes(["self"], PAIR, replace(s, lead="gemma3-270m"))
    solo = bench.expand_modes(["solo"], PAIR, s)[0]
    digests = {m.cache_digest(s) for m in (mode, solo)} | {three.cache_digest(replace(s, self_copies=3))}
    assert len(digests) == 3 and other.members == ("gemma3-270m",)
    with pytest.raises(SystemExit, match="self-copies of 2 or more"):
        bench.expand_modes(["self"], PAIR, replace(s, self_copies=1))

    outcome = bench.run_benchmark(
        limit=1,
        members=PAIR,
        modes=["self"],
        settings=s,
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert outcome.stats.computed == 1 and outcome.stats.errors == 0
    (path,) = (tmp_path / "cache").glob("self_smollm2-135mx2-*.jsonl")
    row = json.loads(path.read_text(encoding="utf-8"))
    first = row["round_log"][0]
    # Both copies drafted and both verified: two members, not one model called twice under one name.
    assert set(first["candidates"]) == set(first["s"]) == {"smollm2-135m#1", "smollm2-135m#2"}
    assert row["summary"]["calls"] >= 4


def test_an_ablation_is_the_default_with_only_its_knobs_changed() -> None:
    """`default+knob=value` modes measure one change on its own: same settings as
    `default` but the named knobs, their own cache file, and typos refused before
    any model loads."""
    s = bench.BenchSettings()
    default, ablation, two = bench.expand_modes(
        ["default", "default+self_verify=true", "default+lam=0+model_exit=false"], PAIR
    )
    base = default.fusion_settings(s)
    changed = {k for k, v in ablation.fusion_settings(s).items() if base[k] != v}
    assert changed == {"self_verify"} and ablation.fusion_settings(s)["self_verify"] is True
    assert {k for k, v in two.fusion_settings(s).items() if base[k] != v} == {"lam", "model_exit"}
    assert len({default.cache_id(s), ablation.cache_id(s), two.cache_id(s)}) == 3
    assert default.cache_id(s) == bench.expand_modes(["default"], PAIR)[0].cache_id(s)
    for bad, says in [
        ("default+self_verfy=true", "unknown fusion setting"),
        ("default+lam=-1", "lam"),
        ("default+lam", "knob=value"),
    ]:
        with pytest.raises(SystemExit, match=says):
            bench.expand_modes([bad], PAIR)


def test_workers_fill_the_cache_that_one_process_then_reads(tmp_path: Path) -> None:
    data = tmp_path / "two.jsonl"
    data.write_text("\n".join(bench.DEFAULT_DATA.read_text(encoding="utf-8").splitlines()[:2]) + "\n")
    settings = bench.BenchSettings(max_tokens=3, temperature=0.0, seed=3)
    kwargs = dict(
        data=data,
        members=PAIR,
        modes=["solo"],
        settings=settings,
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    parallel = bench.run_benchmark(**kwargs, workers=2)
    assert parallel.stats.computed == 2 * len(PAIR)
    again = bench.run_benchmark(**kwargs)
    assert again.stats.computed == 0 and again.stats.cached == 2 * len(PAIR)
    assert again.table == parallel.table


def test_start_skips_prompts_for_a_held_out_split() -> None:
    everything = bench.load_prompts(bench.DEFAULT_DATA)
    split = bench.load_prompts(bench.DEFAULT_DATA, limit=5, start=100)
    assert [p.key for p in split] == [p.key for p in everything[100:105]]


def test_exit_replay_follows_the_engine_rule_on_a_round_log() -> None:
    """Pure logic on a hand-made round log: gemma keeps losing, so a cold rule
    drops it after the warmup; a member who later wins counts as lost text."""
    from benchmarks.ifeval.exit_replay import ExitRule, replay

    members = ("a", "b", "c")
    log = [{"winner": "a", "S": {"a": 0.4, "b": 0.35, "c": 0.25}, "calls": 9} for _ in range(6)]
    keep_all = replay(log, ExitRule(2, 1.0, 0.5, 2), members, solo_segment=32, segment=10)
    assert keep_all.exit_round is None and keep_all.calls == keep_all.fuse_calls == 54
    cold = replay(log, ExitRule(2, 0.1, 0.5, 2), members, solo_segment=32, segment=10)
    # Exit after round 2; rounds 3-6 cost two members' share of 9 calls.
    assert cold.exit_round == 2 and cold.calls == pytest.approx(18 + 4 * 6)
    assert cold.lost_rounds == 0 and cold.kept_top_winner
    alone = replay(log, ExitRule(2, 0.1, 0.5, 1), members, solo_segment=32, segment=10)
    # Down to "a" alone after round 3 (b exits then): rounds 4-6 = 30 tokens = one solo call.
    assert alone.exit_round == 2 and alone.calls == pytest.approx(18 + 6 + 1)
    log[5]["winner"] = "b"
    alone = replay(log, ExitRule(2, 0.1, 0.5, 1), members, solo_segment=32, segment=10)
    assert alone.lost_rounds == 1


def test_exit_replay_runs_the_evidence_rule_like_the_engine() -> None:
    """c trails by the same amount every round: the evidence rule drops it once the
    z of its lead passes -2 for two rounds (rounds 3 and 4 here, see test_scoring),
    and keeps two members; a noisy log where the loser changes keeps everyone."""
    from benchmarks.ifeval.exit_replay import ExitRule, replay

    members = ("a", "b", "c")
    steady = [{"winner": "a", "S": {"a": 0.4, "b": 0.4, "c": 0.2}, "calls": 9} for _ in range(6)]
    rule = ExitRule(2, 0.0, 0.0, 2, "evidence", margin=2.0, patience=2)
    out = replay(steady, rule, members, solo_segment=32, segment=10)
    assert out.exit_round == 4 and out.kept_top_winner
    noisy = [
        {"winner": w, "S": s, "calls": 9}
        for w, s in [("a", {"a": 0.5, "b": 0.3, "c": 0.2}), ("c", {"a": 0.2, "b": 0.3, "c": 0.5})] * 3
    ]
    assert replay(noisy, rule, members, solo_segment=32, segment=10).exit_round is None


def test_verification_replay_sees_pooling_and_self_votes_change_a_winner() -> None:
    from benchmarks.ifeval.verify_replay import RULES, replay, winner

    # a and b each rank their own draft first; c agrees with b's text, which b and
    # c both drafted: counted alone b's support is split, pooled it wins.
    scores = {
        "a": {"a": -0.1, "b": -1.2, "c": -1.2},
        "b": {"a": -2.5, "b": -0.4, "c": -0.4},
        "c": {"a": -0.3, "b": -0.9, "c": -0.9},
    }
    candidates = {"a": ["x", False], "b": ["y", False], "c": ["y", False]}
    order = ["a", "b", "c"]
    picked = {rule: winner(rule, scores, candidates, order) for rule in RULES}
    assert picked[RULES[0]] == "a"  # the paper's rule: a's split rivals lose
    assert picked[RULES[1]] == "b"  # pooled, the shared text wins
    result = replay([{"round_log": [{"candidates": candidates, "s": scores, "winner": "a"}]}], order)
    assert result.rounds == 1
    assert result.changed[RULES[1]] == 1
    assert result.own_first == {"a": [1, 1], "b": [0, 1], "c": [0, 1]}


def test_verification_replay_leaves_out_rounds_without_the_verifiers_own_scores() -> None:
    from benchmarks.ifeval.verify_replay import replay

    # Verified without self-votes: a never scored its own draft, so no rule can be replayed.
    scores = {"a": {"b": -1.0, "c": -2.0}, "b": {"a": -1.0, "b": -0.5, "c": -2.0}}
    candidates = {"a": ["x", False], "b": ["y", False], "c": ["z", False]}
    rows = [{"round_log": [{"candidates": candidates, "s": scores, "winner": "b"}]}]
    result = replay(rows, ["a", "b", "c"])
    assert (result.rounds, result.skipped) == (0, 1)


def test_whole_answer_replay_scores_each_rule_s_pick_against_the_ceiling() -> None:
    from benchmarks.ifeval.verify_replay import whole_rules

    members = ["a", "b", "c"]
    # a and b each prefer their own answer, c prefers b's; only b's answer passes.
    # a's strong self-vote makes a the pick; without self-votes b wins.
    probabilities = {
        "a": {"a": 0.8, "b": 0.15, "c": 0.05},
        "b": {"a": 0.3, "b": 0.6, "c": 0.1},
        "c": {"a": 0.2, "b": 0.45, "c": 0.35},
    }
    ok = {"a": False, "b": True, "c": False}
    passed = whole_rules([({"probabilities": probabilities}, ok)], members)
    assert passed["with self-votes (the re-ranker)"] == 0
    assert passed["without self-votes"] == 1
    assert passed["b alone as judge"] == 1 and passed["a alone as judge"] == 0
    # Borda points (2, 1, 0 per verifier): a 2+1+0 = 3, b 1+2+2 = 5, c 0+0+1 = 1: b's answer.
    assert passed["rank-based (Borda points per verifier)"] == 1
    assert passed["some member passes (ceiling)"] == 1 and passed["prompts"] == 1
    guard = next(rule for rule in passed if "repeat" in rule)
    assert passed[guard] == 0  # no answers known: the re-ranker's own pick
    loop = "the cat sat on the mat and the cat sat on the mat"
    answers = {"a": loop, "b": "a fresh answer", "c": "another one"}
    passed = whole_rules([({"probabilities": probabilities, "answers": answers}, ok)], members)
    assert passed[guard] == 1  # a's looping answer is set aside, b has the most support left


def test_exit_replay_null_tells_evidence_from_noise() -> None:
    """On a log where c loses every round the evidence rule fires; dealing each
    round's S to the members at random (no member better) it almost never does,
    while a rule with a tiny margin fires on the shuffled logs too."""
    import random

    from benchmarks.ifeval.exit_replay import ExitRule, null_exit_rate, replay, shuffled_labels

    members = ("a", "b", "c")
    log = [{"winner": "a", "S": {"a": 0.45, "b": 0.35, "c": 0.2}, "calls": 9} for _ in range(10)]
    shuffled = shuffled_labels(log, random.Random(3))
    assert all(sorted(r["S"].values()) == [0.2, 0.35, 0.45] for r in shuffled)
    assert any(r["S"]["c"] != 0.2 for r in shuffled)
    strict = ExitRule(3, 0.0, 0.0, 2, "evidence", 2.0, 3)
    loose = ExitRule(2, 0.0, 0.0, 2, "evidence", 0.1, 1)
    logs = [log] * 5
    assert replay(log, strict, members, 32, 10).exit_round is not None
    assert null_exit_rate(logs, strict, members, 32, 10) < 1.0  # of 5 answers
    assert null_exit_rate(logs, loose, members, 32, 10) > 3.0
    assert null_exit_rate(logs, strict, members, 32, 10) == null_exit_rate(logs, strict, members, 32, 10)


def test_report_pairs_each_ablation_with_the_default_and_counts_loops() -> None:
    from benchmarks.ifeval.report import ModeReport, markdown

    def report(mode: str, passed: dict[str, bool], calls: float, looping: int) -> ModeReport:
        return ModeReport(
            mode=mode,
            n=len(passed),
            prompt_strict=sum(passed.values()),
            prompt_loose=sum(passed.values()),
            instr_strict=sum(passed.values()),
            instr_loose=sum(passed.values()),
            instr_total=len(passed),
            calls=calls,
            members_per_round=3.0,
            members_per_round_by_tokens=3.0,
            rounds=8.0,
            ttfs=1.0,
            total_time=2.0,
            tokens_per_second=1.0,
            errors=0,
            per_prompt_strict=passed,
            per_instruction_strict={f"{k}:0": v for k, v in passed.items()},
            extra={"repeating": (looping, 0), "turn_markers": 0},
        )

    default = report("default", {"1": True, "2": False, "3": False}, 60.0, 2)
    ablation = report("default+self_verify=true", {"1": False, "2": True, "3": True}, 75.0, 1)
    text = markdown([default, ablation], bench.BenchSettings(), PAIR)
    line = next(x for x in text.splitlines() if x.startswith("- default+self_verify=true vs default"))
    assert "+1 prompts (paired: 2 won, 1 lost" in line and "calls 60.0 -> 75.0" in line
    assert "repeat a 6-word run: default 2/3 (0 pass), default+self_verify=true 1/3 (0 pass)" in text
    assert "turn marker or a fake next turn: default 0/3, default+self_verify=true 0/3" in text
    from benchmarks.ifeval.report import TURN_MARKER

    for leak in ("Yes.\nUser: no", "ok<|im_end|>", "a<end_of_turn>", "x\nAssistant: y"):
        assert TURN_MARKER.search(leak), leak
    assert not TURN_MARKER.search("User: is a word at the start; the user said hi")


def test_subset_table_names_every_configuration_and_the_commands_that_fill_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`python -m benchmarks.ifeval.subsets` reads the tracked cache: each member alone,
    every subset fused and gated, self-fusion; the best member alone is the reference."""
    from benchmarks.ifeval import subsets

    configs = subsets.configurations(bench.DEFAULT_MEMBERS, bench.BenchSettings())
    kinds = [c.mode_name for c in configs]
    assert kinds.count("solo") == 3 and kinds.count("fuse") == kinds.count("default") == 4
    assert kinds.count("self") == 1
    assert len({c.mode.cache_digest(bench.BenchSettings()) for c in configs}) == len(configs)
    assert subsets.main([]) == 0
    out = capsys.readouterr().out
    assert "| qwen alone | 11/50 | – |" in out and "| qwen alone | 22/100 | – |" in out
    assert "Chosen on this split: **" in out
    # The cached plain-fusion answers predate one scoring call per verifier: today's count is shown.
    assert "| fused every round: smollm2 + qwen + gemma | 11/50 |" in out
    assert "44.5 (recorded 66.8)" in out


def test_engine_calls_recounts_ungated_answers_from_their_round_logs() -> None:
    from benchmarks.ifeval.subsets import engine_calls

    rounds = [{"candidates": {"a": [], "b": [], "c": []}, "s": {"a": {}, "b": {}, "c": {}}}] * 2
    assert engine_calls({"summary": {"calls": 20}, "round_log": rounds}) == 12
    gated = [{**rounds[0], "gated": False}, {"candidates": {"a": []}, "s": {}, "gated": True}]
    assert engine_calls({"summary": {"calls": 5}, "round_log": gated}) == 5
    assert engine_calls({"summary": {"calls": 1}}) == 1
