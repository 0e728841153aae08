"""What a fused answer costs a real vLLM server, read from the server's own /metrics.

For contexts of about 100, 1000 and 3000 tokens and 2 and 3 members (the
same model as separate members on one server, sampled so their drafts
differ), run one fused answer (exit off) and one solo answer of the same
length, and diff vLLM's Prometheus counters around each:

- prompt tokens computed: `vllm:prompt_tokens_total - vllm:prompt_tokens_cached_total`
- prompt tokens read from the prefix cache: `vllm:prompt_tokens_cached_total`
- generated tokens: `vllm:generation_tokens_total`
- engine requests: `vllm:request_success_total` (all finish reasons)

(names from vllm/v1/metrics/loggers.py, `PrometheusStatLogger`). Compute is
prompt tokens computed + generated tokens; the table prints fused / solo and
that ratio divided by the number of members N (goal: <= 1.5 on the cheapest
path at ~1000 tokens with 3 members). Each scoring path is run: "echo"
(/v1/completions, the whole prompt re-read per request) and "tokens"
(/inference/v1/generate with the prefix cache read). The trace's own per-call
`prompt_tokens_computed` sum is printed beside the server's figure, with
"+ <=U" when some token-route tries were lost (vLLM computed them, then could
not encode their answer), whose cache use the trace cannot know.

Each measurement starts its prompt with a fresh nonce (new on every run), so
no answer finds another's context in the cache; the chat template's few
tokens before the nonce are shared, but a cache block is 16 (GPU) or 128
(CPU) tokens, and the block holding the nonce is new.

On the token path a candidate whose first tokens an earlier request put in
the cache (a draft on the same server fills a block once (C mod B) + s >= B)
takes those positions' log-probs from that request's answer
(`specfuse/backends/known_logprobs.py`); path "tokens-no-reuse" scores such
a candidate by echo instead, as before, for a comparison in one run.
`--modes fused default` runs each answer both ways: "fused" calls every member
every round (the paper's loop: what verification costs at most) and "default"
is the library as shipped, gated (the first member drafts alone, and a full
round runs only from the first token it is unsure of).
`--block-size` sets the servers' cache block (the CPU build takes multiples
of 32; GPU builds default to 16) and `--separate` gives each member its own
server, where only a verifier's own requests share its cache.

    # a server this script starts (and stops) from a vLLM virtual environment:
    .venv/bin/python benchmarks/server_cost.py --vllm-python .venv-vllm/bin/python
    .venv/bin/python benchmarks/server_cost.py --vllm-python .venv-vllm/bin/python \
        --block-size 32 --separate --members 3 --paths tokens tokens-no-reuse
    # or one already running with --enable-scale-out --enable-prompt-tokens-details:
    .venv/bin/python benchmarks/server_cost.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from specfuse import EnsembleConfig, MemberConfig, SpecFuse  # noqa: E402
from specfuse.backends.vllm import VLLMBackend  # noqa: E402
from specfuse.models import resolve_model_path  # noqa: E402
from tests.vllm_server import SLOW_CPU_ENV, launch_vllm, scale_out_args  # noqa: E402

#: Varied prose for the retrieved "documents" (standard-library docstrings: fixed per Python version).
_SOURCES = ("argparse", "asyncio", "collections", "decimal", "email", "json", "logging", "pathlib")
_METRIC = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")


@dataclass(frozen=True)
class Cost:
    """Counter deltas of one answer."""

    prompt: float
    cached: float
    generated: float
    requests: float

    @property
    def computed(self) -> float:
        return self.prompt - self.cached

    @property
    def compute(self) -> float:
        """Prompt tokens computed + generated tokens: the server's forward-pass work."""
        return self.computed + self.generated


def read_counters(url: str) -> dict[str, float]:
    """Sums of the vLLM counters this benchmark reads, over all label sets."""
    text = httpx.get(url + "/metrics", timeout=30).text
    wanted = {
        "vllm:prompt_tokens_total": "prompt",
        "vllm:prompt_tokens_cached_total": "cached",
        "vllm:generation_tokens_total": "generated",
        "vllm:request_success_total": "requests",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m["name"] in wanted:
            out[wanted[m["name"]]] += float(m["value"])
    return out


@contextmanager
def measured(urls: list[str]) -> Iterator[list[Cost]]:
    """Yields a list that holds the counter deltas of the block, summed over the servers, once it ends."""
    box: list[Cost] = []
    before = [read_counters(url) for url in urls]
    yield box
    time.sleep(0.5)  # the engine publishes its stats a moment after the response
    after = [read_counters(url) for url in urls]
    box.append(Cost(**{k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in before[0]}))


def documents(tokens: int, tokenize: Any) -> str:
    """About `tokens` tokens of varied prose."""
    import importlib

    text = ""
    for name in _SOURCES * 20:
        text += (importlib.import_module(name).__doc__ or "") + "\n"
        if len(tokenize(text)) >= tokens:
            break
    ids = tokenize(text)[:tokens]
    return str(httpx.post(URL + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"])


URL = ""
#: Every server of the run: URL alone, or one per member (--separate).
URLS: list[str] = []


def tokenize(text: str) -> list[int]:
    data = httpx.post(URL + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
    return [int(t) for t in data.json()["tokens"]]


def messages(docs: str, nonce: int) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": f"Request {nonce}. Read these documents.\n\n{docs}\n\n"
            "Question: what are these documents about? Answer in two sentences.",
        }
    ]


def fused(
    model: str,
    members: int,
    path: str,
    msgs: list[dict[str, str]],
    max_tokens: int,
    seed: int,
    mode: str = "fused",
) -> tuple[Any, Cost]:
    config = EnsembleConfig.build(
        [
            MemberConfig(
                model=model,
                name=f"m{i + 1}",
                backend="vllm",
                urls=[URLS[i % len(URLS)]],
                scoring=path.removesuffix("-no-reuse"),
                timeout=600,
            )
            for i in range(members)
        ],
        temperature=0.8,
        max_tokens=max_tokens,
        model_exit=False,
        # "fused": every round, what verification costs the servers at most; "default":
        # the library's gate, which skips verification in the rounds the lead is sure of.
        **({"gate_logprob": None} if mode == "fused" else {}),
    )
    fuse = SpecFuse(config)
    for m in fuse.start():  # probes happen here, outside the measured block
        took = m.info.extra.get("scoring_path")
        if took != path.removesuffix("-no-reuse"):
            raise SystemExit(f"member {m.name} scores by {took!r}, not {path!r}: {m.info.extra}")
        if path == "tokens-no-reuse":
            # Without the store of known log-probs a candidate the cache reaches into goes to echo.
            m.backend._known = None  # type: ignore[attr-defined]
    with measured(URLS) as box:
        result = fuse.generate(msgs, seed=seed)
    fuse.close()
    return result, box[0]


def solo(model: str, msgs: list[dict[str, str]], tokens: int) -> Cost:
    """One completion of exactly `tokens` tokens on the member's own rendering of the prompt."""
    backend = VLLMBackend(MemberConfig(model=model, backend="vllm", urls=[URL]))
    prompt = asyncio.run(backend.render_chat(msgs))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.0,
    }
    with measured([URL]) as box:
        httpx.post(URL + "/v1/completions", json=body, timeout=600).raise_for_status()
    return box[0]


@contextmanager
def server(python: str, model_dir: str, max_model_len: int, block_size: int | None = None) -> Iterator[str]:
    started = launch_vllm(
        python,
        model_dir,
        (os.path.basename(model_dir),),
        max_model_len=max_model_len,
        enforce_eager=False,  # vLLM's default, compiled, as this benchmark has always run
        extra_args=(
            # No chunked prefill (see scale_out_args): seeded drafts of 3000-token prompts
            # are chunked with vLLM's default step budget.
            *scale_out_args(2 * max_model_len),
            *(["--block-size", str(block_size)] if block_size else []),
        ),
        env={
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **SLOW_CPU_ENV,
        },
        timeout=900,
    )
    try:
        yield started.url
    finally:
        started.stop()


def main() -> None:
    global URL
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running vLLM started with the two flags above")
    where.add_argument("--vllm-python", help="python of a vLLM venv; the script starts the server")
    parser.add_argument("--model", default="smollm2-135m", help="store name of the served model")
    parser.add_argument("--contexts", nargs="+", type=int, default=[100, 1000, 3000])
    parser.add_argument("--members", nargs="+", type=int, default=[2, 3])
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["echo", "tokens"],
        choices=["echo", "tokens", "tokens-no-reuse"],
        help="tokens-no-reuse: the token path scoring cached candidate positions by echo (before 2026-12-04)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["fused"],
        choices=["fused", "default"],
        help="fused: every round fused (exit off); default: the library's gated fusion (exit off)",
    )
    parser.add_argument("--max-tokens", type=int, default=20, help="answer length (2 rounds of 10)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--block-size",
        type=int,
        help="prefix-cache block of the servers started (default: 128 on CPU)",
    )
    parser.add_argument(
        "--separate",
        action="store_true",
        help="one server per member (with --vllm-python), instead of every member on one server",
    )
    args = parser.parse_args()
    if args.separate and not args.vllm_python:
        parser.error("--separate starts its servers: give --vllm-python")

    model_dir = str(resolve_model_path(args.model))
    with ExitStack() as stack:
        if args.vllm_python:
            count = max(args.members) if args.separate else 1
            for _ in range(count):
                URLS.append(stack.enter_context(server(args.vllm_python, model_dir, 4096, args.block_size)))
        else:
            URLS.append(args.url.rstrip("/"))
        URL = URLS[0]
        block = int(
            re.search(r'block_size="(\d+)"', httpx.get(URL + "/metrics", timeout=30).text).group(1)  # type: ignore[union-attr]
        )
        served = httpx.get(URL + "/v1/models", timeout=30).json()["data"][0]["id"]
        model = args.model if served == args.model else served
        rows = []
        # Nonces no earlier run on this server used: its prefix cache may still hold those prompts.
        nonce = time.time_ns() // 1000 % 10**9
        for ctx in args.contexts:
            docs = documents(ctx, tokenize)
            for n in args.members:
                for path, mode in [(p, m) for p in args.paths for m in args.modes]:
                    nonce += 1
                    msgs = messages(docs, nonce)
                    result, cost = fused(model, n, path, msgs, args.max_tokens, seed=nonce, mode=mode)
                    answer = result.trace.completion_tokens
                    nonce += 1
                    alone = solo(model, messages(docs, nonce), answer)
                    summary = result.trace.summary()
                    trace_computed = summary["prompt_tokens_computed"]
                    row = {
                        "context_tokens": len(tokenize(docs)),
                        "members": n,
                        "path": path,
                        "mode": mode,
                        # Rounds the lead's segment was accepted without a full round.
                        "gated_rounds": sum(bool(r.gated) for r in result.trace.rounds),
                        "block": block,
                        "servers": len(URLS),
                        # Candidates scored by echo after the token path, by reason.
                        "echo_fallbacks": summary["echo_fallbacks"],
                        "answer_tokens": answer,
                        "rounds": len(result.trace.rounds),
                        "fused_prompt_computed": cost.computed,
                        "fused_prompt_cached": cost.cached,
                        "fused_generated": cost.generated,
                        "fused_requests": cost.requests,
                        "trace_prompt_computed": trace_computed,
                        "trace_prompt_unmetered": summary["prompt_tokens_unmetered"],
                        "solo_prompt_computed": alone.computed,
                        "solo_generated": alone.generated,
                        "ratio": cost.compute / alone.compute,
                        "ratio_per_member": cost.compute / alone.compute / n,
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)

    def fallbacks(reasons: dict[str, int]) -> str:
        detail = ", ".join(f"{why} {n}" for why, n in sorted(reasons.items()))
        return f"{sum(reasons.values())} ({detail})" if reasons else "0"

    table = Table(title=f"server compute per answer, {args.model} on vLLM (from /metrics)")
    heads = (
        "context",
        "N",
        "path",
        "mode",
        "block",
        "servers",
        "echo fallbacks",
        "answer tok",
        "rounds (gated)",
        "prompt computed",
        "prompt cached",
        "generated",
        "requests",
        "trace computed",
        "solo computed+gen",
        "fused/solo",
        "/N",
    )
    for h in heads:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(
            str(r["context_tokens"]),
            str(r["members"]),
            r["path"],
            r["mode"],
            str(r["block"]),
            str(r["servers"]),
            fallbacks(r["echo_fallbacks"]),
            str(r["answer_tokens"]),
            f"{r['rounds']} ({r['gated_rounds']})",
            f"{r['fused_prompt_computed']:.0f}",
            f"{r['fused_prompt_cached']:.0f}",
            f"{r['fused_generated']:.0f}",
            f"{r['fused_requests']:.0f}",
            # "+ up to U": tokens of token-route tries vLLM computed but could not answer.
            f"{r['trace_prompt_computed']}"
            + (f" + <={r['trace_prompt_unmetered']}" if r["trace_prompt_unmetered"] else ""),
            f"{r['solo_prompt_computed']:.0f}+{r['solo_generated']:.0f}",
            f"{r['ratio']:.2f}",
            f"{r['ratio_per_member']:.2f}",
        )
    Console(width=200).print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
