"""The user's window into the fusion: round records, summaries, JSON and HTML.

The engine fills a :class:`FusionTrace` as it goes; adapters expose it (CLI
colours, HTML view, LangChain `response_metadata`, LlamaIndex `raw`).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CallRecord:
    """One backend call: a draft or a score."""

    member: str
    kind: str  # "draft" | "score"
    latency: float
    attempts: int = 1
    error: str | None = None
    #: Tokens the call processed as input / produced (best effort, per the member's tokenizer).
    tokens: int = 0
    #: Prompt tokens the server read for this call (its own count), when it reports one.
    server_prompt_tokens: int | None = None
    #: Of those, the ones it computed rather than read from its prefix cache: the
    #: cost of the call. None when the server does not report its cache use.
    prompt_tokens_computed: int | None = None
    #: Prompt tokens of requests the server computed but whose answer it lost
    #: (see ServerUsage.unmetered_tokens): it computed up to this many more.
    prompt_tokens_unmetered: int = 0
    #: HTTP requests the call made to the server (a batched score counts once).
    requests: int | None = None
    #: How a score call read its log-probs ("echo", "tokens", or both when some
    #: candidates fell back); None for drafts and in-process members.
    scoring_path: str | None = None
    #: Why candidates of a token-path score call fell back to echo, one reason
    #: each (ServerUsage.echo_fallbacks).
    echo_fallbacks: list[str] = field(default_factory=list)


@dataclass
class CandidateRecord:
    member: str
    text: str
    tokens: int
    finished: bool
    finish_reason: str


@dataclass
class RoundRecord:
    index: int  # counted from 1
    candidates: list[CandidateRecord] = field(default_factory=list)
    #: s[verifier][candidate member] and p[verifier][candidate member]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregated: dict[str, float] = field(default_factory=dict)
    #: S after identical candidates pooled their support (what the winner was picked by).
    pooled: dict[str, float] = field(default_factory=dict)
    #: Candidates set aside for repeating words (``no_repeat_words``).
    repeating: list[str] = field(default_factory=list)
    weights_before: dict[str, float] = field(default_factory=dict)
    weights_after: dict[str, float] = field(default_factory=dict)
    winner: str | None = None
    accepted_text: str = ""
    exits: list[str] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    skipped_verification: bool = False
    #: Gated fusion (``gate_logprob``): whether the lead's draft was accepted without a
    #: round (None when gating was off for this round), and why, with the numbers.
    gated: bool | None = None
    gate_reason: str = ""
    wall_time: float = 0.0
    #: Seconds from round start until its drafts and their verification finished
    #: (the round without the bookkeeping around it), for overhead benchmarks.
    critical_path: float = 0.0


@dataclass
class MemberSummary:
    rounds: int = 0
    calls: int = 0
    draft_calls: int = 0
    score_calls: int = 0
    wins: int = 0
    tokens_won: int = 0
    tokens_drafted: int = 0
    tokens_scored: int = 0
    prompt_tokens: int = 0
    #: Prompt tokens the server computed for this member's calls (drafts and
    #: scores), over the calls whose server reported it.
    prompt_tokens_computed: int = 0
    #: Prompt tokens of requests whose answer the server lost: the server
    #: computed up to this many more than prompt_tokens_computed.
    prompt_tokens_unmetered: int = 0
    #: Calls whose server did not report the prompt tokens it computed.
    calls_without_cost: int = 0
    errors: int = 0
    exited_at_round: int | None = None


@dataclass
class FusionTrace:
    members: list[str]
    rounds: list[RoundRecord] = field(default_factory=list)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    seed: int | None = None
    time_to_first_segment: float | None = None
    total_time: float = 0.0
    finish_reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    #: Members that could not be reached when the request started, and why; they
    #: sat this request out and are probed again by the next (docs/design.md, "Reliability").
    left_out: dict[str, str] = field(default_factory=dict)

    # -- summaries ---------------------------------------------------------

    def member_summaries(self) -> dict[str, MemberSummary]:
        out = {m: MemberSummary(prompt_tokens=self.prompt_tokens.get(m, 0)) for m in self.members}
        for rnd in self.rounds:
            active = {c.member for c in rnd.candidates} | {c.member for c in rnd.calls}
            for m in active:
                out[m].rounds += 1
            for call in rnd.calls:
                s = out[call.member]
                s.calls += 1
                s.errors += call.error is not None
                s.prompt_tokens_unmetered += call.prompt_tokens_unmetered
                if call.prompt_tokens_computed is not None:
                    s.prompt_tokens_computed += call.prompt_tokens_computed
                elif call.error is None:
                    s.calls_without_cost += 1
                if call.kind == "draft":
                    s.draft_calls += 1
                else:
                    s.score_calls += 1
                    s.tokens_scored += call.tokens
            for cand in rnd.candidates:
                out[cand.member].tokens_drafted += cand.tokens
            if rnd.winner is not None:
                out[rnd.winner].wins += 1
                won = next(c for c in rnd.candidates if c.member == rnd.winner)
                out[rnd.winner].tokens_won += won.tokens
            for m in rnd.exits:
                out[m].exited_at_round = rnd.index
        return out

    @property
    def completion_tokens(self) -> int:
        """Tokens of the fused answer, each segment counted in its drafter's tokenizer."""
        return sum(s.tokens_won for s in self.member_summaries().values())

    @property
    def total_calls(self) -> int:
        return sum(len(r.calls) for r in self.rounds)

    @property
    def members_per_round(self) -> float:
        """Average number of members called per round (the paper's exit metric)."""
        if not self.rounds:
            return 0.0
        return sum(len({c.member for c in r.calls}) for r in self.rounds) / len(self.rounds)

    @property
    def members_per_round_by_tokens(self) -> float:
        """Members called per round, each round weighted by the tokens it added.

        A 32-token round drafted alone weighs three times a 10-token fused one,
        so this says how many members stood behind the average token.
        """
        weighted = total = 0
        for r in self.rounds:
            won = next((c.tokens for c in r.candidates if c.member == r.winner), 0)
            weighted += won * len({c.member for c in r.calls})
            total += won
        return weighted / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        members = self.member_summaries()
        tokens = self.completion_tokens
        return {
            "rounds": len(self.rounds),
            "calls": self.total_calls,
            "members_per_round": round(self.members_per_round, 3),
            "members_per_round_by_tokens": round(self.members_per_round_by_tokens, 3),
            "completion_tokens": tokens,
            "time_to_first_segment": self.time_to_first_segment,
            "total_time": round(self.total_time, 4),
            "tokens_per_second": round(tokens / self.total_time, 3) if self.total_time else None,
            "finish_reason": self.finish_reason,
            "gated_rounds": sum(1 for r in self.rounds if r.gated),
            "prompt_tokens_computed": sum(s.prompt_tokens_computed for s in members.values()),
            "prompt_tokens_unmetered": sum(s.prompt_tokens_unmetered for s in members.values()),
            "echo_fallbacks": dict(
                Counter(why for r in self.rounds for c in r.calls for why in c.echo_fallbacks)
            ),
            "exits": {m: s.exited_at_round for m, s in members.items() if s.exited_at_round},
            "left_out": dict(self.left_out),
            "members": {m: asdict(s) for m, s in members.items()},
        }

    # -- views ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    def to_html(self, title: str = "specfuse trace") -> str:
        """A self-contained page: the fused text coloured by member, then each round."""
        colours = member_colours(self.members)
        esc = html.escape
        legend = " ".join(
            f'<span class="seg" style="background:{colours[m]}">{esc(m)}</span>' for m in self.members
        )
        fused = "".join(
            f'<span class="seg" title="round {r.index}: {esc(r.winner or "")}" '
            f'style="background:{colours.get(r.winner or "", "#eee")}">{esc(r.accepted_text)}</span>'
            for r in self.rounds
        )
        rounds = []
        for r in self.rounds:
            verifiers = list(r.probabilities)
            head = "".join(f"<th>p<sub>{esc(v)}</sub></th>" for v in verifiers)
            rows = []
            for c in r.candidates:
                cells = "".join(
                    f"<td>{r.probabilities[v][c.member]:.3f}<br><small>s={r.scores[v][c.member]:.3f}"
                    "</small></td>"
                    if c.member in r.probabilities[v]
                    else "<td>–</td>"
                    for v in verifiers
                )
                mark = "win" if c.member == r.winner else ""
                rows.append(
                    f'<tr class="{mark}"><td style="background:{colours[c.member]}">{esc(c.member)}</td>'
                    f"<td><code>{esc(c.text)}</code>{' ⏹' if c.finished else ''}</td>"
                    f"<td>{c.tokens}</td>{cells}<td>{r.aggregated.get(c.member, 0.0):.3f}</td></tr>"
                )
            notes = []
            if r.gated:
                notes.append(f"gated, no round: {esc(r.gate_reason)}")
            elif r.skipped_verification:
                notes.append("single drafter: verification skipped")
            elif r.gated is False:
                notes.append(f"fused: {esc(r.gate_reason)}")
            if r.exits:
                notes.append("exits: " + ", ".join(map(esc, r.exits)))
            errors = [f"{esc(c.member)} {c.kind}: {esc(c.error)}" for c in r.calls if c.error]
            notes.extend(errors)
            rounds.append(
                f"<h3>Round {r.index} <small>{r.wall_time * 1000:.0f} ms</small></h3>"
                f"<table><tr><th>member</th><th>candidate</th><th>tokens</th>{head}<th>S</th></tr>"
                + "".join(rows)
                + "</table>"
                + (f"<p class='note'>{'; '.join(notes)}</p>" if notes else "")
            )
        summary = self.summary()
        member_rows = "".join(
            f'<tr><td style="background:{colours[m]}">{esc(m)}</td><td>{s["rounds"]}</td>'
            f"<td>{s['calls']}</td><td>{s['wins']}</td><td>{s['tokens_won']}</td>"
            f"<td>{s['tokens_drafted']}</td><td>{esc(server_cost(s))}</td><td>{s['errors']}</td>"
            f"<td>{s['exited_at_round'] or '–'}</td></tr>"
            for m, s in summary["members"].items()
        )
        left_out = "".join(
            f"<p class='note'>left out at start: {esc(m)}: {esc(why)}</p>" for m, why in self.left_out.items()
        )
        ttfs = summary["time_to_first_segment"] or 0.0
        totals = (
            f"{summary['rounds']} rounds · {summary['calls']} calls · "
            f"{summary['members_per_round']:.2f} members/round "
            f"({summary['members_per_round_by_tokens']:.2f} by tokens) · first segment {ttfs:.2f} s · "
            f"total {summary['total_time']:.2f} s · {summary['tokens_per_second'] or 0:.1f} tokens/s · "
            f"finish: {esc(summary['finish_reason'])} · server prompt tokens computed: "
            f"{esc(server_cost(summary))}"
        )
        return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
.seg {{ border-radius: 3px; padding: 0 1px; white-space: pre-wrap; }}
.fused {{ line-height: 1.8; border: 1px solid #ccc; padding: 1em; }}
table {{ border-collapse: collapse; margin-bottom: .5em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; vertical-align: top; }}
tr.win td {{ font-weight: bold; }}
.note {{ color: #a33; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>{legend}</p>
<div class="fused">{fused}</div>
<h2>Summary</h2>
<p>{totals}</p>{left_out}
<table><tr><th>member</th><th>rounds</th><th>calls</th><th>wins</th><th>tokens won</th>
<th>tokens drafted</th><th>prompt tokens computed</th><th>errors</th><th>exited at round</th></tr>
{member_rows}</table>
<h2>Rounds</h2>
{"".join(rounds)}
</body></html>
"""


def server_cost(summary: dict[str, Any]) -> str:
    """Prompt tokens the servers computed, as one summary (or one member's) says: "1234",
    "1234 + up to 56 unmetered", and how many calls' servers did not report it."""
    text = str(summary.get("prompt_tokens_computed", 0))
    if summary.get("prompt_tokens_unmetered"):
        text += f" + up to {summary['prompt_tokens_unmetered']} unmetered"
    unreported = summary.get("calls_without_cost")
    if unreported is None:  # the whole response: add up the members
        unreported = sum(m.get("calls_without_cost", 0) for m in (summary.get("members") or {}).values())
    if unreported:
        text += f" ({unreported} call(s) unreported)"
    return text


_PALETTE = ["#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6", "#a0c4ff", "#ffadad"]
#: rich colour names matching the HTML palette order, for the CLI.
RICH_PALETTE = ["orange1", "green3", "cyan", "medium_purple1", "orchid1", "yellow", "sky_blue1", "red"]


def member_colours(members: list[str]) -> dict[str, str]:
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(members)}
