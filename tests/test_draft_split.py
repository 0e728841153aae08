"""Draft.split: the gate keeps a draft's first tokens and holds the rest, cut at token boundaries.

Pure logic over the per-token texts every protocol reports (see the backends);
the remote protocols' texts are checked against servers in test_remote_quirks.py
and test_real_vllm.py.
"""

from __future__ import annotations

from specfuse.backends.base import Draft


def draft(pieces: tuple[str, ...], text: str | None = None, finish: str = "length") -> Draft:
    return Draft(
        text="".join(pieces) if text is None else text,
        token_count=len(pieces),
        finish_reason=finish,  # type: ignore[arg-type]
        token_logprobs=tuple(-0.1 * (i + 1) for i in range(len(pieces))),
        token_texts=pieces,
    )


def test_head_and_tail_spell_the_draft_and_carry_their_own_log_probs() -> None:
    d = draft((" The", " sky", " is", " blue", "."), finish="eos")
    head, tail = d.split(2, 10) or (None, None)
    assert head is not None and tail is not None
    assert (head.text, tail.text) == (" The sky", " is blue.")
    assert head.token_logprobs == d.token_logprobs[:2] and tail.token_logprobs == d.token_logprobs[2:]
    assert (head.token_count, tail.token_count) == (2, 3)
    # The head is only a prefix: the answer goes on. The tail ends where the draft ended.
    assert (head.finish_reason, tail.finish_reason) == ("length", "eos")
    assert tail.token_texts == (" is", " blue", ".")


def test_the_tail_is_at_most_tail_tokens_long_and_then_does_not_end_the_answer() -> None:
    d = draft(("a", "b", "c", "d", "e", "f"), finish="eos")
    head, tail = d.split(1, 2) or (None, None)
    assert head is not None and tail is not None
    assert (head.text, tail.text, tail.token_count) == ("a", "bc", 2)
    assert tail.finish_reason == "length"  # "def" was cut off, so the answer is not over


def test_cut_at_the_first_token_leaves_an_empty_head() -> None:
    head, tail = draft(("x", "y")).split(0, 5) or (None, None)
    assert head is not None and tail is not None
    assert (head.text, head.token_count, head.token_logprobs) == ("", 0, ())
    assert tail.text == "xy"


def test_a_stop_sequence_cut_off_the_text_belongs_to_no_part() -> None:
    # The server generated " END" but returned the text before the stop sequence.
    d = draft(("Hello", " world", " END"), text="Hello world", finish="stop")
    head, tail = d.split(1, 5) or (None, None)
    assert head is not None and tail is not None
    assert (head.text, tail.text, tail.finish_reason) == ("Hello", " world", "stop")
    assert tail.token_count == 2  # the stop's tokens were generated and are counted


def test_a_character_split_across_tokens_is_spelled_by_its_last_piece() -> None:
    # "é" in two byte tokens: the first spells "" (as vLLM and TGI report it).
    d = draft(("caf", "", "é", " au", " lait"))
    head, tail = d.split(2, 5) or (None, None)
    assert head is not None and tail is not None
    assert (head.text, tail.text) == ("caf", "é au lait")
    assert "".join(head.token_texts) + "".join(tail.token_texts) == d.text


def test_no_cut_without_texts_that_spell_the_draft() -> None:
    assert draft(()).split(0, 3) is None  # nothing reported
    # Each token decoded alone (SGLang's texts): a split character reads as U+FFFD.
    assert draft(("caf", "\ufffd", "\ufffd"), text="café").split(1, 3) is None
    # Texts that do not line up with the log-probs cannot be cut at a token.
    d = draft(("a", "b"))
    assert Draft(d.text, 2, "length", (-0.1,), token_texts=d.token_texts).split(1, 1) is None
