"""What a user with GPU servers installs and runs, tried as that user would.

Each framework gets a clean virtual environment holding only what its user
installs (`pip install ".[langchain]"` or `".[llama-index]"`, built by
scripts/lean_env.sh): no torch, no test tools. In it the remote examples run a
LangChain chain and a LlamaIndex query engine against a real vLLM 0.32 started
the way the README tells users to (`--api-key`, `--enable-scale-out`,
`--enable-prompt-tokens-details`) and `specfuse serve` imitations of TGI and
SGLang, so a dependency the remote path needs but an extra lacks turns the suite
red. The same real server shows when the token-in route is guarded by the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from specfuse import MemberConfig
from specfuse.backends.vllm import VLLMBackend
from specfuse.backends.vllm_tokens import _WARNED_OPEN_ROUTE, TOKENS_ROUTE
from tests.remote_fixtures import ServerProcess
from tests.vllm_server import (
    ENABLE_VAR,
    HUB_NAME,
    SCALE_OUT_ARGS,
    SLOW_CPU_ENV,
    ShimServer,
    VLLMServer,
    ensure_vllm_installed,
    start_vllm,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
KEY = "sk-vllm-user-install-0123456789"
#: The first start of vLLM on a busy 2-core machine can take minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def lean_python(extra: str) -> Path:
    """The interpreter of a clean environment with only `pip install ".[extra]"`."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "lean_env.sh"), extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return ROOT / ".venv-lean" / extra / "bin" / "python"


@pytest.fixture(scope="module", params=["langchain", "llama-index"])
def lean(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, lean_python(request.param)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A real vLLM with a key and the token-in route, as the README launches it."""
    if os.environ.get(ENABLE_VAR, "1") == "0":
        pytest.skip(f"real-vLLM tier disabled by {ENABLE_VAR}=0")
    ensure_vllm_installed()
    server = start_vllm(
        tmp_path_factory.mktemp("vllm-user") / "server.log",
        api_keys=(KEY,),
        extra_args=SCALE_OUT_ARGS,
        extra_env=SLOW_CPU_ENV,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def imitations() -> Iterator[dict[str, ServerProcess]]:
    servers = {
        "tgi": ServerProcess("smollm2-135m", "tgi", ("--enable-prefill-logprobs",)).start(),
        "sglang": ServerProcess("gemma3-270m", "sglang").start(),
    }
    try:
        for server in servers.values():
            server.wait_healthy()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def run_lean(python: Path, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> str:
    # Only what a user's shell would hold: no PYTHONPATH into the checkout, an empty model
    # store (so no tokenizer comes from the developers' converted models), offline.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env={**clean, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_lean_install_has_no_torch_and_names_the_extra_for_a_local_member(
    lean: tuple[str, Path], tmp_path: Path
) -> None:
    extra, python = lean
    model = "langchain_specfuse.ChatSpecFuse" if extra == "langchain" else "llama_index_specfuse.SpecFuseLLM"
    module, cls = model.rsplit(".", 1)
    script = f"""
import importlib, importlib.util, json
assert importlib.util.find_spec("torch") is None, "torch is installed"
try:
    getattr(importlib.import_module("{module}"), "{cls}").local()
except ValueError as exc:  # ConfigError, or pydantic's error around it (LangChain models)
    print(json.dumps(str(exc)))
else:
    raise SystemExit("a local member was accepted without torch")
"""
    # From tmp_path, not the checkout: `import specfuse` must find the installed package.
    out = run_lean(python, ["-c", script], {"SPECFUSE_CACHE": str(tmp_path)}, cwd=tmp_path)
    message = json.loads(out.strip().splitlines()[-1])
    assert 'pip install "specfuse[local]"' in message and "torch" in message


def test_remote_example_runs_in_the_lean_install(
    lean: tuple[str, Path],
    vllm: VLLMServer,
    imitations: dict[str, ServerProcess],
    tmp_path: Path,
) -> None:
    """Three remote members: the real vLLM (its key from VLLM_API_KEY), TGI and SGLang imitations."""
    extra, python = lean
    example = EXAMPLES / ("langchain_remote.py" if extra == "langchain" else "llama_index_remote.py")
    args = [
        str(example),
        "--vllm", vllm.url, "--vllm-model", HUB_NAME,
        "--tgi", imitations["tgi"].url, "--tgi-model", "smollm2-135m",
        "--sglang", imitations["sglang"].url, "--sglang-model", "gemma3-270m",
        "--max-tokens", "16",
    ]  # fmt: skip
    out = run_lean(python, args, {"VLLM_API_KEY": KEY, "SPECFUSE_CACHE": str(tmp_path)})
    answer = next(line for line in out.splitlines() if line.startswith("answer:"))
    assert answer.removeprefix("answer:").strip(), out
    if extra == "langchain":
        # Every member is in the ensemble, and the vLLM one, the lead, was called with its
        # key (without it vLLM answers 401). Under the default gate the lead may write a
        # 16-token answer alone, so the others need not have been called.
        calls = {line.split(":")[0]: line for line in out.splitlines() if "rounds won" in line}
        assert set(calls) == {HUB_NAME, "smollm2-135m", "gemma3-270m"}, out
        assert " 0 calls" not in calls[HUB_NAME], out


def _keyed_member(url: str) -> MemberConfig:
    return MemberConfig(model=HUB_NAME, backend="vllm", urls=[url], api_key=KEY, timeout=600)


def _probe(member: MemberConfig) -> tuple[str, list[str]]:
    import asyncio

    async def run() -> str:
        backend = VLLMBackend(member)
        try:
            return (await backend.info()).extra["scoring_path"]
        finally:
            await backend.aclose()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = asyncio.run(run())
    return path, [str(w.message) for w in caught if TOKENS_ROUTE in str(w.message)]


def test_a_token_route_the_key_guards_gives_no_warning(vllm: VLLMServer) -> None:
    """vLLM 0.32 guards /inference with --api-key (GUARDED_PREFIX in
    vllm/entrypoints/serve/middleware/authenticate.py): nothing to warn about."""
    _WARNED_OPEN_ROUTE.clear()
    path, warned = _probe(_keyed_member(vllm.url))
    assert path == "tokens" and warned == []


def test_a_token_route_open_without_the_key_warns_once(vllm: VLLMServer) -> None:
    """A server whose key guards /v1 but not /inference (imitated by a shim that lets
    keyless token-route requests through to the real server): warned once per URL."""

    def open_route(path: str, headers: dict[str, str]) -> dict[str, str]:
        if path.startswith("/inference") and "authorization" not in headers:
            return {**headers, "authorization": f"Bearer {KEY}"}
        return headers

    _WARNED_OPEN_ROUTE.clear()
    with ShimServer(vllm.url, lambda path, body: None, headers=open_route) as shim:
        path, warned = _probe(_keyed_member(shim.url))
        assert path == "tokens"
        assert len(warned) == 1 and "open to anyone" in warned[0] and KEY not in warned[0]
        # Once per process and URL, not once per member object.
        assert _probe(_keyed_member(shim.url))[1] == []


def test_lean_examples_are_importable_by_path() -> None:
    """The remote examples import only what their lean install has (checked here in the dev env too)."""
    for name in ("langchain_remote", "llama_index_remote"):
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "--vllm-model" in result.stdout, result.stderr
