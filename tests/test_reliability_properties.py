"""Property-based tests of response parsing and of prefill-to-candidate alignment.

The alignment decides which prompt log-probs score a candidate, so an
off-by-one silently changes every verdict. We check it against the truth
computed from a real tokenizer (smollm2-135m, byte-level BPE): each token's
raw bytes give its exact byte span, and the covering tokens are those whose
span ends after the context (docs/design.md, "The algorithm"). Token texts are produced
the way a server produces them -- each token decoded alone, so a token that
holds part of a multi-byte character comes back as U+FFFD.
"""

from __future__ import annotations

import email.utils
import functools
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from specfuse.backends._http import (
    ContextWindowErrorRemote,
    RemoteError,
    RetryableError,
    covering_count,
    error_from_status,
    parse_retry_after,
)
from specfuse.backends._remote import count_from_offsets, cut_at_stop
from specfuse.backends.local import _first_covering

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Pieces that split across byte-level tokens: accents, combining marks, CJK, emoji
#: (with skin tone, ZWJ sequences, flags), ligatures, and whitespace of all kinds.
PIECES = [
    *"abcxyz019,.!?-",
    " ",
    "  ",
    "\n",
    "\t",
    " the",
    "é",
    "e\u0301",
    "n\u0303",
    "\u0308",
    "ß",
    "ﬁ",
    "中",
    "文字",
    "日本語",
    "한",
    "😀",
    "👍🏽",
    "👩\u200d💻",
    "🇫🇷",
    "\u00a0",
    "\u3000",
    "Ω",
    "ё",
]
text = st.lists(st.sampled_from(PIECES), min_size=1, max_size=10).map("".join)
space = st.sampled_from(["", " ", "  ", "\n", "\t", " \n"])
candidate = st.tuples(space, text, space).map("".join).filter(bool)


@functools.cache
def tokenizer() -> Any:
    from specfuse.backends.local import load_model
    from specfuse.models import resolve_model_path

    return load_model(resolve_model_path("smollm2-135m")).tokenizer


@functools.cache
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: a byte-level token's symbols -> raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def tokens_of(full: str) -> tuple[list[int], list[bytes]]:
    tok = tokenizer()
    ids = tok(full, add_special_tokens=False)["input_ids"]
    decoder = byte_decoder()
    raw = [bytes(decoder[ch] for ch in piece) for piece in tok.convert_ids_to_tokens(ids)]
    assert b"".join(raw) == full.encode("utf-8")
    return ids, raw


def true_covering(context: str, full: str, raw: list[bytes]) -> int:
    """Tokens whose byte span ends after the context: the exact answer."""
    boundary = len(context.encode("utf-8"))
    end = 0
    count = 0
    for piece in raw:
        end += len(piece)
        count += end > boundary
    return count


def boundary_in_partial_run(context: str, texts: list[str], raw: list[bytes]) -> bool:
    """True when the context ends strictly inside a run of tokens that each decode to U+FFFD.

    There the per-token texts cannot tell where the boundary falls (b"\\xe8" + b"\\xaa\\x9e"
    and b"\\xe8\\xaa" + b"\\x9e" both read as two U+FFFD), so no text-only rule can be exact.
    """
    boundary = len(context.encode("utf-8"))
    end = 0
    for i, piece in enumerate(raw[:-1]):
        end += len(piece)
        if end == boundary:
            return "\ufffd" in texts[i] and "\ufffd" in texts[i + 1]
        if end > boundary:
            return False
    return False


@PROPS
@given(context=text, cand=candidate)
# Found by hypothesis on a fresh machine: a space-only token before a run of partial
# characters (" \u0308" then " \U0001F600" split across tokens) was matched by an empty anchor.
@example(context="a", cand=" \u0308 \U0001f600")
def test_covering_count_matches_the_true_token_spans(context: str, cand: str) -> None:
    full = context + cand
    ids, raw = tokens_of(full)
    expected = true_covering(context, full, raw)
    server_texts = [tokenizer().decode([i]) for i in ids]  # as TGI / vLLM report them
    got = covering_count(full, len(context), server_texts)
    # Texts alone cannot place a boundary inside a run of partial tokens: see the xfail below.
    assume(not boundary_in_partial_run(context, server_texts, raw))
    assert got == expected
    # A suffix of the prefill that starts on a whole character (SGLang's
    # logprob_start_len, a truncated prefill) gives the same answer.
    start = len(ids) - expected - 1
    if start > 0 and "\ufffd" not in server_texts[start]:
        assert covering_count(full, len(context), server_texts[start:]) == expected


@pytest.mark.xfail(
    strict=True,
    reason="known limit: when the context ends inside a run of tokens that each decode "
    "to U+FFFD, covering_count apportions the run by bytes and can be off by one or two tokens; an exact "
    "answer needs the token ids or the server's /tokenize offsets",
)
@pytest.mark.parametrize(("context", "cand"), [("日本語", "日本語"), ("한", "👍🏽")])
def test_covering_count_inside_a_partial_character_run(context: str, cand: str) -> None:
    full = context + cand
    ids, raw = tokens_of(full)
    texts = [tokenizer().decode([i]) for i in ids]
    assert boundary_in_partial_run(context, texts, raw)
    assert covering_count(full, len(context), texts) == true_covering(context, full, raw)


@PROPS
@given(context=text, cand=candidate)
@example(context="日本語", cand="日本語")  # the boundary inside a run of partial-character tokens
@example(context="한", cand="👍🏽")
@example(context="a", cand=" \u0308 \U0001f600")
def test_exact_alignment_matches_the_true_token_spans(context: str, cand: str) -> None:
    """What remote scoring now uses: offsets plus the server's token ids, no per-token texts."""
    full = context + cand
    ids, raw = tokens_of(full)
    expected = true_covering(context, full, raw)
    enc = tokenizer()(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    assert count_from_offsets(ids, offsets, len(context), ids) == expected
    # A server suffix (SGLang's logprob_start_len) long enough to hold the candidate agrees.
    assert count_from_offsets(ids, offsets, len(context), ids[len(ids) - expected :]) == expected
    # Byte offsets (TGI's /tokenize) against the boundary in bytes give the same count.
    starts = [0]
    for ch in full:
        starts.append(starts[-1] + len(ch.encode("utf-8")))
    in_bytes = [(starts[s], starts[e]) for s, e in offsets]
    assert count_from_offsets(ids, in_bytes, len(context.encode("utf-8")), ids) == expected
    # Different ids (another tokenizer behind the server) are refused, never guessed.
    assert count_from_offsets(ids, offsets, len(context), [i + 1 for i in ids]) is None


@PROPS
@given(context=text, cand=candidate)
def test_the_local_covering_rule_matches_the_true_token_spans(context: str, cand: str) -> None:
    full = context + cand
    ids, raw = tokens_of(full)
    enc = tokenizer()(full, add_special_tokens=False, return_offsets_mapping=True)
    first = _first_covering([tuple(o) for o in enc["offset_mapping"]], len(context))
    assert len(ids) - first == true_covering(context, full, raw)


# -- response parsing -----------------------------------------------------------------------

json_body = st.dictionaries(
    st.sampled_from(["error", "error_type", "message", "detail", "object"]),
    st.one_of(st.text(max_size=40), st.integers(), st.none()),
    max_size=4,
).map(json.dumps)
body = st.one_of(st.text(max_size=800), json_body)


@PROPS
@given(
    status=st.integers(400, 599), payload=body, secret=st.text("abcdef0123456789", min_size=12, max_size=20)
)
def test_error_from_status_is_total_and_never_echoes_headers(status: int, payload: str, secret: str) -> None:
    headers = {"authorization": f"Bearer sk-{secret}", "x-api-key": f"sk-{secret}", "retry-after": "2"}
    err = error_from_status(status, payload, headers)
    assert isinstance(err, RemoteError) and err.status == status
    assert f"sk-{secret}" not in str(err) or f"sk-{secret}" in payload
    assert len(str(err)) < 600
    assert isinstance(err, RetryableError) == (status in (429, 502, 503, 504))
    if isinstance(err, ContextWindowErrorRemote):
        assert status in (400, 413, 422)
    if status in (429, 503):
        assert err.retry_after == 2.0


@PROPS
@given(seconds=st.floats(0, 1e6, allow_nan=False))
def test_retry_after_in_seconds(seconds: float) -> None:
    assert parse_retry_after(repr(seconds)) == pytest.approx(seconds)


@PROPS
@given(ahead=st.integers(0, 3600), junk=st.text(max_size=30))
def test_retry_after_as_date_or_junk(ahead: int, junk: str) -> None:
    date = email.utils.formatdate(time.time() + ahead, usegmt=True)
    assert parse_retry_after(date) == pytest.approx(ahead, abs=2.0)
    parsed = parse_retry_after(junk)
    assert parsed is None or parsed >= 0.0


@PROPS
@given(body_text=text, stops=st.lists(text, max_size=6))
def test_cut_at_stop(body_text: str, stops: list[str]) -> None:
    cut, hit = cut_at_stop(body_text, stops)
    assert body_text.startswith(cut)
    assert hit == any(s in body_text for s in stops)
    assert not any(s in cut for s in stops)
    if hit:
        assert any(body_text[len(cut) :].startswith(s) for s in stops)
