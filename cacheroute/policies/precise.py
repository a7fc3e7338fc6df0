"""Precise mode: a prefix policy that reads what the engines report they cache.

A prefix policy normally matches a request against its own *routed history* (what it sent
where: approximate, and per gateway replica). Given a KV-event index (any object with the
:class:`KVIndex` methods, e.g. :class:`cacheroute.events.KVEventIndex`), it matches
token-id requests against the engines' own reports instead:

* ``index_mode="precise"``: a worker's match is what its engine reported holding. Workers
  the index knows nothing about, or whose feed went stale, fall back to the routed history
  (it is always kept, so the fallback is ready).
* ``index_mode="hybrid"`` (default with an index): as precise, plus *claims*: a prompt
  routed to a worker counts for it at once, until its engine's ``BlockStored`` events have
  had time to confirm it (``claim_ttl_s``). Without claims a burst sharing a new prefix
  would scatter, since no engine reports it until its prefill is done.

A claim stops counting once its engine *confirms* it: the first time a request finds the
engine reporting everything the claim covers (every whole block of it, when the index has
a ``block_size(url)`` method, as ``KVEventIndex`` does: the rest of a prompt's last block
is never cached), the claim is marked confirmed, and from
then on the reports alone speak for it, so a ``BlockRemoved`` removes it too. A claim
never confirmed (its request failed, or is still queued) expires: claims live in two
generations of trees, swapped every ``claim_ttl_s / 2``, so one counts for between half
and all of ``claim_ttl_s``, with no per-entry timer. Text requests (no token ids) always
use the routed history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from cacheroute.tree import Tree

__all__ = ["IndexMode", "KVIndex"]

IndexMode = Literal["precise", "hybrid"]
"""How a KV-event index is combined with the routed history (see the module doc)."""


@runtime_checkable
class KVIndex(Protocol):
    """What a prefix policy needs of a KV-event index (:class:`cacheroute.events.KVEventIndex`)."""

    def match(self, token_ids: Sequence[int], **namespace: Any) -> dict[str, int]:
        """``{worker url: leading tokens of token_ids its engine holds}``."""
        ...

    def urls(self) -> list[str]:
        """Every worker the index has a feed for."""
        ...

    def stale_urls(self) -> list[str]:
        """Workers whose feed went silent: their reports may be out of date."""
        ...


class _Generation:
    """Claims made in one half-TTL: what was routed where, and which of it the engines
    confirmed (a confirmed claim no longer counts: the reports speak for it)."""

    __slots__ = ("claimed", "confirmed")

    def __init__(self, new_tree: Callable[[], Tree]) -> None:
        self.claimed = new_tree()
        self.confirmed = new_tree()


class PreciseMatcher:
    """Combines a KV-event index, claims and the routed history into one match.

    Thread-safe. Built by the policy; ``clock`` is injectable for tests.
    """

    __slots__ = (
        "_block_size",
        "_claims",
        "_clock",
        "_half",
        "_index",
        "_lock",
        "_namespace",
        "_new",
        "_swap_at",
    )

    def __init__(
        self,
        index: KVIndex,
        mode: IndexMode,
        claim_ttl_s: float,
        new_tree: Callable[[], Tree],
        namespace: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._index = index
        # Optional (KVEventIndex has it): an engine's block size, by worker url.
        self._block_size: Callable[[str], int] | None = getattr(index, "block_size", None)
        self._namespace = dict(namespace or {})
        self._clock = clock
        self._half = claim_ttl_s / 2
        self._new = new_tree  # bounded like the routed history
        self._lock = threading.Lock()
        # [current, previous] generations of claims; None in precise mode.
        self._claims: list[_Generation] | None = (
            [_Generation(new_tree), _Generation(new_tree)] if mode == "hybrid" else None
        )
        self._swap_at = clock() + self._half

    def _generations(self) -> list[_Generation]:
        claims = self._claims
        assert claims is not None
        now = self._clock()
        if now >= self._swap_at:
            with self._lock:
                claims = self._claims
                assert claims is not None
                if now >= self._swap_at:
                    # Two swaps' worth of time passed: both generations are too old.
                    old = claims[0] if now < self._swap_at + self._half else _Generation(self._new)
                    self._claims = claims = [_Generation(self._new), old]
                    self._swap_at = now + self._half
        return claims

    def lengths(self, token_ids: Sequence[int], routed: dict[str, int]) -> dict[str, int]:
        """Each worker's match: reported (and claimed) for fresh feeds, routed otherwise.

        O(index match + claims match + workers the index knows).
        """
        index = self._index
        reported = index.match(token_ids, **self._namespace)
        stale: Collection[str] = index.stale_urls()
        fresh = set(index.urls()).difference(stale)
        out = {u: m for u, m in routed.items() if u not in fresh}
        for u, m in reported.items():
            if u in fresh:
                out[u] = m
        if self._claims is not None:
            block = self._block_size
            for gen in self._generations():
                claimed = gen.claimed.match_lengths(token_ids)
                if not claimed:
                    continue
                confirmed: dict[str, int] | None = None
                for u, m in claimed.items():
                    if u not in fresh:
                        continue
                    if confirmed is None:
                        confirmed = gen.confirmed.match_lengths(token_ids)
                    if m <= confirmed.get(u, 0):
                        continue  # confirmed before: the reports speak for it
                    # An engine reports whole blocks only: the rest of a claim's last
                    # block is never cached, so its whole blocks are what confirms it.
                    whole = m if block is None else m - m % block(u)
                    if 0 < whole <= reported.get(u, 0):  # the engine reports all of it now
                        gen.confirmed.insert(token_ids[:m], u)
                    elif m > out.get(u, 0):
                        out[u] = m  # not confirmed yet: counts
        return out

    def claim(self, token_ids: Sequence[int], url: str) -> None:
        """``url`` was chosen for ``token_ids``: claim them until events can confirm."""
        if self._claims is not None:
            self._generations()[0].claimed.insert(token_ids, url)

    def forget(self, url: str) -> None:
        """A worker left: drop its claims."""
        if self._claims is not None:
            for gen in self._claims:
                gen.claimed.remove_tenant(url)
                gen.confirmed.remove_tenant(url)
