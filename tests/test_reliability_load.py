"""A light load test: 8 concurrent fused requests over a real `specfuse serve`.

The light cousin of benchmarks/load.py (32 requests there; here 8 requests of 4 tokens, twice): every request
completes without error, within a bound, and neither the client nor the
server grows its resident memory by more than a generous margin.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from specfuse import EnsembleConfig, SpecFuse
from tests.reliability_fixtures import *  # noqa: F403  (the fixtures)
from tests.reliability_fixtures import MODEL, run
from tests.remote_fixtures import ServerProcess


def load_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("specfuse_load_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_eight_concurrent_fused_requests(upstream: ServerProcess) -> None:
    load = load_module()
    members = [
        {"model": MODEL, "name": name, "backend": "tgi", "urls": [upstream.url], "timeout": 120}
        for name in ("a", "b")
    ]
    fuse = SpecFuse(EnsembleConfig.build(members, temperature=0.0, seed=7))
    assert upstream.proc is not None
    pids = {"client": os.getpid(), "server": upstream.proc.pid}
    report = run(load.burst(fuse, 8, pids, max_tokens=4, segment_tokens=4), 240)
    print("\n".join(report.lines()))
    assert report.errors == []
    assert len(report.latencies) == 8 and report.output_tokens >= 8 and report.wall < 200
    growth = report.rss_growth()
    assert growth["client"] < 200, growth
    assert growth["server"] < 400, growth
    # Bounded, not leaking: a second burst reuses what the first one grew.
    again = run(load.burst(fuse, 8, pids, max_tokens=4, segment_tokens=4), 240)
    run(fuse.aclose(), 10)
    print("\n".join(again.lines()))
    assert again.errors == []
    for name, mib in again.rss_after.items():
        assert mib - report.rss_after[name] < 50, (name, report.rss_after, again.rss_after)
