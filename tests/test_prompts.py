"""Per-member prompt rendering with the real tokenizers' chat templates."""

from __future__ import annotations

import pytest

from specfuse import ConfigError
from specfuse.backends.local import LocalBackend
from specfuse.prompts import ChatFormat, PlainFormat, check_messages

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    }
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 times 4?"}]


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
async def test_chat_format_uses_the_models_template_and_end_of_turn(model: str) -> None:
    fmt = await ChatFormat.probe(LocalBackend(model))
    assert fmt is not None
    assert fmt.end_of_turn == "<|im_end|>"  # both are ChatML models
    prompt = await fmt.render(CHAT, None)
    assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt is added
    assert "Be brief." in prompt and "What is 3 times 4?" in prompt


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
async def test_every_chat_member_sees_the_tools(model: str) -> None:
    # Qwen's template renders tools itself; SmolLM2's drops them, so a system note carries them.
    fmt = await ChatFormat.probe(LocalBackend(model))
    assert fmt is not None
    prompt = await fmt.render(CHAT, TOOLS)
    assert "multiply" in prompt
    assert "Be brief." in prompt  # the user's system message survives


async def test_base_model_has_no_chat_template_and_gets_the_plain_format() -> None:
    backend = LocalBackend("gemma3-270m")
    assert await ChatFormat.probe(backend) is None
    info = await backend.info()
    fmt = PlainFormat(bos=info.extra["bos_text"], eos=info.extra["eos_text"])
    prompt = await fmt.render(CHAT, None)
    assert prompt == "<bos>System: Be brief.\nUser: What is 3 times 4?\nAssistant:"
    # A finished candidate is scored with the marker its drafts actually end at,
    # not the end-of-sequence token (about -5 nats after a chat turn).
    assert fmt.end_of_turn == "\nUser:"
    assert "\nUser:" in fmt.stops
    assert "multiply" in await fmt.render(CHAT, TOOLS)


def test_messages_are_checked() -> None:
    with pytest.raises(ConfigError, match="no messages"):
        check_messages([])
    with pytest.raises(ConfigError, match="role 'robot'"):
        check_messages([{"role": "robot", "content": "hi"}])
    with pytest.raises(ConfigError, match="'image_url' is not supported"):
        check_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    parts = check_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}])
    assert parts[0]["content"] == "ab"
