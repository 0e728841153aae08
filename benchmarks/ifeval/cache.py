"""The answer cache: append-only JSONL per mode and settings, one row per prompt key."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from benchmarks.ifeval.data import Prompt
from benchmarks.ifeval.modes import BenchSettings, Mode


class Cache:
    """Append-only JSONL per mode+settings; one row per prompt key."""

    def __init__(self, out_dir: Path, settings: BenchSettings) -> None:
        self.dir = out_dir
        self.settings = settings
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}

    def path(self, mode: Mode) -> Path:
        """The mode's file: one already holding its digest (under any spelling), else a new one."""
        held = sorted(self.dir.glob(f"*-{mode.cache_digest(self.settings)}.jsonl"))
        return held[0] if held else self.dir / f"{mode.cache_id(self.settings)}.jsonl"

    def rows(self, mode: Mode) -> dict[str, dict[str, Any]]:
        cid = mode.cache_digest(self.settings)
        if cid not in self._rows:
            rows: dict[str, dict[str, Any]] = {}
            path = self.path(mode)
            if path.exists():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interrupted write: recomputed
                    rows[str(row["key"])] = row
            self._rows[cid] = rows
        return self._rows[cid]

    def get(self, mode: Mode, prompt: Prompt) -> dict[str, Any] | None:
        row = self.rows(mode).get(str(prompt.key))
        if row is not None and row.get("prompt_sha") != _sha(prompt.prompt):
            return None  # same key, different prompt text: another data file
        return row

    def put(self, mode: Mode, prompt: Prompt, row: dict[str, Any]) -> None:
        row = {"key": prompt.key, "prompt_sha": _sha(prompt.prompt), **row}
        self.dir.mkdir(parents=True, exist_ok=True)
        # One O_APPEND write per row: worker processes append to the same files.
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path(mode), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.rows(mode)[str(prompt.key)] = row


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]
