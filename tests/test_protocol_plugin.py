"""A protocol defined outside specfuse, registered, and used for a whole fused answer.

The protocol ("wordsrv") lives only in this file: a tiny JSON API served by a
loopback HTTP server this test starts (one canned answer per server, drafted
word by word; a candidate scores well when it continues that answer). One
register_protocol call is all specfuse needs to validate members of it and
fuse through it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from specfuse import SpecFuse
from specfuse.backends import Protocol, create_backend, protocol_names, register_protocol
from specfuse.backends._remote import RemoteBackend
from specfuse.backends.base import BackendInfo, CandidateScore, Draft, Sampling
from specfuse.backends.registry import unregister_protocol
from specfuse.config import EnsembleConfig, MemberConfig
from specfuse.errors import ConfigError


def _words(text: str) -> list[str]:
    """' Red, green' -> [' Red,', ' green']: each word with its leading space."""
    out: list[str] = []
    for piece in text.split(" "):
        if piece:
            out.append(" " + piece)
    return out


class WordServer:
    """A loopback server that knows one answer and speaks the 'wordsrv' JSON API."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.paths.append(f"GET {self.path}")
                self._send({"model": "words", "context_window": 4096})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                server.paths.append(f"POST {self.path}")
                if self.path == "/draft":
                    self._send(server.draft(body["context"], body["max_words"]))
                elif self.path == "/score":
                    self._send(server.score(body["context"], body["candidates"]))
                else:
                    self._send({"error": "no such route"}, 404)

            def _send(self, data: Any, status: int = 200) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def rest(self, context: str) -> str:
        """What is left of the answer after the fused text so far ('' once it strays)."""
        fused = context.rpartition("Assistant:")[2]
        return self.answer[len(fused) :] if self.answer.startswith(fused) else ""

    def draft(self, context: str, max_words: int) -> dict[str, Any]:
        words = _words(self.rest(context))
        head = words[:max_words]
        return {"text": "".join(head), "words": len(head), "end": len(words) <= max_words}

    def score(self, context: str, candidates: list[str]) -> list[list[float]]:
        rest = self.rest(context)
        return [[-0.1 if rest.startswith(c) else -3.0 for _ in _words(c) or [c]] for c in candidates]


class WordBackend(RemoteBackend):
    """The 'wordsrv' protocol: retries, replicas and keys come with RemoteBackend."""

    protocol = "wordsrv"

    async def info(self) -> BackendInfo:
        data = await self.call("GET /info", lambda url: self._post(url, "/info", None, method="GET"))
        return BackendInfo(model_id=data["model"], context_window=data["context_window"])

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        body = {"context": context, "max_words": max_tokens}
        data = await self.call("POST /draft", lambda url: self._post(url, "/draft", body))
        return Draft(data["text"], data["words"], "eos" if data["end"] else "length")

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        body = {"context": context, "candidates": list(candidates)}
        rows = await self.call("POST /score", lambda url: self._post(url, "/score", body))
        return [CandidateScore(tuple(row)) for row in rows]

    async def count_tokens(self, text: str) -> int:
        return len(_words(text))


def _no_base_model_loaded(member: MemberConfig) -> None:
    if member.template != "plain":
        raise ValueError("a wordsrv member speaks plain text only: set template='plain'")


@pytest.fixture
def wordsrv() -> Iterator[tuple[WordServer, WordServer]]:
    servers = (WordServer(" Red, green and blue."), WordServer(" Red, green and blue, I think."))
    for s in servers:
        s.thread.start()
    register_protocol(Protocol("wordsrv", WordBackend, check=_no_base_model_loaded))
    try:
        yield servers
    finally:
        unregister_protocol("wordsrv")
        for s in servers:
            s.httpd.shutdown()
            s.httpd.server_close()


def test_a_protocol_registered_from_outside_fuses_an_answer(wordsrv: tuple[WordServer, WordServer]) -> None:
    a, b = wordsrv
    assert "wordsrv" in protocol_names(remote=True)
    config = EnsembleConfig.build(
        [
            {"model": "words-a", "backend": "wordsrv", "urls": [a.url], "template": "plain"},
            {"model": "words-b", "backend": "wordsrv", "urls": [b.url], "template": "plain"},
        ],
        temperature=0.0,
        max_tokens=12,
        segment_tokens=2,
        model_exit=False,
    )
    assert isinstance(create_backend(config.members[0]), WordBackend)
    fuse = SpecFuse(config)
    try:
        result = fuse.generate("Name three primary colours.")
    finally:
        fuse.close()
    assert result.text.strip().startswith("Red, green and blue")  # both servers agree so far
    for server in (a, b):
        assert "GET /info" in server.paths
        assert "POST /draft" in server.paths
        assert "POST /score" in server.paths
    calls = [c for r in result.trace.rounds for c in r.calls]
    assert {c.member for c in calls} == {"words-a", "words-b"}
    assert all(c.error is None for c in calls)


def test_the_registry_validates_members_of_a_registered_protocol(
    wordsrv: tuple[WordServer, WordServer],
) -> None:
    a, _ = wordsrv
    with pytest.raises(ValueError, match="set template='plain'"):
        MemberConfig(model="w", backend="wordsrv", urls=[a.url])
    with pytest.raises(ValueError, match="needs at least one url"):
        MemberConfig(model="w", backend="wordsrv", template="plain")
    with pytest.raises(ConfigError, match="already registered"):
        register_protocol(Protocol("wordsrv", WordBackend))


def test_an_unknown_protocol_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'nope' is not a known protocol; use 'local', 'tgi', 'vllm'"):
        EnsembleConfig.build([{"model": "x", "backend": "nope", "urls": ["http://127.0.0.1:1"]}])
    assert "wordsrv" not in protocol_names()
