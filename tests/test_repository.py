"""The repository stands alone: nothing tracked reads outside the checkout.

A clone has no team folder beside it; a test or benchmark that opened one
stopped collection on every machine but ours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # The IFEval answer cache is data the harness wrote, not code or docs.
    return [ROOT / n for n in names if not n.startswith("benchmarks/ifeval/cache/")]


def test_no_tracked_file_names_a_path_outside_the_checkout() -> None:
    # Built, not written out, so this file does not name them itself.
    outside = [f"{ROOT.parent}/", "/".join(["..", "shared"])]
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (a PNG) or deleted in the work tree
        found += [f"{path.relative_to(ROOT)}: {marker}" for marker in outside if marker in text]
    assert found == []


def test_the_data_the_suite_and_harness_read_ships_in_the_checkout() -> None:
    from benchmarks.ifeval.data import DEFAULT_DATA

    assert DEFAULT_DATA.is_relative_to(ROOT) and DEFAULT_DATA.stat().st_size > 0
    assert len(DEFAULT_DATA.read_text(encoding="utf-8").splitlines()) == 150
    assert (ROOT / "tests" / "data" / "tgi-openapi-subset.json").is_file()
