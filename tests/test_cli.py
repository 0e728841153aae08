"""The `specfuse` command, run as a user would: a real subprocess on real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MEMBERS = ["-m", "smollm2-135m", "-m", "gemma3-270m"]
COMMON = ["--max-tokens", "16", "--temperature", "0", "--seed", "3"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "specfuse.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_generate_streams_answer_and_prints_summary() -> None:
    proc = run_cli("generate", "Name a colour.", *MEMBERS, *COMMON)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the fused answer goes to stdout"
    assert "fusion summary" in proc.stderr
    for name in ("smollm2-135m", "gemma3-270m"):
        assert name in proc.stderr
    assert "rounds" in proc.stderr and "tokens/s" in proc.stderr and "first segment" in proc.stderr


def test_generate_json_has_text_and_full_trace() -> None:
    # Every round fused, so the first one has both members' probabilities.
    proc = run_cli("generate", "Name a colour.", *MEMBERS, *COMMON, "--json", "--no-gate")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["text"].strip()
    trace = data["trace"]
    assert trace["members"] == ["smollm2-135m", "gemma3-270m"]
    assert "".join(r["accepted_text"] for r in trace["rounds"]) == data["text"]
    assert trace["summary"]["rounds"] == len(trace["rounds"])
    assert data["usage"]["output_tokens"] == trace["summary"]["completion_tokens"]
    first = trace["rounds"][0]
    assert set(first["probabilities"]) == {"smollm2-135m", "gemma3-270m"}


def test_generate_gate_flags_reach_the_engine() -> None:
    # A gate no token falls below: the lead writes alone, gate_tokens at a time.
    gate = ["--gate-logprob", "-100", "--gate-tokens", "5"]
    proc = run_cli("generate", "Name a colour.", *MEMBERS, *COMMON, "--json", *gate)
    assert proc.returncode == 0, proc.stderr
    rounds = json.loads(proc.stdout)["trace"]["rounds"]
    assert rounds and all(r["gated"] for r in rounds)
    assert all([c["member"] for c in r["candidates"]] == ["smollm2-135m"] for r in rounds)
    assert all(r["candidates"][0]["tokens"] <= 5 + 4 for r in rounds)  # +4: a split character


def test_generate_trace_writes_a_self_contained_html_view(tmp_path: Path) -> None:
    out = tmp_path / "fusion.html"
    proc = run_cli("generate", "Name a colour.", *MEMBERS, *COMMON, "--trace", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    page = out.read_text(encoding="utf-8")
    data = json.loads(proc.stdout)
    assert page.startswith("<!doctype html>")
    assert "<script src" not in page and "<link" not in page  # nothing fetched from elsewhere
    assert "Round 1" in page
    for record in data["trace"]["rounds"]:
        for cand in record["candidates"]:
            assert cand["member"] in page


def test_bad_member_is_a_clear_error_not_a_traceback() -> None:
    proc = run_cli("generate", "hi", "-m", "no-such-model")
    assert proc.returncode == 2
    assert "unknown local model 'no-such-model'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_file_is_used(tmp_path: Path) -> None:
    config = tmp_path / "ensemble.toml"
    config.write_text(
        '[[members]]\nmodel = "smollm2-135m"\nname = "solo"\n\n[fusion]\nmax_tokens = 8\ntemperature = 0\n'
    )
    proc = run_cli("generate", "Name a colour.", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["trace"]["members"] == ["solo"]
    assert data["trace"]["summary"]["completion_tokens"] <= 8
    # a single drafter continues alone, without verification
    assert all(r["skipped_verification"] for r in data["trace"]["rounds"])


def test_without_the_cli_extra_the_command_says_what_to_install() -> None:
    # rich comes with the `cli` extra; hide it as an install without that extra would.
    hide = "import sys; sys.modules['rich'] = None; "
    code = hide + "from specfuse.cli import main; sys.exit(main(['models', 'list']))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert "pip install 'specfuse[cli]'" in proc.stderr and "Traceback" not in proc.stderr
    # The library itself never needs rich.
    library = hide + "import specfuse, specfuse.tool_calls, specfuse.errors"
    assert subprocess.run([sys.executable, "-c", library], timeout=120).returncode == 0


def test_blank_prompt_is_a_clear_error_before_any_model_loads() -> None:
    for prompt in ("", "   \n"):
        proc = run_cli("generate", prompt, *MEMBERS)
        assert proc.returncode == 2, proc.stdout
        assert "error:" in proc.stderr and "prompt is empty" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert "ready" not in proc.stderr  # refused before loading the members
        assert not proc.stdout


def test_self_verify_flags_map_to_the_setting() -> None:
    from specfuse.cli import _fusion_overrides, build_parser

    def overrides(*flags: str) -> dict[str, object]:
        return _fusion_overrides(build_parser().parse_args(["generate", "hi", *flags]))

    assert overrides("--self-verify")["self_verify"] is True
    assert "self_verify" not in overrides()
