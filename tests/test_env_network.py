"""Remote members honour the network settings of the environment, never its credentials.

A user behind a company proxy sets HTTP(S)_PROXY / NO_PROXY, and one with a
private CA sets SSL_CERT_FILE; both must reach the members through them. A
`.netrc` (or a URL's user:password) must never add credentials of its own:
the only secret a member sends is its bearer token. Proven with a real
forwarding HTTP proxy on loopback that counts what passes through it, a
loopback HTTPS server whose certificate a throwaway CA (trustme) signed, and
the one HTTP stack (httpx) every protocol posts through.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specfuse.backends import create_backend
from specfuse.backends.base import Sampling
from specfuse.config import MemberConfig
from specfuse.errors import RemoteError
from tests.remote_fixtures import TGI_GENERATE_OK, FaultServer, free_port

VLLM_DRAFT = {
    "choices": [{"text": " hi", "finish_reason": "length", "logprobs": {"token_logprobs": [-0.5]}}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1},
}
DRAFTS = {"tgi": TGI_GENERATE_OK, "vllm": VLLM_DRAFT}


class ForwardProxy:
    """A plain HTTP forward proxy on loopback (absolute-form requests), counting requests.

    One request per connection (it answers with `Connection: close`), which is
    all a client needs to be proven to go through it.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            body = await reader.readexactly(
                int(headers.get("Content-Length") or headers.get("content-length") or 0)
            )
            self.requests.append((target, {k.lower(): v for k, v in headers.items()}))
            # absolute-form "http://host:port/path" -> origin-form "/path" for the upstream.
            rest = target.split("://", 1)[1]
            hostport, _, path = rest.partition("/")
            host, _, port = hostport.partition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port or 80))
            kept = {k: v for k, v in headers.items() if k.lower() not in ("proxy-connection", "connection")}
            request = f"{method} /{path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept.items())
            up_writer.write(request.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
            await up_writer.drain()
            answer = await up_reader.read()  # the upstream closes after its answer
            up_writer.close()
            writer.write(answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SPECFUSE_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    # A .netrc holding credentials for loopback, where every client looking for one finds it.
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login alice password netrc-secret-pw\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def draft(protocol: str, url: str, **fields: Any) -> Any:
    member = MemberConfig(
        model="m", name="via-env", backend=protocol, urls=[url], timeout=5, retries=0, **fields
    )
    backend = create_backend(member)

    async def one() -> Any:
        try:
            return await backend.draft("Hello", max_tokens=1, sampling=Sampling(temperature=0))
        finally:
            await backend.aclose()  # no connection left open for the server to wait out

    return asyncio.run(one())


@pytest.fixture
def upstream() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.mark.parametrize("protocol", ["vllm", "tgi"])
def test_calls_go_through_the_proxy_the_environment_names(
    upstream: FaultServer, clean_env: pytest.MonkeyPatch, protocol: str
) -> None:
    fault = upstream.script((200, DRAFTS[protocol]))
    with ForwardProxy() as proxy:
        clean_env.setenv("HTTP_PROXY", proxy.url)
        assert draft(protocol, upstream.url, api_key="sk-member-key").text == " hi"
        assert len(proxy.requests) == 1 and proxy.requests[0][0].startswith(upstream.url)
        assert len(fault.seen) == 1
        # NO_PROXY lets loopback bypass it again.
        clean_env.setenv("NO_PROXY", "127.0.0.1")
        assert draft(protocol, upstream.url).text == " hi"
        assert len(proxy.requests) == 1 and len(fault.seen) == 2
    # The member's own token arrived; nothing from .netrc went anywhere.
    assert fault.seen[0]["headers"].get("authorization") == "Bearer sk-member-key"
    assert "authorization" not in fault.seen[1]["headers"]
    assert all("authorization" not in h or "netrc" not in h["authorization"] for _, h in proxy.requests)
    assert "proxy-authorization" not in proxy.requests[0][1]


@pytest.mark.parametrize("protocol", ["vllm", "tgi"])
def test_netrc_and_url_credentials_are_never_sent(
    upstream: FaultServer, clean_env: pytest.MonkeyPatch, protocol: str
) -> None:
    fault = upstream.script((200, DRAFTS[protocol]))
    draft(protocol, upstream.url)
    draft(protocol, upstream.url.replace("http://", "http://bob:url-secret-pw@"))
    assert len(fault.seen) == 2
    assert all("authorization" not in seen["headers"] for seen in fault.seen)


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTPS server answering a vLLM draft, its certificate signed by a throwaway CA."""
    import trustme
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with cert_file.open("wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        return JSONResponse(VLLM_DRAFT)

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="error",
        ssl_certfile=str(cert_file),
        ssl_keyfile=str(key_file),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"https://127.0.0.1:{port}", ca_file
    server.should_exit = True
    thread.join(5)


def test_the_ca_file_the_environment_names_is_trusted(
    tls_upstream: tuple[str, Path], clean_env: pytest.MonkeyPatch
) -> None:
    url, ca_file = tls_upstream
    clean_env.delenv("SSL_CERT_DIR", raising=False)
    clean_env.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(RemoteError, match="could not reach"):
        draft("vllm", url)  # the throwaway CA is in no default bundle
    clean_env.setenv("SSL_CERT_FILE", str(ca_file))
    assert draft("vllm", url).text == " hi"
