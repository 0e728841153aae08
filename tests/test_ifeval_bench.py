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
    kwargs = dict(data=data, members=PAIR, settings=settings, out_dir=tmp_path / "out", progress=False)

    first = bench.run_benchmark(**kwargs)
    n_modes = len(PAIR) + 1 + len(bench.ENSEMBLE_MODES)  # solos, whole, fusion modes
    assert first.stats.computed == 2 * n_modes and first.stats.cached == 0
    assert [r.n for r in first.reports] == [2] * n_modes
    assert all(r.calls >= 1 for r in first.reports)
    whole = next(r for r in first.reports if r.mode == "whole")
    assert sum(whole.extra["picked"].values()) == 2
    # one cache file per mode, one row per prompt, keyed by the prompt key
    files = sorted((tmp_path / "out").glob("*.jsonl"))
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
