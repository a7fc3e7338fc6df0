"""KVEventIndex: which worker holds which prompt prefix, from the engines' own KV events.

See ``docs/events.md`` for the design, what each event does and the memory bound.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cacheroute._validation import (
    check_bool,
    check_callable,
    check_int,
    check_real,
    check_str,
    fail,
)
from cacheroute.events._store import Store, make_store
from cacheroute.events.wire import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    WireFormatError,
    decode_batch,
)

if TYPE_CHECKING:
    from cacheroute.events.subscriber import Subscription

__all__ = ["KVEventIndex", "WorkerStats"]

log = logging.getLogger("cacheroute.events")

_U32 = "I" if array("I").itemsize == 4 else "L"
_CODEC = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"
_MAX_TOKEN = 0x110000  # ids below map to one code point (the Tree's narrow encoding)
_GPU = "GPU"

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
    """Batches whose sequence number was already applied."""
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
    """Views reset by a publisher restart (sequence went down) or a long disconnect."""
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


class _Block:
    """Where a stored block's prefix lives: ``buf[:end]`` (tokens), in namespace ``ns``."""

    __slots__ = ("buf", "end", "media", "ns")

    def __init__(self, buf: array[int], end: int, ns: Namespace, media: str | set[str]):
        self.buf = buf
        self.end = end
        self.ns = ns
        self.media = media


class _Worker:
    __slots__ = (
        "alive_at",
        "block_size",
        "blocks",
        "c",
        "connected",
        "down_since",
        "group",
        "key",
        "last_log",
        "last_seq",
        "namespaces",
        "suppressed",
    )

    def __init__(self, key: str, block_size: int, now: float) -> None:
        self.key = key
        self.blocks: OrderedDict[BlockHash, _Block] = OrderedDict()
        self.namespaces: set[Namespace] = set()
        self.block_size = block_size
        self.group: int | None = None
        self.last_seq: int | None = None
        self.alive_at = now
        self.connected: bool | None = None
        self.down_since: float | None = None
        self.c = dict.fromkeys(_COUNTERS, 0)
        self.last_log = -1e18
        self.suppressed = 0


def _units(buf: array[int], end: int) -> str:
    """``buf[:end]`` as the store's units: one code point per token, one C-level copy."""
    with memoryview(buf) as mv:
        part = mv[:end]
        try:
            return str(part, _CODEC, "surrogatepass")
        finally:
            part.release()


def _query_units(token_ids: Sequence[int]) -> str:
    """A request's tokens as units, cut before the first id the index can never hold."""
    try:
        a = array(_U32, token_ids)
    except OverflowError:
        a = array(_U32)
        for t in token_ids:
            if not 0 <= t < _MAX_TOKEN:
                break
            a.append(t)
    except TypeError:
        raise fail("token_ids", "a sequence of int token ids", token_ids, TypeError) from None
    raw = a.tobytes()
    try:
        return raw.decode(_CODEC, "surrogatepass")
    except UnicodeDecodeError as exc:
        return raw[: exc.start].decode(_CODEC, "surrogatepass")


def _freeze(x: Any) -> Any:
    """msgpack gives lists for tuples; namespace keys must be hashable."""
    if type(x) is list or type(x) is tuple:
        return tuple(_freeze(v) for v in x)
    if type(x) is dict:
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    return x


class KVEventIndex:
    """Per-worker exact view of engine prefix caches, fed by vLLM/SGLang KV events.

    Feed it with :meth:`subscribe` (a background ZMQ subscriber per worker, with replay of
    missed batches) or :meth:`apply` (one raw message at a time); ask it with
    :meth:`match`. A worker is identified by the string you give (its URL, or one string
    per data-parallel rank).

    :param block_size: the engines' KV block size in tokens; an engine's events carry its
        own, which then wins for that worker. Matches are whole blocks.
    :param max_blocks_per_worker: cap on the blocks held per worker; past it the oldest
        stored blocks are dropped (down to 90% of the cap).
    :param stale_after: seconds after which a worker that is neither connected (for a
        subscribed worker) nor heard from is stale; a subscribed worker reconnecting
        after a disconnect this long has its view reset.
    :param replay_timeout: seconds to wait for a replay to finish.
    :param heartbeat: ZMQ heartbeat interval in seconds for subscriber connections (a dead
        publisher is noticed after three missed heartbeats).
    :param clock: monotonic clock in seconds (tests).

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
        self._trees: dict[Namespace, Store] = {}
        self._lora_alias: dict[int, str] = {}
        self._subs: dict[str, Subscription] = {}
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

        :param url: the worker's key in :meth:`match` results (one per DP rank, see docs).
        :param endpoint: the engine's PUB socket, e.g. ``"tcp://10.0.0.1:5557"``.
        :param replay: the engine's ROUTER replay socket, e.g. ``"tcp://10.0.0.1:5558"``:
            missed batches are asked for over a DEALER socket.
        :param topic: ZMQ topic prefix to subscribe to (the engine's ``topic``).
        :param dp_rank: apply only batches of this data-parallel rank.
        :param catch_up: with ``replay``, ask for the engine's buffered history on the
            first message, so the view starts complete rather than empty.
        :raises RuntimeError: the index is closed, or ``url`` is already subscribed.
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
            ws = self._worker(url)
            ws.connected = False
            ws.down_since = ws.alive_at = self._clock()
            sub = Subscription(
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
            self._subs[url] = sub
        sub.start()

    def unsubscribe(self, url: str) -> None:
        """Stop ``url``'s subscriber (its view stays; see :meth:`forget`). No-op if none."""
        check_str("url", url)
        with self._lock:
            sub = self._subs.pop(url, None)
            ws = self._workers.get(url)
            if ws is not None:
                ws.connected = None
        if sub is not None:
            sub.stop()
            sub.join()

    def apply(self, url: str, seq: int, payload: bytes, *, dp_rank: int | None = None) -> bool:
        """Apply one published message of ``url``'s engine: its ``seq`` and ``payload``.

        Sequence rules as for a subscriber (without replay): a number below the last
        applied one is a publisher restart and resets the worker's view first; one equal
        to it is a duplicate and skipped; a jump counts as a gap (``lost_batches``).

        :returns: whether the batch was applied (``False``: duplicate, other DP rank, or a
            bad message, which is counted and logged, never raised).
        """
        check_str("url", url)
        check_int("seq", seq, minimum=0)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise fail("payload", "bytes", payload, TypeError)
        check_int("dp_rank", dp_rank, minimum=0, none_ok=True)
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
        ns = self._request_namespace(lora_id, lora_name, extra_keys)
        check_bool("include_stale", include_stale)
        if isinstance(token_ids, (str, bytes, bytearray)):
            raise fail("token_ids", "a sequence of int token ids", token_ids, TypeError)
        units = _query_units(token_ids)
        with self._lock:
            tree = self._trees.get(ns)
            if tree is None or not units:
                return {}
            raw = tree.match_lengths(units)
            out: dict[str, int] = {}
            now = self._clock() if not include_stale else 0.0
            workers = self._workers
            for w, n in raw.items():
                ws = workers.get(w)
                bs = ws.block_size if ws is not None else self._bs
                n -= n % bs
                if n and (include_stale or (ws is not None and not self._stale(ws, now))):
                    out[w] = n
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

    def stats(self) -> dict[str, WorkerStats]:
        """Per-worker counters (a snapshot)."""
        with self._lock:
            now = self._clock()
            return {
                k: WorkerStats(
                    **ws.c,
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

    def _event_namespace(self, ev: BlockStored) -> Namespace:
        name = ev.lora_name
        lora: Any = None
        if name is not None:
            lora = ("name", name)
            if ev.lora_id is not None:
                self._lora_alias[ev.lora_id] = name
        elif ev.lora_id is not None:
            lora = ("id", ev.lora_id)
        first = ev.extra_keys[0] if ev.extra_keys else None
        keys: tuple[Any, ...] = ()
        if first:
            keys = tuple(_freeze(k) for k in first if name is None or k != name)
        if not keys and ev.cache_salt is not None:
            keys = (ev.cache_salt,)
        return (lora, keys)

    def _last_seq(self, key: str) -> int | None:
        with self._lock:
            ws = self._workers.get(key)
            return None if ws is None else ws.last_seq

    def _count(self, key: str, counter: str, n: int = 1) -> None:
        with self._lock:
            self._worker(key).c[counter] += n

    def _bad(self, key: str, seq: int | None, reason: str) -> None:
        with self._lock:
            ws = self._worker(key)
            ws.c["bad_messages"] += 1
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

    def _restart(self, key: str) -> None:
        """The publisher restarted (its sequence went down): its cache is empty."""
        with self._lock:
            ws = self._worker(key)
            self._clear(ws)
            ws.c["resets"] += 1
            ws.last_seq = None
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
                    ws.c["resets"] += 1
                    ws.last_seq = None
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
        batch: KVEventBatch | None
        try:
            batch = decode_batch(payload)
            reason = ""
        except WireFormatError as exc:
            batch, reason = None, str(exc)
        with self._lock:
            ws = self._worker(key)
            ws.alive_at = self._clock()
            last = ws.last_seq
            if last is not None:
                if seq <= last:
                    if replayed or seq == last:
                        ws.c["duplicates"] += 1
                        return False
                    self._clear(ws)  # sequence went down: the publisher restarted
                    ws.c["resets"] += 1
                    ws.group = None
                elif seq > last + 1:
                    ws.c["lost_batches"] += seq - last - 1
                    if not (gap_noted or replayed):
                        ws.c["gaps"] += 1
            ws.last_seq = seq
            if batch is None:
                ws.c["bad_messages"] += 1
                self._log_bad(ws, seq, reason)
                return False
            rank = batch.data_parallel_rank
            if dp_rank is not None and rank is not None and rank != dp_rank:
                ws.c["ignored_batches"] += 1
                return False
            ws.c["batches"] += 1
            if replayed:
                ws.c["replayed_batches"] += 1
        for ev in batch.events:
            with self._lock:
                if ws is not self._workers.get(key):  # forgotten meanwhile
                    return False
                try:
                    self._event(ws, ev)
                except Exception as exc:  # never let one event kill a subscriber
                    ws.c["bad_events"] += 1
                    self._log_bad(ws, seq, f"event failed: {exc!r}")
        return True

    def _event(self, ws: _Worker, ev: object) -> None:
        ws.c["events"] += 1
        if type(ev) is BlockStored:
            self._stored(ws, ev)
        elif type(ev) is BlockRemoved:
            self._removed(ws, ev)
        elif type(ev) is AllBlocksCleared:
            self._clear(ws)
            ws.c["clears"] += 1
        else:  # an event decode_batch could not read
            ws.c["events"] -= 1
            ws.c["bad_events"] += 1

    def _group_ok(self, ws: _Worker, group: int | None, kind: str | None) -> bool:
        """Follow one KV cache group per worker: the first full-attention one stored."""
        if group is None or group == ws.group:
            return True
        if ws.group is None and kind in (None, "full_attention"):
            ws.group = group
            return True
        ws.c["ignored_events"] += 1
        return False

    def _stored(self, ws: _Worker, ev: BlockStored) -> None:
        if not self._group_ok(ws, ev.group_idx, ev.kv_cache_spec_kind):
            return
        hashes = ev.block_hashes
        n = len(hashes)
        bs = ev.block_size
        toks = ev.token_ids
        if len(toks) != n * bs:
            ws.c["bad_events"] += 1
            return
        if n == 0:
            return
        try:
            a = array(_U32, toks)
        except (OverflowError, TypeError):
            a = None
        if a is None or max(a) >= _MAX_TOKEN:
            ws.c["bad_events"] += 1
            return
        blocks = ws.blocks
        parent = ev.parent_block_hash
        if parent is None:
            ns = self._event_namespace(ev)
            buf: array[int] = array(_U32)
            first = 1  # the first block's extra keys are the namespace
        else:
            pe = blocks.get(parent)
            if pe is None:
                ws.c["orphan_blocks"] += n
                return
            ns = pe.ns
            buf = pe.buf if pe.end == len(pe.buf) else pe.buf[: pe.end]
            first = 0
        k = n
        extra = ev.extra_keys
        if extra:
            name = ev.lora_name
            for i in range(first, min(n, len(extra))):
                e = extra[i]
                if e and any(x != name for x in e):
                    k = i  # content the tokens do not show: the chain stops here
                    break
        if k < n:
            ws.c["unindexed_blocks"] += n - k
            if k == 0:
                return
        if bs != ws.block_size:
            ws.block_size = bs
        start = len(buf)
        buf.extend(a if k == n else a[: k * bs])
        tree = self._trees.get(ns)
        if tree is None:
            tree = self._trees[ns] = make_store(bs)
        tree.insert(_units(buf, start + k * bs), ws.key)
        ws.namespaces.add(ns)
        medium = ev.medium or _GPU
        move = blocks.move_to_end
        end = start
        for i in range(k):
            end += bs
            h = hashes[i]
            old = blocks.get(h)
            if old is None:
                blocks[h] = _Block(buf, end, ns, medium)
            else:
                m = old.media
                if type(m) is str:
                    if m != medium:
                        old.media = {m, medium}
                else:
                    assert isinstance(m, set)
                    m.add(medium)
                move(h)
        ws.c["blocks_stored"] += k
        if len(blocks) > self._cap:
            self._evict(ws)

    def _removed(self, ws: _Worker, ev: BlockRemoved) -> None:
        g = ev.group_idx
        if g is not None and g != ws.group:
            ws.c["ignored_events"] += 1
            return
        medium = ev.medium or _GPU
        blocks = ws.blocks
        dead: list[_Block] = []
        unknown = 0
        for h in ev.block_hashes:
            e = blocks.get(h)
            if e is None:
                unknown += 1
                continue
            m = e.media
            if m == medium:
                del blocks[h]
                dead.append(e)
            elif type(m) is set and medium in m:
                m.discard(medium)
                if len(m) == 1:
                    e.media = next(iter(m))
            else:
                unknown += 1
        if unknown:
            ws.c["unknown_removals"] += unknown
        if dead:
            ws.c["blocks_removed"] += len(dead)
            self._drop(ws, dead)

    def _evict(self, ws: _Worker) -> None:
        blocks = ws.blocks
        target = max(1, int(self._cap * 0.9))
        dead = [blocks.popitem(last=False)[1] for _ in range(len(blocks) - target)]
        ws.c["blocks_evicted"] += len(dead)
        self._drop(ws, dead)

    def _drop(self, ws: _Worker, dead: list[_Block]) -> None:
        """Remove dropped blocks' prefixes from the trees: per buffer only the shortest
        (removing a prefix removes everything extending it)."""
        shortest: dict[int, _Block] = {}
        for e in dead:
            cur = shortest.get(id(e.buf))
            if cur is None or e.end < cur.end:
                shortest[id(e.buf)] = e
        for e in shortest.values():
            tree = self._trees.get(e.ns)
            if tree is not None:
                tree.remove(_units(e.buf, e.end), ws.key)

    def _clear(self, ws: _Worker) -> None:
        for ns in ws.namespaces:
            tree = self._trees.get(ns)
            if tree is not None:
                tree.remove_tenant(ws.key)
                if not len(tree):
                    del self._trees[ns]
        ws.namespaces.clear()
        ws.blocks.clear()
