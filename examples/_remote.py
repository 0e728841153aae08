"""Members on your servers for the remote examples, or `specfuse serve` imitations when you name none.

Each server is named by its URL and the model it serves; its key, if it wants one,
comes from the environment variable the server itself reads (VLLM_API_KEY for
vLLM, HF_TOKEN for Hugging Face endpoints, SGLANG_API_KEY for SGLang), never
from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

#: protocol -> (the imitation's model when no server is named, the env variable of its key)
PROTOCOLS = {
    "vllm": ("smollm2-135m", "VLLM_API_KEY"),
    "tgi": ("gemma3-270m", "HF_TOKEN"),
    "sglang": ("qwen2.5-coder-0.5b", "SGLANG_API_KEY"),
}


def cli(main: Callable[..., Any], doc: str) -> None:
    """Run an example's main() on the servers its command line names (or on imitations)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    with members_from(args) as members:
        main(members, max_tokens=args.max_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for protocol in PROTOCOLS:
        parser.add_argument(f"--{protocol}", metavar="URL", help=f"a {protocol} server")
        parser.add_argument(f"--{protocol}-model", metavar="NAME", help="the model it serves")
    parser.add_argument("--max-tokens", type=int, default=48)


def member(protocol: str, model: str, url: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": model, "backend": protocol, "urls": url}
    variable = PROTOCOLS[protocol][1]
    if os.environ.get(variable):
        spec["api_key_env"] = variable  # read when the member starts; sent to its host only
    return spec


@contextlib.contextmanager
def members_from(args: argparse.Namespace) -> Iterator[list[dict[str, Any]]]:
    """The members the arguments name; with none, three imitations on loopback (full install only)."""
    named = [p for p in PROTOCOLS if getattr(args, p)]
    for protocol in named:
        if not getattr(args, f"{protocol}_model"):
            raise SystemExit(f"--{protocol} needs --{protocol}-model: the model that server serves")
    if named:
        yield [member(p, getattr(args, f"{p}_model"), getattr(args, p)) for p in named]
        return
    servers = [_start_imitation(protocol, model) for protocol, (model, _) in PROTOCOLS.items()]
    try:
        yield [member(protocol, model, url) for (protocol, model, url, _) in servers]
    finally:
        for *_, proc in servers:
            proc.terminate()
            proc.wait(30)


def _start_imitation(protocol: str, model: str) -> tuple[str, str, str, subprocess.Popen[bytes]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "specfuse.devserver", model, "--protocol", protocol, "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--enable-prefill-logprobs"] if protocol == "tgi" else cmd)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return protocol, model, url, proc
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the {protocol} imitation of {model} did not start (needs scripts/setup.sh)")
