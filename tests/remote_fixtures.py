"""Real `specfuse serve` subprocesses on loopback, and a tiny fault-injecting server.

Import the fixtures into a test module (`from tests.remote_fixtures import ...`).
Servers start once per session and protocol; asking for another protocol
stops the previous pair first, so at most two models sit in memory at once
on this small machine (group a protocol's tests in one module).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parents[1]
PAIR = ("smollm2-135m", "gemma3-270m")
FUSION = {"temperature": 0.0, "max_tokens": 24, "seed": 7}
PROMPT = "Name three primary colours."
#: A TGI /generate answer with one drafted token, for scripted servers (FaultServer).
TGI_GENERATE_OK = {
    "generated_text": " hi",
    "details": {
        "finish_reason": "length",
        "generated_tokens": 1,
        "seed": None,
        "prefill": [],
        "tokens": [{"id": 1, "text": " hi", "logprob": -0.5, "special": False}],
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    proc: subprocess.Popen[bytes],
    url: str,
    timeout: float,
    *,
    what: str,
    detail: Callable[[], str],
    every: float = 0.3,
    probe_timeout: float = 2.0,
) -> None:
    """Wait until the child server `proc` answers GET url/health with 200; raise
    RuntimeError when it exits first and TimeoutError after `timeout` seconds, each
    with `detail()` (the child's log, say)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{detail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not healthy after {timeout:.0f}s:\n{detail()}")
        try:
            if httpx.get(url + "/health", timeout=probe_timeout).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(every)


class ChildServer:
    """A server subprocess on loopback `port` (`proc` once started), stopped by its own handle."""

    port: int
    proc: subprocess.Popen[bytes] | None
    #: Seconds a stopped child has to exit before it is killed.
    stop_wait = 10.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its handle
            try:
                self.proc.wait(self.stop_wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class ServerProcess(ChildServer):
    """One `python -m specfuse.devserver` child process."""

    model: str
    protocol: str
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "specfuse.devserver", self.model, "--protocol", self.protocol]
        cmd += ["--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self

    def wait_healthy(self, timeout: float = 180.0) -> None:
        assert self.proc is not None
        proc = self.proc

        def stderr() -> str:
            # Only once the child has exited: reading a live child's pipe would block.
            if proc.poll() is None or proc.stderr is None:
                return ""
            return proc.stderr.read().decode(errors="replace")[-3000:]

        wait_healthy(proc, self.url, timeout, what=f"server {self.model} ({self.protocol})", detail=stderr)


class ServerPool:
    """Starts server groups on demand; keeps one group alive at a time."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[ServerProcess]] = {}

    def get(
        self, protocol: str, models: tuple[str, ...] = PAIR, args: tuple[str, ...] = ()
    ) -> list[ServerProcess]:
        key = (protocol, models, args)
        if key not in self.groups:
            for other in list(self.groups):
                for server in self.groups.pop(other):
                    server.stop()
            servers = [ServerProcess(m, protocol, args).start() for m in models]
            try:
                for server in servers:
                    server.wait_healthy()
            except BaseException:
                for server in servers:
                    server.stop()
                raise
            self.groups[key] = servers
        return self.groups[key]

    def stop_all(self) -> None:
        for servers in self.groups.values():
            for server in servers:
                server.stop()
        self.groups.clear()


@pytest.fixture(scope="session")
def server_pool() -> Iterator[ServerPool]:
    pool = ServerPool()
    yield pool
    pool.stop_all()


def remote_config(protocol: str, servers: list[ServerProcess], **fusion: Any) -> Any:
    from specfuse import EnsembleConfig

    settings = {**FUSION, **fusion}
    members = [{"model": s.model, "backend": protocol, "urls": [s.url], "timeout": 120.0} for s in servers]
    return EnsembleConfig.build(members, **settings)


def fuses_like_reference(protocol: str, servers: list[ServerProcess], reference: Any) -> Any:
    """Fuse PROMPT over `servers` (every member able to score) and assert the
    in-process reference's greedy answer: the same text and the same round winners.
    Returns the result, for a test's further checks."""
    from specfuse import SpecFuse

    fuse = SpecFuse(remote_config(protocol, servers))
    try:
        assert all(m.info.can_score for m in fuse.start())
        result = fuse.generate(PROMPT)
    finally:
        fuse.close()
    assert result.text == reference.text
    assert [r.winner for r in result.trace.rounds] == [r.winner for r in reference.trace.rounds]
    return result


@pytest.fixture(scope="session")
def reference_answer() -> Any:
    """The in-process greedy answer with each model tokenised as a server tokenises it.

    Servers add the tokenizer's special tokens (Gemma's <bos>) to every input;
    the local backend adds none and puts the BOS text in the plain prompt
    instead. The reference spells that out (PlainFormat(bos=...) from what
    the tokenizer adds), so it stays comparable whatever the local backend
    reports; test_tgi_vs_embedded_local_ensemble checks EnsembleConfig.local too.
    """
    import asyncio

    from specfuse import SpecFuse
    from specfuse.backends.local import LocalBackend
    from specfuse.prompts import ChatFormat, PlainFormat, end_of_turn_tokens
    from specfuse.request import Member

    async def build() -> list[Member]:
        members = []
        for name in PAIR:
            backend = LocalBackend(name)
            info = await backend.info()
            fmt = await ChatFormat.probe(backend)
            if fmt is None:
                tok = backend.load().tokenizer
                first = tok("a", add_special_tokens=True)["input_ids"][0]
                bos = tok.bos_token if first == tok.bos_token_id else ""
                fmt = PlainFormat(bos=bos, eos=tok.eos_token or "")
            # As SpecFuse._prepare measures it: a finished candidate's marker counts as one unit.
            marker_tokens = await end_of_turn_tokens(backend, fmt)
            members.append(
                Member(
                    name=name,
                    backend=backend,
                    format=fmt,
                    roles=frozenset({"draft", "verify"}),
                    weight=1.0,
                    info=info,
                    end_of_turn_tokens=marker_tokens,
                )
            )
        return members

    from specfuse.config import FusionSettings

    fuse = SpecFuse(members=asyncio.run(build()), fusion=FusionSettings(**FUSION))
    return fuse.generate(PROMPT)


# -- a fault-injecting HTTP server ---------------------------------------------------


@dataclass
class Fault:
    """Scripted replies: each request pops the next (status, body, headers); the last one repeats."""

    script: list[tuple[int, Any, dict[str, str]]]
    seen: list[dict[str, Any]] = field(default_factory=list)

    def next(self) -> tuple[int, Any, dict[str, str]]:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class ThreadedServer:
    """An ASGI app served by uvicorn in a daemon thread on a free loopback port (a context manager).

    A subclass builds its app in __init__ and hands it to `_serve`.
    """

    def __init__(self) -> None:
        self.port = free_port()

    def _serve(self, app: Any) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class FaultServer(ThreadedServer):
    """A loopback server whose replies a test scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.fault = Fault([(200, {}, {})])
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def anything(path: str, request: Request) -> JSONResponse:
            body = await request.body()
            self.fault.seen.append({"path": "/" + path, "headers": dict(request.headers), "body": body})
            status, payload, headers = self.fault.next()
            return JSONResponse(payload, status_code=status, headers=headers)

        self._serve(app)

    def script(self, *replies: tuple[int, Any] | tuple[int, Any, dict[str, str]]) -> Fault:
        self.fault = Fault([(r[0], r[1], r[2] if len(r) > 2 else {}) for r in replies])  # type: ignore[misc]
        return self.fault


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def fault_pair() -> Iterator[tuple[FaultServer, FaultServer]]:
    with FaultServer() as a, FaultServer() as b:
        yield a, b
