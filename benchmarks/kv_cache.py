"""Time per round of the local backend, with and without its KV cache.

For a context of about 100 and about 1000 tokens, run the same greedy fusion
with every member's cache on, then off, and print the mean round wall time.
Goal: with the cache, going from ~100 to ~1000 tokens of context costs at most
1.5x per round (without it, every round re-reads the whole context).

    .venv/bin/python benchmarks/kv_cache.py [--models smollm2-135m gemma3-270m] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from rich.table import Table

from specfuse import EnsembleConfig, MemberConfig, SpecFuse

FILLER = (
    "The river runs past the old mill, under the stone bridge, and on through the fields "
    "where the farmers grow wheat and barley in the long summer days. "
)


def prompt_of(tokens: int, count_tokens) -> str:
    """A user prompt of about `tokens` tokens (in the first member's tokenizer)."""
    text = ""
    while count_tokens(text) < tokens - 20:
        text += FILLER
    return text + "\nSummarise the passage above in one sentence."


def run(models: list[str], kv_cache: bool, prompt: str, rounds: int, segment: int) -> list[float]:
    members = [MemberConfig(model=m, kv_cache=kv_cache) for m in models]
    fuse = SpecFuse(EnsembleConfig.build(members, temperature=0.0, segment_tokens=segment, model_exit=False))
    fuse.start()
    fuse.generate("Hello", max_tokens=2)  # warm-up: first forward passes are slower
    result = fuse.generate(prompt, max_tokens=rounds * segment, seed=0)
    # The first round includes the prompt prefill, which no cache can avoid.
    return [r.wall_time for r in result.trace.rounds[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--segment-tokens", type=int, default=10)
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000])
    args = parser.parse_args()

    from specfuse.backends.local import LocalBackend

    counter = LocalBackend(args.models[0])
    tok = counter.load().tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = {}
    for size in args.sizes:
        prompt = prompt_of(size, count)
        for cached in (True, False):
            times = run(args.models, cached, prompt, args.rounds, args.segment_tokens)
            rows[(size, cached)] = (count(prompt), statistics.mean(times), len(times))
            print(f"~{size} tokens, cache {'on' if cached else 'off'}: {rows[(size, cached)][1]:.3f} s/round")

    table = Table(title=f"seconds per round, members: {', '.join(args.models)}")
    for col in ("context tokens", "cache", "rounds timed", "s/round", "growth vs smallest context"):
        table.add_column(col, justify="right")
    smallest = min(args.sizes)
    for (_size, cached), (tokens, mean, n) in rows.items():
        growth = mean / rows[(smallest, cached)][1]
        table.add_row(str(tokens), "on" if cached else "off", str(n), f"{mean:.3f}", f"{growth:.2f}x")
    Console().print(table)
    for size in args.sizes:
        speedup = rows[(size, False)][1] / rows[(size, True)][1]
        print(f"cache speed-up at ~{size} tokens: {speedup:.2f}x")


if __name__ == "__main__":
    main()
