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
from cacheroute.events._blocks import (
    _COUNTERS,
    _DEFAULT_NS,
    _U32,
    _W,
    Namespace,
    _BlockStore,
    _freeze,
    _Worker,
)
from cacheroute.events.wire import (
    REMOVED,
    STORED,
    WireFormatError,
    _decode_raw,
    _read_event,
)

if TYPE_CHECKING:
    from cacheroute.events.subscriber import Subscription

__all__ = ["KVEventIndex", "WorkerStats"]

log = logging.getLogger("cacheroute.events")

_EVENTS_PER_LOCK = 32  # events applied per hold of the index lock


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
        cap = check_int("max_blocks_per_worker", max_blocks_per_worker, minimum=1)
        self._stale_after: float = check_real("stale_after", stale_after, minimum=0.0)
        self._replay_timeout: float = check_real(
            "replay_timeout", replay_timeout, minimum=0.0, min_open=True
        )
        self._heartbeat: float = check_real("heartbeat", heartbeat, minimum=0.0, min_open=True)
        self._clock: Callable[[], float] = check_callable("clock", clock)
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._store = _BlockStore(self._workers, self._bs, cap)
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
            sub.start()  # under the lock: a close() or unsubscribe() now joins a started thread

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
                self._store.clear(ws)
                self._store.block_sizes_changed()

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
        store = self._store
        with self._lock:
            tree = store.trees.get(ns)
            if tree is None or not units:
                return {}
            raw = tree.match_lengths(units)
            b = store.uniform_bs * _W
            tails = store.tails.get(ns)
            if include_stale and b:
                # one block size for all: floor to whole blocks, drop those below one
                out = {w: (n - n % b) >> 2 for w, n in raw.items() if n >= b}
                if tails:
                    store.credit_tails(tails, units, out)
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
                store.credit_tails(tails, units, out)
            return out

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

    def block_size(self, url: str) -> int:
        """The KV block size of ``url``'s engine, in tokens: the last one its events
        carried, or the index's ``block_size`` for a worker not heard from. A match only
        ever reports whole blocks of it. O(1).

        Raises:
            TypeError: ``url`` is not a ``str``.

        >>> from cacheroute.events import BlockStored, encode_batch
        >>> index = KVEventIndex(block_size=16)
        >>> index.apply("http://a", 0, encode_batch([BlockStored([1], None, [0] * 4, 4)]))
        True
        >>> index.block_size("http://a"), index.block_size("http://b")
        (4, 16)
        """
        check_str("url", url)
        with self._lock:
            ws = self._workers.get(url)
            return self._bs if ws is None else ws.block_size

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
            f"subscribed={len(self._subs)}, namespaces={len(self._store.trees)})"
        )

    # --------------------------------------------------------------- internals

    def _worker(self, key: str) -> _Worker:
        ws = self._workers.get(key)
        if ws is None:
            ws = self._workers[key] = _Worker(key, self._bs, self._clock())
            if self._store.uniform_bs != self._bs:  # the others' block size is not ours
                self._store.block_sizes_changed()
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
            name = self._store.lora_alias.get(lid)
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
            self._store.clear(ws)
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
                    self._store.clear(ws)
                    ws.resets += 1
                    ws.last_seq = ws.last_payload = None
                    ws.group = None
                ws.connected = True
                ws.down_since = None
            elif ws.connected:
                ws.connected = False
                ws.down_since = now
            else:  # a failed handshake while down: no sign of life, staleness runs on
                return
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
        store = self._store
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
                    self._store.clear(ws)
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
                        store.stored(ws, ev)
                    elif tag == REMOVED:
                        store.removed(ws, ev)
                    else:
                        store.clear(ws)
                        ws.clears += 1
                except WireFormatError:  # an event the wire reader cannot read
                    ws.bad_events += 1
                except Exception as exc:  # never let one event kill a subscriber
                    ws.bad_events += 1
                    self._log_bad(ws, seq, f"event failed: {exc!r}")
        finally:
            lock.release()
        return True
