"""Choose an ensemble on data: each member alone, every subset fused (plain and gated), self-fusion.

Fusion helps some ensembles and hurts others: above about a ten-point gap a
token-level ensemble falls below its stronger member (UniTE, arXiv 2410.03777),
a searched subset of small models beats mixing them all (SLM-MUX, arXiv
2510.05077), and one model sampled several times can beat a mix (Self-MoA,
arXiv 2502.00674). So the only way to know what to deploy is to measure the
candidates on your own prompts and members, paired per prompt:

    specfuse select ensemble.toml prompts.jsonl --checker ifeval
    specfuse select ensemble.toml prompts.jsonl --checker mychecks:passes

Prompts are JSONL, one object a line with `prompt` (text) or `messages` (chat);
the checker decides pass or fail of each answer: `ifeval` (rows in IFEval's
format, scored by the `if-verifiable` package) or `module:function`, called as
`function(row, answer) -> bool`. Answers are appended to a JSONL file in the
output directory as they come, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib
import importlib.util
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specfuse.config import EnsembleConfig, FusionSettings, MemberConfig
from specfuse.errors import ConfigError

#: Decides whether an answer to a prompt row passes.
Checker = Callable[[dict[str, Any], str], bool]

#: The gate of the gated configurations unless told otherwise: the library's default.
DEFAULT_GATE_LOGPROB: float = FusionSettings.model_fields["gate_logprob"].default


@dataclass(frozen=True)
class Configuration:
    """One way of answering: a member alone, a fused subset (plain or gated), or self-fusion."""

    name: str
    kind: str  # "solo" | "fuse" | "gated" | "self"
    config: EnsembleConfig

    @property
    def key(self) -> str:
        """Name plus a hash of everything that changes its answers (the resume key)."""
        blob = self.config.model_dump_json()  # api keys are never dumped
        return f"{self.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def configurations(
    ensemble: EnsembleConfig,
    *,
    gate_logprob: float = DEFAULT_GATE_LOGPROB,
    lead: str | None = None,
    self_copies: int = 3,
    max_tokens: int = 128,
    seed: int = 1234,
) -> list[Configuration]:
    """Every configuration worth comparing, from one ensemble's members.

    The gated configurations' lead is `lead`, else the ensemble's own rule (the
    member with the highest weight, the first listed among equals): put the
    best member first, or name it once the members alone have been measured.
    """
    drafters = [m for m in ensemble.members if "draft" in m.roles]
    if not drafters:
        raise ConfigError("no member drafts; selection compares drafting members")
    names = [m.display_name for m in drafters]
    if lead is not None and lead not in names:
        raise ConfigError(f"--lead {lead!r} is not a drafting member; name one of {names}")
    # Every configuration but the gated ones runs without a gate, whatever the file sets.
    plain = ensemble.fusion.with_overrides(max_tokens=max_tokens, seed=seed).model_copy(
        update={"gate_logprob": None, "lead": None}
    )
    out = []
    for m in drafters:
        # A member alone writes its whole answer in one call, as it would in production.
        solo = plain.with_overrides(solo_segment_tokens=max_tokens)
        out.append(Configuration(f"solo:{m.display_name}", "solo", _ensemble([m], solo)))
    for size in range(2, len(drafters) + 1):
        for subset in itertools.combinations(drafters, size):
            label = "+".join(m.display_name for m in subset)
            out.append(Configuration(f"fuse:{label}", "fuse", _ensemble(subset, plain)))
            chosen = lead if lead in [m.display_name for m in subset] else None
            gated = plain.with_overrides(gate_logprob=gate_logprob, lead=chosen)
            out.append(Configuration(f"gated:{label}", "gated", _ensemble(subset, gated)))
    if self_copies >= 2:
        for m in drafters:
            name = f"self:{m.display_name}x{self_copies}"
            out.append(Configuration(name, "self", _ensemble(self_fusion(m, self_copies), plain)))
    return out


def self_fusion(member: MemberConfig, copies: int) -> list[MemberConfig]:
    """`copies` of one member, each drafting and verifying under its own name: a
    member's place in the ensemble seeds its drafts, so the copies sample apart."""
    both = frozenset({"draft", "verify"})
    return [
        member.model_copy(update={"name": f"{member.display_name}#{i + 1}", "roles": both})
        for i in range(copies)
    ]


def _ensemble(members: Sequence[MemberConfig], fusion: FusionSettings) -> EnsembleConfig:
    return EnsembleConfig(members=list(members), fusion=fusion)


# -- checkers ---------------------------------------------------------------------


def load_checker(spec: str) -> Checker:
    """`ifeval`, or `module:function` (importable from the current directory or PYTHONPATH)."""
    if spec == "ifeval":
        return ifeval_passes
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"--checker {spec!r}: use 'ifeval' or 'module:function'")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the user's own module, next to their prompts
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--checker {spec!r}: cannot load it ({exc})") from None
    if not callable(found):
        raise ConfigError(f"--checker {spec!r} is not a function")
    return found  # type: ignore[no-any-return]


def ifeval_passes(row: dict[str, Any], answer: str) -> bool:
    """IFEval's prompt-level strict verdict."""
    results = ifeval_results(row, answer)
    return bool(results) and all(r.strict_pass for r in results)


def ifeval_results(row: dict[str, Any], answer: str) -> list[Any]:
    """if-verifiable's per-instruction results (`strict_pass`, `loose_pass`), by its own entry point."""
    try:
        from if_verifiable import IFEvalSample, evaluate_output_for_sample
        from langdetect import DetectorFactory
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the ifeval checker needs {exc.name}: pip install if-verifiable (with nltk, langdetect)"
        ) from None
    # The language checks sample at random: unseeded, one answer passed in one run
    # and failed in the next.
    DetectorFactory.seed = 0
    import nltk

    cache = shipped_nltk_data()
    if cache is not None and str(cache) not in nltk.data.path:
        nltk.data.path.append(str(cache))
    sample = IFEvalSample(
        key=row["key"],
        prompt=row["prompt"],
        instruction_id_list=list(row["instruction_id_list"]),
        kwargs=[dict(k) for k in row["kwargs"]],
    )
    results, _ = evaluate_output_for_sample("ifeval", sample, answer)
    return list(results)


def shipped_nltk_data() -> Path | None:
    """NLTK data that llama-index-core ships (punkt_tab, which IFEval's sentence checks
    read), so nothing is downloaded; None without it."""
    spec = importlib.util.find_spec("llama_index.core")
    if spec is None or spec.origin is None:
        return None
    cache = Path(spec.origin).parent / "_static" / "nltk_cache"
    return cache if cache.is_dir() else None


# -- running ----------------------------------------------------------------------


@dataclass
class Answer:
    passed: bool
    calls: int
    seconds: float
    prompt_tokens_computed: int


@dataclass
class Results:
    """Answers per configuration key, per prompt key; appended to a JSONL file as they come."""

    path: Path
    answers: dict[str, dict[str, Answer]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Results:
        results = cls(path)
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                results.answers.setdefault(row["config"], {})[row["prompt"]] = Answer(**row["answer"])
        return results

    def add(self, config: str, prompt: str, answer: Answer, text: str) -> None:
        self.answers.setdefault(config, {})[prompt] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"config": config, "prompt": prompt, "answer": answer.__dict__, "text": text}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_rows(path: Path, *, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[start:] if limit is None else rows[start : start + limit]
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
            raise ConfigError(
                f"{path}: row {start + i + 1} has neither 'prompt' (text) nor 'messages' (a list)"
            )
    return rows


def row_key(row: dict[str, Any], index: int) -> str:
    return str(row.get("key", index))


def run(
    configs: Sequence[Configuration],
    rows: Sequence[dict[str, Any]],
    checker: Checker,
    results: Results,
    *,
    start: int = 0,
    progress: Callable[[str], None] = lambda _line: None,
) -> None:
    """Answer every prompt with every configuration, prompt by prompt (so every
    configuration meets the machine in the same state), skipping what is stored."""
    from specfuse.engine import SpecFuse

    engines: dict[str, SpecFuse] = {}
    try:
        for index, row in enumerate(rows, start):
            key = row_key(row, index)
            messages = row.get("messages") or row["prompt"]
            for c in configs:
                if key in results.answers.get(c.key, {}):
                    continue
                engine = engines.get(c.key)
                if engine is None:
                    # Loaded and probed before the clock starts: an answer's time is the answer's.
                    engine = engines[c.key] = SpecFuse(c.config)
                    engine.start()
                started = time.perf_counter()
                result = engine.generate(messages)
                seconds = time.perf_counter() - started
                summary = result.trace.summary()
                answer = Answer(
                    passed=bool(checker(row, result.text)),
                    calls=summary["calls"],
                    seconds=round(seconds, 3),
                    prompt_tokens_computed=summary["prompt_tokens_computed"],
                )
                results.add(c.key, key, answer, result.text)
                verdict = "pass" if answer.passed else "fail"
                progress(f"{key} {c.name}: {verdict} ({answer.calls} calls, {seconds:.1f} s)")
    finally:
        for engine in engines.values():
            engine.close()


# -- the verdict ------------------------------------------------------------------


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped): how surprising a paired split is."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def ranking(passed: int, wins: int, losses: int, calls: float) -> tuple[int, int, float]:
    """The order configurations are chosen in: most answers passed, then most paired wins
    net of losses against the best member alone, then fewest calls. The top one is
    deployed over that member only if it wins more prompts than it loses."""
    return (passed, wins - losses, -calls)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    passed: int
    n: int
    wins: int
    losses: int
    p: float
    calls: float
    seconds: float
    computed: float


def verdict(
    configs: Sequence[Configuration], results: Results, prompts: Sequence[str]
) -> tuple[list[Row], str]:
    """Each configuration against the best member alone, and which one to deploy.

    Only prompts every configuration answered are compared (paired). The best
    configuration is the one passing most, then with fewer calls; it is named
    over the best member only when it wins more prompts than it loses, and the
    sign test says how sure that is.
    """
    answered = [p for p in prompts if all(p in results.answers.get(c.key, {}) for c in configs)]
    if not answered:
        return [], "no prompt was answered by every configuration yet"

    def of(c: Configuration) -> list[Answer]:
        return [results.answers[c.key][p] for p in answered]

    solos = [c for c in configs if c.kind == "solo"]
    best_solo = max(
        solos, key=lambda c: (sum(a.passed for a in of(c)), -statistics.fmean(a.seconds for a in of(c)))
    )
    ref = of(best_solo)
    rows = []
    for c in configs:
        mine = of(c)
        wins = sum(a.passed and not r.passed for a, r in zip(mine, ref, strict=True))
        losses = sum(r.passed and not a.passed for a, r in zip(mine, ref, strict=True))
        rows.append(
            Row(
                c.name,
                c.kind,
                sum(a.passed for a in mine),
                len(mine),
                wins,
                losses,
                sign_test(wins, losses),
                statistics.fmean(a.calls for a in mine),
                statistics.fmean(a.seconds for a in mine),
                statistics.fmean(a.prompt_tokens_computed for a in mine),
            )
        )
    best = max(rows, key=lambda r: ranking(r.passed, r.wins, r.losses, r.calls))
    solo_row = next(r for r in rows if r.name == best_solo.name)
    if best.kind == "solo" or best.wins <= best.losses:
        advice = (
            f"deploy {best_solo.name.removeprefix('solo:')} alone: no configuration beat it on these "
            f"{len(answered)} prompts ({solo_row.passed} passed)"
        )
    else:
        advice = (
            f"deploy {best.name}: {best.passed}/{best.n} against {solo_row.passed}/{solo_row.n} for the best "
            f"member alone ({best_solo.name}), paired {best.wins} won / {best.losses} lost, sign test "
            f"p = {best.p:.2f}{'' if best.p < 0.05 else ' (not significant: measure more prompts)'}, "
            f"at {best.calls / solo_row.calls:.1f}x its calls and "
            f"{best.seconds / solo_row.seconds:.1f}x its time"
        )
    return rows, advice


def render(rows: Sequence[Row], advice: str) -> str:
    if not rows:
        return advice
    # The reference is the best member alone: the solo row with the most passes.
    ref = max((r for r in rows if r.kind == "solo"), key=lambda r: (r.passed, -r.seconds))
    lines = [
        "| configuration | passed | vs best member (won/lost, p) | calls/answer | time/answer "
        "| time vs best member |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.passed}/{r.n} | {r.wins}/{r.losses}, p={r.p:.2f} | {r.calls:.1f} | "
            f"{r.seconds:.1f} s | {r.seconds / ref.seconds if ref.seconds else 0:.2f}x |"
        )
    return "\n".join([*lines, "", advice])


# -- command line -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ensemble", type=Path, help="an ensemble file (.toml / .json) with the candidate members"
    )
    parser.add_argument("prompts", type=Path, help="JSONL: one object a line with 'prompt' or 'messages'")
    parser.add_argument(
        "--checker", default="ifeval", help="'ifeval' or module:function(row, answer) -> bool"
    )
    parser.add_argument("--start", type=int, default=0, help="skip the first N prompts")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--gate-logprob", type=float, default=DEFAULT_GATE_LOGPROB)
    parser.add_argument("--lead", default=None, help="the lead of the gated configurations")
    parser.add_argument(
        "--self-copies", type=int, default=3, help="copies of a member in self-fusion (0: none)"
    )
    parser.add_argument("--out", type=Path, default=Path("specfuse-select"), help="where answers are kept")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        help="measure only the configurations these shell patterns name (e.g. 'solo:*' 'gated:*')",
    )


def main_with(args: argparse.Namespace) -> int:
    ensemble = EnsembleConfig.from_file(args.ensemble)
    rows = load_rows(args.prompts, start=args.start, limit=args.limit)
    checker = load_checker(args.checker)
    configs = configurations(
        ensemble,
        gate_logprob=args.gate_logprob,
        lead=args.lead,
        self_copies=args.self_copies,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    if args.only:
        configs = [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) for p in args.only)]
        if not any(c.kind == "solo" for c in configs):
            raise ConfigError("--only must keep at least one member alone: the verdict compares with it")
    results = Results.load(args.out / "answers.jsonl")
    run(configs, rows, checker, results, start=args.start, progress=lambda line: print(line, file=sys.stderr))
    keys = [row_key(row, i) for i, row in enumerate(rows, args.start)]
    table, advice = verdict(configs, results, keys)
    print(render(table, advice))
    return 0


def register(subparsers: Any) -> None:
    """Add the `select` subcommand (used by specfuse.cli)."""
    parser = subparsers.add_parser(
        "select",
        help="measure each member alone, every subset fused (plain, gated) and self-fusion on your prompts",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=main_with)
