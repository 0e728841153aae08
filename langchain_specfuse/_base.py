"""Settings and engine plumbing shared by ChatSpecFuse and SpecFuseLLM.

The adapters hold no algorithm: they turn LangChain settings into the core's
per-request overrides, build one :class:`specfuse.SpecFuse` lazily, and turn
its results into LangChain metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Self

from langchain_core.messages import BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from langchain_specfuse._convert import to_core_messages
from specfuse import (
    DEFAULT_LOCAL_MODELS,
    EnsembleConfig,
    FusionResult,
    FusionSettings,
    MemberConfig,
    SpecFuse,
)
from specfuse.config import ADAPTER_FIELD_SETTINGS, request_overrides
from specfuse.engine_pool import SharesEngine


class SpecFuseParams(SharesEngine, BaseModel):
    """How to reach the ensemble and the default fusion settings of each request.

    The ensemble comes from, in order: `config_path` (a `.toml`/`.json` ensemble
    file), `members` (model short names, or MemberConfig objects / dicts), or,
    when neither is given, the embedded offline ensemble
    (`specfuse.DEFAULT_LOCAL_MODELS`).
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    members: list[str | dict[str, Any]] | None = None
    """Member specs: model short names, or MemberConfig fields as dicts."""
    config_path: str | None = None
    """An ensemble config file; takes precedence over `members`."""
    model_name: str | None = Field(default=None, alias="model")
    """A label for traces and usage callbacks; defaults to `specfuse:<member>+<member>...`."""

    temperature: float | None = None
    max_tokens: int | None = None
    """Max tokens of the fused answer (counted in each winning drafter's tokenizer)."""
    top_p: float | None = None
    seed: int | None = None
    segment_tokens: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop sequences applied to every call, in addition to the per-call `stop`."""
    fusion: dict[str, Any] = Field(default_factory=dict)
    """Any other FusionSettings field (tau, lam, model_exit, ...)."""

    timeout: float | None = None
    """Seconds allowed per response; maps to the core's `request_deadline`."""
    max_retries: int | None = Field(default=None, ge=0)
    """Retries of each remote member call (None: each member's own `retries`, default 2)."""
    streaming: bool = False
    """When True, invoke() runs through the segment stream (so callbacks see each segment)."""

    api_key: SecretStr | None = Field(default_factory=secret_from_env("SPECFUSE_API_KEY", default=None))
    """Bearer token for remote members that have none of their own (env SPECFUSE_API_KEY)."""
    member_api_keys: dict[str, SecretStr] = Field(default_factory=dict, exclude=True, repr=False)
    """Per-member keys lifted out of `members` so no secret is serialised."""

    _engine: SpecFuse | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _lift_member_secrets(cls, data: Any) -> Any:
        """Move api keys out of member specs into the excluded `member_api_keys`."""
        if not isinstance(data, dict) or not data.get("members"):
            return data
        data = dict(data)
        keys: dict[str, Any] = dict(data.get("member_api_keys") or {})
        specs: list[Any] = []
        for spec in data["members"]:
            if isinstance(spec, MemberConfig):
                key = spec.api_key
                spec = spec.model_dump(mode="json", exclude_defaults=True)
            elif isinstance(spec, dict):
                spec = dict(spec)
                key = spec.pop("api_key", None)
            else:
                key = None
            if key is not None and isinstance(spec, dict):
                keys[spec.get("name") or spec["model"]] = key
            specs.append(spec)
        data["members"] = specs
        data["member_api_keys"] = keys
        return data

    @model_validator(mode="after")
    def _check_fusion(self) -> SpecFuseParams:
        # Validate early, so a typo (or a member this environment cannot run) fails at
        # construction rather than on the first call.
        FusionSettings().with_overrides(**self._overrides(None, {}))
        self.ensemble_config()
        return self

    # -- construction and LangChain plumbing shared by both models -----------

    @classmethod
    def local(cls, models: Sequence[str] | None = None, **kwargs: Any) -> Self:
        """The embedded offline ensemble, or a subset of its short names."""
        return cls(members=list(models) if models is not None else None, **kwargs)

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> Self:
        """An ensemble described by a `.toml` / `.json` config file."""
        return cls(config_path=str(path), **kwargs)

    #: LangChain's name for the model type, and the module its serialised form names
    #: (fixed, so that a subclass defined elsewhere still loads as this package's class).
    llm_type: ClassVar[str]
    lc_module: ClassVar[str]

    @property
    def _llm_type(self) -> str:
        return self.llm_type

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["langchain_specfuse", cls.lc_module]

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "SPECFUSE_API_KEY"}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.resolved_model_name,
            "members": self.members,
            "config_path": self.config_path,
            **self._overrides(None, {}),
        }

    # -- the ensemble ---------------------------------------------------------

    def ensemble_config(self) -> EnsembleConfig:
        """The EnsembleConfig this model fuses (secrets applied)."""
        if self.config_path:
            config = EnsembleConfig.from_file(self.config_path)
        elif self.members:
            config = EnsembleConfig.build(list(self.members))
        else:
            config = EnsembleConfig.local()
        members = []
        for member in config.members:
            key = self.member_api_keys.get(member.display_name)
            if key is None and member.api_key_env is None and member.backend != "local":
                # A member naming its own variable reads that one; the others this model's key.
                key = self.api_key
            if key is not None and member.api_key is None:
                # Validated again, so a "${VAR}" key becomes a reference, never text sent.
                data = {**member.model_dump(exclude={"api_key"}), "api_key": key}
                member = MemberConfig.model_validate(data)
            members.append(member)
        return config.model_copy(update={"members": members}).with_retries(self.max_retries)

    @property
    def engine(self) -> SpecFuse:
        """The SpecFuse engine, built on first use and reused (models stay loaded).

        Model objects with the same ensemble share one engine, from the bounded
        pool of :mod:`specfuse.engine_pool`.
        """
        return self._pooled_engine(self.ensemble_config)

    def _member_names(self) -> list[str]:
        if self._engine is not None:
            return self._engine.member_names
        if self.config_path:
            try:
                return [m.display_name for m in EnsembleConfig.from_file(self.config_path).members]
            except Exception:  # a label must never fail; the real error surfaces on the first call
                return []
        if self.members:
            return [m if isinstance(m, str) else (m.get("name") or m["model"]) for m in self.members]
        return list(DEFAULT_LOCAL_MODELS)

    @property
    def resolved_model_name(self) -> str:
        """`model_name`, or `specfuse:` followed by the member names joined with `+`."""
        if self.model_name:
            return self.model_name
        names = self._member_names()
        return "specfuse:" + "+".join(names) if names else "specfuse"

    # -- token counting (LangChain's get_num_tokens API) ---------------------------

    def get_num_tokens(self, text: str) -> int:
        """Tokens of `text` in the members' own tokenizers: the largest count over the members.

        The largest, so that a budget checked against it (trim_messages, memories)
        holds for every member. A `custom_get_token_ids` set by the user takes precedence.
        """
        if self.custom_get_token_ids is not None:  # type: ignore[attr-defined]
            return super().get_num_tokens(text)  # type: ignore[misc]
        return self.engine.count_tokens(text)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of a conversation as the members read it: rendered with each member's own
        chat template (tools and generation prompt included) and counted in its own
        tokenizer; the largest count over the members, so budgets hold for every member.
        """
        if self.custom_get_token_ids is not None:  # type: ignore[attr-defined]
            return super().get_num_tokens_from_messages(messages, tools)  # type: ignore[misc]
        specs = [convert_to_openai_tool(t) for t in tools] if tools else None
        return self.engine.count_prompt_tokens(to_core_messages(messages), tools=specs)

    # -- per request ------------------------------------------------------------

    def _overrides(self, stop: list[str] | None, call: dict[str, Any]) -> dict[str, Any]:
        """Fusion overrides of one request: `fusion`, then fields, then per-call kwargs."""
        fields = {name: getattr(self, name) for name in ADAPTER_FIELD_SETTINGS}
        return request_overrides(self.fusion, fields, {"stop": stop}, call)


def usage_metadata(result: FusionResult) -> UsageMetadata:
    """LangChain usage of one fused response.

    input_tokens: the prompt as each member called in the response read it,
    summed over those members (each in its own tokenizer); output_tokens: the
    fused answer, each segment counted in the tokenizer of the member that
    drafted it. Verification prefills are not counted here; they are in
    `response_metadata["specfuse_member_usage"]` (tokens_scored).
    """
    return UsageMetadata(
        input_tokens=result.usage.input_tokens,
        output_tokens=result.usage.output_tokens,
        total_tokens=result.usage.total_tokens,
    )


def member_usage(result: FusionResult) -> dict[str, dict[str, int]]:
    """Per-member token totals of one response (from the trace)."""
    return {
        name: {
            "prompt_tokens": s.prompt_tokens if s.calls else 0,
            "tokens_drafted": s.tokens_drafted,
            "tokens_won": s.tokens_won,
            "tokens_scored": s.tokens_scored,
            "calls": s.calls,
            "wins": s.wins,
        }
        for name, s in result.trace.member_summaries().items()
    }


def result_metadata(result: FusionResult, model_name: str) -> dict[str, Any]:
    """What a response reports besides its text: model, finish, fusion summary and trace."""
    return {
        "model_name": model_name,
        "finish_reason": result.finish_reason,
        "specfuse_summary": result.trace.summary(),
        "specfuse_member_usage": member_usage(result),
        "specfuse_trace": result.trace.to_dict(),
    }
