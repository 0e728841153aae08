"""Gateway load: N concurrent streams through R `specfuse gateway` replicas over shared members.

What a deployment needs to know: under a burst, does every stream arrive whole
and unmixed, and what does the HTTP hop cost against calling the engine
in-process? One run measures both on the same member servers:

1. in-process: one SpecFuse engine runs the N requests at once (astream);
2. gateway: N streams with the official openai client, request i to replica
   i mod R (a round-robin load balancer's choice), each replica a real
   uvicorn subprocess with the same members.

Every answer is greedy, so the gateway's answer to prompt i must equal the
in-process answer to prompt i: a lost, cut or mixed stream shows as a
mismatch. The table gives p50/p95 time to first segment and total per
request, both ways, and their ratios (gateway / in-process) from this run.

    python benchmarks/gateway_load.py                      # 32 streams, 2 replicas, two members started here
    python benchmarks/gateway_load.py -n 32 --replicas 2 --max-tokens 8 --segment-tokens 4
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from benchmarks.load import burst_parser  # noqa: E402
from specfuse import EnsembleConfig, SpecFuse  # noqa: E402
from tests.gateway_fixtures import GatewayProcess, write_config  # noqa: E402
from tests.remote_fixtures import ServerProcess  # noqa: E402

KEY = "sk-bench"
MODEL = "fused"


def prompt(i: int) -> str:
    # Distinct prompts, so an answer delivered to the wrong stream cannot match.
    return f"Question {i}: what is {i} plus {i + 1}? Answer in one short sentence."


@dataclass
class Run:
    """One burst: per request time to first segment, total time, and the answer text."""

    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0

    def record(self, i: int, t0: float, first: float | None, parts: list[str]) -> None:
        """Request i, started at t0, answered `parts` (its first text after `first` seconds)."""
        self.total.append(time.perf_counter() - t0)
        self.first.append(first if first is not None else self.total[-1])
        self.texts[i] = "".join(parts)

    async def burst(self, n: int, one: Callable[[int], Awaitable[None]]) -> None:
        """Requests 0..n-1 at once, each by `one(i)`; `wall` is the whole burst's time."""
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        self.wall = time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[round(q * 100) - 1]


async def in_process(fuse: SpecFuse, n: int, settings: dict[str, Any]) -> Run:
    run = Run()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        first: float | None = None
        parts = []
        try:
            async for segment in fuse.astream(prompt(i), **settings):
                if segment.text and first is None:
                    first = time.perf_counter() - t0
                parts.append(segment.text)
        except Exception as exc:  # a benchmark reports failures instead of stopping at the first
            run.errors.append(f"in-process {i}: {type(exc).__name__}: {exc}")
            return
        run.record(i, t0, first, parts)

    await run.burst(n, one)
    return run


async def through_gateways(urls: list[str], n: int, settings: dict[str, Any]) -> Run:
    run = Run()
    clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key=KEY, max_retries=0, timeout=600) for u in urls]
    extension = {"segment_tokens": settings["segment_tokens"]}

    async def one(i: int) -> None:
        client = clients[i % len(clients)]
        t0 = time.perf_counter()
        first: float | None = None
        parts = []
        ids = set()
        finished = False
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt(i)}],
                max_tokens=settings["max_tokens"],
                stream=True,
                extra_body={"specfuse_fusion": extension},
            )
            async for chunk in stream:
                ids.add(chunk.id)
                if not chunk.choices:
                    continue
                text = chunk.choices[0].delta.content
                if text:
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(text)
                finished = finished or chunk.choices[0].finish_reason is not None
        except Exception as exc:
            run.errors.append(f"gateway {i}: {type(exc).__name__}: {exc}")
            return
        if not finished or len(ids) != 1:
            run.errors.append(f"gateway {i}: finished={finished}, chunk ids={len(ids)}")
            return
        run.record(i, t0, first, parts)

    await run.burst(n, one)
    for client in clients:
        await client.close()
    return run


def table(local: Run, gateway: Run, n: int, replicas: int) -> list[str]:
    rows = [
        ("time to first segment p50 (s)", pct(local.first, 0.5), pct(gateway.first, 0.5)),
        ("time to first segment p95 (s)", pct(local.first, 0.95), pct(gateway.first, 0.95)),
        ("total p50 (s)", pct(local.total, 0.5), pct(gateway.total, 0.5)),
        ("total p95 (s)", pct(local.total, 0.95), pct(gateway.total, 0.95)),
        ("burst wall time (s)", local.wall, gateway.wall),
    ]
    lines = [
        f"| {n} concurrent requests | in-process engine | {replicas} gateway replicas (streams) | ratio |",
        "|---|---|---|---|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = burst_parser(__doc__)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args(argv)
    settings = {"max_tokens": args.max_tokens, "segment_tokens": args.segment_tokens}

    servers = [ServerProcess(m, "tgi", ("--enable-prefill-logprobs",)).start() for m in args.models]
    gateways: list[GatewayProcess] = []
    folder = Path(tempfile.mkdtemp(prefix="gateway-load-"))
    try:
        for server in servers:
            server.wait_healthy()
        members = [
            {"model": s.model, "name": f"{s.model}#{i}", "backend": "tgi", "urls": [s.url], "timeout": 300}
            for i, s in enumerate(servers)
        ]
        fusion = {"temperature": 0.0, "seed": 7}
        config = write_config(folder / "ensemble.json", members, fusion)

        fuse = SpecFuse(EnsembleConfig.build(members, **fusion))
        asyncio.run(fuse.astart())
        asyncio.run(in_process(fuse, 1, settings))  # warm-up: tokenizers, connections, server caches
        local = asyncio.run(in_process(fuse, args.n, settings))

        gateways = [
            GatewayProcess(
                config,
                folder / f"gateway{r}.log",
                api_key=KEY,
                args=("--model-name", MODEL, "--max-concurrent", str(args.n), "--log-level", "warning"),
            ).start()
            for r in range(args.replicas)
        ]
        for g in gateways:
            g.wait_healthy()
        urls = [g.url for g in gateways]
        asyncio.run(through_gateways(urls, len(urls), settings))  # warm-up, one request per replica
        remote = asyncio.run(through_gateways(urls, args.n, settings))
    finally:
        for g in gateways:
            g.stop()
        for server in servers:
            server.stop()

    lost = args.n - len(remote.texts)
    mixed = [i for i, text in remote.texts.items() if i in local.texts and text != local.texts[i]]
    print(
        f"{args.n} streams through {args.replicas} replicas over {len(servers)} shared `specfuse serve` "
        f"members ({', '.join(args.models)}), greedy, max_tokens {args.max_tokens}, "
        f"segment_tokens {args.segment_tokens}"
    )
    print(
        f"lost or cut: {lost}; answers differing from the in-process answer to the same prompt: {len(mixed)}"
    )
    print()
    for line in table(local, remote, args.n, args.replicas):
        print(line)
    for error in (local.errors + remote.errors)[:5]:
        print("error:", error)
    return 1 if lost or mixed or local.errors or remote.errors else 0


if __name__ == "__main__":
    sys.exit(main())
