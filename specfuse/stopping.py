"""When a fused answer stops: stop sequences, member turn markers, and the end of a round.

The fused text is checked, after every round, for the caller's stop sequences and
every member's turn markers (a segment boundary may split one between two
drafters); a tail that could still grow into one is held back from the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specfuse.prompts import PromptFormat
    from specfuse.request import Member, _Request
    from specfuse.trace import RoundRecord


def _cut_at_stop(request: _Request, record: RoundRecord) -> bool:
    """Cut the fused text before the first stop sequence or member turn marker
    that ends in this round's segment, and the rounds' accepted texts with it.

    A marker may straddle two segments ("\\nUs" + "er:"), so the search starts
    a marker's length before the new text, and the cut may reach into earlier
    rounds. Returns whether it cut.
    """
    new_from = len(request.fused) - len(record.accepted_text)
    cut = _find_stop(request.fused, request.stops, new_from)
    if cut is None:
        return False
    excess = len(request.fused) - cut
    for earlier in reversed(request.trace.rounds):
        if excess <= 0:
            break
        kept = max(0, len(earlier.accepted_text) - excess)
        excess -= len(earlier.accepted_text) - kept
        earlier.accepted_text = earlier.accepted_text[:kept]
    request.fused = request.fused[:cut]
    return True


def _finish_reason(request: _Request, record: RoundRecord) -> str | None:
    """Why the answer ends after this round, or None to go on. Reads, never edits."""
    winner = next(c for c in record.candidates if c.member == record.winner)
    if winner.finished:
        return "stop"
    if request.tokens_used >= request.max_tokens:
        return "length"
    return None


def _all_stops(caller_stops: Sequence[str], members: Sequence[Member]) -> tuple[str, ...]:
    """The caller's stop sequences plus every member's turn markers, without repeats."""
    return tuple(dict.fromkeys([*caller_stops, *(t for m in members for t in _turn_markers(m.format))]))


def _turn_markers(fmt: PromptFormat) -> tuple[str, ...]:
    """Strings that open or close a turn in a member's format: none may appear in an answer."""
    end = fmt.end_of_turn if fmt.end_of_turn.strip() else ""
    return tuple(dict.fromkeys([*fmt.stops, *([end] if end else [])]))


def _find_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Index of the earliest stop sequence that ends in the newly added text."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, new_from - longest + 1)
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


def _pending_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop sequence.

    That tail is held back from the stream until the next segment decides it.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best
