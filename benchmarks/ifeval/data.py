"""IFEval data: the prompts file, the offline environment, and if-verifiable's verdict on an answer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: The 150-prompt development split, shipped with the harness (data/README.md says where it comes from).
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "dev.jsonl"


def setup_environment() -> None:
    """Offline model loading, and NLTK data from llama-index-core.

    Must run before nltk is imported: nltk reads NLTK_DATA once, at import.
    Some IFEval checkers tokenise sentences (punkt_tab); llama-index-core ships
    it, so nothing is downloaded.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from specfuse.selection import shipped_nltk_data

    cache = shipped_nltk_data()
    current = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if cache is not None and str(cache) not in current:
        os.environ["NLTK_DATA"] = os.pathsep.join([*current, str(cache)])


@dataclass(frozen=True)
class Prompt:
    """One IFEval sample, as in the jsonl file."""

    key: int | str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


def load_prompts(path: Path, limit: int | None = None, start: int = 0) -> list[Prompt]:
    """Read an IFEval-format jsonl file (fields key, prompt, instruction_id_list, kwargs).

    ``start`` skips the first prompts, so a later slice of the file can serve as a
    held-out split for choosing defaults.
    """
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = rows[start:] if limit is None else rows[start : start + limit]
    return [Prompt(row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]) for row in rows]


@dataclass(frozen=True)
class Score:
    """if-verifiable's verdict on one response: per instruction, strict and loose."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def prompt_strict(self) -> bool:
        return bool(self.strict) and all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return bool(self.loose) and all(self.loose)


def score_response(prompt: Prompt, response: str) -> Score:
    """Score with if-verifiable's own entry point, the path every number here goes through.

    An empty response fails every instruction (the package returns no
    per-instruction results for it, so we fill them in as failures to keep the
    instruction-level denominator the same for every mode).
    """
    from specfuse.selection import ifeval_results

    row = {"key": prompt.key, "prompt": prompt.prompt}
    results = ifeval_results(
        row | {"instruction_id_list": prompt.instruction_id_list, "kwargs": prompt.kwargs}, response
    )
    if not results:
        n = len(prompt.instruction_id_list)
        return Score((False,) * n, (False,) * n)
    return Score(tuple(r.strict_pass for r in results), tuple(r.loose_pass for r in results))
