"""Precise mode in the simulator: engines' KV events feeding a real index
(:class:`~cacheroute.events.index.KVEventIndex`).

The simulated engines emit :class:`~cacheroute.sim.engine.KVEvent` records (blocks stored
when a prefill ends, blocks evicted); :class:`EventFeed` encodes them in vLLM's wire
format (``BlockStored`` / ``BlockRemoved``, msgpack, one batch per engine per delivery) and
applies them to one :class:`cacheroute.events.KVEventIndex`, exactly as a gateway's
subscriber would. The index's units are the workload's chained block ids (a block id
stands for one "token" of the index, ``block_size=1``), the same units the policies route
on, so a reported match is in blocks like the routed history's.

Every gateway replica reads the same index: with events, all replicas see the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cacheroute.sim.engine import KVEvent

__all__ = ["INDEX_MODES", "EventFeed"]

INDEX_MODES = ("approximate", "precise", "hybrid")
"""``--index``: the routed history only, the engines' reports, or reports plus claims."""


class EventFeed:
    """Delivers simulated KV events to a real KVEventIndex (needs the ``events`` extra).

    Args:
        urls: the workers' URLs, by engine index.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        from cacheroute.events import BlockRemoved, BlockStored, KVEventIndex, encode_batch

        self._stored, self._removed, self._encode = BlockStored, BlockRemoved, encode_batch
        # A simulated feed never goes silent: staleness is the subscriber's concern.
        self.index = KVEventIndex(block_size=1, stale_after=1e12)
        self._urls = list(urls)
        self._seq = [0] * len(urls)
        self.batches = 0

    def deliver(self, events: Sequence[KVEvent]) -> None:
        """Apply ``events`` (in emission order), one wire batch per engine."""
        by_worker: dict[int, list[Any]] = {}
        for e in events:
            out = by_worker.setdefault(e.worker, [])
            if e.kind == "stored":
                out.append(self._stored(list(e.blocks), e.parent, list(e.blocks), 1))
            else:
                out.append(self._removed(list(e.blocks)))
        for w, evs in by_worker.items():
            url = self._urls[w]
            if not self.index.apply(url, self._seq[w], self._encode(evs)):
                raise RuntimeError(f"the KV-event index refused a batch of {url}")
            self._seq[w] += 1
            self.batches += 1

    def open_feeds(self) -> None:
        """Every engine's feed exists from t=0 (an empty batch each), so none is unknown."""
        for w, url in enumerate(self._urls):
            self.index.apply(url, self._seq[w], self._encode([]))
            self._seq[w] += 1

    def close(self) -> None:
        """Release the index."""
        self.index.close()
