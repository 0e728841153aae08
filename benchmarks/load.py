"""Load: many concurrent fused requests over local `specfuse serve` endpoints.

Does the client stay correct and lean when a burst of requests shares the
members? We fire N fused requests at once (two members, TGI protocol, small
max_tokens), then report errors, throughput, p50/p95 latency and the resident
memory (RSS) of the client and of each server before and after the burst.
A warm-up request first loads tokenizers and fills caches, so the RSS delta
shows growth caused by the burst itself.

    python benchmarks/load.py                          # starts two TGI servers on loopback
    python benchmarks/load.py -n 32 --max-tokens 8 --write-results
    python benchmarks/load.py --urls http://127.0.0.1:8080 http://127.0.0.1:8081 --models m1 m2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specfuse import EnsembleConfig, SpecFuse  # noqa: E402

PROMPTS = [
    "Name three primary colours.",
    "What is the capital of France?",
    "Give one tip for sleeping well.",
    "Say hello in Spanish.",
]
MB = 1024 * 1024


@dataclass
class LoadReport:
    """What one burst measured (seconds, MiB)."""

    requests: int
    errors: list[str]
    wall: float
    latencies: list[float]
    output_tokens: int
    rss_before: dict[str, float] = field(default_factory=dict)
    rss_after: dict[str, float] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p95(self) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=20, method="inclusive")[-1]

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return (self.requests - len(self.errors)) / self.wall

    def rss_growth(self) -> dict[str, float]:
        return {k: self.rss_after[k] - self.rss_before.get(k, 0.0) for k in self.rss_after}

    def lines(self) -> list[str]:
        out = [
            f"requests: {self.requests}, errors: {len(self.errors)}",
            f"wall: {self.wall:.1f} s, throughput: {self.throughput:.2f} req/s, "
            f"{self.output_tokens / self.wall:.1f} output tokens/s",
            f"latency p50: {self.p50:.1f} s, p95: {self.p95:.1f} s",
        ]
        for name in self.rss_after:
            out.append(
                f"RSS {name}: {self.rss_before.get(name, 0):.0f} -> {self.rss_after[name]:.0f} MiB "
                f"({self.rss_growth()[name]:+.0f})"
            )
        return out


def rss(pids: dict[str, int]) -> dict[str, float]:
    """Resident memory in MiB per named process."""
    return {name: psutil.Process(pid).memory_info().rss / MB for name, pid in pids.items()}


async def burst(fuse: SpecFuse, n: int, pids: dict[str, int], **settings: Any) -> LoadReport:
    """Warm up once, then run n fused requests at once; measure latency, errors and RSS."""
    await fuse.astart()
    await fuse.agenerate(PROMPTS[0], **settings)  # warm-up: tokenizers, clients, caches
    before = rss(pids)

    async def one(i: int) -> tuple[float, int, str | None]:
        t0 = time.perf_counter()
        try:
            result = await fuse.agenerate(PROMPTS[i % len(PROMPTS)], **settings)
        except Exception as exc:  # a benchmark reports failures instead of stopping at the first
            return time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - t0, result.usage.output_tokens, None

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    return LoadReport(
        requests=n,
        errors=[e for _, _, e in results if e],
        wall=wall,
        latencies=sorted(lat for lat, _, e in results if not e),
        output_tokens=sum(t for _, t, _ in results),
        rss_before=before,
        rss_after=rss(pids),
    )


def start_servers(models: list[str]) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """`specfuse serve` per model on a free loopback port (TGI protocol, prefill log-probs on)."""
    from tests.remote_fixtures import ServerProcess

    servers = [ServerProcess(m, "tgi", ("--enable-prefill-logprobs",)).start() for m in models]
    try:
        for server in servers:
            server.wait_healthy()
    except BaseException:  # Ctrl-C or a failed start: leave no server behind
        for server in servers:
            server.stop()
        raise
    return [(s.url, s.proc) for s in servers]  # type: ignore[misc]


def write_results(report: LoadReport, args: argparse.Namespace) -> None:
    """Append (or replace) our own "## Load" section; other sections are left as they are."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    section = "\n".join(
        [
            "## Load",
            "",
            f"`python benchmarks/load.py -n {args.n} --max-tokens {args.max_tokens} "
            f"--segment-tokens {args.segment_tokens}`: {args.n} concurrent fused requests, two members "
            f"({', '.join(args.models)}) over local `specfuse serve --protocol tgi` on loopback, "
            "greedy; a 2-core machine shared with other work, so absolute times are pessimistic.",
            "",
            *(f"- {line}" for line in report.lines()),
            "",
        ]
    )
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"  # re-read now
    start = text.find("## Load\n")
    if start != -1:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def burst_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of a burst, shared with benchmarks/gateway_load.py (which adds its own)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=32, help="concurrent requests")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--segment-tokens", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = burst_parser(__doc__)
    parser.add_argument("--urls", nargs="+", help="existing TGI-protocol servers (default: start them)")
    parser.add_argument("--write-results", action="store_true", help="write the '## Load' section")
    args = parser.parse_args(argv)

    started = [] if args.urls else start_servers(args.models)
    urls = args.urls or [u for u, _ in started]
    pids = {"client": os.getpid()}
    pids.update({f"server {m}": p.pid for m, (_, p) in zip(args.models, started, strict=False)})
    members = [
        {"model": m, "name": f"{m}#{i}", "backend": "tgi", "urls": [u], "timeout": 300}
        for i, (m, u) in enumerate(zip(args.models, urls, strict=True))
    ]
    fuse = SpecFuse(EnsembleConfig.build(members, temperature=0.0, seed=7))
    try:
        report = asyncio.run(
            burst(fuse, args.n, pids, max_tokens=args.max_tokens, segment_tokens=args.segment_tokens)
        )
    finally:
        for _, proc in started:
            proc.terminate()  # our own children, by handle
            proc.wait(10)
    for line in report.lines():
        print(line)
    for error in report.errors[:5]:
        print("error:", error)
    if args.write_results:
        write_results(report, args)
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
