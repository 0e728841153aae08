"""How often vLLM's token-in route loses a scoring's answer, and which retry recovers it.

On the token path (`specfuse/backends/vllm_tokens.py`) a scoring asks vLLM for
prompt log-probs while reading its prefix cache. vLLM 0.32 fills the cached
positions of that answer from a buffer it never writes
(`LogprobsTensors.empty_cpu` in vllm/v1/outputs.py, called from
`GPUModelRunner._get_prompt_logprobs_dict`); when that memory holds a NaN the
JSON encoder refuses the answer (HTTP 400 "Out of range float values are not
JSON compliant") after the server computed it. After the last lost try the
scoring falls back to echo, which re-reads the whole context.

For each context (about 1000 and 3000 tokens, each with a fresh first token),
the script sends a draft that puts the context in the cache, then scores two
new 10-token candidates on it, each with up to 8 tries under one of two retry
rules, alternating which goes first:

- "same": every try asks for the same answer (`prompt_logprobs` 0);
- "wider": try i asks for i top log-probs per position (what the library does).

It prints, per rule, how many first tries were lost, and of those how many the
second try answered, a later try answered, and none of 8 did.

    .venv/bin/python benchmarks/vllm_lost_tries.py --vllm-python .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from rich.console import Console
from rich.table import Table

from specfuse.backends.vllm_tokens import TOKENS_ROUTE
from specfuse.models import resolve_model_path
from tests.vllm_server import SLOW_CPU_ENV, launch_vllm, scale_out_args

_TRIES = 8
_SOURCES = ("argparse", "asyncio", "collections", "decimal", "email", "json", "logging", "pathlib")


def answered(url: str, model: str, ids: list[int], width: int) -> bool:
    """Whether one token-in scoring came back (False: vLLM could not encode it)."""
    # vLLM skips reading its cache for a prompt-log-prob request unless told otherwise,
    # and only cached positions are at risk.
    params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": width, "detokenize": False}
    params["skip_reading_prefix_cache"] = False
    body = {"model": model, "token_ids": ids, "sampling_params": params}
    response = httpx.post(url + TOKENS_ROUTE, json=body, timeout=600)
    if response.status_code == 400 and "JSON compliant" in response.text:
        return False
    response.raise_for_status()
    return True


def first_answer(url: str, model: str, ids: list[int], rule: str) -> int | None:
    """The index of the try that answered, None when none of them did."""
    for attempt in range(_TRIES):
        if answered(url, model, ids, attempt if rule == "wider" else 0):
            return attempt
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", required=True, help="python of a vLLM venv; the script starts it")
    parser.add_argument("--model", default="smollm2-135m", help="store name of the served model")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1000, 3000])
    parser.add_argument("--per-context", type=int, default=50, help="contexts of each length")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    model_dir = str(resolve_model_path(args.model))
    started = launch_vllm(
        args.vllm_python,
        model_dir,
        (args.model,),
        max_model_len=4096,
        enforce_eager=False,
        extra_args=(*scale_out_args(8192), "--block-size", str(args.block_size)),
        env={"VLLM_CPU_KVCACHE_SPACE": "1", **SLOW_CPU_ENV},
        timeout=900,
    )
    url, rng = started.url, random.Random(args.seed)
    outcomes: dict[str, Counter[str]] = {"same": Counter(), "wider": Counter()}
    try:
        text = "".join((importlib.import_module(n).__doc__ or "") + "\n" for n in _SOURCES * 5)
        tokenized = httpx.post(
            url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60
        )
        ids = [int(t) for t in tokenized.json()["tokens"]]
        for length in args.contexts:
            for j in range(args.per_context):
                context = [rng.randrange(1000, 40000), *ids[j * 7 : j * 7 + length - 1]]
                draft = {"max_tokens": 10, "temperature": 0.8, "logprobs": 0, "detokenize": False}
                httpx.post(
                    url + TOKENS_ROUTE,
                    json={"model": args.model, "token_ids": context, "sampling_params": draft},
                    timeout=600,
                ).raise_for_status()
                for rule in ("same", "wider") if j % 2 else ("wider", "same"):
                    candidate = [rng.randrange(1000, 40000) for _ in range(10)]
                    got = first_answer(url, args.model, context + candidate, rule)
                    kind = {None: "none of 8", 0: "first try", 1: "second try"}.get(got, "a later try")
                    outcomes[rule][kind] += 1
    finally:
        started.stop()

    table = Table(title=f"token-in scorings on vLLM ({args.model}, block {args.block_size})")
    columns = ("retry rule", "scorings", "first try lost", "second try answered", "a later try", "none of 8")
    for column in columns:
        table.add_column(column, justify="right")
    for rule, seen in outcomes.items():
        lost = sum(seen.values()) - seen["first try"]
        table.add_row(
            rule,
            str(sum(seen.values())),
            str(lost),
            str(seen["second try"]),
            str(seen["a later try"]),
            str(seen["none of 8"]),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
