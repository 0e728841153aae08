"""`specfuse select`: every configuration of an ensemble measured on the user's prompts, paired.

The configurations and the verdict are logic (tested on constructed answers);
the command runs end to end on two real local models and a user's checker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ifeval.data import DEFAULT_DATA, load_prompts, score_response
from specfuse import ConfigError, EnsembleConfig
from specfuse.cli import main as cli_main
from specfuse.selection import (
    Answer,
    Configuration,
    Results,
    configurations,
    ifeval_passes,
    load_checker,
    sign_test,
    verdict,
)

THREE = EnsembleConfig.build(["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"], gate_logprob=-0.3)


def has_a_digit(row: dict, answer: str) -> bool:
    """A user's checker: the answer names a number."""
    return any(ch.isdigit() for ch in answer)


def test_every_subset_plain_and_gated_each_member_alone_and_self_fusion() -> None:
    configs = configurations(THREE, lead="qwen2.5-coder-0.5b", gate_logprob=-1.0, self_copies=3)
    names = [c.name for c in configs]
    assert names[:3] == ["solo:smollm2-135m", "solo:qwen2.5-coder-0.5b", "solo:gemma3-270m"]
    pairs = ["smollm2-135m+qwen2.5-coder-0.5b", "smollm2-135m+gemma3-270m", "qwen2.5-coder-0.5b+gemma3-270m"]
    for subset in [*pairs, "smollm2-135m+qwen2.5-coder-0.5b+gemma3-270m"]:
        assert f"fuse:{subset}" in names and f"gated:{subset}" in names
    assert [n for n in names if n.startswith("self:")] == [
        "self:smollm2-135mx3",
        "self:qwen2.5-coder-0.5bx3",
        "self:gemma3-270mx3",
    ]
    assert len(configs) == 3 + 4 * 2 + 3
    by_name = {c.name: c for c in configs}
    # Only gated configurations gate, whatever the file set (it set -0.3).
    for c in configs:
        assert (c.config.fusion.gate_logprob is not None) == (c.kind == "gated")
    assert by_name["gated:smollm2-135m+gemma3-270m"].config.fusion.lead is None  # qwen is not in it
    assert by_name["gated:smollm2-135m+qwen2.5-coder-0.5b"].config.fusion.lead == "qwen2.5-coder-0.5b"
    assert by_name["gated:smollm2-135m+qwen2.5-coder-0.5b"].config.fusion.gate_logprob == -1.0
    # A member alone answers in one call.
    assert by_name["solo:gemma3-270m"].config.fusion.solo_segment_tokens == 128
    assert len({c.key for c in configs}) == len(configs)
    with pytest.raises(ConfigError, match="--lead 'nobody' is not a drafting member"):
        configurations(THREE, lead="nobody")


def _results(tmp_path: Path, table: dict[str, list[bool]], calls: dict[str, int]) -> Results:
    results = Results(tmp_path / "answers.jsonl")
    for name, passes in table.items():
        for i, ok in enumerate(passes):
            results.add(name, str(i), Answer(ok, calls[name], float(calls[name]), 0), "")
    return results


def _config(name: str, kind: str) -> Configuration:
    members = ["smollm2-135m"] if kind == "solo" else ["smollm2-135m", "gemma3-270m"]
    config = EnsembleConfig.build(members)
    return Configuration(name, kind, config)


def test_the_verdict_names_a_configuration_only_when_it_beats_the_best_member(tmp_path: Path) -> None:
    a, b, fused = _config("solo:a", "solo"), _config("solo:b", "solo"), _config("gated:a+b", "gated")
    keys = {c.name: c.key for c in (a, b, fused)}
    # b alone is the best member (4/8); the gated pair passes 7/8: 3 won, 0 lost against b.
    table = {
        keys["solo:a"]: [True, False, False, False, False, False, False, False],
        keys["solo:b"]: [True, True, True, True, False, False, False, False],
        keys["gated:a+b"]: [True, True, True, True, True, True, True, False],
    }
    calls = {keys["solo:a"]: 1, keys["solo:b"]: 1, keys["gated:a+b"]: 4}
    rows, advice = verdict([a, b, fused], _results(tmp_path, table, calls), [str(i) for i in range(8)])
    row = {r.name: r for r in rows}
    assert (row["gated:a+b"].wins, row["gated:a+b"].losses) == (3, 0)
    assert row["gated:a+b"].p == pytest.approx(sign_test(3, 0)) == pytest.approx(0.25)
    assert advice.startswith("deploy gated:a+b: 7/8 against 4/8 for the best member alone (solo:b)")
    assert "not significant" in advice and "4.0x its calls" in advice
    # The same pair at parity with b: keep b.
    table[keys["gated:a+b"]] = [True, True, True, False, True, False, False, False]
    rows, advice = verdict([a, b, fused], _results(tmp_path / "2", table, calls), [str(i) for i in range(8)])
    assert advice.startswith("deploy b alone: no configuration beat it on these 8 prompts")


def test_sign_test_is_the_exact_two_sided_binomial() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(6, 0) == pytest.approx(2 / 64)
    assert sign_test(10, 12) == pytest.approx(sign_test(12, 10))
    assert sign_test(10, 12) > 0.8


def test_checkers_load_and_fail_clearly() -> None:
    assert load_checker("tests.test_selection:has_a_digit")({}, "3 apples")
    assert load_checker("ifeval") is ifeval_passes
    with pytest.raises(ConfigError, match="use 'ifeval' or 'module:function'"):
        load_checker("has_a_digit")
    with pytest.raises(ConfigError, match="cannot load it"):
        load_checker("tests.test_selection:nothing_here")


def test_the_ifeval_checker_counts_sentences_without_a_download() -> None:
    """Sentence checks need NLTK's punkt_tab: the checker finds the copy llama-index-core
    ships (a fresh process, so no earlier set-up of the harness helps it)."""
    row = {"key": 1, "prompt": "Answer in at most two sentences."}
    row |= {"instruction_id_list": ["length_constraints:number_sentences"]}
    row |= {"kwargs": [{"relation": "less than", "num_sentences": 3}]}
    script = (
        "import json, sys; from specfuse.selection import ifeval_passes; "
        "row = json.loads(sys.argv[1]); "
        "print(ifeval_passes(row, 'One. Two.'), ifeval_passes(row, 'One. Two. Three. Four.'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(row)], capture_output=True, text=True, env=env, check=False
    )
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]


def test_the_ifeval_checker_agrees_with_the_harness() -> None:
    prompts = load_prompts(DEFAULT_DATA, limit=6)
    for p in prompts:
        row = {
            "key": p.key,
            "prompt": p.prompt,
            "instruction_id_list": p.instruction_id_list,
            "kwargs": p.kwargs,
        }
        for answer in ("", "Hello world. " * 40, p.prompt):
            assert ifeval_passes(row, answer) == score_response(p, answer).prompt_strict


@pytest.mark.slow
def test_the_command_measures_every_configuration_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensemble = tmp_path / "ensemble.toml"
    ensemble.write_text('[[members]]\nmodel = "smollm2-135m"\n[[members]]\nmodel = "gemma3-270m"\n')
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "How many legs does a spider have?"},
        {"messages": [{"role": "user", "content": "2+2="}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "select", str(ensemble), str(prompts),
        "--checker", "tests.test_selection:has_a_digit",
        "--max-tokens", "6", "--self-copies", "2", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    names = ["solo:smollm2-135m", "solo:gemma3-270m", "fuse:smollm2-135m+gemma3-270m"]
    names += ["gated:smollm2-135m+gemma3-270m", "self:smollm2-135mx2", "self:gemma3-270mx2"]
    for name in names:
        assert f"| {name} | " in out.out
    assert "deploy " in out.out
    stored = (tmp_path / "out" / "answers.jsonl").read_text().splitlines()
    assert len(stored) == 6 * 2
    # Solo answers are one call; fused ones at least one draft per member and a verification.
    solo = [json.loads(line) for line in stored if json.loads(line)["config"].startswith("solo:")]
    assert all(s["answer"]["calls"] == 1 for s in solo)
    # A second run answers nothing again: every answer is read back.
    assert cli_main(argv) == 0
    assert len((tmp_path / "out" / "answers.jsonl").read_text().splitlines()) == 12
    assert capsys.readouterr().err == ""
    # --only keeps the configurations it names (and refuses to drop every member alone).
    assert cli_main([*argv, "--only", "solo:*", "gated:*"]) == 0
    table = capsys.readouterr().out
    assert "| gated:smollm2-135m+gemma3-270m | " in table and "| fuse:" not in table
    assert cli_main([*argv, "--only", "gated:*"]) == 2
    assert "at least one member alone" in capsys.readouterr().err
