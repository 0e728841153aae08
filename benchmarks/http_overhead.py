"""How much does the fusion loop add on top of the HTTP calls it must make?

Per round the engine records `critical_path` (the slowest chain draft ->
its verifications: the time no orchestration could save) and `wall_time`.
Their ratio is the orchestration overhead; the goal is <= 1.10. Draft and
verify columns are the slowest draft call and the slowest score call of the
round, from the trace's CallRecords.

    python benchmarks/http_overhead.py                 # starts two TGI servers on loopback
    python benchmarks/http_overhead.py --protocol sglang
    python benchmarks/http_overhead.py --urls http://a:8080 http://b:8080 --models m1 m2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
from rich.console import Console
from rich.table import Table

from specfuse import EnsembleConfig, SpecFuse

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name three primary colours.", "Give one tip for writing clear code."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_servers(models: list[str], protocol: str) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    """One `specfuse serve` per model; returns their URLs once healthy."""
    procs, urls = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for model in models:
        port = _free_port()
        args = [sys.executable, "-m", "specfuse.devserver", model, "--protocol", protocol]
        args += ["--port", str(port)]
        if protocol == "tgi":
            args.append("--enable-prefill-logprobs")
        procs.append(
            subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 300
    for url in urls:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become healthy")
            time.sleep(0.3)
    return urls, procs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("tgi", "vllm", "sglang"), default="tgi")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument(
        "--urls", nargs="+", default=None, help="use running servers instead of starting them"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    args = parser.parse_args(argv)

    procs: list[subprocess.Popen[bytes]] = []
    urls = args.urls
    if urls is None:
        urls, procs = start_servers(args.models, args.protocol)
    try:
        members = [
            {"model": m, "backend": args.protocol, "urls": [u], "timeout": 120.0}
            for m, u in zip(args.models, urls, strict=True)
        ]
        fuse = SpecFuse(EnsembleConfig.build(members, temperature=0.0, max_tokens=args.max_tokens, seed=1))
        fuse.start()
        fuse.generate("Warm up.", max_tokens=4)  # first-call costs (connections, caches) are not the loop's
        table = Table(title=f"HTTP overhead per round ({args.protocol}, {len(members)} members)")
        for column in (
            "prompt",
            "round",
            "draft s",
            "verify s",
            "critical s",
            "wall s",
            "orch. ms",
            "wall/crit",
        ):
            table.add_column(column, justify="right")
        total_wall = total_crit = 0.0
        for p_index, prompt in enumerate(PROMPTS[: args.prompts], 1):
            result = fuse.generate(prompt)
            for rnd in result.trace.rounds:
                drafts = [c.latency for c in rnd.calls if c.kind == "draft"]
                scores = [c.latency for c in rnd.calls if c.kind == "score"]
                crit = rnd.critical_path or rnd.wall_time
                total_wall += rnd.wall_time
                total_crit += crit
                table.add_row(
                    str(p_index),
                    str(rnd.index),
                    f"{max(drafts, default=0):.3f}",
                    f"{max(scores, default=0):.3f}",
                    f"{crit:.3f}",
                    f"{rnd.wall_time:.3f}",
                    f"{(rnd.wall_time - crit) * 1000:.1f}",
                    f"{rnd.wall_time / crit:.3f}" if crit else "-",
                )
        fuse.close()
        ratio = total_wall / total_crit if total_crit else float("nan")
        table.add_section()
        table.add_row(
            "all",
            "",
            "",
            "",
            f"{total_crit:.3f}",
            f"{total_wall:.3f}",
            f"{(total_wall - total_crit) * 1000:.1f}",
            f"{ratio:.3f}",
        )
        console = Console()
        console.print(table)
        verdict = "[green]meets[/]" if ratio <= 1.10 else "[red]misses[/]"
        console.print(f"wall / critical path = {ratio:.3f} ({verdict} the <= 1.10 goal)")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
