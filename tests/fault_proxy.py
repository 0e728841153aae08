"""A fault-injecting HTTP/1.1 reverse proxy on loopback, for reliability tests.

Why a raw asyncio proxy and not a framework app: the faults we need live
below the framework -- resetting a connection (RST), closing in the middle of
a body, announcing a Content-Length and sending less, or hanging while
watching for the client to give up. With plain asyncio streams each of these
is a few lines, and the proxy can see exactly when a client disconnects,
which is how the cancellation tests prove that abandoned calls are really
cancelled on the wire.

The proxy runs its own event loop in a daemon thread, so sync and async tests
use it alike. Healthy requests are forwarded to the upstream server (a real
`specfuse serve`) with httpx; faults are scripted per test with `set_rules`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Fault kinds a Rule may name.
KINDS = (
    "pass",  # forward to the upstream unchanged
    "status",  # answer `status` with a JSON `body` and `headers` (429 + Retry-After, 503, 500, 422 ...)
    "hang",  # never answer; wait for the client to disconnect (recorded in `disconnects`)
    "reset",  # close the connection with an RST before answering
    "truncate",  # forward, but send only half of the upstream body under the full Content-Length
    "malformed",  # answer 200 with a body that is not JSON
    "slow",  # forward after `delay` seconds
    "die",  # send headers and a few bytes of the body, then close the connection
)


@dataclass
class Rule:
    """One scripted behaviour for requests whose path starts with one of `paths`.

    `times` limits how many requests the rule handles (None: all); once it is
    used up the next matching rule applies, and with none left the request
    passes through.
    """

    kind: str
    #: Exact paths (without query); the TGI backend posts generations to "/" (the compat route).
    paths: tuple[str, ...] = ("/", "/generate")
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    times: int | None = None
    #: Only requests whose body holds these bytes (b"": every request).
    match: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")


@dataclass
class Seen:
    """A request as the proxy received it (headers lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    rule: str
    at: float


class FaultProxy:
    """A reverse proxy to `upstream` whose behaviour a test switches with set_rules()."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        #: Requests that were hanging (or slow) when their client disconnected.
        self.disconnects = 0
        #: Requests currently being handled.
        self.in_flight = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._client: httpx.AsyncClient | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self.port = 0

    # -- control (any thread) -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_rules(self, *rules: Rule) -> None:
        """Replace the script and forget what was seen."""
        with self._lock:
            self.rules = list(rules)
            self.seen = []
            self.disconnects = 0

    def count(self, paths: tuple[str, ...] = ("/", "/generate")) -> int:
        """Requests seen on these exact paths since the last set_rules()."""
        with self._lock:
            return sum(1 for s in self.seen if s.path.split("?")[0] in paths)

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the proxy (its own loop) ----------------------------------------------------------

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(timeout=300, trust_env=False)
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Finish open connections here, so none is left to a closed loop.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _pick(self, path: str, body: bytes = b"") -> Rule:
        with self._lock:
            for rule in self.rules:
                if (
                    path.split("?")[0] in rule.paths
                    and rule.match in body
                    and (rule.times is None or rule.times > 0)
                ):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return Rule("pass")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                rule = self._pick(path, body)
                with self._lock:
                    self.seen.append(Seen(method, path, headers, body, rule.kind, time.monotonic()))
                    self.in_flight += 1
                try:
                    keep = await self._handle(rule, method, path, headers, body, reader, writer)
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only _stop() cancels these tasks; ending quietly keeps asyncio's
            # connection callback from logging the cancellation as an error.
            return
        finally:
            if not writer.is_closing():
                writer.close()

    async def _handle(
        self,
        rule: Rule,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request per its rule; False when the connection must close."""
        if rule.kind == "hang":
            await self._until_disconnect(reader, None)
            return False
        if rule.kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if rule.kind == "status":
            payload = json.dumps(rule.body if rule.body is not None else {"error": "injected"}).encode()
            await _respond(writer, rule.status, payload, rule.headers)
            return True
        if rule.kind == "malformed":
            await _respond(writer, 200, b'{"generated_text": "oops", "details": {', {})
            return True
        if rule.kind == "slow" and not await self._until_disconnect(reader, rule.delay):
            return False
        forwarded = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
        assert self._client is not None
        upstream = await self._client.request(method, self.upstream + path, content=body, headers=forwarded)
        data = upstream.content
        out_headers = {"content-type": upstream.headers.get("content-type", "application/json")}
        if rule.kind == "truncate":
            head = _head(upstream.status_code, len(data), out_headers)
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            return False
        if rule.kind == "die":
            writer.write(_head(upstream.status_code, len(data), out_headers) + data[:8])
            await writer.drain()
            writer.transport.abort()
            return False
        await _respond(writer, upstream.status_code, data, out_headers)
        return True

    async def _until_disconnect(self, reader: asyncio.StreamReader, delay: float | None) -> bool:
        """Wait `delay` seconds (None: forever) unless the client goes away first.

        Returns True when the delay passed with the client still connected.
        """
        try:
            data = await asyncio.wait_for(reader.read(1), delay)
        except TimeoutError:
            return True
        except ConnectionError:
            data = b""
        if not data:
            with self._lock:
                self.disconnects += 1
        return False


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


_REASONS = {200: "OK", 422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error"}


def _head(status: int, length: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if not any(k.lower() == "content-type" for k in headers):
        lines.append("content-type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str]) -> None:
    writer.write(_head(status, len(body), headers) + body)
    await writer.drain()
