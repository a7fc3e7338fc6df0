"""Multi-tenant radix tree: which tenant holds the longest prefix of a prompt.

The :class:`Tree` is the approximate prefix cache behind cache-aware routing: for every
request a router asks which worker (*tenant*) holds the longest prefix of the prompt
(:meth:`Tree.match`), picks one, and records that it now holds the whole prompt
(:meth:`Tree.insert_match`). ``docs/tree.md`` has the semantics, the complexity table,
memory figures and benchmarks.

Why it is fast, in pure Python:

* **Unit comparisons run in C.** Edges are ``str``; text is stored as is (a unit is a code
  point) and token ids as fixed-width ``latin-1`` strings (4 or 8 code points per id, built
  by ``array`` and the codec at C speed). A descent is one dict lookup and one
  ``str.startswith(edge, pos)`` (a ``memcmp``) per node; a mismatch inside an edge is found
  by halving with slice compares, then (one byte per unit) one xor of the last windows,
  never by a per-unit Python loop.
* **Struct of arrays.** A node is an integer index into a few lists (edge, parent, children,
  holders, recency stamp). Children are ``dict[str, int]`` (first unit -> node), holders are
  the tenant's ``str`` (one holder) or a ``dict[str, int]``; CPython tracks none of these
  for garbage collection, so the collector has next to nothing to scan per node, there are
  no reference cycles, and a dropped tree is freed at once by reference counting.
* **O(1) exact LRU, one stamp per insert.** A tenant holds a set of prefixes, each with the
  time of the last insert through it. That time is the newest insert that *ended* at or
  below the prefix's node, so only the node where an insert ends gets a stamp (the insert's
  number); the nodes above it are *implicit*: as recent as their newest stamped descendant.
  An insert therefore writes one recency entry, where the former scheme moved every node of
  its path to the end of ``OrderedDict`` orders (1.6-1.8x slower W3 inserts), and no entry
  ever moves: a newer stamp replaces the old one, which is left dead. Each tenant's order is
  ``{stamp: node}`` (ascending, as stamps only grow) with a ``deque`` for its front, and a
  bounded tree adds ``{stamp: tenant}``. The least stamp names either a leaf of its tenant
  (evicted; a parent left a leaf inherits the stamp, which is its recency too) or a node
  that still has children of that tenant, all more recent, whose stamp is simply dropped.
  To tell the two apart in O(1), a shared node stores per holder
  ``stamp * 2**32 + children of that holder``. Nothing is scanned or sorted, and each insert
  evicts about what it adds, so no call pays for a burst.
* **Few nodes per path.** A tenant extending its own leaf (the next turn of a conversation)
  grows that leaf's edge instead of adding a node, so a 10-turn conversation stays one node.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

from cacheroute._validation import check_callable, check_int, check_str, fail

__all__ = ["Tree", "TreeMatch", "Units"]

Units = str | Sequence[int]
"""A prompt: ``str`` (units are code points) or a sequence of non-negative ``int`` token ids
(``list``, ``tuple``, ``range``, ``array.array``...)."""

Kind = Literal["text", "tokens"]
Holders = str | dict[str, int]  # one holder, or {tenant: stamp * _K + children it holds}

_CHUNK = 1024  # node ids allocated at a time
_XOR_SPAN = 256  # units: a window this small is settled by one xor, cheaper than halving on
_NONE = sys.maxsize  # "no bound"
_TEXT: Kind = "text"
_K = 1 << 32  # a multi-holder node's value for a tenant: stamp * _K + its children held
_M = _K - 1


class _Tenant:
    """One tenant: its name (the one ``str`` object every holder entry uses, so holders
    compare by identity), size, caps, and its recency order.

    The order is its stamped nodes, least recent first. ``live`` maps each stamp to its
    node; its insertion order is ascending stamps (a stamp is only ever added as the newest,
    and an entry passed to a parent keeps its place). ``q`` holds the same stamps in the
    same order plus dead ones (skipped at the front, dropped by :meth:`compact` once they
    are half of it). It exists because a dict's first item is found by stepping over every
    deleted slot before it, which eviction from the front would make O(n). The global
    order instead steps a counter up from its least stamp (``Tree._gf``): each number is
    passed once and most were stamps, while one tenant's stamps are sparse among them.
    """

    __slots__ = ("cap", "limit", "live", "name", "q", "size", "stale")

    def __init__(self, name: str, limit: int, max_chars: int) -> None:
        self.name = name
        self.size = 0  # code points held
        self.limit = limit  # cap in code points (_NONE: none)
        self.cap = min(limit, max_chars)  # longest insert kept whole
        self.live: dict[int, int] = {}
        self.q: deque[int] = deque()
        self.stale = 0  # at least the dead stamps in q

    def compact(self) -> None:
        """Drop the dead stamps of ``q``. O(live), in C."""
        self.q = deque(self.live)
        self.stale = 0


def _lcp(e: str, s: str, pos: int, latin1: bool = False) -> int:
    """Length of the common prefix of ``e`` and ``s[pos:]``, given ``e[0] == s[pos]`` and
    ``not s.startswith(e, pos)`` (every caller has just found that the edge does not
    match whole). ``latin1``: every unit of both is below 256 (a token tree's strings).

    A mismatch within the first 8 units is found by one C compare and a short loop (the
    common case). A longer run is halved with C-level ``startswith`` slice compares (each
    costs about the same whatever its length) down to a window of ``_XOR_SPAN`` units.
    Where both sides encode to one byte per unit (ASCII text, token ids), one xor settles
    the window: read as big-endian integers, the two windows' xor has its highest set bit
    in the first unit that differs. A 4,000-unit shared prompt takes 5 compares and one
    xor, where halving to the end took 13 (W1 insert p99 1.15-1.29x faster in two runs of
    ``benchmarks/bench_tree.py --baseline-rev``). Where ``s`` ends inside ``e`` it may
    match all of its rest, which one compare settles first; where it does not, the
    caller's failed ``startswith`` already says the mismatch is inside.
    """
    hi = len(s) - pos
    le = len(e)
    if le < hi:
        hi = le
    if hi < 2 or e[1] != s[pos + 1]:
        return 1
    lim = 8 if hi > 8 else hi
    if not s.startswith(e[2:lim], pos + 2):
        i = 2
        while e[i] == s[pos + i]:
            i += 1
        return i
    if lim == hi or (hi < le and s.startswith(e[lim:hi], pos + lim)):
        return hi
    lo = lim
    hi -= 1  # e[:lo] matches; the first unit that differs is in lo..hi
    span = _XOR_SPAN if latin1 or e.isascii() else 0
    while True:
        while hi - lo > span:
            mid = (lo + hi + 1) >> 1
            if s.startswith(e[lo:mid], pos + lo):
                lo = mid
            else:
                hi = mid - 1
        if not span:
            return lo
        b = s[pos + lo : pos + hi + 1]
        if latin1 or b.isascii():
            x = int.from_bytes(e[lo : hi + 1].encode("latin-1"), "big") ^ int.from_bytes(
                b.encode("latin-1"), "big"
            )
            return hi - ((x.bit_length() - 1) >> 3)
        span = 0  # s is wider there: halving to the end


def _encode(units: object, code: str) -> tuple[str, Kind]:
    """``units`` as the internal ``str`` and its kind; ``code`` is the ``array`` typecode
    of one token id. Raises ``TypeError``/``ValueError`` naming ``units``."""
    if isinstance(units, str):
        return (units if type(units) is str else str.__str__(units)), "text"
    if type(units) is array and units.typecode == code:
        return str(units, "latin-1"), "tokens"  # no conversion: the buffer is decoded
    if (
        type(units) is not list
        and type(units) is not tuple
        and (isinstance(units, (bytes, bytearray, memoryview)) or not isinstance(units, Sequence))
    ):
        raise fail("units", "a str or a sequence of int token ids", units, TypeError)
    try:
        return str(array(code, units), "latin-1"), "tokens"
    except (OverflowError, TypeError, ValueError):
        raise _token_error(units, code) from None


def _token_error(units: Sequence[Any], code: str) -> Exception:
    """The error for a token sequence ``array`` refused (slow path only)."""
    bits = 8 * array(code).itemsize
    for i, v in enumerate(units):
        if not isinstance(v, int):
            return fail(f"units[{i}]", "an int token id", v, TypeError)
        if not 0 <= v < 1 << bits:
            hint = "" if bits == 64 else " (Tree(token_bytes=8) takes ids < 2**64)"
            return fail(f"units[{i}]", f"a token id in [0, 2**{bits}){hint}", v)
    return fail("units", "a sequence of int token ids", units, TypeError)


def _tenant(tenant: object) -> str:
    """``tenant`` as an exact ``str`` (slow path: the fast one is ``type(t) is str``)."""
    return str.__str__(check_str("tenant", tenant, empty_ok=True))  # (not str(): __str__)


class TreeMatch:
    """What :meth:`Tree.match` found for one prompt; give it to :meth:`Tree.insert_match`.

    It records the descent (the nodes passed and the tree's version), so inserting the same
    prompt right after costs no second descent. It only reads the tree: if the tree is
    written in between, :meth:`Tree.insert_match` simply descends again. It cannot be built
    directly.

    Attributes:
        lengths: ``{tenant: matched units}`` for every tenant with a non-zero match, the
            same as :meth:`Tree.match_lengths` (a dict of its own: keep it or change it).
        units: length of the prompt, in units.

    >>> t = Tree()
    >>> t.insert("hello world", "a")
    >>> m = t.match("hello there")
    >>> m.lengths, m.units
    ({'a': 6}, 11)
    """

    __slots__ = ("_kind", "_s", "_tree", "_version", "_walk", "lengths", "units")

    lengths: dict[str, int]
    units: int
    _kind: Kind
    _s: str
    _tree: Tree
    _version: int
    _walk: _Walk

    def __init__(self) -> None:
        raise TypeError("TreeMatch objects are made by Tree.match")

    def __repr__(self) -> str:
        return f"TreeMatch(units={self.units}, lengths={self.lengths!r})"


_Walk = tuple[list[int], int, int, int]  # (full nodes, code points covered, partial node, k)


class Tree:
    """Multi-tenant radix tree over text or token ids, with exact LRU eviction and bounds.

    One tree holds one *kind* of units, fixed by the first non-empty insert: ``"text"``
    (``str``; a unit is a code point: any ``str`` works, lone surrogates included) or
    ``"tokens"`` (sequences of ``int`` ids in ``[0, 2**32)``, or ``[0, 2**64)`` with
    ``token_bytes=8``; ``bool`` values count as 0/1). The other kind raises ``TypeError``.

    A tenant *holds* every prefix of every sequence inserted for it, until evicted;
    ``size(tenant)`` is the number of distinct non-empty prefixes it holds. Each held prefix
    has a *recency*: the time of the tenant's last insert of a sequence starting with it.
    Reads (``match``, ``prefix_match``...) do not change recency.

    Eviction removes held prefixes, least recent first (longest first among equals, so what
    is left is prefix-closed), one unit at a time: a bound is never exceeded after a call
    returns and eviction stops as soon as it holds, so each insert evicts about what it adds.

    Bounds, all enforced inside the call that grows the tree (an insert; a remove or a
    lower tenant limit that splits a shared node), with no background thread:

    * ``max_size``: cap on :meth:`total_size` (units summed over tenants). Evicts the least
      recent (tenant, prefix) pairs of all tenants.
    * ``max_size_per_tenant`` / :meth:`set_tenant_limit`: cap on one tenant's units; the
      inserting tenant pays with its own least recent prefixes.
    * ``max_nodes``: cap on nodes summed over tenants (a node held by 3 tenants counts 3
      times, as its units do in :meth:`total_size`). This is what memory follows; see
      :meth:`max_nodes_for` to pick it for a memory budget.

    Thread-safety: every public method holds one internal lock for its whole work.

    Complexity: *m* = length of the argument in units, *d* = nodes on its path (d <= m and
    usually a handful), *T* = tenants, *e* = nodes evicted. Unit comparisons run in C.

    Args:
        max_size: cap on total units, or ``None``.
        max_size_per_tenant: default cap on each tenant's units, or ``None``.
        max_nodes: cap on nodes summed over tenants, or ``None``.
        token_bytes: bytes per token id, 4 (ids < 2**32) or 8 (ids < 2**64).

    Raises:
        TypeError: a parameter has the wrong type.
        ValueError: a cap is < 1, or ``token_bytes`` is not 4 or 8.

    >>> t = Tree(max_size=10_000)
    >>> t.insert("You are a helpful assistant. Hi", "w1")
    >>> t.prefix_match("You are a helpful assistant. Bye")
    (29, 'w1')
    """

    NODE_BYTES = 600
    """Worst-case bytes per node per holder (``max_nodes`` counts nodes so): measured up to
    443 (distinct 1-unit edges; ``benchmarks/bench_tree_memory.py``), plus margin."""

    __slots__ = (
        "__weakref__",
        "_bounded",
        "_code",
        "_edge",
        "_ent",
        "_free",
        "_gf",
        "_glob",
        "_hold",
        "_holdings",
        "_kids",
        "_kind",
        "_lock",
        "_max_chars",
        "_max_nodes",
        "_max_size",
        "_max_size_per_tenant",
        "_overrides",
        "_ten",
        "_total",
        "_up",
        "_version",
        "_w",
    )

    def __init__(
        self,
        max_size: int | None = None,
        max_size_per_tenant: int | None = None,
        *,
        max_nodes: int | None = None,
        token_bytes: int = 4,
    ) -> None:
        self._max_size: int | None = check_int("max_size", max_size, minimum=1, none_ok=True)
        self._max_size_per_tenant: int | None = check_int(
            "max_size_per_tenant", max_size_per_tenant, minimum=1, none_ok=True
        )
        mn = check_int("max_nodes", max_nodes, minimum=1, none_ok=True)
        if check_int("token_bytes", token_bytes) not in (4, 8):
            raise fail("token_bytes", "4 or 8", token_bytes)
        self._w = 1  # code points per unit: 1 for text, token_bytes for tokens
        self._code = "Q" if token_bytes == 8 else ("I" if array("I").itemsize == 4 else "L")
        self._max_nodes: int = _NONE if mn is None else mn
        self._max_chars = _NONE if max_size is None else max_size
        self._lock = threading.Lock()
        self._kind: Kind | None = None
        # per node (index 0 is the root): edge text, parent, children, holders, entry
        self._edge: list[str] = [""]
        self._up: list[int] = [0]
        self._kids: list[dict[str, int] | None] = [None]
        # holders: a str or a dict[str, int] (see Holders); Any spares the hot paths the
        # narrowing asserts mypy would need (measured: an assert per node is not free)
        self._hold: list[Any] = [None]
        self._ent: list[int] = [0]  # stamp of a single holder (0: implicit)
        self._free: list[int] = []
        self._holdings = 0
        # bumped by every write: a TreeMatch is valid while unchanged; the stamp of an insert
        self._version = 0
        self._ten: dict[str, _Tenant] = {}  # registration order
        self._total = 0
        # bounded: {stamp: tenant} of every live stamp, ascending; _gf <= the least one
        self._glob: dict[int, _Tenant] | None = None if max_size is None and mn is None else {}
        self._gf = 1
        self._overrides: dict[str, int | None] = {}
        self._bounded = not (max_size is None and mn is None and max_size_per_tenant is None)

    # ------------------------------------------------------------------ helpers

    def _register(self, t: str) -> _Tenant:
        o = self._ten.get(t)
        if o is None:
            cap = self._max_size_per_tenant
            o = self._ten[t] = _Tenant(t, _NONE if cap is None else cap * self._w, self._max_chars)
        return o

    def _start(self, units: object, t: str, kind: Kind, s: str) -> _Tenant | None:
        """An insert's slow start: fix the kind, register ``t``; ``None`` if ``s`` is empty."""
        if kind is not self._kind and s:
            self._set_kind(kind, units, True)
        o = self._register(t)
        return o if s else None

    def _set_kind(self, kind: Kind, units: object, write: bool) -> None:
        """Check ``kind`` against the tree's (fixing it on a write); raise if they differ."""
        if self._kind is None:
            if write:
                self._kind = kind
                if kind == "tokens":
                    w = self._w = array(self._code).itemsize
                    self._max_chars = _NONE if self._max_size is None else self._max_size * w
                    for o in self._ten.values():
                        if o.limit != _NONE:
                            o.limit *= w
                        o.cap = min(o.limit, self._max_chars)
            return
        if self._kind == "text":
            raise fail("units", "a str (this tree holds text)", units, TypeError)
        what = "a sequence of int token ids (this tree holds tokens)"
        raise fail("units", what, units, TypeError)

    def _walk(self, s: str) -> _Walk:
        """Descend along ``s``: the nodes whose edges it covers, the code points they cover,
        and the node whose edge it leaves (or ends) inside after ``k`` more, or ``-1``."""
        n = len(s)
        w = self._w
        kids = self._kids
        edge = self._edge
        node = 0
        pos = 0
        path: list[int] = []
        while pos < n:
            ch = kids[node]
            if ch is None:
                break
            c = ch.get(s[pos] if w == 1 else s[pos : pos + w])
            if c is None:
                break
            e = edge[c]
            if s.startswith(e, pos):
                pos += len(e)
                path.append(c)
                node = c
            else:
                k = _lcp(e, s, pos, w > 1)
                return path, pos, c, k - k % w
        return path, pos, -1, 0

    def _alloc(self) -> int:
        """A free node id (children and holders ``None``, stamp 0), growing the lists by a
        chunk if need be."""
        free = self._free
        if not free:
            n = len(self._edge)
            self._edge.extend([""] * _CHUNK)
            self._up.extend([0] * _CHUNK)
            self._kids.extend([None] * _CHUNK)
            self._hold.extend([None] * _CHUNK)
            self._ent.extend([0] * _CHUNK)
            free.extend(range(n + _CHUNK - 1, n - 1, -1))
        return free.pop()

    def _split(self, c: int, k: int) -> int:
        """Cut node ``c`` after ``k`` code points and return the new node above it.

        ``c`` keeps the lower part with everything that is its own (children, holders,
        stamps), so no recency entry moves; the new node takes the upper part and the same
        holders, each holding it through ``c`` (implicit, one child). O(holders).
        """
        edge = self._edge
        up = self._up
        z = self._free.pop() if self._free else self._alloc()
        e = edge[c]
        low = e[k:]
        edge[z] = e[:k]
        edge[c] = low
        p = up[c]
        up[z] = p
        up[c] = z
        if self._w == 1:
            self._kids[p][e[0]] = z  # type: ignore[index]  # p has c
            self._kids[z] = {low[0]: c}
        else:
            w = self._w
            self._kids[p][e[:w]] = z  # type: ignore[index]
            self._kids[z] = {low[:w]: c}
        h = self._hold[c]
        if type(h) is str:
            self._hold[z] = h  # stamp 0: implicit
            self._holdings += 1
        else:
            self._hold[z] = dict.fromkeys(h, 1)  # same order: most recent holder last
            self._holdings += len(h)
        return z

    def _bound(self, o: _Tenant, ne: int, old: int) -> None:
        """After an insert for ``o`` stamped ``ne`` (replacing ``old``): the global order,
        then the bounds."""
        g = self._glob
        if g is not None:
            g[ne] = o
            if old:
                del g[old]
        if o.size > o.limit:
            self._evict_tenant(o, o.limit)
        if self._total > self._max_chars or self._holdings > self._max_nodes:
            self._evict_global()

    def _put(self, s: str, o: _Tenant, path: list[int], pos: int, part: int, k: int) -> None:
        """Make ``o`` hold ``s`` (non-empty) given its descent (from :meth:`_walk`): the
        updates :meth:`insert` makes as it descends, without comparing an edge again; stamp
        the last node; enforce the bounds. O(d), + the evictions."""
        t = o.name
        kids = self._kids
        hold = self._hold
        w = self._w
        n = len(s)
        node = 0
        added = 0
        new = 0
        joined = False
        hn: Any = t
        for c in path:
            h = hold[c]
            if h is not t:
                if type(h) is str:
                    if not joined:
                        joined = True
                        if hn is not t:
                            hn[t] += 1
                    cc = kids[c]
                    h = hold[c] = {h: self._ent[c] * _K + (len(cc) if cc else 0), t: 1}
                    self._ent[c] = 0
                    added += len(self._edge[c])
                    new += 1
                else:
                    v = h.pop(t, -1)
                    if v < 0:
                        if not joined:
                            joined = True
                            if hn is not t:
                                hn[t] += 1
                        v = 1
                        added += len(self._edge[c])
                        new += 1
                    h[t] = v
            node = c
            hn = h
        ch = kids[node]
        key = ""
        if part >= 0:
            c = self._split(part, k)
            pos += k
            h = hold[c]
            if h is not t:
                if not joined and (type(h) is str or t not in h):
                    joined = True
                    if hn is not t:
                        hn[t] += 1
                if type(h) is str:
                    h = hold[c] = {h: 1, t: 1}
                    added += k
                    new += 1
                else:
                    if h.pop(t, 0) == 0:
                        added += k
                        new += 1
                    h[t] = 1
            node = c
            hn = h
            ch = kids[c]
        if pos < n and ch is not None:
            key = s[pos] if w == 1 else s[pos : pos + w]
        ne = self._version  # the stamp: unique, increasing
        live = o.live
        old = 0
        if pos < n:
            rest = s[pos:]
            if ch is None and hn is t and node:
                self._edge[node] += rest  # t's own leaf grows: no new node
                old = self._ent[node]
                self._ent[node] = ne
                live[ne] = node
            else:
                try:
                    x = self._free.pop()
                except IndexError:
                    x = self._alloc()
                self._edge[x] = rest
                self._up[x] = node
                hold[x] = t
                self._ent[x] = ne
                live[ne] = x
                new += 1
                if ch is None:
                    kids[node] = {rest[0] if w == 1 else rest[:w]: x}
                else:
                    ch[key] = x  # (the unit that no child starts with)
                if hn is not t and not joined:
                    hn[t] += 1  # one more child for t
            added += n - pos
        elif hn is t:  # s ends at node's end (t's alone): node gets the stamp
            old = self._ent[node]
            self._ent[node] = ne
            live[ne] = node
        else:
            v = hn[t]
            old = v >> 32
            hn[t] = ne * _K if joined else ne * _K + (v & _M)
            live[ne] = node
        o.q.append(ne)
        if new:
            self._holdings += new
        o.size += added
        self._total += added
        if old:  # a stamp replaced: its place in the order is dead
            del live[old]
            o.stale += 1
            if o.stale > len(o.q) >> 1:
                o.compact()
        if self._bounded:
            self._bound(o, ne, old)

    # ----------------------------------------------------------------- eviction

    def _unhold(self, o: _Tenant, x: int) -> int:
        """``o`` stops holding node ``x`` (no child of which it holds): the node goes if
        ``o`` was its last holder. Returns ``o``'s stamp there (0: implicit). O(1)."""
        hold = self._hold
        h = hold[x]
        size = len(self._edge[x])
        o.size -= size
        self._total -= size
        self._holdings -= 1
        if type(h) is str:  # no holder left, hence no child: unlink
            e = self._ent[x]
            self._unlink(x)
            return e
        v: int = h.pop(o.name)
        if len(h) == 1:
            for r, rv in h.items():
                hold[x] = r
                self._ent[x] = rv >> 32
        return v >> 32

    def _unlink(self, x: int) -> None:
        """Free node ``x`` (no holder, no child)."""
        edge = self._edge
        e = edge[x]
        p = self._up[x]
        ch: dict[str, int] = self._kids[p]  # type: ignore[assignment]  # p has x
        del ch[e[0] if self._w == 1 else e[: self._w]]
        if not ch:
            self._kids[p] = None
        edge[x] = ""
        self._hold[x] = None
        self._ent[x] = 0
        self._free.append(x)

    def _implicit(self, o: _Tenant, s: int, x: int) -> None:
        """The front entry ``s`` of ``o`` names ``x``, which still has children of ``o``:
        they are all more recent, so ``x``'s recency is theirs; drop the entry."""
        h = self._hold[x]
        if type(h) is str:
            self._ent[x] = 0
        else:
            h[o.name] &= _M
        del o.live[s]
        if self._glob is not None:
            del self._glob[s]
        q = o.q
        while q.popleft() != s:
            pass

    def _drop(self, o: _Tenant, s: int, x: int, excess: int) -> None:
        """Evict ``o``'s least recent entry ``s`` (node ``x``, a leaf of ``o``): the whole
        node for ``o``, or only its last ``excess`` code points if that is fewer. O(1), or
        O(holders) when a partial eviction must split a shared node."""
        edge = self._edge
        hold = self._hold
        kids = self._kids
        size = len(edge[x])
        h = hold[x]
        if excess < size:
            if type(h) is str and kids[x] is None:
                edge[x] = edge[x][: size - excess]  # o's own leaf: cut in place
                o.size -= excess
                self._total -= excess
                return
            self._split(x, size - excess)  # x keeps the lower part, which o loses
            size = excess
        o.size -= size
        self._total -= size
        self._holdings -= 1
        p = self._up[x]
        u = o.name
        if type(h) is str:  # no holder left, hence no child: unlink
            e = edge[x]
            ch = kids[p]
            del ch[e[0] if self._w == 1 else e[: self._w]]  # type: ignore[union-attr]
            if not ch:
                kids[p] = None
            edge[x] = ""
            hold[x] = None
            self._ent[x] = 0
            self._free.append(x)
        else:
            del h[u]
            if len(h) == 1:
                for r, rv in h.items():
                    hold[x] = r
                    self._ent[x] = rv >> 32
        if p:  # o held x through p: p may be its leaf now
            hp = hold[p]
            if type(hp) is str:
                if kids[p] is None and not self._ent[p]:
                    self._ent[p] = s  # implicit: it takes x's entry (the same recency)
                    o.live[s] = p
                    return
            else:
                v = hp[u] - 1
                if not v:  # implicit, no child of o left: it takes x's entry
                    hp[u] = s * _K
                    o.live[s] = p
                    return
                hp[u] = v
        del o.live[s]
        if self._glob is not None:
            del self._glob[s]
        q = o.q
        while q.popleft() != s:
            pass

    def _evict_tenant(self, o: _Tenant, target: int) -> None:
        """Evict ``o``'s least recent prefixes until it holds <= ``target`` code points."""
        live = o.live
        kids = self._kids
        hold = self._hold
        u = o.name
        while o.size > target:
            q = o.q
            s = q[0]
            x = live.get(s, -1)
            if x < 0:
                q.popleft()
                continue
            h = hold[x]
            if kids[x] is not None if type(h) is str else h[u] & _M:
                self._implicit(o, s, x)
                continue
            self._drop(o, s, x, o.size - target)

    def _evict_global(self) -> None:
        """Evict the least recent (tenant, prefix) pairs until every global bound holds."""
        g = self._glob
        assert g is not None
        kids = self._kids
        hold = self._hold
        edge = self._edge
        s = self._gf
        while True:
            excess = self._total - self._max_chars
            if self._holdings > self._max_nodes:
                excess = _NONE  # whole nodes
            elif excess <= 0:
                break
            o = g.get(s)
            while o is None:
                s += 1
                o = g.get(s)
            x = o.live[s]
            h = hold[x]
            if type(h) is str:
                if kids[x] is not None:
                    self._implicit(o, s, x)
                    continue
                size = len(edge[x])
                if excess < size:  # the last step of most inserts: cut o's own leaf
                    edge[x] = edge[x][: size - excess]
                    o.size -= excess
                    self._total -= excess
                    break
            elif h[o.name] & _M:
                self._implicit(o, s, x)
                continue
            self._drop(o, s, x, excess)
        self._gf = s

    # -------------------------------------------------------------------- reads

    def match(self, units: Units) -> TreeMatch:
        """Match ``units`` once: every tenant's matched length, and the descent for
        :meth:`insert_match`.

        Read-only: recency is not refreshed.

        Args:
            units: the prompt (``str`` or token ids).

        Returns:
            A :class:`TreeMatch` with ``lengths`` (as :meth:`match_lengths`) and ``units``.

        Raises:
            TypeError, ValueError: invalid ``units``, or the other kind than the tree's.

        Complexity: O(m) in C + O(d + tenants matched).

        >>> t = Tree()
        >>> t.insert("system prompt A", "w1")
        >>> m = t.match("system prompt B")
        >>> m.lengths
        {'w1': 14}
        >>> t.insert_match(m, "w2")
        0
        >>> t.prefix_match_tenant("system prompt B", "w2")
        15
        """
        if type(units) is str:
            s: str = units
            kind: Kind = "text"
        else:
            s, kind = _encode(units, self._code)
        m: TreeMatch = object.__new__(TreeMatch)
        lock = self._lock
        lock.acquire()  # (not ``with``: measured ~0.12 us dearer per call)
        try:
            if kind != self._kind and s and self._kind is not None:
                self._set_kind(kind, units, False)
            walk = path, pos, part, k = self._walk(s)
            m.lengths = self._lengths(path, pos, part, k)
            m._version = self._version
        finally:
            lock.release()
        m.units = len(s) if kind == "text" else len(s) // array(self._code).itemsize
        m._walk = walk
        m._s = s
        m._kind = kind
        m._tree = self
        return m

    def _lengths(self, path: list[int], pos: int, part: int, k: int) -> dict[str, int]:
        """Per-tenant matched units of a descent. Holder sets shrink going down, so the path
        is a run of shared nodes then a run held by one tenant: only the first run is
        visited (deeper ends overwrite shallower ones). O(shared nodes + their holders)."""
        hold = self._hold
        res: dict[str, int] = {}
        end = 0
        for y in path:
            h = hold[y]
            if type(h) is str:
                res[h] = pos + k  # the rest of the path (and the partial node) is h's alone
                break
            end += len(self._edge[y])
            if res:
                for u in h:
                    res[u] = end
            else:
                res = dict.fromkeys(h, end)
        else:
            if part >= 0:
                h = hold[part]
                if type(h) is str:
                    res[h] = pos + k
                else:
                    for u in h:
                        res[u] = pos + k
        w = self._w
        if w != 1:
            return {u: c // w for u, c in res.items()}
        return res

    def match_lengths(self, units: Units) -> dict[str, int]:
        """Matched units of every tenant with a non-zero match, in one descent.

        Read-only. Same as ``match(units).lengths``.

        Args:
            units: the prompt.

        Returns:
            ``{tenant: matched units}`` (a new dict).

        Raises:
            TypeError, ValueError: invalid ``units``, or the other kind.

        Complexity: O(m) in C + O(d + tenants matched).

        >>> t = Tree()
        >>> t.insert("hello world", "a")
        >>> t.insert("hello there", "b")
        >>> sorted(t.match_lengths("hello thx").items())
        [('a', 6), ('b', 8)]
        """
        return self.match(units).lengths

    def prefix_match(self, units: Units) -> tuple[int, str | None]:
        """Longest prefix of ``units`` held by any tenant, and who holds it.

        Read-only. Among the tenants holding that longest prefix, the one whose last insert
        through it is the most recent wins.

        Args:
            units: the prompt.

        Returns:
            ``(matched_units, tenant)``, or ``(0, None)`` when nothing matches.

        Raises:
            TypeError, ValueError: invalid ``units``, or the other kind.

        Complexity: O(m) in C + O(d).

        >>> t = Tree()
        >>> t.insert("shared prefix one", "a")
        >>> t.insert("shared prefix two", "b")
        >>> t.prefix_match("shared prefix")
        (13, 'b')
        >>> t.prefix_match("shared prefix one!")
        (17, 'a')
        """
        if type(units) is str:
            s: str = units
            kind: Kind = "text"
        else:
            s, kind = _encode(units, self._code)
        lock = self._lock
        lock.acquire()
        try:
            if kind != self._kind and s and self._kind is not None:
                self._set_kind(kind, units, False)
            # The descent of _walk without its path: the hottest read, and measured
            # ~25% faster than calling _walk (bench_tree.py, W1/W3 match).
            n = len(s)
            w = self._w
            kids = self._kids
            edge = self._edge
            node = 0
            pos = 0
            last = -1
            while pos < n:
                ch = kids[node]
                if ch is None:
                    break
                c = ch.get(s[pos] if w == 1 else s[pos : pos + w])
                if c is None:
                    break
                last = c
                e = edge[c]
                if not s.startswith(e, pos):
                    k = _lcp(e, s, pos, w > 1)
                    pos += k - k % w
                    break
                pos += len(e)
                node = c
            if last < 0:
                return 0, None
            h = self._hold[last]
            if type(h) is str:
                return pos // w, h
            return pos // w, next(reversed(h))
        finally:
            lock.release()

    def prefix_match_tenant(self, units: Units, tenant: str) -> int:
        """Longest prefix of ``units`` held by ``tenant`` (0 if unknown).

        Read-only.

        Args:
            units: the prompt.
            tenant: the tenant.

        Returns:
            Matched units.

        Raises:
            TypeError, ValueError: invalid ``units`` or ``tenant``, or the other kind.

        Complexity: O(m) in C + O(d).

        >>> t = Tree()
        >>> t.insert("hello world", "a")
        >>> t.prefix_match_tenant("hello there", "a")
        6
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        if type(units) is str:
            s: str = units
            kind: Kind = "text"
        else:
            s, kind = _encode(units, self._code)
        with self._lock:
            if kind != self._kind and s and self._kind is not None:
                self._set_kind(kind, units, False)
            path, pos, part, k = self._walk(s)
            hold = self._hold
            if part >= 0 and self._holds(hold[part], t):
                return (pos + k) // self._w
            for y in reversed(path):  # t's nodes are a top part of the path
                if self._holds(hold[y], t):
                    return pos // self._w
                pos -= len(self._edge[y])
            return 0

    @staticmethod
    def _holds(h: Holders | None, t: str) -> bool:
        return h == t if type(h) is str else (h is not None and t in h)

    # ------------------------------------------------------------------- writes

    def insert(self, units: Units, tenant: str) -> None:
        """Record that ``tenant`` holds every prefix of ``units``; refresh their recency.

        Empty ``units`` only registers the tenant. The bounds are enforced before returning;
        a prompt longer than the tenant's cap (or ``max_size``) keeps its first cap units.

        Args:
            units: the prompt.
            tenant: who now holds it.

        Raises:
            TypeError: ``tenant`` is not a ``str``; ``units`` has a wrong type or element,
                or is of the other kind than the tree.
            ValueError: a token id is out of range.

        Complexity: O(m) in C + O(d), + O(1) amortized per node evicted.

        >>> t = Tree()
        >>> t.insert("abc", "a")
        >>> t.insert("abd", "a")
        >>> t.size("a")  # a, ab, abc, abd
        4
        """
        if type(tenant) is not str:
            tenant = _tenant(tenant)
        if type(units) is str:
            s: str = units
            kind: Kind = "text"
        else:
            s, kind = _encode(units, self._code)
        lock = self._lock
        lock.acquire()  # (not ``with``: measured ~0.12 us dearer per call)
        try:
            o = self._ten.get(tenant)
            if o is None or kind is not self._kind or not s:
                o = self._start(units, tenant, kind, s)
                if o is None:
                    return
            ne = self._version + 1  # the stamp of this insert: unique, increasing
            self._version = ne
            if self._bounded and len(s) > o.cap:  # the state of inserting it whole, evicting
                s = s[: o.cap]
                if not s:
                    return
            if kind is not _TEXT:
                path, pos, part, k = self._walk(s)
                self._put(s, o, path, pos, part, k)
                return
            # The descent and the update in one loop (text: a unit is one code point). The
            # nodes t holds are a top part of the path (holder sets shrink going down): on
            # each t moves to the end of the holders (most recent last, for prefix_match's
            # ties); on the rest it joins, held through the next node.
            t = o.name
            kids = self._kids
            hold = self._hold
            n = len(s)
            node = 0
            pos = 0
            added = 0
            new = 0
            joined = False  # t holds node since this insert (through the next node)
            hn: Any = t  # holders of node (the root: as if t's own)
            ch = kids[0]
            key = ""
            while pos < n and ch is not None:
                key = s[pos]
                c = ch.get(key)
                if c is None:
                    break
                e = self._edge[c]
                le = len(e)
                if le > 1 and not s.startswith(e, pos):  # s leaves or ends inside e: cut it
                    k = 1 if pos + 1 == n or e[1] != s[pos + 1] else _lcp(e, s, pos)
                    # (_split inlined: c keeps the lower part, z the upper one)
                    try:
                        z = self._free.pop()
                    except IndexError:
                        z = self._alloc()
                    low = e[k:]
                    self._edge[z] = e[:k]
                    self._edge[c] = low
                    self._up[z] = node
                    self._up[c] = z
                    ch[key] = z
                    kids[z] = {low[0]: c}
                    pos += k
                    h = hold[c]
                    if h is t:
                        hold[z] = t  # (its stamp: 0, implicit)
                        new += 1
                    elif type(h) is str:  # t joins the upper part only
                        if not joined:
                            joined = True
                            if hn is not t:
                                hn[t] += 1
                        h = hold[z] = {h: 1, t: 1}
                        added += k
                        new += 2
                    else:
                        h = hold[z] = dict.fromkeys(h, 1)  # same order
                        new += len(h)
                        if h.pop(t, 0) == 0:
                            if not joined:
                                joined = True
                                if hn is not t:
                                    hn[t] += 1
                            added += k
                            new += 1
                        h[t] = 1
                    node = z
                    hn = h
                    ch = kids[z]
                    if pos < n:
                        key = s[pos]
                    break
                pos += le
                h = hold[c]
                if h is not t:
                    if type(h) is str:  # another tenant's: t joins it
                        if not joined:
                            joined = True
                            if hn is not t:
                                hn[t] += 1
                        cc = kids[c]
                        h = hold[c] = {h: self._ent[c] * _K + (len(cc) if cc else 0), t: 1}
                        self._ent[c] = 0
                        added += le
                        new += 1
                    else:
                        v = h.pop(t, -1)
                        if v < 0:
                            if not joined:
                                joined = True
                                if hn is not t:
                                    hn[t] += 1
                            v = 1
                            added += le
                            new += 1
                        h[t] = v  # most recent holder last
                node = c
                hn = h
                ch = kids[c]
            live = o.live
            old = 0
            if pos < n:
                rest = s[pos:]
                if ch is None and hn is t and node:
                    self._edge[node] += rest  # t's own leaf grows: no new node
                    old = self._ent[node]
                    self._ent[node] = ne
                    live[ne] = node
                else:
                    try:
                        x = self._free.pop()
                    except IndexError:
                        x = self._alloc()
                    self._edge[x] = rest
                    self._up[x] = node
                    hold[x] = t
                    self._ent[x] = ne
                    live[ne] = x
                    new += 1
                    if ch is None:
                        kids[node] = {rest[0]: x}
                    else:
                        ch[key] = x  # (the unit that no child starts with)
                    if hn is not t and not joined:
                        hn[t] += 1  # one more child for t
                added += n - pos
            elif hn is t:  # s ends at node's end (t's alone): node gets the stamp
                old = self._ent[node]
                self._ent[node] = ne
                live[ne] = node
            else:
                v = hn[t]
                old = v >> 32
                hn[t] = ne * _K if joined else ne * _K + (v & _M)
                live[ne] = node
            o.q.append(ne)
            if new:
                self._holdings += new
            o.size += added
            self._total += added
            if old:  # a stamp replaced: its place in the order is dead
                del live[old]
                o.stale += 1
                if o.stale > len(o.q) >> 1:
                    o.compact()
            if self._bounded:
                self._bound(o, ne, old)
        finally:
            lock.release()

    def insert_match(self, match: TreeMatch, tenant: str) -> int:
        """Insert the prompt of ``match`` for ``tenant``, as :meth:`insert` would.

        The descent recorded by :meth:`match` is reused when the tree has not been written
        since (no second descent); otherwise the prompt is matched again.

        Args:
            match: a :class:`TreeMatch` from this tree's :meth:`match`.
            tenant: who now holds the prompt.

        Returns:
            The units of the prompt ``tenant`` held at match time
            (``match.lengths.get(tenant, 0)``).

        Raises:
            TypeError: ``match`` is not a :class:`TreeMatch`, ``tenant`` is not a ``str``,
                or the tree has since been fixed to the other kind.
            ValueError: ``match`` comes from another tree.

        Complexity: O(d) + what :meth:`insert` evicts; O(m) in C + O(d) if re-matched.

        >>> t = Tree()
        >>> m = t.match("hello")
        >>> t.insert_match(m, "a"), t.insert_match(t.match("help"), "b")
        (0, 0)
        >>> t.match_lengths("hello")
        {'a': 5, 'b': 3}
        """
        if type(match) is not TreeMatch:
            raise fail("match", "a TreeMatch (from Tree.match)", match, TypeError)
        if match._tree is not self:
            raise fail("match", "a TreeMatch from this tree's match()", match)
        if type(tenant) is not str:
            tenant = _tenant(tenant)
        s = match._s
        lock = self._lock
        lock.acquire()
        try:
            kind = match._kind
            o = self._ten.get(tenant)
            if o is None or kind is not self._kind or not s:
                if kind is not self._kind and s:
                    if self._kind is not None:
                        what = f"a match of {self._kind} (this tree's kind)"
                        raise fail("match", what, match, TypeError)
                    self._set_kind(kind, s, True)
                o = self._register(tenant)
                if not s:
                    return 0  # (an empty match matched nothing)
            fresh = match._version == self._version
            self._version += 1
            if self._bounded and len(s) > o.cap:
                s = s[: o.cap]
                fresh = False
            if s:
                path, pos, part, k = match._walk if fresh else self._walk(s)
                self._put(s, o, path, pos, part, k)
        finally:
            lock.release()
        return match.lengths.get(tenant, 0)

    def shared_length(self, match: TreeMatch) -> int:
        """Units of the longest prefix of ``match``'s prompt that the tree has seen
        continued in two ways: a prefix other prompts share (a system prompt, a few-shot
        template), as opposed to one prompt's own history (a conversation's earlier
        turns, which only its next turn extends).

        A fork counts when it has three branches or more, or two that both go on for at
        least two units: a branch of one unit that ends there is what a block-hash prompt
        leaves behind (the last, partial block of a previous turn, completed differently
        by the next one). The prompt itself counts as one branch where it leaves the tree
        (if it goes on for two units or more), and a prompt that ends inside the tree is
        shared all the way (a longer prompt continues it).

        Args:
            match: a :class:`TreeMatch` from this tree's :meth:`match`; if the tree has
                been written since, its prompt is matched again.

        Returns:
            Units, at most the prompt's match: 0 when nothing of it is shared.

        Raises:
            TypeError: ``match`` is not a :class:`TreeMatch`; ValueError: it comes from
                another tree.

        Complexity: O(d) for the d nodes matched.

        >>> t = Tree()
        >>> t.insert("SYSTEM. user one asks", "a")
        >>> t.insert("SYSTEM. user two asks", "b")
        >>> t.shared_length(t.match("SYSTEM. user nine"))
        13
        >>> t.insert("hi there", "c")
        >>> t.shared_length(t.match("hi there, and more"))  # only its own history
        0
        """
        if type(match) is not TreeMatch:
            raise fail("match", "a TreeMatch (from Tree.match)", match, TypeError)
        if match._tree is not self:
            raise fail("match", "a TreeMatch from this tree's match()", match)
        s = match._s
        if not s:
            return 0
        lock = self._lock
        lock.acquire()
        try:
            if match._kind is not self._kind:
                return 0  # nothing of the other kind is in this tree
            path, pos, part, k = match._walk if match._version == self._version else self._walk(s)
            kids = self._kids
            edge = self._edge
            w = self._w
            depth = d = 0
            for y in path:
                d += len(edge[y])
                ch = kids[y]
                if ch is not None and len(ch) > 1:
                    if len(ch) > 2:  # three ways: more than one turn's leftover
                        depth = d
                    else:
                        c1, c2 = ch.values()
                        if (len(edge[c1]) > w or kids[c1] is not None) and (
                            len(edge[c2]) > w or kids[c2] is not None
                        ):
                            depth = d
            end = pos + k
            if end >= len(s):  # it ends inside the tree: a longer prompt continues it
                if part >= 0 or (path and kids[path[-1]] is not None):
                    depth = end
            elif len(s) - end > w:  # it goes on past its match: does another branch?
                if part >= 0:
                    if len(edge[part]) - k > w or kids[part] is not None:
                        depth = end
                elif path:
                    ch = kids[path[-1]]
                    if ch is not None:
                        if len(ch) > 1:
                            depth = end
                        else:
                            (c,) = ch.values()
                            if len(edge[c]) > w or kids[c] is not None:
                                depth = end
        finally:
            lock.release()
        return depth // w

    def match_and_insert(
        self, units: Units, choose: Callable[[dict[str, int]], str | None]
    ) -> tuple[str | None, int]:
        """Match ``units``, let ``choose`` pick a tenant, insert the prompt for it.

        The fused call of SGLang/smg-style trees, for routers written against that API;
        it is :meth:`match`, then ``choose(match.lengths)``, then :meth:`insert_match`
        (one descent when nothing wrote the tree in between). ``choose`` runs outside the
        tree's lock, so it may call any method of the tree.

        Args:
            units: the prompt.
            choose: called once with ``{tenant: matched units}`` (a dict of its own); it
                returns the tenant that now holds the prompt, or ``None`` to insert
                nothing.

        Returns:
            ``(chosen, units of the prompt chosen held before)``; ``(None, 0)`` when
            ``choose`` returned ``None``.

        Raises:
            TypeError, ValueError: invalid ``units``, or ``choose`` returned something
                that is neither a tenant name nor ``None``. Whatever ``choose`` raises
                propagates; in every case the tree is left unchanged.

        Complexity: as :meth:`match` + :meth:`insert_match`.

        >>> t = Tree()
        >>> t.insert("system prompt A", "w1")
        >>> t.match_and_insert("system prompt B", lambda lengths: "w2")
        ('w2', 0)
        >>> t.match_and_insert("system prompt A, then more", max)
        ('w2', 14)
        >>> t.match_and_insert("anything", lambda lengths: None)
        (None, 0)
        """
        check_callable("choose", choose)
        m = self.match(units)
        chosen = choose(m.lengths)
        if chosen is None:
            return None, 0
        if type(chosen) is not str:
            chosen = str.__str__(check_str("choose(lengths)", chosen, empty_ok=True))
        return chosen, self.insert_match(m, chosen)

    def remove(self, units: Units, tenant: str) -> int:
        """``tenant`` stops holding ``units`` and every sequence that starts with it.

        It keeps the strict prefixes of ``units`` (an engine that evicted a KV block lost that
        block and every block after it). Empty ``units`` removes everything it holds. No-op
        if it does not hold ``units``. Recency is not refreshed.

        Args:
            units: the prompt.
            tenant: the tenant.

        Returns:
            The units ``tenant`` no longer holds.

        Raises:
            TypeError, ValueError: invalid ``units`` or ``tenant``, or the other kind.

        Complexity: O(m) in C + O(d + nodes removed and their children).

        >>> t = Tree()
        >>> t.insert("abcdef", "a")
        >>> t.insert("abcxyz", "a")
        >>> t.remove("abcd", "a")  # "abcd", "abcde", "abcdef"
        3
        >>> t.prefix_match_tenant("abcdef", "a"), t.size("a")
        (3, 6)
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        s, kind = _encode(units, self._code)
        with self._lock:
            if kind != self._kind and s and self._kind is not None:
                self._set_kind(kind, units, False)
            o = self._ten.get(t)
            if o is None:
                return 0
            self._version += 1
            before = o.size
            if not s:
                self._evict_tenant(o, 0)
                if self._holdings > self._max_nodes:
                    self._evict_global()
                return before // self._w
            w = self._w
            path, pos, part, k = self._walk(s)
            if part >= 0:
                x = part
                start = pos
                pos += k
            elif path:
                x = path[-1]
                start = pos - len(self._edge[x])
            else:
                return 0
            if pos < len(s) or not self._holds(self._hold[x], t):
                return 0
            off = len(s) - w - start  # the last unit of s starts at this offset in x
            if off:
                self._split(x, off)  # x keeps the part from the last unit of s on
            # drop t from x and its subtree, children before parents
            hold = self._hold
            kids = self._kids
            order = [x]
            i = 0
            while i < len(order):
                ch = kids[order[i]]
                i += 1
                if ch is not None:
                    order.extend(c for c in ch.values() if self._holds(hold[c], t))
            live = o.live
            g = self._glob
            p = self._up[x]
            u = o.name
            best = 0  # t's newest stamp below p: the recency of p's prefixes through x
            for y in reversed(order):
                e = self._unhold(o, y)
                if e > best:
                    e, best = best, e
                if e:
                    del live[e]
                    if g is not None:
                        del g[e]
                    o.stale += 1
            dead = best
            if p:  # p keeps that recency: it takes the entry if it is newer than its own
                hp = hold[p]
                if type(hp) is str:
                    own = self._ent[p]
                    if best > own:
                        self._ent[p] = best
                else:
                    v = hp[u] - 1
                    own = v >> 32
                    hp[u] = best * _K + (v & _M) if best > own else v
                if best > own:
                    live[best] = p  # (in place: the same stamp keeps its place)
                    dead = own
            if dead:
                del live[dead]
                if g is not None:
                    del g[dead]
                o.stale += 1
            if o.stale > len(o.q) >> 1:
                o.compact()
            if self._holdings > self._max_nodes:  # the split above added holdings
                self._evict_global()
            return (before - o.size) // w

    def add_tenant(self, tenant: str) -> None:
        """Register ``tenant`` with size 0 (no-op if known).

        Args:
            tenant: the tenant.

        Raises:
            TypeError: ``tenant`` is not a ``str``.

        Complexity: O(1).

        >>> t = Tree()
        >>> t.add_tenant("w1")
        >>> t.tenants(), t.size("w1")
        (['w1'], 0)
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        with self._lock:
            self._register(t)

    def remove_tenant(self, tenant: str) -> None:
        """Forget ``tenant``: everything it holds, its limit, its registration (no-op if unknown).

        Args:
            tenant: the tenant.

        Raises:
            TypeError: ``tenant`` is not a ``str``.

        Complexity: O(nodes it holds).

        >>> t = Tree()
        >>> t.insert("abc", "a")
        >>> t.remove_tenant("a")
        >>> t.tenants(), t.total_size()
        ([], 0)
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        with self._lock:
            o = self._ten.get(t)
            if o is not None:
                self._version += 1
                self._evict_tenant(o, 0)
                del self._ten[t]
                self._overrides.pop(t, None)

    def evict_tenant_by_size(self, max_units: int) -> int:
        """Shrink every tenant holding more than ``max_units`` to exactly ``max_units``.

        Each loses its least recent prefixes first (longest first among equals).

        Args:
            max_units: the size to shrink to (>= 0).

        Returns:
            Units evicted, summed over tenants.

        Raises:
            TypeError: ``max_units`` is not an ``int``.
            ValueError: ``max_units`` < 0.

        Complexity: O(T + e).

        >>> t = Tree()
        >>> t.insert("aaaa", "x")
        >>> t.insert("bbbb", "x")
        >>> t.evict_tenant_by_size(6), t.prefix_match_tenant("aaaa", "x")
        (2, 2)
        """
        check_int("max_units", max_units, minimum=0)
        with self._lock:
            self._version += 1
            target = max_units * self._w
            before = self._total
            for o in self._ten.values():
                if o.size > target:
                    self._evict_tenant(o, target)
            if self._holdings > self._max_nodes:  # cutting a shared node split it in two
                self._evict_global()
            return (before - self._total) // self._w

    def set_tenant_limit(self, tenant: str, max_units: int | None) -> None:
        """Cap ``tenant`` at ``max_units`` (``None``: back to ``max_size_per_tenant``).

        Registers the tenant. Enforced at once (it loses its least recent prefixes) and on
        every insert for it (it pays with its own). E.g. a worker's KV-cache capacity.

        Args:
            tenant: the tenant.
            max_units: its cap (>= 0), or ``None``.

        Raises:
            TypeError: wrong types.
            ValueError: ``max_units`` < 0.

        Complexity: O(1) + O(e).

        >>> t = Tree()
        >>> t.insert("abcdef", "w1")
        >>> t.set_tenant_limit("w1", 4)
        >>> t.size("w1"), t.tenant_limit("w1")
        (4, 4)
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        check_int("max_units", max_units, minimum=0, none_ok=True)
        with self._lock:
            o = self._register(t)
            self._version += 1
            self._overrides[t] = max_units
            cap = self._max_size_per_tenant if max_units is None else max_units
            o.limit = _NONE if cap is None else cap * self._w
            o.cap = min(o.limit, self._max_chars)
            if cap is not None:
                self._bounded = True
            if o.size > o.limit:
                self._evict_tenant(o, o.limit)
                if self._holdings > self._max_nodes:  # a cut shared node split in two
                    self._evict_global()

    def tenant_limit(self, tenant: str) -> int | None:
        """The cap that applies to ``tenant`` (its own, else ``max_size_per_tenant``).

        Args:
            tenant: the tenant.

        Returns:
            Units, or ``None`` if uncapped.

        Raises:
            TypeError: ``tenant`` is not a ``str``.

        Complexity: O(1).

        >>> Tree(max_size_per_tenant=100).tenant_limit("w1")
        100
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        with self._lock:
            if t in self._overrides and self._overrides[t] is not None:
                return self._overrides[t]
            return self._max_size_per_tenant

    # ------------------------------------------------------------- accounting

    @property
    def kind(self) -> Kind | None:
        """``"text"``, ``"tokens"``, or ``None`` before the first non-empty insert.

        >>> t = Tree()
        >>> t.insert([1, 2], "a")
        >>> t.kind
        'tokens'
        """
        return self._kind

    def size(self, tenant: str) -> int:
        """Units held by ``tenant`` (0 if unknown).

        Args:
            tenant: the tenant.

        Returns:
            The number of distinct non-empty prefixes it holds.

        Raises:
            TypeError: ``tenant`` is not a ``str``.

        Complexity: O(1).

        >>> t = Tree()
        >>> t.insert("abc", "a")
        >>> t.size("a"), t.size("b")
        (3, 0)
        """
        t = tenant if type(tenant) is str else _tenant(tenant)
        with self._lock:
            o = self._ten.get(t)
            return 0 if o is None else o.size // self._w

    def used_size_per_tenant(self) -> dict[str, int]:
        """``{tenant: units}`` for every registered tenant.

        Complexity: O(T).

        >>> t = Tree()
        >>> t.insert("abc", "a")
        >>> t.insert("abd", "b")
        >>> t.used_size_per_tenant()
        {'a': 3, 'b': 3}
        """
        with self._lock:
            w = self._w
            return {t: o.size // w for t, o in self._ten.items()}

    def total_size(self) -> int:
        """Units summed over tenants (a prefix held by 3 tenants counts 3 times).

        Complexity: O(1).

        >>> t = Tree()
        >>> t.insert("abc", "a")
        >>> t.insert("abd", "b")
        >>> t.total_size(), len(t)
        (6, 6)
        """
        with self._lock:
            return self._total // self._w

    def __len__(self) -> int:
        """Same as :meth:`total_size`."""
        return self.total_size()

    def tenants(self) -> list[str]:
        """Registered tenants, in registration order (a new list).

        Complexity: O(T).

        >>> t = Tree()
        >>> t.add_tenant("b"); t.add_tenant("a")
        >>> t.tenants()
        ['b', 'a']
        """
        with self._lock:
            return list(self._ten)

    def smallest_tenant(self) -> str | None:
        """The tenant holding the fewest units, ties by name; ``None`` if none.

        Complexity: O(T).

        >>> t = Tree()
        >>> t.insert("aaaa", "b")
        >>> t.insert("bb", "a")
        >>> t.smallest_tenant()
        'a'
        """
        with self._lock:
            if not self._ten:
                return None
            return min(self._ten.values(), key=lambda o: (o.size, o.name)).name

    @classmethod
    def max_nodes_for(cls, memory_bytes: int, max_size: int, *, unit_bytes: int = 4) -> int:
        """The ``max_nodes`` that keeps a tree bounded by ``max_size`` within ``memory_bytes``.

        Worst case: :attr:`NODE_BYTES` per node per holder, plus ``unit_bytes`` per unit of
        edge text (a ``str`` takes 1, 2 or 4 bytes a code point, a token ``token_bytes``).

        Args:
            memory_bytes: the budget for the tree.
            max_size: the tree's ``max_size``.
            unit_bytes: worst bytes per unit: 4 for text and 4-byte tokens, 8 for
                ``token_bytes=8``.

        Returns:
            ``(memory_bytes - unit_bytes * max_size) // NODE_BYTES``.

        Raises:
            ValueError: ``memory_bytes`` cannot hold one node, or ``max_size`` alone does
                not fit in the budget.

        Complexity: O(1).

        >>> n = Tree.max_nodes_for(256 * 2**20, max_size=2**24)
        >>> n
        335544
        >>> t = Tree(max_size=2**24, max_nodes=n)  # <= 256 MiB whatever it is fed
        """
        check_int("memory_bytes", memory_bytes, minimum=1)
        check_int("max_size", max_size, minimum=1)
        check_int("unit_bytes", unit_bytes, minimum=1)
        least = cls.NODE_BYTES + unit_bytes  # one node of one unit: max_size 1
        if memory_bytes < least:
            raise fail("memory_bytes", f">= {least} (one node of one unit)", memory_bytes)
        room = memory_bytes - unit_bytes * max_size
        if room < cls.NODE_BYTES:
            limit = (memory_bytes - cls.NODE_BYTES) // unit_bytes
            raise fail("max_size", f"<= {limit} for a budget of {memory_bytes} bytes", max_size)
        return room // cls.NODE_BYTES

    def __repr__(self) -> str:
        return (
            f"Tree(kind={self._kind!r}, tenants={len(self._ten)}, "
            f"total_size={self.total_size()}, max_size={self._max_size!r})"
        )

    def _node_count(self) -> int:
        """Nodes in the tree, the root excluded (tests and benchmarks). O(1)."""
        return len(self._edge) - 1 - len(self._free)
