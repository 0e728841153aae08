"""The ways of answering a prompt and the settings every mode shares.

A mode is a member alone, the whole-answer re-ranker, or a fusion mode; its cache key
hashes everything that changes its answers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MEMBERS: tuple[str, ...] = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
#: The lead of gated fusion in the harness: the best member alone on the knob split
#: (prompts 101-150). Named, not left to the library's rule (the first listed leads),
#: because the harness keeps the member order its cached answers were made in.
DEFAULT_LEAD = "qwen2.5-coder-0.5b"
ENSEMBLE_MODES: tuple[str, ...] = ("fuse", "specem", "exit", "specem+exit", "default")
#: The paper's verification, so fuse/specem/exit modes each isolate one mechanism;
#: `default` runs whatever the library's defaults are.
PAPER_VERIFICATION: dict[str, Any] = {"self_verify": True, "pool_identical": False}
#: Self-fusion: the lead fused with copies of itself, each drafting with its own seed
#: (Self-MoA, arXiv 2502.00674: one model sampled several times can beat a mix).
SELF_MODE = "self"
ALL_MODES: tuple[str, ...] = ("solo", "whole", *ENSEMBLE_MODES)
#: The run of words the reports and replays call a repetition (`no_repeat_words` of the ablation).
REPEAT_WORDS = 6
#: Knobs added to FusionSettings after answers were cached, with the value at which
#: they do nothing. At that value a knob is left out of the cache key, so answers
#: cached before it existed (exactly what the code still computes) stay valid.
INERT_KNOBS: dict[str, Any] = {"no_repeat_words": 0, "gate_logprob": None, "lead": None}
#: An ablation is the default with knobs changed: ``default+self_verify=true+lam=0``.
ABLATION_PREFIX = "default+"


@dataclass(frozen=True)
class BenchSettings:
    """Settings shared by every mode of one run (part of every cache key)."""

    max_tokens: int = 128
    segment_tokens: int = 10
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 1234
    lam: float = 1.0
    # The gated modes' lead when it is a member (else the library's rule).
    lead: str | None = DEFAULT_LEAD
    # Copies of the lead in self-fusion (mode `self`).
    self_copies: int = 2
    # Model-exit knobs of the exit modes; None = the library's default.
    exit_rule: str | None = None
    exit_warmup: int | None = None
    exit_margin: float | None = None
    exit_patience: int | None = None
    exit_temperature: float | None = None
    exit_ratio: float | None = None
    min_active: int | None = None

    def exit_settings(self) -> dict[str, Any]:
        """The exit knobs in effect: explicit ones, else FusionSettings' defaults.

        Resolved here so a change of the library's defaults changes the cache key
        of the exit modes instead of silently reusing answers made under the old ones.
        """
        from specfuse.config import FusionSettings

        defaults = FusionSettings()
        chosen = {
            "exit_rule": self.exit_rule,
            "exit_warmup": self.exit_warmup,
            "exit_margin": self.exit_margin,
            "exit_patience": self.exit_patience,
            "exit_temperature": self.exit_temperature,
            "exit_ratio": self.exit_ratio,
            "min_active": self.min_active,
        }
        return {k: getattr(defaults, k) if v is None else v for k, v in chosen.items()}


@dataclass(frozen=True)
class Mode:
    """One way of answering: a member alone, the whole-answer re-ranker, or a fusion mode."""

    name: str
    kind: str  # "solo" | "whole" | "fusion"
    members: tuple[str, ...]
    #: FusionSettings fields the mode changes from the library's defaults (ablations).
    overrides: tuple[tuple[str, Any], ...] = ()
    #: Self-fusion: the one member fused with this many copies of itself.
    copies: int = 1

    def ensemble_members(self) -> list[Any]:
        """The members as EnsembleConfig.build takes them (self-fusion: the copies
        `specfuse select` makes, each sampling with its own seed)."""
        if self.copies == 1:
            return list(self.members)
        from specfuse.config import MemberConfig
        from specfuse.selection import self_fusion

        (member,) = self.members
        return self_fusion(MemberConfig(model=member), self.copies)

    def fusion_settings(self, s: BenchSettings) -> dict[str, Any]:
        """The FusionSettings this mode runs with (whole reuses the solo runs' settings)."""
        common = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        if self.kind in ("solo", "whole"):
            # One segment of max_tokens: a pure single-model answer.
            return {
                **common,
                "solo_segment_tokens": s.max_tokens,
                "lam": 0.0,
                "model_exit": False,
                "gate_logprob": None,
            }
        if self.copies > 1:
            # As `specfuse select` runs self-fusion: the library's verification, every round fused.
            from specfuse.config import FusionSettings

            knobs = {**common, "segment_tokens": s.segment_tokens, "gate_logprob": None}
            return FusionSettings(**knobs).model_dump(mode="json")
        if self.resolved:
            # Every knob resolved, so a change of any library default is a new cache key.
            from specfuse.config import FusionSettings

            lead = {"lead": s.lead} if s.lead in self.members else {}
            knobs = {**common, "segment_tokens": s.segment_tokens, **lead, **dict(self.overrides)}
            return FusionSettings(**knobs).model_dump(mode="json")
        lam = s.lam if "specem" in self.name else 0.0
        fusion = {
            **common,
            **PAPER_VERIFICATION,
            # The paper's loop: every round fused, whatever the library's default gate.
            "gate_logprob": None,
            "segment_tokens": s.segment_tokens,
            "lam": lam,
            "model_exit": "exit" in self.name,
        }
        if fusion["model_exit"]:
            fusion.update(s.exit_settings())
        return fusion

    @property
    def resolved(self) -> bool:
        """The default or an ablation of it: every knob comes from FusionSettings."""
        return self.kind == "fusion" and (self.name == "default" or bool(self.overrides))

    def cache_digest(self, s: BenchSettings) -> str:
        """A hash of everything that changes this mode's answers, and nothing else.

        The default and its ablations hash their resolved settings under one name, so
        two spellings of one configuration (``default`` and, once the library's
        defaults moved to them, ``default+gate_logprob=-0.5``) share their answers.
        """
        fusion = {
            k: v for k, v in self.fusion_settings(s).items() if not (k in INERT_KNOBS and v == INERT_KNOBS[k])
        }
        if fusion.get("gate_logprob") is None:
            # No gate: the same answers whoever leads and however far the lead drafts alone.
            fusion.pop("lead", None)
            fusion.pop("gate_tokens", None)
        name = "default" if self.resolved else self.name
        blob = json.dumps({"mode": name, "members": self.members, "fusion": fusion}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def cache_id(self, s: BenchSettings) -> str:
        """Mode name plus the digest of its answers' settings (the cache file's stem)."""
        return f"{re.sub(r'[^A-Za-z0-9.+-]', '_', self.name)}-{self.cache_digest(s)}"


def parse_ablation(name: str) -> tuple[tuple[str, Any], ...]:
    """``default+self_verify=true+lam=0`` -> (("self_verify", True), ("lam", 0)).

    Values are JSON (true, false, numbers, "quoted strings"); a bare word is a string.
    Every knob is checked against FusionSettings here, so a typo fails before any model loads.
    """
    from specfuse.config import FusionSettings
    from specfuse.errors import ConfigError

    overrides: list[tuple[str, Any]] = []
    for part in name.removeprefix(ABLATION_PREFIX).split("+"):
        key, sep, raw = part.partition("=")
        if not sep or not key or not raw:
            raise SystemExit(
                f"ablation {name!r}: write each change as knob=value, e.g. default+self_verify=true"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.append((key, value))
    try:
        FusionSettings().with_overrides(**dict(overrides))
    except ConfigError as exc:
        raise SystemExit(f"ablation {name!r}: {exc}") from None
    return tuple(overrides)


def expand_modes(
    names: Sequence[str], members: Sequence[str], settings: BenchSettings | None = None
) -> list[Mode]:
    """Mode names -> modes, in the order a prompt runs them (solo answers before `whole`)."""
    ablations = [n for n in names if n.startswith(ABLATION_PREFIX)]
    unknown = set(names) - {*ALL_MODES, SELF_MODE} - set(ablations)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {list(ALL_MODES)}")
    members = tuple(members)
    modes: list[Mode] = []
    if "solo" in names or "whole" in names:
        # `whole` re-ranks the solo answers, so it needs them (they are cached, not run twice).
        modes += [Mode(f"solo:{m}", "solo", (m,)) for m in members]
    if "whole" in names:
        if len(members) < 2:
            raise SystemExit("the whole-answer baseline needs at least two members")
        modes.append(Mode("whole", "whole", members))
    for name in [n for n in ENSEMBLE_MODES if n in names] + ablations:
        if len(members) < 2:
            raise SystemExit(f"mode {name!r} needs at least two members")
        overrides = parse_ablation(name) if name in ablations else ()
        modes.append(Mode(name, "fusion", members, overrides))
    if SELF_MODE in names:
        s = settings or BenchSettings()
        if s.self_copies < 2:
            raise SystemExit(f"self-fusion needs --self-copies of 2 or more, not {s.self_copies}")
        # The lead's copies: the best member alone is the one worth sampling several times.
        lead = s.lead if s.lead in members else members[0]
        modes.append(Mode(f"self:{lead}x{s.self_copies}", "fusion", (lead,), copies=s.self_copies))
    return modes
