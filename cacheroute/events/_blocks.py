"""The blocks each engine holds, as KV events describe them, and the trees that match them.

:class:`~cacheroute.events.KVEventIndex` owns one :class:`_BlockStore` and the feeds (sequence
numbers, connections, staleness); the store applies what a batch's events say to the
per-worker block maps and to one :class:`~cacheroute.tree.Tree` per namespace (LoRA adapter
and first-block extra keys). Every method runs under the index's lock. See
``docs/events.md``.
"""

from __future__ import annotations

from array import array
from itertools import islice, repeat
from operator import rshift
from typing import Any

from cacheroute.events.wire import BlockHash, RawEvent
from cacheroute.tree import Tree

_U32 = "I" if array("I").itemsize == 4 else "L"
# The trees hold text: a token is the 4 code points of its 4 bytes (latin-1 of the array,
# one C-level copy), so a match counts code points, which KVEventIndex.match floors to
# whole blocks in one pass (the Tree's token mode would first divide every worker's length
# by 4 itself).
_W = 4
_GPU = "GPU"
# A block's place: (chain id << _SHIFT) | end, one int (no per-block object for the
# collector to track): the block's prefix is chain.buf[:end].
_SHIFT = 32
_END = (1 << _SHIFT) - 1
# A chain grown by decode steps keeps its newest blocks out of the tree (a *tail*, matched
# from the chain's buffer) until they reach _TAIL_BLOCKS blocks or 1/_TAIL_SHARE of the
# prefix the tree holds: a one-block extension then costs O(block), not a tree insert of
# its whole prefix (O(prefix) copies and compares), amortized.
_TAIL_BLOCKS = 8
_TAIL_SHARE = 8
_DECODE_STEP = True  # stored()'s path for decode steps (tests compare it with the general one)

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
    """One worker: its blocks (the store's part) and its feed (the index's part: sequence
    numbers, connection, liveness, counters)."""

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


def _freeze(x: Any) -> Any:
    """msgpack gives lists for tuples; namespace keys must be hashable."""
    if type(x) is list or type(x) is tuple:
        return tuple(_freeze(v) for v in x)
    if type(x) is dict:
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    return x


class _BlockStore:
    """Every worker's blocks and the namespace trees they are matched in.

    ``workers`` is the index's own map of worker state (the store reads and changes the
    block part of each); ``trees`` maps a namespace to the tree of the prefixes held in
    it; ``tails`` (per namespace: tree_end -> {worker: chains}) finds the chains whose
    newest blocks are held outside the tree (see :meth:`_grown`).
    """

    __slots__ = ("block_size", "cap", "lora_alias", "tails", "trees", "uniform_bs", "workers")

    def __init__(self, workers: dict[str, _Worker], block_size: int, cap: int) -> None:
        self.workers = workers
        self.block_size = block_size  # the index's default, for workers whose events say none
        self.cap = cap  # blocks per worker
        self.trees: dict[Namespace, Tree] = {}
        self.uniform_bs = block_size  # every worker's block size, or 0 if they differ
        self.tails: dict[Namespace, dict[int, dict[str, list[_Chain]]]] = {}
        self.lora_alias: dict[int, str] = {}

    def credit_tails(
        self, tails: dict[int, dict[str, list[_Chain]]], units: str, out: dict[str, int]
    ) -> None:
        """Extend ``out`` by the tails of chains whose tree part the request matched whole
        (a worker's tree match ends where such a chain's tree part ends: a block further
        would be the tail's own first block, hashes being a function of the prefix)."""
        for f in [f for f in set(out.values()) if f in tails]:  # few distinct lengths
            for w, chains in tails[f].items():
                if out.get(w) != f:
                    continue
                b4 = self.workers[w].block_size * _W
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

    def _event_namespace(self, ev: RawEvent) -> Namespace:
        lora_id, name, extra, salt = ev[5], ev[7], ev[8], ev[11]
        if lora_id is None and name is None and not extra and salt is None:
            return _DEFAULT_NS
        lora: Any = None
        if name is not None:
            lora = ("name", name)
        elif lora_id is not None:
            lora = ("id", lora_id)
        first = extra[0] if extra else None
        keys: tuple[Any, ...] = ()
        if first:
            keys = tuple(_freeze(k) for k in first if name is None or k != name)
        if not keys and salt is not None:
            keys = (salt,)
        if name is not None and lora_id is not None:  # (last: a malformed event changes nothing)
            self.lora_alias[lora_id] = name
        return (lora, keys)

    def block_sizes_changed(self) -> None:
        sizes = {ws.block_size for ws in self.workers.values()}
        self.uniform_bs = (sizes.pop() if len(sizes) == 1 else 0) if sizes else self.block_size

    def _group_ok(self, ws: _Worker, group: int | None, kind: str | None) -> bool:
        """Follow one KV cache group per worker: the first full-attention one stored."""
        if group is None or group == ws.group:
            return True
        if ws.group is None and kind in (None, "full_attention"):
            ws.group = group
            return True
        ws.ignored_events += 1
        return False

    def stored(self, ws: _Worker, ev: RawEvent) -> None:
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
                    if len(blocks) > self.cap:
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
        if chain is None:  # (malformed extra keys fail here: before any change)
            ns = self._event_namespace(ev)
        if bs != ws.block_size:
            ws.block_size = bs
            self.block_sizes_changed()
        if chain is None:
            chain = self._new_chain(ws, a, ns)
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
        if len(blocks) > self.cap:
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
        tree = self.trees.get(ns)
        if tree is None:
            tree = self.trees[ns] = Tree()
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
        by_end = self.tails.setdefault(chain.ns, {})
        by_end.setdefault(chain.tree_end, {}).setdefault(ws.key, []).append(chain)
        ws.tails.add(chain)

    def _drop_tail(self, ws: _Worker, chain: _Chain) -> None:
        chain.tail = 0
        ws.tails.discard(chain)
        by_end = self.tails.get(chain.ns)
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
                    del self.tails[chain.ns]

    def _flush(self, ws: _Worker, chain: _Chain) -> None:
        """Put ``chain``'s tail into the tree."""
        end = chain.tail
        tree = self.trees.get(chain.ns)
        if tree is None:
            tree = self.trees[chain.ns] = Tree()
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

    def removed(self, ws: _Worker, ev: RawEvent) -> None:
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
        target = max(1, int(self.cap * 0.9))
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
            tree = self.trees.get(chain.ns)
            if tree is not None:
                with memoryview(chain.buf) as mv:
                    tree.remove(str(mv[:end], "latin-1"), ws.key)

    def clear(self, ws: _Worker) -> None:
        for ns in ws.namespaces:
            tree = self.trees.get(ns)
            if tree is not None:
                tree.remove_tenant(ws.key)
                if not len(tree):
                    del self.trees[ns]
        for chain in list(ws.tails):
            self._drop_tail(ws, chain)
        ws.epoch += 1
        ws.namespaces.clear()
        ws.blocks.clear()
        ws.media.clear()
        ws.chains.clear()
        ws.sweep_at = 64
