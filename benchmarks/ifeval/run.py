"""IFEval benchmark: each member alone, a whole-answer re-ranker, and SpecFuse in its modes.

Why this exists: the claim of SpecFuse is that fusing models segment by
segment beats the best single member, and that model exit saves calls at a
small loss. This harness measures both on IFEval prompts, scored offline by
the ``if-verifiable`` checkers, so the claim can be checked on our own models.

Modes (``--modes``; default all):

* ``solo``         every member alone (expands to ``solo:<member>``), one long segment;
* ``whole``        whole-answer baseline: the solo answers, re-ranked by the same
                   verifiers (mean prompt log-prob of each full answer, per-verifier
                   softmax, averaged; LLM-Blender-style rank-then-pick);
* ``fuse``         plain SpecFuse (lam=0, model_exit off);
* ``specem``       SpecEM online weights (lam > 0);
* ``exit``         model exit (lam=0);
* ``specem+exit``  both.

Runs go prompt by prompt (every mode of a prompt before the next prompt), so
an interrupted run leaves every mode with the same prompts done. Every answer
is appended to a JSONL cache under ``benchmarks/out/`` keyed by mode, settings
and prompt key; a rerun reads it and calls no model for what it holds.

    .venv/bin/python -m benchmarks.ifeval --limit 20 --max-tokens 128
    .venv/bin/python benchmarks/ifeval/run.py --report-only      # tables from the cache
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "ifeval" / "dev.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "out"
# Tracked in git: answers cost CPU-minutes each, so the cache must outlive the
# machine and the session that computed them (a 150-prompt run takes hours).
DEFAULT_CACHE = REPO / "benchmarks" / "ifeval" / "cache"
DEFAULT_MEMBERS: tuple[str, ...] = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
ENSEMBLE_MODES: tuple[str, ...] = ("fuse", "specem", "exit", "specem+exit")
ALL_MODES: tuple[str, ...] = ("solo", "whole", *ENSEMBLE_MODES)


def setup_environment() -> None:
    """Offline model loading, and NLTK data from llama-index-core.

    Must run before nltk is imported: nltk reads NLTK_DATA once, at import.
    Some IFEval checkers tokenise sentences (punkt_tab); llama-index-core ships
    it, so nothing is downloaded.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = importlib.util.find_spec("llama_index.core")
    if spec is None or spec.origin is None:
        return
    cache = Path(spec.origin).parent / "_static" / "nltk_cache"
    current = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if cache.is_dir() and str(cache) not in current:
        os.environ["NLTK_DATA"] = os.pathsep.join([*current, str(cache)])


# --------------------------------------------------------------------------- data and scoring


@dataclass(frozen=True)
class Prompt:
    """One IFEval sample, as in the jsonl file."""

    key: int | str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


def load_prompts(path: Path, limit: int | None = None, start: int = 0) -> list[Prompt]:
    """Read an IFEval-format jsonl file (fields key, prompt, instruction_id_list, kwargs).

    ``start`` skips the first prompts, so a later slice of the file can serve as a
    held-out split for choosing defaults.
    """
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = rows[start:] if limit is None else rows[start : start + limit]
    return [Prompt(row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]) for row in rows]


@dataclass(frozen=True)
class Score:
    """if-verifiable's verdict on one response: per instruction, strict and loose."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def prompt_strict(self) -> bool:
        return bool(self.strict) and all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return bool(self.loose) and all(self.loose)


def score_response(prompt: Prompt, response: str) -> Score:
    """Score with if-verifiable's own entry point, the path every number here goes through.

    An empty response fails every instruction (the package returns no
    per-instruction results for it, so we fill them in as failures to keep the
    instruction-level denominator the same for every mode).
    """
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    sample = IFEvalSample(
        key=prompt.key,  # type: ignore[arg-type]
        prompt=prompt.prompt,
        instruction_id_list=list(prompt.instruction_id_list),
        kwargs=[dict(k) for k in prompt.kwargs],
    )
    results, _ = evaluate_output_for_sample("ifeval", sample, response)
    if not results:
        n = len(prompt.instruction_id_list)
        return Score((False,) * n, (False,) * n)
    return Score(tuple(r.strict_pass for r in results), tuple(r.loose_pass for r in results))


# --------------------------------------------------------------------------- modes and cache


@dataclass(frozen=True)
class BenchSettings:
    """Settings shared by every mode of one run (part of every cache key)."""

    max_tokens: int = 128
    segment_tokens: int = 10
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 1234
    lam: float = 1.0
    # Model-exit knobs of the exit modes; None = the library's default.
    exit_warmup: int | None = None
    exit_temperature: float | None = None
    exit_ratio: float | None = None
    min_active: int | None = None

    def exit_settings(self) -> dict[str, Any]:
        """The exit knobs in effect: explicit ones, else FusionSettings' defaults.

        Resolved here so a change of the library's defaults changes the cache key
        of the exit modes instead of silently reusing answers made under the old ones.
        """
        from specfuse.config import FusionSettings

        defaults = FusionSettings()
        chosen = {
            "exit_warmup": self.exit_warmup,
            "exit_temperature": self.exit_temperature,
            "exit_ratio": self.exit_ratio,
            "min_active": self.min_active,
        }
        return {k: getattr(defaults, k) if v is None else v for k, v in chosen.items()}


@dataclass(frozen=True)
class Mode:
    """One way of answering: a member alone, the whole-answer re-ranker, or a fusion mode."""

    name: str
    kind: str  # "solo" | "whole" | "fusion"
    members: tuple[str, ...]

    def fusion_settings(self, s: BenchSettings) -> dict[str, Any]:
        """The FusionSettings this mode runs with (whole reuses the solo runs' settings)."""
        common = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        if self.kind in ("solo", "whole"):
            # One segment of max_tokens: a pure single-model answer.
            return {**common, "solo_segment_tokens": s.max_tokens, "lam": 0.0, "model_exit": False}
        lam = s.lam if "specem" in self.name else 0.0
        fusion = {**common, "segment_tokens": s.segment_tokens, "lam": lam, "model_exit": "exit" in self.name}
        if fusion["model_exit"]:
            fusion.update(s.exit_settings())
        return fusion

    def cache_id(self, s: BenchSettings) -> str:
        """Mode name plus a hash of everything that changes its answers."""
        blob = json.dumps(
            {"mode": self.name, "members": self.members, "fusion": self.fusion_settings(s)}, sort_keys=True
        )
        digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
        return f"{re.sub(r'[^A-Za-z0-9.+-]', '_', self.name)}-{digest}"


def expand_modes(names: Sequence[str], members: Sequence[str]) -> list[Mode]:
    """Mode names -> modes, in the order a prompt runs them (solo answers before `whole`)."""
    unknown = set(names) - set(ALL_MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {list(ALL_MODES)}")
    members = tuple(members)
    modes: list[Mode] = []
    if "solo" in names or "whole" in names:
        # `whole` re-ranks the solo answers, so it needs them (they are cached, not run twice).
        modes += [Mode(f"solo:{m}", "solo", (m,)) for m in members]
    if "whole" in names:
        if len(members) < 2:
            raise SystemExit("the whole-answer baseline needs at least two members")
        modes.append(Mode("whole", "whole", members))
    for name in ENSEMBLE_MODES:
        if name in names:
            if len(members) < 2:
                raise SystemExit(f"mode {name!r} needs at least two members")
            modes.append(Mode(name, "fusion", members))
    return modes


class Cache:
    """Append-only JSONL per mode+settings; one row per prompt key."""

    def __init__(self, out_dir: Path, settings: BenchSettings) -> None:
        self.dir = out_dir
        self.settings = settings
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}

    def path(self, mode: Mode) -> Path:
        return self.dir / f"{mode.cache_id(self.settings)}.jsonl"

    def rows(self, mode: Mode) -> dict[str, dict[str, Any]]:
        cid = mode.cache_id(self.settings)
        if cid not in self._rows:
            rows: dict[str, dict[str, Any]] = {}
            path = self.path(mode)
            if path.exists():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interrupted write: recomputed
                    rows[str(row["key"])] = row
            self._rows[cid] = rows
        return self._rows[cid]

    def get(self, mode: Mode, prompt: Prompt) -> dict[str, Any] | None:
        row = self.rows(mode).get(str(prompt.key))
        if row is not None and row.get("prompt_sha") != _sha(prompt.prompt):
            return None  # same key, different prompt text: another data file
        return row

    def put(self, mode: Mode, prompt: Prompt, row: dict[str, Any]) -> None:
        row = {"key": prompt.key, "prompt_sha": _sha(prompt.prompt), **row}
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.path(mode).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows(mode)[str(prompt.key)] = row


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- running


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
            fuse = SpecFuse(EnsembleConfig.build(list(mode.members), **mode.fusion_settings(self.settings)))
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
    finished segment) and gives the mean log-prob per token; softmax per
    verifier; the average over verifiers picks the answer (ties: member order).
    """
    from specfuse import scoring

    messages = [{"role": "user", "content": prompt}]
    scores: dict[str, dict[str, float]] = {}
    calls = 0
    for verifier in members:
        if not verifier.verifies:
            continue
        context = await verifier.format.render(messages, None)
        texts = {}
        for name, row in answers.items():
            finished = row.get("finish_reason") == "stop"
            text = row["response"] + (verifier.format.end_of_turn if finished or not row["response"] else "")
            texts[name] = text
        unique = list(dict.fromkeys(texts.values()))
        results = await verifier.backend.score(context, unique)
        calls += 1
        by_text = {t: r.mean for t, r in zip(unique, results, strict=True)}
        scores[verifier.name] = {name: by_text[t] for name, t in texts.items()}
    probabilities = scoring.normalise_per_verifier(scores, tau)
    weights = {v: 1.0 for v in scores}
    aggregated = scoring.aggregate(probabilities, weights, list(answers))
    order = list(answers)
    winner = max(order, key=lambda m: (aggregated[m], -order.index(m)))
    return {"winner": winner, "probabilities": probabilities, "aggregated": aggregated, "score_calls": calls}


# --------------------------------------------------------------------------- report


@dataclass
class ModeReport:
    """Aggregates of one mode over the prompts every selected mode has answered."""

    mode: str
    n: int
    prompt_strict: int
    prompt_loose: int
    instr_strict: int
    instr_loose: int
    instr_total: int
    calls: float
    members_per_round: float
    rounds: float
    ttfs: float
    total_time: float
    tokens_per_second: float | None
    errors: int
    per_prompt_strict: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def build_reports(modes: Sequence[Mode], prompts: Sequence[Prompt], cache: Cache) -> list[ModeReport]:
    """Score every cached answer; aggregate over the prompts that all modes have (paired)."""
    common = [p for p in prompts if all(cache.get(m, p) is not None for m in modes)]
    reports = []
    for mode in modes:
        rows = [(p, cache.get(mode, p)) for p in common]
        scored = [(p, r, score_response(p, r["response"])) for p, r in rows if r is not None]
        n = len(scored)
        summaries = [r["summary"] for _, r, _ in scored]
        tokens = sum(s["completion_tokens"] for s in summaries)
        seconds = sum(s["total_time"] for s in summaries)
        extra: dict[str, Any] = {}
        if mode.kind == "whole" and n:
            extra["picked"] = _count(r["picked"] for _, r, _ in scored)
            extra["sequential_time"] = _mean(s["sequential_time"] for s in summaries)
        if mode.kind == "fusion" and n:
            extra["exits"] = _count(m for _, r, _ in scored for m in r.get("exits", {}))
        reports.append(
            ModeReport(
                mode=mode.name,
                n=n,
                prompt_strict=sum(s.prompt_strict for _, _, s in scored),
                prompt_loose=sum(s.prompt_loose for _, _, s in scored),
                instr_strict=sum(sum(s.strict) for _, _, s in scored),
                instr_loose=sum(sum(s.loose) for _, _, s in scored),
                instr_total=sum(len(s.strict) for _, _, s in scored),
                calls=_mean(s["calls"] for s in summaries),
                members_per_round=_mean(s["members_per_round"] for s in summaries),
                rounds=_mean(s["rounds"] for s in summaries),
                ttfs=_mean(s["time_to_first_segment"] or 0.0 for s in summaries),
                total_time=_mean(s["total_time"] for s in summaries),
                tokens_per_second=tokens / seconds if seconds and mode.kind != "whole" else None,
                errors=sum("error" in r for _, r, _ in scored),
                per_prompt_strict={str(p.key): s.prompt_strict for p, _, s in scored},
                extra=extra,
            )
        )
    return reports


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped): how surprising a paired split is."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(mode: ModeReport, reference: ModeReport) -> tuple[int, int]:
    """Prompts (strict) that mode passed and reference failed, and the reverse."""
    ref = reference.per_prompt_strict
    wins = sum(v and not ref.get(k, False) for k, v in mode.per_prompt_strict.items())
    losses = sum(not v and ref.get(k, False) for k, v in mode.per_prompt_strict.items())
    return wins, losses


def markdown(reports: Sequence[ModeReport], settings: BenchSettings, members: Sequence[str]) -> str:
    """The results table plus the paired comparisons the goals are about."""

    def frac(k: int, n: int) -> str:
        return f"{k / n:.3f} ({k}/{n})" if n else "–"

    lines = [
        f"members: {', '.join(members)}; max_tokens={settings.max_tokens}, "
        f"segment_tokens={settings.segment_tokens}, temperature={settings.temperature}, "
        f"top_p={settings.top_p}, seed={settings.seed}, lam(specem)={settings.lam}",
        "",
        "| mode | N | prompt strict | prompt loose | instr strict | instr loose | calls/prompt "
        "| members/round | rounds | TTFS s | total s | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        tps = f"{r.tokens_per_second:.2f}" if r.tokens_per_second is not None else "–"
        lines.append(
            f"| {r.mode} | {r.n} | {frac(r.prompt_strict, r.n)} | {frac(r.prompt_loose, r.n)} "
            f"| {frac(r.instr_strict, r.instr_total)} | {frac(r.instr_loose, r.instr_total)} "
            f"| {r.calls:.1f} | {r.members_per_round:.2f} | {r.rounds:.1f} | {r.ttfs:.1f} "
            f"| {r.total_time:.1f} | {tps} |"
        )
    by_name = {r.mode: r for r in reports}
    solos = [r for r in reports if r.mode.startswith("solo:")]
    notes = []
    if solos:
        best = max(solos, key=lambda r: (r.prompt_strict, r.instr_strict))
        notes.append(
            f"Best single member (prompt strict): **{best.mode}** {frac(best.prompt_strict, best.n)}."
        )
        for r in reports:
            if r.mode.startswith("solo:"):
                continue
            wins, losses = paired(r, best)
            notes.append(
                f"- {r.mode} vs {best.mode}: {r.prompt_strict - best.prompt_strict:+d} prompts "
                f"(paired: {wins} won, {losses} lost, sign-test p={sign_test(wins, losses):.2f})"
            )
    for exit_mode, base_mode in (("exit", "fuse"), ("specem+exit", "specem")):
        if exit_mode in by_name and base_mode in by_name and by_name[base_mode].n:
            e, b = by_name[exit_mode], by_name[base_mode]
            cut = 1 - e.calls / b.calls if b.calls else 0.0
            keep = e.prompt_strict / b.prompt_strict if b.prompt_strict else float("nan")
            keep_instr = e.instr_strict / b.instr_strict if b.instr_strict else float("nan")
            wins, losses = paired(e, b)
            notes.append(
                f"- {exit_mode} vs {base_mode}: calls {b.calls:.1f} -> {e.calls:.1f} ({cut:+.0%} cut), "
                f"members/round {b.members_per_round:.2f} -> {e.members_per_round:.2f}, "
                f"prompt strict {e.prompt_strict}/{e.n} vs {b.prompt_strict}/{b.n} ({keep:.0%} kept; "
                f"paired: {wins} won, {losses} lost), instr strict {e.instr_strict}/{e.instr_total} vs "
                f"{b.instr_strict}/{b.instr_total} ({keep_instr:.0%} kept)"
            )
    if "whole" in by_name and by_name["whole"].n:
        w = by_name["whole"]
        notes.append(
            f"- whole: picked {w.extra.get('picked')}; TTFS = slowest member's full answer + scoring "
            f"(parallel members); on this shared CPU, sequential {w.extra.get('sequential_time', 0):.1f} s"
        )
    for r in reports:
        if r.extra.get("exits"):
            notes.append(f"- {r.mode}: exited members (prompts) {r.extra['exits']}")
        if r.errors:
            notes.append(f"- {r.mode}: {r.errors} answers failed (scored as empty)")
    return "\n".join([*lines, "", *notes, ""])


def chart(reports: Sequence[ModeReport], path: Path, title: str) -> None:
    """Accuracy (strict filled, loose hollow) against model calls per prompt, per mode.

    Two panels: prompt level (the goal's metric) and instruction level, which
    separates small models better because it gives partial credit. Calls on a log
    axis, since solo answers cost one call and fused ones a hundred.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def prompt_level(r: ModeReport) -> tuple[float, float]:
        return r.prompt_strict / r.n, r.prompt_loose / r.n

    def instruction_level(r: ModeReport) -> tuple[float, float]:
        total = r.instr_total or 1
        return r.instr_strict / total, r.instr_loose / total

    shown = [r for r in reports if r.n]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120, sharex=True)
    panels = (("prompt-level accuracy", prompt_level), ("instruction-level accuracy", instruction_level))
    for ax, (label, values) in zip(axes, panels, strict=True):
        top = 0.0
        for i, r in enumerate(shown):
            colour = f"C{i % 10}"
            strict, loose = values(r)
            ax.scatter(r.calls, strict, color=colour, s=60, label=f"{r.mode} (N={r.n})", zorder=3)
            ax.scatter(r.calls, loose, facecolors="none", edgecolors=colour, s=60, zorder=3)
            top = max(top, strict, loose)
        upper = max(0.1, top * 1.2)
        ax.set_ylim(-0.03 * upper, upper)
        ax.set_xscale("log")
        ax.set_xlabel("model calls per prompt (mean, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{title} (filled: strict, hollow: loose)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point


@dataclass
class Outcome:
    """Everything a caller (CLI or test) needs from one invocation."""

    stats: RunStats
    reports: list[ModeReport]
    table_path: Path
    chart_path: Path
    table: str


def run_benchmark(
    *,
    data: Path = DEFAULT_DATA,
    limit: int | None = None,
    start: int = 0,
    members: Sequence[str] = DEFAULT_MEMBERS,
    modes: Sequence[str] = ALL_MODES,
    settings: BenchSettings | None = None,
    out_dir: Path = DEFAULT_OUT,
    cache_dir: Path = DEFAULT_CACHE,
    report_only: bool = False,
    progress: bool = True,
) -> Outcome:
    """Run (or resume) the benchmark, then write the markdown table and the PNG chart."""
    setup_environment()
    settings = settings or BenchSettings()
    prompts = load_prompts(data, limit, start)
    selected = expand_modes(modes, members)
    cache = Cache(cache_dir, settings)
    bench = Bench(members, selected, settings, cache)
    try:
        if not report_only:
            _run_with_progress(bench, prompts, progress)
    finally:
        bench.close()
    reports = build_reports(selected, prompts, cache)
    tag = hashlib.sha1(
        json.dumps(
            [asdict(settings), list(members), [m.name for m in selected], str(data), limit, start]
        ).encode()
    ).hexdigest()[:8]
    table_path = out_dir / f"ifeval-{tag}.md"
    chart_path = out_dir / f"ifeval-{tag}.png"
    table = markdown(reports, settings, members)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table, encoding="utf-8")
    chart(
        reports,
        chart_path,
        f"IFEval {data.name}, N={reports[0].n if reports else 0}, "
        f"max_tokens={settings.max_tokens}, T={settings.temperature}",
    )
    return Outcome(bench.stats, reports, table_path, chart_path, table)


def _run_with_progress(bench: Bench, prompts: Sequence[Prompt], show: bool) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
    ) as bar:
        task = bar.add_task("ifeval", total=len(prompts) * len(bench.modes))
        first = [True]

        def step(label: str) -> None:
            if not first[0]:
                bar.advance(task)
            first[0] = False
            bar.update(task, description=label)

        bench.run(prompts, on_step=step)
        bar.update(task, completed=len(prompts) * len(bench.modes), description="done")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ifeval", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IFEval-format jsonl")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--start", type=int, default=0, help="skip the first N prompts (a held-out split)")
    parser.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS))
    parser.add_argument("--modes", nargs="+", default=list(ALL_MODES), help=f"subset of {list(ALL_MODES)}")
    parser.add_argument("--max-tokens", type=int, default=BenchSettings.max_tokens)
    parser.add_argument("--segment-tokens", type=int, default=BenchSettings.segment_tokens)
    parser.add_argument("--temperature", type=float, default=BenchSettings.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=BenchSettings.top_p)
    parser.add_argument("--seed", type=int, default=BenchSettings.seed)
    parser.add_argument("--lam", type=float, default=BenchSettings.lam, help="SpecEM rate of specem modes")
    exit_help = "exit modes only; default: the library's"
    parser.add_argument("--exit-warmup", type=int, default=None, help=exit_help)
    parser.add_argument("--exit-temperature", type=float, default=None, help=exit_help)
    parser.add_argument("--exit-ratio", type=float, default=None, help=exit_help)
    parser.add_argument("--min-active", type=int, default=None, help=exit_help)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="table and chart directory")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="answer cache (JSONL per mode)")
    parser.add_argument("--report-only", action="store_true", help="no model call: report what is cached")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    members = [m for arg in args.members for m in arg.split(",") if m]
    modes = [m for arg in args.modes for m in arg.split(",") if m]
    settings = BenchSettings(
        max_tokens=args.max_tokens,
        segment_tokens=args.segment_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        lam=args.lam,
        exit_warmup=args.exit_warmup,
        exit_temperature=args.exit_temperature,
        exit_ratio=args.exit_ratio,
        min_active=args.min_active,
    )
    outcome = run_benchmark(
        data=args.data,
        limit=args.limit,
        start=args.start,
        members=members,
        modes=modes,
        settings=settings,
        out_dir=args.out,
        cache_dir=args.cache,
        report_only=args.report_only,
        progress=not args.no_progress,
    )
    print(outcome.table)
    s = outcome.stats
    print(f"computed {s.computed}, cached {s.cached}, errors {s.errors}")
    print(f"table: {outcome.table_path}\nchart: {outcome.chart_path}")
    return 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:  # run as a script: make `specfuse` importable from the repo
        sys.path.insert(0, str(REPO))
    sys.exit(main())
