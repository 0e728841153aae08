"""A real `specfuse gateway` subprocess on a loopback free port, for the gateway tests.

The child runs this worktree's code (PYTHONPATH and cwd point at the repo
root), logs to a file the tests read (to prove no secret reaches the log),
and is stopped by its own handle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.remote_fixtures import ROOT, ChildServer, free_port, wait_healthy


def write_config(path: Path, members: list[dict[str, Any]], fusion: dict[str, Any]) -> Path:
    """An ensemble file as JSON (EnsembleConfig.from_file reads .json as well as .toml)."""
    path.write_text(json.dumps({"members": members, "fusion": fusion}), encoding="utf-8")
    return path


@dataclass
class GatewayProcess(ChildServer):
    config: Path
    log: Path
    api_key: str | None = None
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    stop_wait = 15.0

    def start(self) -> GatewayProcess:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("SPECFUSE_GATEWAY_API_KEY", None)
        cmd = [sys.executable, "-m", "specfuse", "gateway", str(self.config), "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        cmd += list(self.args)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=5)

    def wait_healthy(self, timeout: float = 240.0) -> None:
        assert self.proc is not None
        wait_healthy(
            self.proc,
            self.url,
            timeout,
            what="gateway",
            detail=lambda: self.log.read_text(errors="replace")[-3000:],
            probe_timeout=5.0,
        )
