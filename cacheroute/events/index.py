"""KVEventIndex: which worker holds which prompt prefix, from the engines' own KV events.

See ``docs/events.md`` for the design, what each event does and the memory bound.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from operator import rshift
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from cacheroute._validation import (
    check_bool,
    check_callable,
    check_int,
    check_real,
    check_str,
    fail,
)
from cacheroute.events.wire import (
    REMOVED,
    STORED,
    BlockHash,
    RawEvent,
    WireFormatError,
    _decode_raw,
    _read_event,
)
from cacheroute.tree import Tree

if TYPE_CHECKING:
    from cacheroute.events.subscriber import Subscription

__all__ = ["KVEventIndex", "WorkerStats"]

log = logging.getLogger("cacheroute.events")

_U32 = "I" if array("I").itemsize == 4 else "L"
# The trees hold text: a token is the 4 code points of its 4 bytes (latin-1 of the array,
# one C-level copy), so a match counts code points, floored here to whole blocks in one
# pass (the Tree's token mode would first divide every worker's length by 4 itself).
_W = 4
_GPU = "GPU"
# A block's place: (chain id << _SHIFT) | end, one int (no per-block object for the
# collector to track): the block's prefix is chain.buf[:end].
_SHIFT = 32
_END = (1 << _SHIFT) - 1
_EVENTS_PER_LOCK = 32  # events applied per hold of the index lock
# A chain grown by decode steps keeps its newest blocks out of the tree (a *tail*, matched
# from the chain's buffer) until they reach _TAIL_BLOCKS blocks or 1/_TAIL_SHARE of the
# prefix the tree holds: a one-block extension then costs O(block), not a tree insert of
# its whole prefix (O(prefix) copies and compares), amortized.
_TAIL_BLOCKS = 8
_TAIL_SHARE = 8
_DECODE_STEP = True  # _stored's path for decode steps (tests compare it with the general one)

Namespace = tuple[Any, tuple[Any, ...]]
_DEFAULT_NS: Namespace = (None, ())

_COUNTERS = (
    "batches",
    "events",
    "bad_messages",
    "bad_events",
    "ignored_events",
    "ignored_batches",
    "duplicates",
    "blocks_stored",
    "blocks_removed",
    "blocks_evicted",
    "orphan_blocks",
    "unindexed_blocks",
    "unknown_removals",
    "clears",
    "resets",
    "gaps",
    "replays",
    "replayed_batches",
    "lost_batches",
)


@dataclass(frozen=True)
class WorkerStats:
    """Counters of one worker's event stream (see ``docs/events.md`` for each)."""

    batches: int
    """Batches applied (live and replayed)."""
    events: int
    """Events applied."""
    bad_messages: int
    """Messages skipped whole: not a batch (bad msgpack, structure, frames)."""
    bad_events: int
    """Events skipped inside a readable batch (malformed, token count != blocks * size,
    token ids the index cannot hold)."""
    ignored_events: int
    """Events of another KV cache group (hybrid models)."""
    ignored_batches: int
    """Batches of another data-parallel rank than the subscription's ``dp_rank``."""
    duplicates: int
    """Batches skipped as already applied: a redelivery (the last sequence number again,
    with the same bytes) or a replayed batch the index already had."""
    blocks_stored: int
    blocks_removed: int
    blocks_evicted: int
    """Blocks dropped by the index's own per-worker cap (``max_blocks_per_worker``)."""
    orphan_blocks: int
    """Stored blocks skipped because their parent block is unknown (missed events)."""
    unindexed_blocks: int
    """Stored blocks skipped because their hash depends on content the tokens do not show
    (multimodal inputs, prompt embeddings past the first block)."""
    unknown_removals: int
    """Removed hashes the index did not hold."""
    clears: int
    """``AllBlocksCleared`` events applied."""
    resets: int
    """Views reset by a publisher restart (a sequence number not above the last one, but
    for a duplicate) or a long disconnect."""
    gaps: int
    """Sequence gaps seen on the live stream."""
    replays: int
    """Replay requests sent (gaps and the catch-up at start)."""
    replayed_batches: int
    """Batches applied from replays."""
    lost_batches: int
    """Batches missed and not recovered by a replay."""
    blocks: int
    """Blocks the index holds for the worker now."""
    last_seq: int | None
    """Sequence number of the last batch applied."""
    stale: bool
    connected: bool | None
    """Subscriber's connection to the publisher (``None``: not subscribed)."""
    seconds_since_heard: float
    """Since the last message (or connection news) from the worker."""


class _Chain:
    """A token buffer shared by a chain of stored blocks, in namespace ``ns``: a block at
    ``end`` has the prefix ``buf[:end]``. A block stored under the last one (decode)
    appends in place; a branch copies its parent's prefix once."""

    __slots__ = ("base", "buf", "epoch", "ns", "tail", "tree_end")

    def __init__(self, buf: array[int], ns: Namespace, cid: int, epoch: int) -> None:
        self.buf = buf
        self.ns = ns
        self.base = cid << _SHIFT  # its blocks' codes are base | end
        # The tree holds buf[:tree_end] for the worker (inserted at the worker's removal
        # ``epoch``, none since if the epochs agree); a tail is buf[tree_end:tail], held by
        # the worker but not in the tree (tail == 0: none).
        self.tree_end = len(buf)
        self.epoch = epoch
        self.tail = 0


class _Worker:
    __slots__ = (
        "alive_at",
        "block_size",
        "blocks",
        "chains",
        "connected",
        "down_since",
        "epoch",
        "group",
        "key",
        "last_log",
        "last_payload",
        "last_seq",
        "media",
        "namespaces",
        "next_chain",
        "suppressed",
        "sweep_at",
        "tails",
        *_COUNTERS,
    )
    # WorkerStats' counters, one attribute each: cheaper to bump than dict items, and
    # every batch bumps a few.
    batches: int
    events: int
    bad_messages: int
    bad_events: int
    ignored_events: int
    ignored_batches: int
    duplicates: int
    blocks_stored: int
    blocks_removed: int
    blocks_evicted: int
    orphan_blocks: int
    unindexed_blocks: int
    unknown_removals: int
    clears: int
    resets: int
    gaps: int
    replays: int
    replayed_batches: int
    lost_batches: int

    def __init__(self, key: str, block_size: int, now: float) -> None:
        self.key = key
        # hash -> (chain id << _SHIFT) | end, in store order (the cap drops the oldest)
        self.blocks: dict[BlockHash, int] = {}
        # hash -> media of a block not on the GPU alone (absent: {"GPU"}): one str or a set
        self.media: dict[BlockHash, str | set[str]] = {}
        self.chains: dict[int, _Chain] = {}
        self.next_chain = 0
        self.sweep_at = 64  # chains count that triggers dropping unreferenced chains
        self.epoch = 0  # bumped by every removal from the trees
        self.tails: set[_Chain] = set()  # chains with a tail
        self.namespaces: set[Namespace] = set()
        self.block_size = block_size
        self.group: int | None = None
        self.last_seq: int | None = None
        self.last_payload: bytes | None = None  # the batch at last_seq, to tell a duplicate
        self.alive_at = now
        self.connected: bool | None = None
        self.down_since: float | None = None
        for counter in _COUNTERS:
            setattr(self, counter, 0)
        self.last_log = -1e18
        self.suppressed = 0


def _query(token_ids: object) -> array[int]:
    """A request's tokens as the Tree's 4-byte ids, cut before the first id no engine
    event can carry (negative, or >= 2**32)."""
    if type(token_ids) is array and token_ids.typecode == _U32:
        return token_ids
    if type(token_ids) is list or (
        not isinstance(token_ids, (str, bytes, bytearray))
        and isinstance(token_ids, (Sequence, array))  # not a generator, set or dict
    ):
        try:
            if type(token_ids) is list:
                a = array(_U32)
                a.fromlist(token_ids)  # ~2x faster than array(code, list)
                return a
            return array(_U32, cast("Sequence[int]", token_ids))
        except OverflowError:
            a = array(_U32)
            try:
                for t in token_ids:
                    if not 0 <= t <= 0xFFFFFFFF:
                        break
                    a.append(t)
                return a
            except TypeError:
                pass
        except TypeError:
            pass
    raise fail("token_ids", "a sequence of int token ids", token_ids, TypeError)


def _freeze(x: Any) -> Any:
    """msgpack gives lists for tuples; namespace keys must be hashable."""
    if type(x) is list or type(x) is tuple:
        return tuple(_freeze(v) for v in x)
    if type(x) is dict:
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    return x


_Feed = tuple[str, "str | None", str, "int | None", bool]
"""``(endpoint, replay, topic, dp_rank, catch_up)``: what a worker was subscribed with."""
_FEED_KEYS = frozenset(("endpoint", "replay", "topic", "dp_rank", "catch_up"))


def _feed(url: str, feed: object) -> _Feed:
    """One :meth:`KVEventIndex.sync_subscriptions` feed, checked and normalized."""
    param = f"feeds[{url!r}]"
    if not isinstance(feed, Mapping):
        raise fail(param, "a mapping with an 'endpoint'", feed, TypeError)
    unknown = sorted(map(str, set(feed).difference(_FEED_KEYS)))
    if unknown:
        raise fail(param, "a mapping of " + ", ".join(sorted(_FEED_KEYS)) + " only", feed)
    return (
        check_str(f"{param}['endpoint']", feed.get("endpoint")),
        check_str(f"{param}['replay']", feed.get("replay"), none_ok=True),
        check_str(f"{param}['topic']", feed.get("topic", ""), empty_ok=True),
        check_int(f"{param}['dp_rank']", feed.get("dp_rank"), minimum=0, none_ok=True),
        check_bool(f"{param}['catch_up']", feed.get("catch_up", True)),
    )


class KVEventIndex:
    """Per-worker exact view of engine prefix caches, fed by vLLM/SGLang KV events.

    Feed it with :meth:`subscribe` (a background ZMQ subscriber per worker, with replay of
    missed batches) or :meth:`apply` (one raw message at a time); ask it with
    :meth:`match`. A worker is identified by the string you give (its URL, or one string
    per data-parallel rank).

    Args:
        block_size: the engines' KV block size in tokens; an engine's events carry its
            own, which then wins for that worker. Matches are whole blocks.
        max_blocks_per_worker: cap on the blocks held per worker; past it the oldest
            stored blocks are dropped (down to 90% of the cap).
        stale_after: seconds after which a worker that is neither connected (for a
            subscribed worker) nor heard from is stale; a subscribed worker reconnecting
            after a disconnect this long has its view reset.
        replay_timeout: seconds to wait for a replay to finish.
        heartbeat: ZMQ heartbeat interval in seconds for subscriber connections (a dead
            publisher is noticed after three missed heartbeats).
        clock: monotonic clock in seconds (tests).

    Thread-safe: :meth:`match` may run in any number of request threads while
    subscriber threads apply events.

    >>> from cacheroute.events import BlockStored, KVEventIndex, encode_batch
    >>> index = KVEventIndex(block_size=2)
    >>> stored = BlockStored([11, 12], None, [1, 2, 3, 4], 2)
    >>> index.apply("http://w1:8000", 0, encode_batch([stored]))
    True
    >>> index.match([1, 2, 3, 9])
    {'http://w1:8000': 2}
    """

    def __init__(
        self,
        block_size: int = 16,
        *,
        max_blocks_per_worker: int = 262_144,
        stale_after: float = 30.0,
        replay_timeout: float = 2.0,
        heartbeat: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bs: int = check_int("block_size", block_size, minimum=1)
        self._cap: int = check_int("max_blocks_per_worker", max_blocks_per_worker, minimum=1)
        self._stale_after: float = check_real("stale_after", stale_after, minimum=0.0)
        self._replay_timeout: float = check_real(
            "replay_timeout", replay_timeout, minimum=0.0, min_open=True
        )
        self._heartbeat: float = check_real("heartbeat", heartbeat, minimum=0.0, min_open=True)
        self._clock: Callable[[], float] = check_callable("clock", clock)
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._trees: dict[Namespace, Tree] = {}
        self._uniform_bs: int = self._bs  # every worker's block size, or 0 if they differ
        # per namespace: tree_end -> {worker: chains with a tail past a prefix that long}
        self._tails: dict[Namespace, dict[int, dict[str, list[_Chain]]]] = {}
        self._lora_alias: dict[int, str] = {}
        self._subs: dict[str, Subscription] = {}
        self._feeds: dict[str, _Feed] = {}  # the subscribe() arguments of each of _subs
        self._ctx: Any = None
        self._closed = False

    # ----------------------------------------------------------------- feeding

    def subscribe(
        self,
        url: str,
        endpoint: str,
        replay: str | None = None,
        *,
        topic: str = "",
        dp_rank: int | None = None,
        catch_up: bool = True,
    ) -> None:
        """Follow ``url``'s engine: a background thread reads its ZMQ PUB ``endpoint``.

        Args:
            url: the worker's key in :meth:`match` results (one per DP rank, see docs).
            endpoint: the engine's PUB socket, e.g. ``"tcp://10.0.0.1:5557"``.
            replay: the engine's ROUTER replay socket, e.g. ``"tcp://10.0.0.1:5558"``:
                missed batches are asked for over a DEALER socket.
            topic: ZMQ topic prefix to subscribe to (the engine's ``topic``).
            dp_rank: apply only batches of this data-parallel rank.
            catch_up: with ``replay``, ask for the engine's buffered history on the
                first message, so the view starts complete rather than empty.

        Raises:
            RuntimeError: the index is closed, or ``url`` is already subscribed.
        """
        check_str("url", url)
        check_str("endpoint", endpoint)
        check_str("replay", replay, none_ok=True)
        check_str("topic", topic, empty_ok=True)
        check_int("dp_rank", dp_rank, minimum=0, none_ok=True)
        check_bool("catch_up", catch_up)
        from cacheroute.events.subscriber import Subscription

        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventIndex is closed")
            if url in self._subs:
                raise RuntimeError(f"{url!r} is already subscribed")
            if self._ctx is None:
                import zmq

                self._ctx = zmq.Context()
            sub = Subscription(  # first: a malformed address raises before any state
                self,
                url,
                self._ctx,
                endpoint,
                replay,
                topic=topic,
                dp_rank=dp_rank,
                catch_up=catch_up,
                heartbeat=self._heartbeat,
                replay_timeout=self._replay_timeout,
            )
            ws = self._worker(url)
            ws.connected = False
            ws.down_since = ws.alive_at = self._clock()
            self._subs[url] = sub
            self._feeds[url] = (endpoint, replay, topic, dp_rank, catch_up)
        sub.start()

    def unsubscribe(self, url: str) -> None:
        """Stop ``url``'s subscriber (its view stays; see :meth:`forget`). No-op if none."""
        check_str("url", url)
        with self._lock:
            sub = self._subs.pop(url, None)
            self._feeds.pop(url, None)
            ws = self._workers.get(url)
            if ws is not None:
                ws.connected = None
        if sub is not None:
            sub.stop()
            sub.join()

    def sync_subscriptions(self, feeds: Mapping[str, Mapping[str, Any]]) -> None:
        """Be subscribed to exactly ``feeds``, ``{url: feed}``: for gateways whose service
        discovery says where each engine publishes (Ray Serve's routing stats, a registry).

        A feed is a mapping of :meth:`subscribe`'s keyword arguments: ``endpoint``
        (required), ``replay``, ``topic``, ``dp_rank``, ``catch_up``. A url already
        subscribed to the same feed is left as it is; one whose feed changed (an engine
        restarted on another port) is forgotten and subscribed again, since its view
        describes a process that is gone; a subscribed url absent from ``feeds`` is
        forgotten. Workers fed only through :meth:`apply` are not touched.

        Raises:
            TypeError: ``feeds`` or one of its feeds is of a wrong type (the message names
                ``feeds[url]``); nothing changed.
            ValueError: ``feeds`` or one of its feeds has a wrong value (likewise; nothing
                changed), or some subscriptions could not be made (a malformed address):
                raised after every other url was synced, naming each failed url, which is
                left unsubscribed.
            RuntimeError: the index is closed.

        >>> from cacheroute.events import KVEventPublisher
        >>> with KVEventPublisher("tcp://127.0.0.1:*") as engine, KVEventIndex() as index:
        ...     index.sync_subscriptions({"http://w1:8000": {"endpoint": engine.endpoint}})
        ...     index.sync_subscriptions({})  # w1 left the pool: forgotten
        ...     index.urls()
        []
        """
        if not isinstance(feeds, Mapping):
            raise fail("feeds", "a mapping of url -> feed", feeds, TypeError)
        wanted = {check_str("feeds key", url): _feed(url, feed) for url, feed in feeds.items()}
        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventIndex is closed")
            current = dict(self._feeds)
        for url, old in current.items():
            if wanted.get(url) != old:
                self.forget(url)  # gone, or publishing elsewhere now
        failed: list[str] = []
        for url, (endpoint, replay, topic, dp_rank, catch_up) in wanted.items():
            if current.get(url) == wanted[url]:
                continue
            try:
                self.subscribe(
                    url, endpoint, replay, topic=topic, dp_rank=dp_rank, catch_up=catch_up
                )
            except Exception as exc:  # a malformed address: the others still sync
                failed.append(f"{url!r}: {exc}")
        if failed:
            raise ValueError("could not subscribe to " + "; ".join(failed))

    def apply(self, url: str, seq: int, payload: bytes, *, dp_rank: int | None = None) -> bool:
        """Apply one published message of ``url``'s engine: its ``seq`` and ``payload``.

        Sequence rules (a subscriber's, without replay): the last applied number again
        with the same bytes is a duplicate (a redelivery) and skipped; a number below
        the last, or equal to it with other bytes, is a publisher restart (engines number
        batches from 0 per process and stamp each with its time, so a restarted engine's
        seq 0 differs from the old seq 0) and resets the worker's view first; a jump
        counts as a gap (``lost_batches``). A subscriber, which knows which batches come
        from the live stream, takes every live batch not above the last for a restart.

        Returns:
            Whether the batch was applied (``False``: duplicate, other DP rank, or a bad
            message, which is counted and logged, never raised).
        """
        if type(url) is not str or not url:
            check_str("url", url)
        if type(seq) is not int or seq < 0:
            check_int("seq", seq, minimum=0)
        if type(payload) is not bytes and not isinstance(payload, (bytearray, memoryview)):
            raise fail("payload", "bytes", payload, TypeError)
        if dp_rank is not None:
            check_int("dp_rank", dp_rank, minimum=0)
        return self._apply(url, seq, payload, dp_rank)

    def touch(self, url: str) -> None:
        """Record that ``url``'s engine is alive though silent (for :meth:`apply` feeds
        whose transport has its own liveness signal)."""
        check_str("url", url)
        with self._lock:
            self._worker(url).alive_at = self._clock()

    def forget(self, url: str) -> None:
        """Drop everything known about ``url`` (stops its subscriber first)."""
        self.unsubscribe(url)
        with self._lock:
            ws = self._workers.pop(url, None)
            if ws is not None:
                self._clear(ws)
                self._block_sizes_changed()

    # ---------------------------------------------------------------- querying

    def match(
        self,
        token_ids: Sequence[int],
        *,
        lora_id: int | None = None,
        lora_name: str | None = None,
        extra_keys: Sequence[Any] | None = None,
        include_stale: bool = True,
    ) -> dict[str, int]:
        """``{worker: tokens}``: how many leading tokens of ``token_ids`` each worker's
        cache holds, in whole blocks; workers with no whole block are left out.

        A request matches only blocks of its own namespace: the same LoRA adapter (by
        ``lora_name``, or ``lora_id``) and the same first-block ``extra_keys`` as the
        engine computed them, less the LoRA name (for vLLM: ``(cache_salt,)`` for a
        salted request; for SGLang: ``(cache_salt,)`` too).

        A stale worker's last view is returned unless ``include_stale=False``; the caller
        decides (see :meth:`stale_urls`).

        Thread-safe. Complexity: one walk of the namespace's tree, O(len(token_ids)) in C
        comparisons.
        """
        if lora_id is None and lora_name is None and extra_keys is None:
            ns = _DEFAULT_NS
        else:
            ns = self._request_namespace(lora_id, lora_name, extra_keys)
        if include_stale is not True:
            check_bool("include_stale", include_stale)
        units = str(_query(token_ids), "latin-1")
        with self._lock:
            tree = self._trees.get(ns)
            if tree is None or not units:
                return {}
            raw = tree.match_lengths(units)
            b = self._uniform_bs * _W
            tails = self._tails.get(ns)
            if include_stale and b:
                # one block size for all: floor to whole blocks, drop those below one
                out = {w: (n - n % b) >> 2 for w, n in raw.items() if n >= b}
                if tails:
                    self._credit_tails(tails, units, out)
                return out
            out = {}
            now = self._clock() if not include_stale else 0.0
            workers = self._workers
            for w, n in raw.items():
                ws = workers.get(w)
                n >>= 2
                n -= n % (ws.block_size if ws is not None else self._bs)
                if n and (include_stale or (ws is not None and not self._stale(ws, now))):
                    out[w] = n
            if tails:
                self._credit_tails(tails, units, out)
            return out

    def _credit_tails(
        self, tails: dict[int, dict[str, list[_Chain]]], units: str, out: dict[str, int]
    ) -> None:
        """Extend ``out`` by the tails of chains whose tree part the request matched whole
        (a worker's tree match ends where such a chain's tree part ends: a block further
        would be the tail's own first block, hashes being a function of the prefix)."""
        for f in [f for f in set(out.values()) if f in tails]:  # few distinct lengths
            for w, chains in tails[f].items():
                if out.get(w) != f:
                    continue
                b4 = self._workers[w].block_size * _W
                best = f
                for chain in chains:
                    with memoryview(chain.buf) as mv:
                        if not units.startswith(str(mv[:f], "latin-1")):
                            continue
                        tail = str(mv[f : chain.tail], "latin-1")
                    pos = f * _W
                    lo, hi = 0, len(tail) // b4  # whole tail blocks the request goes on with
                    if units.startswith(tail, pos):
                        lo = hi
                    while lo < hi:
                        mid = (lo + hi + 1) >> 1
                        if units.startswith(tail[: mid * b4], pos):
                            lo = mid
                        else:
                            hi = mid - 1
                    best = max(best, f + lo * b4 // _W)
                out[w] = best

    def is_stale(self, url: str) -> bool:
        """Whether ``url``'s view may be out of date: its subscriber has been disconnected
        (or an :meth:`apply` feed silent) for more than ``stale_after`` seconds. An
        unknown ``url`` is stale (nothing is known about it)."""
        check_str("url", url)
        with self._lock:
            ws = self._workers.get(url)
            return ws is None or self._stale(ws, self._clock())

    def stale_urls(self) -> list[str]:
        """Known workers that are stale now (see :meth:`is_stale`)."""
        with self._lock:
            now = self._clock()
            return [k for k, ws in self._workers.items() if self._stale(ws, now)]

    def urls(self) -> list[str]:
        """Every worker known to the index (subscribed or fed), in first-seen order."""
        with self._lock:
            return list(self._workers)

    def stats(self) -> dict[str, WorkerStats]:
        """Per-worker counters (a snapshot)."""
        with self._lock:
            now = self._clock()
            return {
                k: WorkerStats(
                    **{counter: getattr(ws, counter) for counter in _COUNTERS},
                    blocks=len(ws.blocks),
                    last_seq=ws.last_seq,
                    stale=self._stale(ws, now),
                    connected=ws.connected,
                    seconds_since_heard=max(0.0, now - ws.alive_at),
                )
                for k, ws in self._workers.items()
            }

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop every subscriber and wait for its thread; idempotent. The view stays
        readable; :meth:`subscribe` raises afterwards."""
        with self._lock:
            self._closed = True
            subs = list(self._subs.values())
            self._subs.clear()
            for ws in self._workers.values():
                if ws.connected is not None:
                    ws.connected = None
        for s in subs:
            s.stop()
        for s in subs:
            s.join()
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()

    def __enter__(self) -> KVEventIndex:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KVEventIndex(block_size={self._bs}, workers={len(self._workers)}, "
            f"subscribed={len(self._subs)}, namespaces={len(self._trees)})"
        )

    # --------------------------------------------------------------- internals

    def _worker(self, key: str) -> _Worker:
        ws = self._workers.get(key)
        if ws is None:
            ws = self._workers[key] = _Worker(key, self._bs, self._clock())
        return ws

    def _stale(self, ws: _Worker, now: float) -> bool:
        return not ws.connected and now - ws.alive_at > self._stale_after

    def _request_namespace(
        self, lora_id: object, lora_name: object, extra_keys: object
    ) -> Namespace:
        lid: int | None = check_int("lora_id", lora_id, none_ok=True)
        lname: str | None = check_str("lora_name", lora_name, none_ok=True)
        lora: Any = None
        if lname is not None:
            lora = ("name", lname)
        elif lid is not None:
            name = self._lora_alias.get(lid)
            lora = ("name", name) if name is not None else ("id", lid)
        if extra_keys is None:
            return (lora, ())
        if isinstance(extra_keys, (str, bytes)) or not isinstance(extra_keys, Sequence):
            raise fail("extra_keys", "a list or tuple, or None", extra_keys, TypeError)
        try:
            keys = _freeze(list(extra_keys))
            hash(keys)
        except TypeError:
            raise fail("extra_keys", "hashable items", extra_keys, TypeError) from None
        return (lora, keys)

    def _event_namespace(self, ev: RawEvent) -> Namespace:
        lora_id, name, extra, salt = ev[5], ev[7], ev[8], ev[11]
        if lora_id is None and name is None and not extra and salt is None:
            return _DEFAULT_NS
        lora: Any = None
        if name is not None:
            lora = ("name", name)
            if lora_id is not None:
                self._lora_alias[lora_id] = name
        elif lora_id is not None:
            lora = ("id", lora_id)
        first = extra[0] if extra else None
        keys: tuple[Any, ...] = ()
        if first:
            keys = tuple(_freeze(k) for k in first if name is None or k != name)
        if not keys and salt is not None:
            keys = (salt,)
        return (lora, keys)

    def _block_sizes_changed(self) -> None:
        sizes = {ws.block_size for ws in self._workers.values()}
        self._uniform_bs = (sizes.pop() if len(sizes) == 1 else 0) if sizes else self._bs

    def _last_seq(self, key: str) -> int | None:
        with self._lock:
            ws = self._workers.get(key)
            return None if ws is None else ws.last_seq

    def _count(self, key: str, counter: str, n: int = 1) -> None:
        with self._lock:
            ws = self._worker(key)
            setattr(ws, counter, getattr(ws, counter) + n)

    def _bad(self, key: str, seq: int | None, reason: str) -> None:
        with self._lock:
            ws = self._worker(key)
            ws.bad_messages += 1
            ws.alive_at = self._clock()
            self._log_bad(ws, seq, reason)

    def _log_bad(self, ws: _Worker, seq: int | None, reason: str) -> None:
        now = time.monotonic()
        if now - ws.last_log < 10.0:  # at most one line per worker per 10 s
            ws.suppressed += 1
            return
        more = f" ({ws.suppressed} more since the last report)" if ws.suppressed else ""
        log.warning("KV events from %s: skipped message seq=%s: %s%s", ws.key, seq, reason, more)
        ws.last_log = now
        ws.suppressed = 0

    def _is_last(self, key: str, payload: bytes) -> bool:
        """Whether ``payload`` is the batch last applied for ``key`` (same bytes)."""
        with self._lock:
            ws = self._workers.get(key)
            return ws is not None and ws.last_payload == payload

    def _restart(self, key: str) -> None:
        """The publisher restarted (a live batch not above the last): its cache is empty."""
        with self._lock:
            ws = self._worker(key)
            self._clear(ws)
            ws.resets += 1
            ws.last_seq = ws.last_payload = None
            ws.group = None

    def _set_connected(self, key: str, up: bool) -> None:
        with self._lock:
            ws = self._workers.get(key)
            if ws is None or ws.connected is None:
                return
            now = self._clock()
            if up:
                down = ws.down_since
                if (
                    down is not None
                    and now - down >= self._stale_after
                    and (ws.blocks or ws.last_seq is not None)
                ):
                    # Gone long enough to have restarted unseen: start over.
                    self._clear(ws)
                    ws.resets += 1
                    ws.last_seq = ws.last_payload = None
                    ws.group = None
                ws.connected = True
                ws.down_since = None
            elif ws.connected:
                ws.connected = False
                ws.down_since = now
            ws.alive_at = now

    def _apply(
        self,
        key: str,
        seq: int,
        payload: bytes,
        dp_rank: int | None,
        *,
        replayed: bool = False,
        gap_noted: bool = False,
    ) -> bool:
        events: list[Any] | None
        try:
            _, events, rank = _decode_raw(payload)  # (apply and the subscriber pass bytes)
        except WireFormatError as exc:
            events, rank, reason = None, None, str(exc)
        lock = self._lock
        workers = self._workers
        lock.acquire()
        try:
            ws = workers.get(key) or self._worker(key)
            ws.alive_at = self._clock()
            last = ws.last_seq
            if last is not None:
                if seq <= last:
                    if replayed or (seq == last and payload == ws.last_payload):
                        ws.duplicates += 1
                        return False
                    # sequence went down, or seq 0 again with another batch: a new process
                    self._clear(ws)
                    ws.resets += 1
                    ws.group = None
                elif seq > last + 1:
                    ws.lost_batches += seq - last - 1
                    if not (gap_noted or replayed):
                        ws.gaps += 1
            ws.last_seq = seq
            ws.last_payload = payload if type(payload) is bytes else bytes(payload)
            if events is None:
                ws.bad_messages += 1
                self._log_bad(ws, seq, reason)
                return False
            if dp_rank is not None and rank is not None and rank != dp_rank:
                ws.ignored_batches += 1
                return False
            ws.batches += 1
            if replayed:
                ws.replayed_batches += 1
            held = 0
            for raw in events:
                if held == _EVENTS_PER_LOCK:  # a large batch never holds up a match long
                    lock.release()
                    lock.acquire()
                    if ws is not workers.get(key):  # forgotten meanwhile
                        return False
                    held = 0
                held += 1
                try:
                    ev = _read_event(raw)
                    ws.events += 1
                    tag = ev[0]
                    if tag == STORED:
                        self._stored(ws, ev)
                    elif tag == REMOVED:
                        self._removed(ws, ev)
                    else:
                        self._clear(ws)
                        ws.clears += 1
                except WireFormatError:  # an event the wire reader cannot read
                    ws.bad_events += 1
                except Exception as exc:  # never let one event kill a subscriber
                    ws.bad_events += 1
                    self._log_bad(ws, seq, f"event failed: {exc!r}")
        finally:
            lock.release()
        return True

    def _group_ok(self, ws: _Worker, group: int | None, kind: str | None) -> bool:
        """Follow one KV cache group per worker: the first full-attention one stored."""
        if group is None or group == ws.group:
            return True
        if ws.group is None and kind in (None, "full_attention"):
            ws.group = group
            return True
        ws.ignored_events += 1
        return False

    def _stored(self, ws: _Worker, ev: RawEvent) -> None:
        """O(k) in C for k blocks (one array, one dict update, one tree insert of the
        chain's prefix, itself O(prefix) in C), O(1) Python steps but for multimodal
        keys and blocks already held; a decode step's block (the usual event) takes a
        shorter path to the same state."""
        _, hashes, parent, toks, bs, _, medium, name, extra, group, kind, _ = ev
        blocks = ws.blocks
        chain: _Chain | None
        if (
            _DECODE_STEP
            and len(hashes) == 1
            and bs == ws.block_size
            and len(toks) == bs
            and (group is None or group == ws.group)
            and not (extra and extra[0])
            and (not medium or medium == _GPU)
            and (code := blocks.get(parent)) is not None  # (None is never a key)
            and hashes[0] not in blocks
        ):
            # A decode step, most of what an engine sends: one new plain GPU block of the
            # worker's block size and group under a held one (a new block on the GPU has
            # no media to note). If that one ends its chain, stored here as the general
            # path below stores it, in the fewest steps.
            chain = ws.chains[code >> _SHIFT]
            buf = chain.buf
            if code & _END == len(buf):
                try:
                    buf.fromlist(toks)  # in place (a failed one leaves buf as it was)
                except (OverflowError, TypeError):
                    pass  # the general path counts it
                else:
                    self._grown(ws, chain, bs)
                    blocks[hashes[0]] = chain.base + len(buf)
                    ws.blocks_stored += 1
                    if len(blocks) > self._cap:
                        self._evict(ws)
                    return
        if group is not None and group != ws.group and not self._group_ok(ws, group, kind):
            return
        n = len(hashes)
        if len(toks) != n * bs:
            ws.bad_events += 1
            return
        if n == 0:
            return
        a = array(_U32)
        try:
            a.fromlist(toks)  # (~2x faster than array(code, list)); ids >= 2**32: bad
        except (OverflowError, TypeError):
            ws.bad_events += 1
            return
        chain = None
        end = 0
        if parent is None:
            first = 1  # the first block's extra keys are the namespace
        else:
            code = blocks.get(parent)
            if code is None:
                ws.orphan_blocks += n
                return
            chain = ws.chains[code >> _SHIFT]
            end = code & _END
            first = 0
        k = n
        if extra:
            part = extra[first:n] if first or len(extra) > n else extra
            plain = part.count(None)
            if plain != len(part):
                plain += part.count([])
                if name is not None:
                    plain += part.count([name])
                if plain != len(part):
                    for i in range(first, min(n, len(extra))):
                        e = extra[i]
                        if e and any(x != name for x in e):
                            k = i  # content the tokens do not show: the chain stops here
                            break
        if k < n:
            ws.unindexed_blocks += n - k
            if k == 0:
                return
            hashes = hashes[:k]
            a = a[: k * bs]
        if bs != ws.block_size:
            ws.block_size = bs
            self._block_sizes_changed()
        if chain is None:
            chain = self._new_chain(ws, a, self._event_namespace(ev))
            self._to_tree(ws, chain)
        elif end == len(chain.buf):
            chain.buf.extend(a)  # the chain's last block grows (decode): in place
            self._grown(ws, chain, bs)
        else:
            if chain.tail and end > chain.tree_end:
                self._flush(ws, chain)  # the branch starts in the tail: tree first
            buf = chain.buf[:end]  # a branch: its parent's prefix, copied once
            buf.extend(a)
            chain = self._new_chain(ws, buf, chain.ns)
            self._to_tree(ws, chain)
        medium = medium or _GPU
        if medium != _GPU or ws.media:
            self._store_media(ws, hashes, medium)
        end += chain.base
        if k == 1:  # a decode step's block
            h = hashes[0]
            if h in blocks:
                del blocks[h]  # held already: it is the newest now
                if ws.tails:
                    self._flush_tails(ws)
            blocks[h] = end + bs
        else:
            before = len(blocks)
            blocks.update(zip(hashes, range(end + bs, end + k * bs + 1, bs), strict=True))
            if len(blocks) - before != k:  # some were held already: they are the newest now
                for h in hashes:
                    blocks[h] = blocks.pop(h)
                if ws.tails:
                    self._flush_tails(ws)
        ws.blocks_stored += k
        if len(blocks) > self._cap:
            self._evict(ws)

    def _grown(self, ws: _Worker, chain: _Chain, bs: int) -> None:
        """``chain`` grew in place by blocks of ``bs``: they join its tail while that stays
        short (no tree work), else the whole chain goes into the tree."""
        end = len(chain.buf)
        tree_end = chain.tree_end
        tail = end - tree_end
        # (two comparisons: the builtin max() costs a decode step ~0.1 us)
        if chain.epoch == ws.epoch and (tail < _TAIL_BLOCKS * bs or tail < tree_end // _TAIL_SHARE):
            if not chain.tail:
                self._add_tail(ws, chain)
            chain.tail = end
        else:
            self._to_tree(ws, chain)

    def _to_tree(self, ws: _Worker, chain: _Chain) -> None:
        """Insert ``chain``'s whole prefix (its tail too) into its namespace's tree."""
        ns = chain.ns
        tree = self._trees.get(ns)
        if tree is None:
            tree = self._trees[ns] = Tree()
        ws.namespaces.add(ns)
        tree.insert(str(chain.buf, "latin-1"), ws.key)
        if chain.tail:
            self._drop_tail(ws, chain)
        chain.tree_end = len(chain.buf)
        chain.epoch = ws.epoch

    # Tails, exactly: a chain grows one only while the tree holds its tree part as last
    # inserted (no removal for the worker since: the epochs agree), and every removal puts
    # the worker's tails into the tree first, so the tree alone then answers as if each
    # block had been inserted when stored. A request is credited a tail when the worker's
    # tree match ends where the chain's tree part does and covers it: a longer tree match
    # would go on with another block than the tail's first, which for engines whose block
    # hash is a function of the block's prefix (vLLM's and SGLang's) is a different path,
    # since a path through a tail re-stores its hashes and a branch from it names one as
    # its parent, and both put the tail into the tree first. (With hashes that are not, a
    # match can only come out shorter, never claim a block the worker does not hold.)

    def _add_tail(self, ws: _Worker, chain: _Chain) -> None:
        by_end = self._tails.setdefault(chain.ns, {})
        by_end.setdefault(chain.tree_end, {}).setdefault(ws.key, []).append(chain)
        ws.tails.add(chain)

    def _drop_tail(self, ws: _Worker, chain: _Chain) -> None:
        chain.tail = 0
        ws.tails.discard(chain)
        by_end = self._tails.get(chain.ns)
        if by_end is None:
            return
        by_worker = by_end.get(chain.tree_end)
        if by_worker is None:
            return
        held = by_worker.get(ws.key)
        if held is None:
            return
        if chain in held:
            held.remove(chain)
        if not held:
            del by_worker[ws.key]
            if not by_worker:
                del by_end[chain.tree_end]
                if not by_end:
                    del self._tails[chain.ns]

    def _flush(self, ws: _Worker, chain: _Chain) -> None:
        """Put ``chain``'s tail into the tree."""
        end = chain.tail
        tree = self._trees.get(chain.ns)
        if tree is None:
            tree = self._trees[chain.ns] = Tree()
        with memoryview(chain.buf) as mv:
            tree.insert(str(mv[:end], "latin-1"), ws.key)
        self._drop_tail(ws, chain)
        chain.tree_end = end

    def _flush_tails(self, ws: _Worker) -> None:
        for chain in list(ws.tails):
            self._flush(ws, chain)

    def _new_chain(self, ws: _Worker, buf: array[int], ns: Namespace) -> _Chain:
        chains = ws.chains
        if len(chains) >= ws.sweep_at:  # drop the chains no block refers to any more
            live = set(map(rshift, ws.blocks.values(), repeat(_SHIFT)))
            for cid in [cid for cid in chains if cid not in live]:
                dead = chains.pop(cid)
                if dead.tail:
                    self._drop_tail(ws, dead)
            ws.sweep_at = max(64, 2 * len(chains))
        chain = _Chain(buf, ns, ws.next_chain, ws.epoch)
        chains[ws.next_chain] = chain
        ws.next_chain += 1
        return chain

    def _store_media(self, ws: _Worker, hashes: list[BlockHash], medium: str) -> None:
        """Media of blocks about to be stored on ``medium`` (before the map update)."""
        media = ws.media
        blocks = ws.blocks
        for h in hashes:
            m = media.get(h)
            if m is None:
                if h not in blocks:
                    if medium != _GPU:
                        media[h] = medium
                elif medium != _GPU:
                    media[h] = {_GPU, medium}
            elif type(m) is str:
                if m != medium:
                    media[h] = {m, medium}
            else:
                assert isinstance(m, set)
                m.add(medium)

    def _removed(self, ws: _Worker, ev: RawEvent) -> None:
        _, hashes, medium, g = ev
        if g is not None and g != ws.group:
            ws.ignored_events += 1
            return
        medium = medium or _GPU
        blocks = ws.blocks
        if medium == _GPU and not ws.media:  # every block known is dropped
            codes = list(map(blocks.pop, hashes, repeat(None)))
            dead: list[int] = list(filter(None, codes))  # codes are >= 1
            unknown = len(codes) - len(dead)
        else:
            dead, unknown = self._remove_media(ws, hashes, medium)
        if unknown:
            ws.unknown_removals += unknown
        if dead:
            ws.blocks_removed += len(dead)
            self._drop(ws, dead)

    @staticmethod
    def _remove_media(ws: _Worker, hashes: list[BlockHash], medium: str) -> tuple[list[int], int]:
        media = ws.media
        blocks = ws.blocks
        dead: list[int] = []
        unknown = 0
        for h in hashes:
            code = blocks.get(h)
            if code is None:
                unknown += 1
                continue
            m = media.get(h, _GPU)
            if m == medium:
                del blocks[h]
                media.pop(h, None)
                dead.append(code)
            elif type(m) is set and medium in m:
                m.discard(medium)
                if len(m) == 1:
                    (rest,) = m
                    if rest == _GPU:
                        del media[h]
                    else:
                        media[h] = rest
            else:
                unknown += 1
        return dead, unknown

    def _evict(self, ws: _Worker) -> None:
        blocks = ws.blocks
        target = max(1, int(self._cap * 0.9))
        keys = list(islice(blocks, len(blocks) - target))  # the oldest stored
        dead = list(map(blocks.pop, keys))
        if ws.media:
            for h in keys:
                ws.media.pop(h, None)
        ws.blocks_evicted += len(dead)
        self._drop(ws, dead)

    def _drop(self, ws: _Worker, dead: list[int]) -> None:
        """Remove dropped blocks' prefixes from the trees: per chain only the shortest
        (removing a prefix removes everything extending it). C-level grouping."""
        lo = min(dead)
        if lo >> _SHIFT == max(dead) >> _SHIFT:  # one chain (an evicted tail): one removal
            firsts = [lo]
        else:  # per chain its smallest code: the shortest prefix
            dead = sorted(dead, reverse=True)
            firsts = list(dict(zip(map(rshift, dead, repeat(_SHIFT)), dead, strict=True)).values())
        if ws.tails:  # tails into the tree first: the removal then acts on the tree alone
            self._flush_tails(ws)
        ws.epoch += 1  # a chain grows a tail again only after a tree insert of its own
        chains = ws.chains
        for code in firsts:
            chain = chains[code >> _SHIFT]
            end = code & _END
            tree = self._trees.get(chain.ns)
            if tree is not None:
                with memoryview(chain.buf) as mv:
                    tree.remove(str(mv[:end], "latin-1"), ws.key)

    def _clear(self, ws: _Worker) -> None:
        for ns in ws.namespaces:
            tree = self._trees.get(ns)
            if tree is not None:
                tree.remove_tenant(ws.key)
                if not len(tree):
                    del self._trees[ns]
        for chain in list(ws.tails):
            self._drop_tail(ws, chain)
        ws.epoch += 1
        ws.namespaces.clear()
        ws.blocks.clear()
        ws.media.clear()
        ws.chains.clear()
        ws.sweep_at = 64
