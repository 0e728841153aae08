"""Bad configuration is refused at construction with a message that says what to change."""

from __future__ import annotations

import json

import pytest

from specfuse import ConfigError, EnsembleConfig, FusionSettings, MemberConfig, SpecFuse
from specfuse.errors import ModelNotAvailableError


def test_defaults() -> None:
    s = FusionSettings()
    assert (s.segment_tokens, s.temperature, s.top_p, s.tau) == (10, 0.6, 0.9, 1.0)
    # No self-votes, identical candidates pooled, exit on evidence keeping two members.
    assert (s.self_verify, s.pool_identical, s.exit_rule) == (False, True, "evidence")
    assert (s.exit_warmup, s.exit_margin, s.exit_patience, s.min_active) == (4, 2.0, 3, 2)


def test_default_min_active_does_not_refuse_a_one_or_two_member_ensemble() -> None:
    # min_active caps exits; the default of 2 must not make one drafter an error,
    # neither when left out nor when a saved config spells it out.
    one = EnsembleConfig.build(["smollm2-135m"])
    assert one.fusion.min_active == 2
    assert EnsembleConfig.model_validate(one.model_dump()).fusion.min_active == 2


def test_no_members() -> None:
    with pytest.raises(ConfigError, match="no members"):
        EnsembleConfig.build([])
    with pytest.raises(ConfigError, match="no members"):
        SpecFuse(members=[])


def test_duplicate_names() -> None:
    with pytest.raises(ConfigError, match=r"duplicate member names.*name="):
        EnsembleConfig.build(["smollm2-135m", "smollm2-135m"])


def test_several_drafters_but_no_verifier() -> None:
    with pytest.raises(ConfigError, match="no verifier"):
        EnsembleConfig.build(
            [
                {"model": "smollm2-135m", "name": "a", "roles": ["draft"]},
                {"model": "smollm2-135m", "name": "b", "roles": ["draft"]},
            ]
        )


def test_single_drafter_needs_no_verifier() -> None:
    config = EnsembleConfig.build([{"model": "smollm2-135m", "roles": "draft"}])
    assert config.members[0].roles == frozenset({"draft"})


def test_nobody_drafts() -> None:
    with pytest.raises(ConfigError, match="no member drafts"):
        EnsembleConfig.build([{"model": "smollm2-135m", "roles": ["verify"]}])


@pytest.mark.parametrize(
    ("field", "value"),
    [("segment_tokens", 0), ("tau", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("exit_ratio", 1.0)],
)
def test_out_of_range_knobs(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        EnsembleConfig.build(["smollm2-135m"], **{field: value})


def test_min_active_above_drafters() -> None:
    with pytest.raises(ConfigError, match="min_active"):
        EnsembleConfig.build(["smollm2-135m", "gemma3-270m"], min_active=3)


def test_unknown_model_short_name_is_refused_at_construction() -> None:
    with pytest.raises(ModelNotAvailableError, match=r"unknown local model 'gpt-9'.*smollm2-135m"):
        SpecFuse.from_members(["gpt-9"])


def test_missing_model_directory_is_refused_at_construction(tmp_path) -> None:
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        SpecFuse.from_members([str(tmp_path / "missing-model")])


def test_remote_member_needs_a_url() -> None:
    # pydantic's ValidationError is a ValueError; EnsembleConfig.build turns it into a ConfigError
    with pytest.raises(ValueError, match="needs at least one url"):
        MemberConfig(model="x", backend="tgi")
    with pytest.raises(ConfigError, match="needs at least one url"):
        EnsembleConfig.build([{"model": "x", "backend": "tgi"}])


def test_api_key_never_in_repr_or_dump() -> None:
    member = MemberConfig(model="x", backend="tgi", urls="http://127.0.0.1:1", api_key="hf_secret_123")
    assert "hf_secret_123" not in repr(member)
    assert "hf_secret_123" not in member.model_dump_json()
    assert member.api_key is not None and member.api_key.get_secret_value() == "hf_secret_123"


def test_config_file_toml_and_json(tmp_path) -> None:
    toml = tmp_path / "ensemble.toml"
    toml.write_text(
        '[[members]]\nmodel = "smollm2-135m"\nweight = 2.0\n\n'
        '[[members]]\nmodel = "gemma3-270m"\nroles = ["verify"]\n\n'
        "[fusion]\nsegment_tokens = 6\ntau = 0.5\n"
    )
    config = EnsembleConfig.from_file(toml)
    assert [m.model for m in config.members] == ["smollm2-135m", "gemma3-270m"]
    assert config.fusion.segment_tokens == 6
    js = tmp_path / "ensemble.json"
    js.write_text(json.dumps({"members": [{"model": "smollm2-135m"}], "fusion": {"lam": 0}}))
    assert EnsembleConfig.from_file(js).fusion.lam == 0
    with pytest.raises(ConfigError, match="does not exist"):
        EnsembleConfig.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[members]]\nmodel = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        EnsembleConfig.from_file(bad)


def test_none_is_a_value_when_named_on_purpose() -> None:
    """`gate_logprob=None` means "fuse every round": an override or a `fusion` dict that
    names it must not keep the gate on, while frameworks' unset fields (None) change nothing."""
    from specfuse.config import request_overrides

    gated = FusionSettings(seed=5)
    assert gated.gate_logprob is not None
    assert gated.with_overrides(gate_logprob=None).gate_logprob is None
    assert gated.with_overrides(seed=None).seed is None
    assert gated.with_overrides().seed == 5  # a field left out is kept
    with pytest.raises(ConfigError, match="temperature"):
        gated.with_overrides(temperature=None)  # a None the field cannot hold is refused
    # In the `fusion` layer None is kept; in fields and call keywords it means "not set".
    assert request_overrides({"gate_logprob": None}, {"seed": None}, {"stop": None}) == {"gate_logprob": None}
    assert request_overrides(None, {"gate_logprob": None, "seed": None}) == {}
    assert request_overrides({"seed": None}, {"seed": 3}) == {"seed": 3}  # a later value wins
    assert request_overrides({"timeout": None}) == {"request_deadline": None}
    # The gateway's `specfuse_fusion` extension is such a layer; OpenAI's unset fields are not.
    from specfuse.gateway.schemas import ChatCompletionRequest
    from specfuse.gateway.translate import chat_call

    messages = [{"role": "user", "content": "hi"}]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "specfuse_fusion": {"gate_logprob": None}}
    )
    overrides = chat_call(request).overrides
    assert overrides["gate_logprob"] is None and "seed" not in overrides and "temperature" not in overrides
