"""Running modes over prompts: engines built once per process, answers written to the cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.ifeval.cache import Cache
from benchmarks.ifeval.data import Prompt
from benchmarks.ifeval.modes import BenchSettings, Mode


@dataclass
class RunStats:
    """What a run did: rows computed vs read from the cache, engines built."""

    computed: int = 0
    cached: int = 0
    engines_built: int = 0
    errors: int = 0


class Bench:
    """Runs modes over prompts, filling the cache; engines are built only when needed."""

    def __init__(self, members: Sequence[str], modes: Sequence[Mode], settings: BenchSettings, cache: Cache):
        self.members = tuple(members)
        self.modes = list(modes)
        self.settings = settings
        self.cache = cache
        self.stats = RunStats()
        self._engines: dict[str, Any] = {}
        self._warm: set[str] = set()

    def engine(self, mode: Mode) -> Any:
        """A started SpecFuse for the mode (models load once per process, so this is cheap)."""
        from specfuse import EnsembleConfig, SpecFuse

        if mode.name not in self._engines:
            config = EnsembleConfig.build(mode.ensemble_members(), **mode.fusion_settings(self.settings))
            fuse = SpecFuse(config)
            fuse.start()
            if not set(mode.members) <= self._warm:
                # Warm-up: a model's first forward passes in a process are slow;
                # keep that cost out of the first measured answer.
                fuse.generate("Hello", max_tokens=2)
                self._warm.update(mode.members)
            self._engines[mode.name] = fuse
            self.stats.engines_built += 1
        return self._engines[mode.name]

    def close(self) -> None:
        for fuse in self._engines.values():
            fuse.close()
        self._engines.clear()

    def run(self, prompts: Sequence[Prompt], on_step: Callable[[str], None] | None = None) -> RunStats:
        """Prompt-major: every mode of a prompt, then the next prompt."""
        for prompt in prompts:
            for mode in self.modes:
                if on_step is not None:
                    on_step(f"{mode.name} · key {prompt.key}")
                if self.cache.get(mode, prompt) is not None:
                    self.stats.cached += 1
                    continue
                row = self._whole(prompt, mode) if mode.kind == "whole" else self._generate(prompt, mode)
                self.stats.errors += "error" in row
                self.cache.put(mode, prompt, row)
                self.stats.computed += 1
        return self.stats

    def _generate(self, prompt: Prompt, mode: Mode) -> dict[str, Any]:
        from specfuse.errors import SpecfuseError

        fuse = self.engine(mode)
        started = time.perf_counter()
        try:
            result = fuse.generate([{"role": "user", "content": prompt.prompt}])
        except SpecfuseError as exc:
            return {
                "response": "",
                "error": f"{type(exc).__name__}: {exc}",
                "summary": _empty_summary(time.perf_counter() - started),
            }
        summary = result.trace.summary()
        return {
            "response": result.text,
            "finish_reason": result.finish_reason,
            "summary": {k: summary[k] for k in _SUMMARY_KEYS},
            "wins": {m: s["wins"] for m, s in summary["members"].items()},
            "exits": summary["exits"],
            # Per round: enough to replay exit rules offline without rerunning models.
            "round_log": [
                {
                    "winner": r.winner,
                    "S": {m: round(v, 4) for m, v in r.aggregated.items()},
                    "calls": len(r.calls),
                    "exits": r.exits,
                    # The candidates and every verifier's score of each, so other
                    # verification rules can be replayed on the same round offline.
                    "candidates": {c.member: [c.text, c.finished] for c in r.candidates},
                    "s": {v: {m: round(x, 4) for m, x in row.items()} for v, row in r.scores.items()},
                    "repeating": r.repeating,
                    # Gated fusion only: whether the lead's segment skipped the round, and why.
                    **({"gated": r.gated, "gate_reason": r.gate_reason} if r.gated is not None else {}),
                }
                for r in result.trace.rounds
            ],
        }

    def _whole(self, prompt: Prompt, mode: Mode) -> dict[str, Any]:
        """Re-rank the members' complete solo answers with every member as verifier."""
        answers: dict[str, dict[str, Any]] = {}
        for member in mode.members:
            solo = Mode(f"solo:{member}", "solo", (member,))
            row = self.cache.get(solo, prompt)
            if row is None:  # run order puts solos first; this only happens with a custom mode list
                row = self._generate(prompt, solo)
                self.cache.put(solo, prompt, row)
            answers[member] = row
        fuse = self.engine(Mode("fuse", "fusion", mode.members))  # only for its members' formats/backends
        members = fuse.start()
        started = time.perf_counter()
        verdict = asyncio.run(rank_whole_answers(members, prompt.prompt, answers))
        score_time = time.perf_counter() - started
        gen_times = {m: a["summary"]["total_time"] for m, a in answers.items()}
        picked = verdict["winner"]
        # Time until the picked answer is known: members generate in parallel
        # (separate servers), then the verifiers score; `sequential` is this CPU's reality.
        ttft = max(gen_times.values()) + score_time
        return {
            "response": answers[picked]["response"],
            "finish_reason": answers[picked].get("finish_reason", ""),
            "picked": picked,
            "probabilities": verdict["probabilities"],
            "aggregated": verdict["aggregated"],
            "summary": {
                "rounds": 1,
                "calls": len(answers) + verdict["score_calls"],
                "members_per_round": float(len(answers)),
                "members_per_round_by_tokens": float(len(answers)),
                "completion_tokens": answers[picked]["summary"]["completion_tokens"],
                "time_to_first_segment": ttft,
                "total_time": ttft,
                "tokens_per_second": None,
                "sequential_time": sum(gen_times.values()) + score_time,
                "score_time": score_time,
            },
        }


_SUMMARY_KEYS = (
    "rounds",
    "calls",
    "members_per_round",
    "members_per_round_by_tokens",
    "completion_tokens",
    "time_to_first_segment",
    "total_time",
    "tokens_per_second",
)


def _empty_summary(elapsed: float) -> dict[str, Any]:
    return {
        "rounds": 0,
        "calls": 0,
        "members_per_round": 0.0,
        "members_per_round_by_tokens": 0.0,
        "completion_tokens": 0,
        "time_to_first_segment": elapsed,
        "total_time": elapsed,
        "tokens_per_second": None,
    }


async def rank_whole_answers(
    members: Sequence[Any], prompt: str, answers: dict[str, dict[str, Any]], tau: float = 1.0
) -> dict[str, Any]:
    """Rank complete answers as the fusion ranks segments, once, at the end.

    Each verifier reads its own rendering of the prompt plus each answer (its
    end-of-turn appended when the answer finished, as the engine does for a
    finished segment) and scores it with the engine's formula
    (``scoring.candidate_score``); softmax per verifier, every vote counted
    (LLM-Blender-style); the average over verifiers picks the answer with the
    engine's tie rule (``scoring.pick_winner``: member order).
    """
    from specfuse import scoring

    messages = [{"role": "user", "content": prompt}]
    scores: dict[str, dict[str, float]] = {}
    calls = 0
    for verifier in members:
        if not verifier.verifies:
            continue
        context = await verifier.format.render(messages, None)
        texts: dict[str, tuple[str, int]] = {}
        for name, row in answers.items():
            # An empty answer is "stop now": only the marker is scored.
            if row.get("finish_reason") == "stop" or not row["response"]:
                texts[name] = (row["response"] + verifier.format.end_of_turn, verifier.end_of_turn_tokens)
            else:
                texts[name] = (row["response"], 0)
        unique = list(dict.fromkeys(text for text, _ in texts.values()))
        results = await verifier.backend.score(context, unique)
        calls += 1
        by_text = dict(zip(unique, results, strict=True))
        scores[verifier.name] = {
            name: scoring.candidate_score(by_text[text].token_logprobs, marker)
            for name, (text, marker) in texts.items()
        }
    probabilities = scoring.normalise_per_verifier(scores, tau)
    weights = {v: 1.0 for v in scores}
    aggregated = scoring.aggregate(probabilities, weights, list(answers))
    winner = scoring.pick_winner(aggregated, {}, list(answers))
    return {"winner": winner, "probabilities": probabilities, "aggregated": aggregated, "score_calls": calls}


def _run_shard(
    members: tuple[str, ...],
    modes: list[Mode],
    settings: BenchSettings,
    cache_dir: Path,
    prompts: list[Prompt],
) -> RunStats:
    """One worker process: its own engines (one torch thread), the shared cache files."""
    import torch

    # N workers on N cores: more threads per process would only contend.
    torch.set_num_threads(1)
    bench = Bench(members, modes, settings, Cache(cache_dir, settings))
    try:
        return bench.run(prompts)
    finally:
        bench.close()


def run_in_workers(
    members: Sequence[str],
    modes: Sequence[Mode],
    settings: BenchSettings,
    cache_dir: Path,
    prompts: Sequence[Prompt],
    workers: int,
) -> RunStats:
    """Run the prompts in ``workers`` processes (prompt i goes to worker i mod N).

    Every mode of a prompt stays in one process (``whole`` needs that prompt's solo
    answers); rows go to the same JSONL files, one append each.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shards = [list(prompts[i::workers]) for i in range(workers)]
    total = RunStats()
    context = multiprocessing.get_context("spawn")  # no forked torch or event-loop state
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(_run_shard, tuple(members), list(modes), settings, cache_dir, shard)
            for shard in shards
            if shard
        ]
        for future in futures:
            stats = future.result()
            total.computed += stats.computed
            total.cached += stats.cached
            total.engines_built += stats.engines_built
            total.errors += stats.errors
    return total
