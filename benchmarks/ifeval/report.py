"""Reports from the cache: per-mode aggregates, paired comparisons with a sign test, the chart."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ifeval.cache import Cache
from benchmarks.ifeval.data import Prompt, score_response
from benchmarks.ifeval.modes import ABLATION_PREFIX, REPEAT_WORDS, BenchSettings, Mode
from specfuse import scoring
from specfuse.selection import sign_test

#: The members' end-of-turn markers and a plain-template fake next turn ("\nUser:"),
#: none of which may reach an answer.
TURN_MARKER = re.compile(
    r"\n(?:User|Assistant|Human|System)\s*:|<\|im_(?:start|end)\|>|<(?:start|end)_of_turn>|<\|endoftext\|>|<eos>"
)


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
    members_per_round_by_tokens: float
    rounds: float
    ttfs: float
    total_time: float
    tokens_per_second: float | None
    errors: int
    per_prompt_strict: dict[str, bool] = field(default_factory=dict)
    #: "key:index" of each instruction -> passed (strict), for instruction-level pairing.
    per_instruction_strict: dict[str, bool] = field(default_factory=dict)
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
        # Likelihood rewards loops: how many answers repeat a run of words, and how many of those pass.
        looping = [sc for _, r, sc in scored if scoring.repeats_words("", r["response"], REPEAT_WORDS)]
        extra["repeating"] = (len(looping), sum(sc.prompt_strict for sc in looping))
        extra["turn_markers"] = sum(bool(TURN_MARKER.search(r["response"])) for _, r, _ in scored)
        if mode.kind == "whole" and n:
            extra["picked"] = _count(r["picked"] for _, r, _ in scored)
            extra["sequential_time"] = _mean(s["sequential_time"] for s in summaries)
        if mode.kind == "fusion" and n:
            extra["exits"] = _count(m for _, r, _ in scored for m in r.get("exits", {}))
            # Rows that record each round's verifiers (`s`): how many verified the
            # answer's least-verified round, and the (verifier, candidate) scorings per round.
            logs = [r["round_log"] for _, r, _ in scored if all("s" in x for x in r.get("round_log", []))]
            if logs:
                extra["fewest_verifiers"] = _count(
                    str(min((len(x["s"]) for x in log), default=0)) for log in logs
                )
                rounds = [x for log in logs for x in log]
                extra["scorings_per_round"] = _mean(sum(len(row) for row in x["s"].values()) for x in rounds)
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
                # Rows cached before the token-weighted figure existed: solo rows are one member.
                members_per_round_by_tokens=_mean(
                    s.get("members_per_round_by_tokens", s["members_per_round"]) for s in summaries
                ),
                rounds=_mean(s["rounds"] for s in summaries),
                ttfs=_mean(s["time_to_first_segment"] or 0.0 for s in summaries),
                total_time=_mean(s["total_time"] for s in summaries),
                tokens_per_second=tokens / seconds if seconds and mode.kind != "whole" else None,
                errors=sum("error" in r for _, r, _ in scored),
                per_prompt_strict={str(p.key): s.prompt_strict for p, _, s in scored},
                per_instruction_strict={
                    f"{p.key}:{i}": ok for p, _, s in scored for i, ok in enumerate(s.strict)
                },
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


def paired(mode: ModeReport, reference: ModeReport, level: str = "prompt") -> tuple[int, int]:
    """Prompts (or instructions, level="instruction") that mode passed strictly and
    reference failed, and the reverse."""
    attr = "per_prompt_strict" if level == "prompt" else "per_instruction_strict"
    ours, ref = getattr(mode, attr), getattr(reference, attr)
    wins = sum(v and not ref.get(k, False) for k, v in ours.items())
    losses = sum(not v and ref.get(k, False) for k, v in ours.items())
    return wins, losses


def comparison(mode: ModeReport, reference: ModeReport) -> str:
    """One line: prompt-level difference, paired wins/losses with a sign test, at both levels."""
    pw, pl = paired(mode, reference)
    iw, il = paired(mode, reference, "instruction")
    return (
        f"- {mode.mode} vs {reference.mode}: {mode.prompt_strict - reference.prompt_strict:+d} prompts "
        f"(paired: {pw} won, {pl} lost, sign-test p={sign_test(pw, pl):.2f}); "
        f"{mode.instr_strict - reference.instr_strict:+d} instructions "
        f"(paired: {iw} won, {il} lost, p={sign_test(iw, il):.2f})"
    )


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
        "| members/round | by tokens | rounds | TTFS s | total s | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        tps = f"{r.tokens_per_second:.2f}" if r.tokens_per_second is not None else "–"
        lines.append(
            f"| {r.mode} | {r.n} | {frac(r.prompt_strict, r.n)} | {frac(r.prompt_loose, r.n)} "
            f"| {frac(r.instr_strict, r.instr_total)} | {frac(r.instr_loose, r.instr_total)} "
            f"| {r.calls:.1f} | {r.members_per_round:.2f} | {r.members_per_round_by_tokens:.2f} "
            f"| {r.rounds:.1f} | {r.ttfs:.1f} "
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
            notes.append(comparison(r, best))
    for mode, reference in (("default", "whole"), ("default", "fuse")):
        if mode in by_name and reference in by_name and by_name[reference].n:
            notes.append(comparison(by_name[mode], by_name[reference]))
    ablations = [r for r in reports if r.mode.startswith(ABLATION_PREFIX)]
    if ablations and "default" in by_name:
        d = by_name["default"]
        for r in ablations:
            notes.append(comparison(r, d) + f"; calls {d.calls:.1f} -> {r.calls:.1f}")
    for exit_mode, base_mode in (("exit", "fuse"), ("specem+exit", "specem"), ("default", "fuse")):
        if exit_mode in by_name and base_mode in by_name and by_name[base_mode].n:
            e, b = by_name[exit_mode], by_name[base_mode]
            cut = 1 - e.calls / b.calls if b.calls else 0.0
            keep = e.prompt_strict / b.prompt_strict if b.prompt_strict else float("nan")
            keep_instr = e.instr_strict / b.instr_strict if b.instr_strict else float("nan")
            wins, losses = paired(e, b)
            notes.append(
                f"- {exit_mode} vs {base_mode}: calls {b.calls:.1f} -> {e.calls:.1f} ({cut:+.0%} cut), "
                f"members/round {b.members_per_round:.2f} -> {e.members_per_round:.2f} "
                f"(by tokens {e.members_per_round_by_tokens:.2f}), "
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
    looping = [
        f"{r.mode} {r.extra['repeating'][0]}/{r.n} ({r.extra['repeating'][1]} pass)"
        for r in reports
        if "repeating" in r.extra
    ]
    if looping:
        notes.append(f"- answers that repeat a {REPEAT_WORDS}-word run: {', '.join(looping)}")
    marked = [f"{r.mode} {r.extra['turn_markers']}/{r.n}" for r in reports if "turn_markers" in r.extra]
    if marked:
        notes.append(f"- answers holding a turn marker or a fake next turn: {', '.join(marked)}")
    for r in reports:
        if r.extra.get("exits"):
            notes.append(f"- {r.mode}: exited members (prompts) {r.extra['exits']}")
        if r.extra.get("fewest_verifiers"):
            notes.append(
                f"- {r.mode}: answers by the verifiers of their least-verified round "
                f"{dict(sorted(r.extra['fewest_verifiers'].items()))}; "
                f"{r.extra['scorings_per_round']:.2f} scorings (verifier x candidate) per round"
            )
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
