"""Ensemble and member settings, validated at construction.

Two layers:

* :class:`FusionSettings` holds the knobs of the algorithm (docs/design.md,
  "The algorithm"). A request may override any of them.
* :class:`MemberConfig` says how to reach one model and what it does in the
  ensemble; :class:`EnsembleConfig` bundles members with fusion defaults and
  checks that the combination can work.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from specfuse.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

Role = Literal["draft", "verify"]
#: A member's protocol: a name in specfuse.backends.registry ("local", "tgi", "vllm", "sglang", or
#: one registered with specfuse.backends.register_protocol).
BackendKind = str
TemplateKind = Literal["auto", "chat", "plain", "server"]

#: The environment variable every entry point reads a remote member's key from by default.
DEFAULT_API_KEY_ENV = "SPECFUSE_API_KEY"
#: `${VAR}`: an api key given as a reference to an environment variable.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: The embedded offline ensemble: the three PyPI-shipped models (docs/design.md, "Offline models").
#: The strongest alone comes first, because the first listed leads gated fusion in an
#: unweighted ensemble: qwen2.5-coder-0.5b was the best member alone on the IFEval knob
#: split (prompts 101-150; benchmarks/RESULTS.md, "Gated fusion ... the default").
DEFAULT_LOCAL_MODELS: tuple[str, ...] = ("qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m")


class FusionSettings(BaseModel):
    """The algorithm's knobs. Every field may be overridden per request."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Drafting
    segment_tokens: Annotated[int, Field(ge=1, description="Max tokens per drafted segment.")] = 10
    solo_segment_tokens: Annotated[
        int, Field(ge=1, description="Segment length when a single drafter is left alone.")
    ] = 32
    max_tokens: Annotated[int, Field(ge=1, description="Max tokens of the fused answer.")] = 256
    temperature: Annotated[float, Field(ge=0.0, description="0 means greedy decoding.")] = 0.6
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    # Verification and aggregation
    tau: Annotated[float, Field(gt=0.0, description="Softmax temperature of per-verifier scores.")] = 1.0
    # Whether a verifier's opinion of its own draft counts. Verifiers rank their
    # own draft first far above chance (58-70 % of 1278 recorded IFEval rounds,
    # chance 33 %), which measures self-agreement, not quality; off, each
    # verifier only votes on the others' candidates (its own draft serves as the
    # reference when it has a single other one to judge). Off for that bias and
    # for 36 % fewer scorings; accuracy was the same within noise either way
    # (benchmarks/RESULTS.md, ablation).
    self_verify: bool = False
    # Identical candidates pool their support instead of splitting it.
    pool_identical: bool = True
    # A candidate that repeats a run of this many words already in the answer (or
    # within itself) loses to every candidate that does not; 0 turns the guard off.
    # Likelihood favours a loop once it has started. Off by default: on 50 IFEval
    # prompts it cut looping answers from 25 to 15 and changed no verdict
    # (benchmarks/RESULTS.md).
    no_repeat_words: Annotated[int, Field(ge=0)] = 0

    # Gated fusion: the lead member drafts alone first, up to gate_tokens tokens, and
    # keeps every token up to the first it is unsure of (raw log-prob below
    # gate_logprob); from that token on the others draft too and everyone verifies, as
    # in every round without gating. Fusion pays off where members are uncertain, a
    # small share of an answer's positions (GaC, arXiv 2406.12585, ensembles only such
    # "key tokens"; SAFE, arXiv 2510.15346). None: every round is fused (the paper's
    # loop). -4 is the threshold the rule fixed in advance picks on the IFEval knob
    # split (prompts 101-150): the most passes among thresholds within a quarter of
    # plain fusion's calls (-4: 9/50 at 4.8 calls an answer; -3: 7/50 at 9.3; -2.5:
    # 11/50 at 14.1, a third of plain fusion's 44.5; qwen alone 11/50). On the report
    # split (1-100) it scored 24/100 against 22 for the best member alone (8 won, 6
    # lost) and 21 for plain fusion, at 5.5 calls an answer (benchmarks/RESULTS.md).
    gate_logprob: Annotated[
        float | None,
        Field(le=0.0, description="A lead's token below this log-prob starts a fused round."),
    ] = -4.0
    gate_tokens: Annotated[
        int, Field(ge=1, description="Tokens the lead drafts alone before the others are asked.")
    ] = 32
    # The member that drafts first under gating: a member name, or None for the member
    # with the highest configured weight (the first listed among equals). Gating pays
    # only when the lead is the strongest member: list it first, or name it here.
    lead: str | None = None

    # SpecEM online weights
    lam: Annotated[float, Field(ge=0.0, description="Learning rate of online weights; 0 disables.")] = 1.0
    warm_weights: bool = False

    # Model exit. "evidence": a drafter leaves when its cumulative lead in S is
    # below -exit_margin times the round-to-round spread (scaled by sqrt(rounds))
    # after each of the last exit_patience rounds. "softmax": the paper's rule,
    # pi = softmax(Q / exit_temperature) < exit_ratio / n_active, which at the
    # former defaults (T 0.1, min_active 1) fired on noise and left one unverified
    # member writing most answers. min_active 2 keeps two members verifying each
    # other to the end of every answer.
    model_exit: bool = True
    exit_rule: Literal["evidence", "softmax"] = "evidence"
    exit_warmup: Annotated[int, Field(ge=0)] = 4
    exit_margin: Annotated[float, Field(gt=0.0)] = 2.0
    exit_patience: Annotated[int, Field(ge=1)] = 3
    exit_temperature: Annotated[float, Field(gt=0.0)] = 0.1
    exit_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    min_active: Annotated[int, Field(ge=1, description="Drafters (and verifiers) kept by model exit.")] = 2

    # Time limits (seconds); None means no limit.
    round_deadline: Annotated[float | None, Field(gt=0.0)] = None
    request_deadline: Annotated[float | None, Field(gt=0.0)] = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def with_overrides(self, **overrides: Any) -> FusionSettings:
        """A validated copy with the given fields replaced.

        None is a value, not "unset": ``gate_logprob=None`` fuses every round and
        ``seed=None`` samples at random, so leave a field out to keep it.
        """
        unknown = set(overrides) - set(type(self).model_fields)
        if unknown:
            raise ConfigError(
                f"unknown fusion setting(s) {sorted(unknown)}; known: {sorted(type(self).model_fields)}"
            )
        data = self.model_dump()
        data.update(overrides)
        return _validated(FusionSettings, data)


#: The framework-style name of a setting, and the FusionSettings field it sets.
SETTING_ALIASES = {"timeout": "request_deadline"}
#: The settings both framework adapters expose as fields under these names (what
#: users of LangChain and LlamaIndex models expect); every other FusionSettings
#: field goes through their ``fusion={...}`` dict.
ADAPTER_FIELD_SETTINGS = ("temperature", "max_tokens", "top_p", "seed", "segment_tokens", "stop", "timeout")


def request_overrides(fusion: Mapping[str, Any] | None, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fusion overrides of one request, from layers of settings, later ones winning.

    How the framework adapters turn their ``fusion`` dict, their fields and a
    call's keywords into engine overrides, so both follow one rule. In ``fusion``
    (settings named on purpose) None is a value: ``{"gate_logprob": None}`` fuses
    every round. In the later layers (model fields and call keywords, which the
    frameworks fill with None when not given) None means "not set". ``timeout``
    sets ``request_deadline``, stop sequences of every layer are kept (in order,
    once each), and a name that is no setting is a ConfigError that lists the
    valid ones.
    """
    out: dict[str, Any] = {}
    stops: list[str] = []
    for depth, layer in enumerate((fusion, *layers)):
        for name, value in (layer or {}).items():
            if value is None and (depth > 0 or name == "stop"):
                continue
            field = SETTING_ALIASES.get(name, name)
            if field not in FusionSettings.model_fields:
                valid = sorted({*FusionSettings.model_fields, *SETTING_ALIASES})
                raise ConfigError(f"unknown fusion setting {name!r}; valid settings: {valid}")
            if field == "stop":
                stops.extend([value] if isinstance(value, str) else value)
            else:
                out[field] = value
    if stops:
        out["stop"] = list(dict.fromkeys(stops))
    return out


class MemberConfig(BaseModel):
    """One base model of the ensemble."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local short name or directory, or the served model id.")
    name: str | None = Field(default=None, description="Defaults to `model`.")
    backend: BackendKind = Field(
        default="local",
        description=(
            "The protocol that reaches the model: 'local' (in this process), 'tgi', 'vllm', 'sglang', "
            "or one registered with specfuse.backends.register_protocol."
        ),
    )
    urls: list[str] = Field(default_factory=list, description="Endpoint URL(s) of a remote member.")
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    api_key_env: str | None = Field(
        default=None,
        description=(
            "The environment variable holding this member's key, read when the member is built "
            f"(default {DEFAULT_API_KEY_ENV}, if set). An api_key written as '${{VAR}}' means "
            "api_key_env='VAR'."
        ),
    )
    served_model: str | None = Field(
        default=None,
        description=(
            "The name the server serves this model under, when `model` names a local tokenizer "
            "(e.g. model='smollm2-135m', served_model='HuggingFaceTB/SmolLM2-135M-Instruct')."
        ),
    )
    roles: frozenset[Role] = frozenset({"draft", "verify"})
    weight: Annotated[float, Field(gt=0.0)] = 1.0
    template: TemplateKind = "auto"
    tokenizer: str | None = Field(
        default=None,
        description=(
            "A remote member's tokenizer: a local short name or directory whose chat template "
            "and BOS/EOS texts are used. Defaults to `model` when that names a local model."
        ),
    )
    chat_template: str | None = Field(
        default=None,
        description="A remote member's Jinja chat template (the text); used before any other.",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    kv_cache: bool = True
    timeout: Annotated[
        float, Field(gt=0.0, description="Seconds one attempt of a call may take (the start probe's too).")
    ] = 60.0
    retries: Annotated[
        int, Field(ge=0, description="Retries of a failed call (429, 503, 502/504, timeouts, refused).")
    ] = 2
    retry_budget: Annotated[
        float | None,
        Field(
            gt=0.0,
            description=(
                "Seconds one call may take over all its attempts; default 2 x timeout, so a dead or "
                "hanging server is given up within about twice its timeout."
            ),
        ),
    ] = None
    scoring: Literal["auto", "echo", "tokens"] = Field(
        default="auto",
        description=(
            "How a remote verifier reads prompt log-probs. 'auto': the cheapest correct way the "
            "server offers, found when the member is probed; 'echo': re-read the whole prompt "
            "(every server); 'tokens': vLLM's token-in route (/inference/v1/generate), which reuses "
            "the prefix cache, and an error if the server does not offer it."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _key_from_env_reference(cls, data: Any) -> Any:
        """`api_key = "${VAR}"` (an ensemble file's way to name a variable) means api_key_env="VAR".

        The reference is never sent as the key; any other `${` in a key is a mistake.
        """
        if not isinstance(data, dict) or data.get("api_key") is None:
            return data
        key = data["api_key"]
        text = key.get_secret_value() if isinstance(key, SecretStr) else key
        if not isinstance(text, str) or "${" not in text:
            return data
        match = ENV_REFERENCE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                "api_key holds '${' but is not a whole '${VAR}' reference; write api_key = \"${VAR}\" "
                'or api_key_env = "VAR" to read the key from an environment variable'
            )
        if data.get("api_key_env") not in (None, match.group(1)):
            raise ValueError("api_key names one environment variable and api_key_env another; keep one")
        data = {k: v for k, v in data.items() if k != "api_key"}
        data["api_key_env"] = match.group(1)
        return data

    @field_validator("urls", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("roles", mode="before")
    @classmethod
    def _roles_from_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [r.strip() for r in value.split(",") if r.strip()]
        return value

    @field_serializer("roles")
    def _roles_as_list(self, roles: frozenset[Role]) -> list[str]:
        # A sorted list: plain json.dumps of a dump must work (LlamaIndex's to_json does that).
        return sorted(roles)

    @field_validator("backend")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        from specfuse.backends.registry import protocol_names, unknown_protocol

        if value not in protocol_names():
            raise ValueError(unknown_protocol(value))
        return value

    @model_validator(mode="after")
    def _check(self) -> MemberConfig:
        if not self.roles:
            raise ValueError("a member needs at least one role: 'draft', 'verify' or both")
        from specfuse.backends.registry import check_member

        # What this member's protocol requires or refuses (urls, tokenizer=, installed packages).
        check_member(self)
        if self.template in ("plain", "server") and self.chat_template is not None:
            raise ValueError(f"chat_template= contradicts template={self.template!r}; drop one of them")
        return self

    @property
    def is_remote(self) -> bool:
        """True when the member's protocol reaches a server (it has urls and may have a key)."""
        from specfuse.backends.registry import get_protocol

        return get_protocol(self.backend).remote

    @property
    def display_name(self) -> str:
        return self.name or self.model

    @property
    def attempt_budget(self) -> float:
        """Seconds one call of this member may take over all its attempts."""
        return self.retry_budget if self.retry_budget is not None else 2 * self.timeout

    def resolved_api_key(self) -> str | None:
        """This member's key: `api_key`, else its `api_key_env` variable, else SPECFUSE_API_KEY.

        Read when the member's backend is built, so the secret never sits in a
        config dump. A variable named on purpose must be set.
        """
        import os

        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if not self.is_remote:
            return None
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ConfigError(
                    f"member {self.display_name!r} reads its api key from ${self.api_key_env}, "
                    "which is not set; export it or change api_key_env"
                )
            return value
        return os.environ.get(DEFAULT_API_KEY_ENV) or None


class EnsembleConfig(BaseModel):
    """Members plus the fusion defaults of every request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: list[MemberConfig]
    fusion: FusionSettings = Field(default_factory=FusionSettings)

    @model_validator(mode="after")
    def _check(self) -> EnsembleConfig:
        if not self.members:
            raise ValueError(
                "the ensemble has no members; add at least one, e.g. "
                f"MemberConfig(model={DEFAULT_LOCAL_MODELS[0]!r})"
            )
        names = [m.display_name for m in self.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate member names {dupes}; give each member a distinct name=")
        drafters = [m for m in self.members if "draft" in m.roles]
        verifiers = [m for m in self.members if "verify" in m.roles]
        if not drafters:
            raise ValueError("no member drafts; give at least one member the 'draft' role")
        if len(drafters) > 1 and not verifiers:
            raise ValueError(
                "several drafters but no verifier: give at least one member the 'verify' role "
                "so candidates can be ranked"
            )
        lead = self.fusion.lead
        if lead is not None and lead not in [m.display_name for m in drafters]:
            raise ValueError(
                f"lead={lead!r} is not a drafting member; name one of {[m.display_name for m in drafters]}"
            )
        min_active = self.fusion.min_active
        # min_active caps exits, so the default (2) fits any ensemble, also after a
        # dump/load round trip; a value raised above it must be reachable.
        default = FusionSettings.model_fields["min_active"].default
        if min_active > max(len(drafters), default):
            raise ValueError(
                f"min_active={min_active} exceeds the {len(drafters)} drafting member(s); lower it"
            )
        return self

    @classmethod
    def build(cls, members: list[MemberConfig | dict[str, Any] | str], **fusion: Any) -> EnsembleConfig:
        """Members as configs, dicts or plain model names; fusion settings as keywords."""
        data = {
            "members": [{"model": m} if isinstance(m, str) else m for m in members],
            "fusion": fusion,
        }
        return _validated(cls, data)

    def with_retries(self, max_retries: int | None) -> EnsembleConfig:
        """A copy whose remote members retry a failed call `max_retries` times (None: unchanged).

        The framework adapters' `max_retries` field, so it means the same in both:
        each member call (draft, score, probe) is tried at most max_retries + 1 times,
        within that member's `retry_budget`.
        """
        if max_retries is None:
            return self
        if max_retries < 0:
            raise ConfigError(f"max_retries={max_retries} must be 0 or more")
        members = [
            m if not m.is_remote else m.model_copy(update={"retries": max_retries}) for m in self.members
        ]
        return self.model_copy(update={"members": members})

    @classmethod
    def local(cls, models: tuple[str, ...] = DEFAULT_LOCAL_MODELS, **fusion: Any) -> EnsembleConfig:
        """The embedded offline ensemble (or a subset of its short names)."""
        return cls.build(list(models), **fusion)

    @classmethod
    def from_file(cls, path: str | Path) -> EnsembleConfig:
        """Load a `.toml` or `.json` file with `members = [...]` and an optional `fusion` table."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"ensemble config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot parse ensemble config {path}: {exc}") from exc
        return _validated(cls, data)


def _validated(model: type[M], data: Any) -> M:
    """Validate, turning pydantic's error into a ConfigError with readable lines."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or model.__name__
            lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
