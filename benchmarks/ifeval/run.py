"""IFEval benchmark: each member alone, a whole-answer re-ranker, and SpecFuse in its modes.

Why this exists: the claim of SpecFuse is that fusing models segment by
segment beats the best single member, and that model exit saves calls at a
small loss. This harness measures both on IFEval prompts, scored offline by
the ``if-verifiable`` checkers, so the claim can be checked on our own models.

Modes (``--modes``; default all):

* ``solo``         every member alone (expands to ``solo:<member>``), one long segment;
* ``whole``        whole-answer baseline: the solo answers, re-ranked by the same
                   verifiers (``scoring.candidate_score`` of each full answer,
                   per-verifier softmax, averaged; LLM-Blender-style rank-then-pick);
* ``fuse``         plain SpecFuse as in the paper (lam=0, model_exit off, self-votes
                   counted, identical candidates not pooled);
* ``specem``       the same with SpecEM online weights (lam > 0);
* ``exit``         the same with model exit (lam=0; exit knobs: flags or library defaults);
* ``specem+exit``  both;
* ``default``      whatever ``FusionSettings()`` defaults to (the library as shipped:
                   gated fusion), led by ``--lead`` (the best member alone on the knob split);
* ``self``         self-fusion: the lead (``--lead``, else the first member) fused with
                   ``--self-copies`` copies of itself, each drafting with its own seed,
                   every round fused with the library's verification (as ``specfuse select``);
* ``default+knob=value``  an ablation: the default with knobs changed
                   (``default+gate_logprob=null`` is the ungated loop).

Runs go prompt by prompt (every mode of a prompt before the next prompt), so
an interrupted run leaves every mode with the same prompts done. Every answer
is appended to a JSONL cache in ``benchmarks/ifeval/cache/`` (tracked in git, so
a long run accumulates across machines and sessions) keyed by mode, settings
and prompt key; a rerun reads it and calls no model for what it holds.
``--workers N`` answers prompts in N processes.

The code: ``data`` (prompts, checker), ``modes`` (settings, cache keys),
``cache``, ``runner`` (engines, the whole-answer ranking, workers), ``report``
(tables, paired sign tests, chart) and this module (the command line).

    .venv/bin/python -m benchmarks.ifeval --limit 20 --max-tokens 128
    .venv/bin/python -m benchmarks.ifeval --report-only      # tables from the cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from benchmarks.ifeval.cache import Cache
from benchmarks.ifeval.data import (
    DEFAULT_DATA,
    REPO,
    Prompt,
    Score,
    load_prompts,
    score_response,
    setup_environment,
)
from benchmarks.ifeval.modes import (
    ALL_MODES,
    DEFAULT_LEAD,
    DEFAULT_MEMBERS,
    ENSEMBLE_MODES,
    BenchSettings,
    Mode,
    expand_modes,
)
from benchmarks.ifeval.report import ModeReport, build_reports, chart, markdown, paired, sign_test
from benchmarks.ifeval.runner import Bench, RunStats, rank_whole_answers, run_in_workers

__all__ = [
    "ALL_MODES",
    "DEFAULT_CACHE",
    "DEFAULT_DATA",
    "DEFAULT_LEAD",
    "DEFAULT_MEMBERS",
    "DEFAULT_OUT",
    "ENSEMBLE_MODES",
    "Bench",
    "BenchSettings",
    "Cache",
    "Mode",
    "ModeReport",
    "Outcome",
    "Prompt",
    "RunStats",
    "Score",
    "build_reports",
    "chart",
    "expand_modes",
    "load_prompts",
    "main",
    "markdown",
    "paired",
    "rank_whole_answers",
    "run_benchmark",
    "score_response",
    "setup_environment",
    "sign_test",
]

DEFAULT_OUT = REPO / "benchmarks" / "out"
# Tracked in git: answers cost CPU-minutes each, so the cache must outlive the
# machine and the session that computed them (a 150-prompt run takes hours).
DEFAULT_CACHE = REPO / "benchmarks" / "ifeval" / "cache"


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
    workers: int = 1,
) -> Outcome:
    """Run (or resume) the benchmark, then write the markdown table and the PNG chart.

    ``workers`` > 1 answers prompts in that many processes (no progress bar).
    """
    setup_environment()
    settings = settings or BenchSettings()
    prompts = load_prompts(data, limit, start)
    selected = expand_modes(modes, members, settings)
    cache = Cache(cache_dir, settings)
    bench = Bench(members, selected, settings, cache)
    stats = bench.stats
    if workers > 1 and not report_only:
        stats = run_in_workers(members, selected, settings, cache_dir, prompts, workers)
        cache = Cache(cache_dir, settings)  # re-read what the workers appended
    else:
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
    return Outcome(stats, reports, table_path, chart_path, table)


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
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(ALL_MODES),
        help=f"subset of {[*ALL_MODES, 'self']}, or an ablation: default+knob=value[+knob=value]",
    )
    parser.add_argument("--max-tokens", type=int, default=BenchSettings.max_tokens)
    parser.add_argument("--segment-tokens", type=int, default=BenchSettings.segment_tokens)
    parser.add_argument("--temperature", type=float, default=BenchSettings.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=BenchSettings.top_p)
    parser.add_argument("--seed", type=int, default=BenchSettings.seed)
    parser.add_argument("--lam", type=float, default=BenchSettings.lam, help="SpecEM rate of specem modes")
    parser.add_argument(
        "--lead",
        default=DEFAULT_LEAD,
        help="the gated modes' lead when a member (chosen on the knob split); 'auto': the library's rule",
    )
    parser.add_argument(
        "--self-copies", type=int, default=BenchSettings.self_copies, help="copies of the lead in `self`"
    )
    exit_help = "exit modes only; default: the library's"
    parser.add_argument("--exit-rule", choices=["evidence", "softmax"], default=None, help=exit_help)
    parser.add_argument("--exit-warmup", type=int, default=None, help=exit_help)
    parser.add_argument("--exit-margin", type=float, default=None, help=exit_help)
    parser.add_argument("--exit-patience", type=int, default=None, help=exit_help)
    parser.add_argument("--exit-temperature", type=float, default=None, help=exit_help)
    parser.add_argument("--exit-ratio", type=float, default=None, help=exit_help)
    parser.add_argument("--min-active", type=int, default=None, help=exit_help)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="table and chart directory")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="answer cache (JSONL per mode)")
    parser.add_argument("--report-only", action="store_true", help="no model call: report what is cached")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes answering prompts at once (one torch thread each)"
    )
    args = parser.parse_args(argv)
    members = [m for arg in args.members for m in arg.split(",") if m]
    modes = [m for arg in args.modes for m in arg.split(",") if m]
    # Every setting has a flag of its name; only --lead has a spelling of its own ('auto').
    knobs = {f.name: getattr(args, f.name) for f in fields(BenchSettings) if f.name != "lead"}
    settings = BenchSettings(**knobs, lead=None if args.lead == "auto" else args.lead)
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
        workers=args.workers,
    )
    print(outcome.table)
    s = outcome.stats
    print(f"computed {s.computed}, cached {s.cached}, errors {s.errors}")
    print(f"table: {outcome.table_path}\nchart: {outcome.chart_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
