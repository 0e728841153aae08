"""Log-probs a vLLM server already computed, to stand in for the positions its prefix cache skips.

The token-in route computes prompt log-probs only after the cached prefix
(`vllm_tokens.valid_from`); a candidate whose first tokens are in the cache
would otherwise be scored again by echo, which re-reads the whole context. A
cached position was computed before, by an earlier request holding the same
tokens up to and including it: a draft (a completion returns the log-prob of
every token it samples) or an earlier scoring. The same model after the same
tokens gives the same log-prob for the same token, so such positions are
taken from here. vLLM returns raw log-probs for both, sampled tokens and
prompt tokens (`--logprobs-mode raw_logprobs`, its default, in
vllm/config/model.py); a server started with processed log-probs would give
a draft's values after temperature, which is why every scoring is checked
against what drafts said for the same positions and drafts stop counting
once they disagree.

Sequences are keyed by their token ids alone, so members that share a server
and a served model share one store (`shared_store`): a draft by one member
serves another member's verification on that server.
"""

from __future__ import annotations

import warnings
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from specfuse.backends.vllm_tokens import common_prefix

#: How many token sequences a store keeps: a round adds one per draft and one per scoring.
CAPACITY = 48
#: Largest difference (nats) between a draft's log-prob and a scoring's for the same position
#: that still counts as the same value: bf16 on CPU puts the same sums in another order by
#: up to ~0.13 on one token (tests/test_real_vllm_cost.py); temperature-processed values
#: differ by far more.
DRAFT_TOLERANCE = 0.5

Source = Literal["draft", "score"]


@dataclass(frozen=True)
class _Known:
    ids: tuple[int, ...]
    #: position -> log-prob of ids[position] after ids[:position]
    values: Mapping[int, float]
    source: Source


class KnownLogprobs:
    """The last few token sequences a server computed log-probs for, and those log-probs."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._known: deque[_Known] = deque(maxlen=capacity)
        #: False once a draft's value disagreed with a scoring's for the same position.
        self.drafts_trusted = True

    def clear(self) -> None:
        self._known.clear()

    def add(self, ids: Sequence[int], values: Mapping[int, float], source: Source) -> None:
        """Remember values[p], the log-prob of ids[p] after ids[:p], for each given position p."""
        if not values:
            return
        ids = tuple(ids)
        if source == "score" and self.drafts_trusted:
            self._check_drafts(ids, values)
        self._known.append(_Known(ids, dict(values), source))

    def lookup(self, ids: Sequence[int], positions: range) -> list[float] | None:
        """The known log-prob at every position of `positions` in ids, or None if one is unknown."""
        ids = tuple(ids)
        found: dict[int, float] = {}
        for known in reversed(self._known):
            if known.source == "draft" and not self.drafts_trusted:
                continue
            shared = common_prefix(known.ids, ids)
            for p in positions:
                if p < shared and p not in found and p in known.values:
                    found[p] = known.values[p]
            if len(found) == len(positions):
                return [found[p] for p in positions]
        return None

    def _check_drafts(self, ids: tuple[int, ...], values: Mapping[int, float]) -> None:
        for known in self._known:
            if known.source != "draft":
                continue
            shared = common_prefix(known.ids, ids)
            for p, value in values.items():
                if p < shared and p in known.values and abs(known.values[p] - value) > DRAFT_TOLERANCE:
                    self.drafts_trusted = False
                    warnings.warn(
                        f"a draft's log-prob ({known.values[p]:.3f}) and the server's prompt log-prob "
                        f"({value:.3f}) of the same token after the same tokens differ: the server "
                        "does not return raw log-probs (vLLM --logprobs-mode); cached positions are "
                        "now scored by echo, which costs more compute but stays correct",
                        UserWarning,
                        stacklevel=4,
                    )
                    return


_STORES: weakref.WeakValueDictionary[tuple[object, ...], KnownLogprobs] = weakref.WeakValueDictionary()


def shared_store(urls: Sequence[str], served_model: str) -> KnownLogprobs:
    """The store of every backend that reaches these server URLs for this served model."""
    key = (tuple(sorted(urls)), served_model)
    store = _STORES.get(key)
    if store is None:
        store = KnownLogprobs()
        _STORES[key] = store
    return store
