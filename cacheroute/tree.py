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
  by galloping over slice compares, never by a per-unit Python loop.
* **Struct of arrays.** A node is an integer index into a few lists (edge, parent, children,
  holders, recency entry). Children are ``dict[str, int]`` (first unit -> node), holders are
  the tenant's ``str`` (one holder) or a ``dict[str, int]``; CPython tracks none of these
  for garbage collection, so the collector has next to nothing to scan per node, there are
  no reference cycles, and a dropped tree is freed at once by reference counting.
* **O(1) exact LRU.** A tenant holds a set of prefixes, each with the time of the last
  insert through it. One ``OrderedDict`` per tenant (plus one global one when the tree is
  bounded) keeps them least recently used first, by node: every insert moves the nodes of
  its path to the end (deepest first), eviction pops the front. Nothing is scanned, nothing
  is sorted, and each insert evicts about what it adds, so no call pays for a burst.
* **Few nodes per path.** A tenant extending its own leaf (the next turn of a conversation)
  grows that leaf's edge instead of adding a node, so a 10-turn conversation stays one node.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from cacheroute._validation import check_int, check_str, fail

__all__ = ["Tree", "TreeMatch", "Units"]

Units = str | Sequence[int]
"""A prompt: ``str`` (units are code points) or a sequence of non-negative ``int`` token ids
(``list``, ``tuple``, ``range``, ``array.array``...)."""

Kind = Literal["text", "tokens"]
Holders = str | dict[str, int]  # one holder, or {tenant: recency entry, -1 = implicit}

_CHUNK = 1024  # node ids allocated at a time
_NONE = sys.maxsize  # "no bound"


def _lcp(e: str, s: str, pos: int) -> int:
    """Length of the common prefix of ``e`` and ``s[pos:]``, given ``e[0] == s[pos]``.

    A short loop settles the common case (a mismatch within a few units); longer runs are
    found by galloping then bisecting with C-level ``startswith`` slice compares.
    """
    hi = min(len(e), len(s) - pos)
    i = 1
    lim = min(8, hi)
    while i < lim:
        if e[i] != s[pos + i]:
            return i
        i += 1
    if i >= hi:
        return hi
    lo = i  # e[:lo] matches
    step = 16
    while True:
        m = min(lo + step, hi)
        if not s.startswith(e[lo:m], pos + lo):
            hi = m - 1
            break
        lo = m
        if lo == hi:
            return lo
        step <<= 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if s.startswith(e[lo:mid], pos + lo):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _encode(units: object, code: str) -> tuple[str, Kind]:
    """``units`` as the internal ``str`` and its kind; ``code`` is the ``array`` typecode
    of one token id. Raises ``TypeError``/``ValueError`` naming ``units``."""
    if isinstance(units, str):
        return (units if type(units) is str else str(units)), "text"
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
    return str(check_str("tenant", tenant, empty_ok=True))


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

    Bounds, all enforced inside the inserting call (no background thread):

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
    """Worst-case bytes per node (per tenant holding it) of a tree, measured by
    ``benchmarks/bench_tree_memory.py``, with margin."""
    UNIT_BYTES: ClassVar[dict[str, int]] = {"text": 4, "tokens": 1}
    """Worst-case bytes per unit of edge text: a ``str`` stores 1, 2 or 4 bytes per code
    point; a token costs ``token_bytes`` (the value here is multiplied by it)."""

    __slots__ = (
        "__weakref__",
        "_code",
        "_edge",
        "_ent",
        "_entry",
        "_free",
        "_glob",
        "_hold",
        "_holdings",
        "_kids",
        "_kind",
        "_limits",
        "_lock",
        "_max_chars",
        "_max_nodes",
        "_max_size",
        "_max_size_per_tenant",
        "_nodes",
        "_orders",
        "_overrides",
        "_sizes",
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
        self._hold: list[Holders | None] = [None]
        self._ent: list[int] = [-1]  # recency entry of a single holder (-1: implicit)
        self._free: list[int] = []
        self._nodes = 0
        self._holdings = 0
        self._entry = 0  # next recency entry id
        self._version = 0  # bumped by every write: a TreeMatch is valid while unchanged
        self._sizes: dict[str, int] = {}  # tenant -> code points held
        self._total = 0
        self._orders: dict[str, OrderedDict[int, int]] = {}  # tenant -> {entry: node}
        self._glob: OrderedDict[int, str] | None = (
            None if max_size is None and mn is None else OrderedDict()  # {entry: tenant}
        )
        self._limits: dict[str, int] = {}  # tenant -> cap in code points
        self._overrides: dict[str, int | None] = {}

    # ------------------------------------------------------------------ helpers

    def _register(self, t: str) -> None:
        if t not in self._sizes:
            self._sizes[t] = 0
            self._orders[t] = OrderedDict()
            if self._max_size_per_tenant is not None:
                self._limits[t] = self._max_size_per_tenant * self._w

    def _set_kind(self, kind: Kind, units: object, write: bool) -> None:
        """Check ``kind`` against the tree's (fixing it on a write); raise if they differ."""
        if self._kind is None:
            if write:
                self._kind = kind
                if kind == "tokens":
                    self._w = array(self._code).itemsize
                    self._max_chars = _NONE if self._max_size is None else self._max_size * self._w
                    for t, c in self._limits.items():
                        self._limits[t] = c * self._w
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
                k = _lcp(e, s, pos)
                return path, pos, c, k - k % w
        return path, pos, -1, 0

    def _alloc(self) -> int:
        free = self._free
        if not free:
            n = len(self._edge)
            self._edge.extend([""] * _CHUNK)
            self._up.extend([0] * _CHUNK)
            self._kids.extend([None] * _CHUNK)
            self._hold.extend([None] * _CHUNK)
            self._ent.extend([-1] * _CHUNK)
            free.extend(range(n + _CHUNK - 1, n - 1, -1))
        self._nodes += 1
        return free.pop()

    def _split(self, c: int, k: int) -> int:
        """Cut node ``c`` after ``k`` code points and return the new node below it.

        ``c`` keeps the upper part; the new node takes the rest of the edge, the children
        and the recency entries, so every order keeps its exact place (both parts have the
        same recency for every holder) and ``c`` becomes *implicit* for its holders: held
        through its one child, ordered by that child's entry. O(holders + children).
        """
        edge = self._edge
        hold = self._hold
        ent = self._ent
        up = self._up
        z = self._alloc()
        e = edge[c]
        low = e[k:]
        edge[c] = e[:k]
        edge[z] = low
        up[z] = c
        ch = self._kids[c]
        self._kids[z] = ch
        if ch is not None:
            for y in ch.values():
                up[y] = z
        self._kids[c] = {low[0] if self._w == 1 else low[: self._w]: z}
        h = hold[c]
        hold[z] = h
        if type(h) is str:
            x = ent[c]
            ent[z] = x
            ent[c] = -1
            if x >= 0:
                self._orders[h][x] = z
            self._holdings += 1
        else:
            assert isinstance(h, dict)
            ent[z] = -1
            hold[c] = dict.fromkeys(h, -1)
            orders = self._orders
            for u, x in h.items():
                if x >= 0:
                    orders[u][x] = z
            self._holdings += len(h)
        return z

    def _put(self, s: str, t: str, path: list[int], pos: int, part: int, k: int) -> None:
        """Make ``t`` hold ``s`` given its descent; refresh the path; enforce the bounds.

        O(1) for the structure, O(1) per node of the path for recency (deepest first, in
        ``t``'s order and the global one), plus what the bounds evict.
        """
        edge = self._edge
        kids = self._kids
        hold = self._hold
        ent = self._ent
        od = self._orders[t]
        g = self._glob
        n = len(s)
        w = self._w
        ne = self._entry
        added = 0
        new = 0  # holdings added
        top = path[-1] if path else 0
        if part >= 0:
            self._split(part, k)
            pos += k
            top = part
            path = [*path, part]
        if pos < n:
            rest = s[pos:]
            if top and kids[top] is None and hold[top] == t:
                edge[top] += rest  # t's own leaf grows: no new node (one recency for all)
            else:
                x = self._alloc()
                edge[x] = rest
                self._up[x] = top
                kids[x] = None
                hold[x] = t
                ent[x] = ne
                od[ne] = x
                if g is not None:
                    g[ne] = t
                ne += 1
                new = 1
                ch = kids[top]
                if ch is None:
                    kids[top] = {rest[0] if w == 1 else rest[:w]: x}
                else:
                    ch[rest[0] if w == 1 else rest[:w]] = x
            added = n - pos
        for y in reversed(path):  # deepest first: a node comes before its ancestors
            h = hold[y]
            if type(h) is str:
                if h == t:
                    e = ent[y]
                    if e >= 0:
                        od.move_to_end(e)
                        if g is not None:
                            g.move_to_end(e)
                        continue
                    ent[y] = ne  # implicit (split) node touched: its own entry now
                else:
                    hold[y] = {h: ent[y], t: ne}
                    ent[y] = -1
                    added += len(edge[y])
                    new += 1
            else:
                assert isinstance(h, dict)
                e = h.pop(t, -2)
                h[t] = e  # most recent holder last (ties in prefix_match)
                if e >= 0:
                    od.move_to_end(e)
                    if g is not None:
                        g.move_to_end(e)
                    continue
                if e == -2:
                    added += len(edge[y])
                    new += 1
                h[t] = ne
            od[ne] = y
            if g is not None:
                g[ne] = t
            ne += 1
        self._entry = ne
        self._holdings += new
        if added:
            self._sizes[t] += added
            self._total += added
        lim = self._limits.get(t)
        if lim is not None and self._sizes[t] > lim:
            self._evict_tenant(t, lim)
        if g is not None and (self._total > self._max_chars or self._holdings > self._max_nodes):
            self._evict_global()

    def _cut(self, s: str, t: str) -> str:
        """``s`` cut to what ``t`` can keep under its cap and ``max_size`` (the same final
        state as inserting it whole and evicting, without building what would go)."""
        cap = min(self._limits.get(t, _NONE), self._max_chars)
        return s[:cap] if cap < len(s) else s

    # ----------------------------------------------------------------- eviction

    def _drop(self, u: str, e: int, x: int, excess: int) -> None:
        """Evict ``u``'s entry ``e`` (bottom node ``x``, a leaf of ``u``): the whole node
        for ``u``, or only its last ``excess`` code points if that is fewer. O(1), or
        O(holders + children) when a partial eviction must split a shared node."""
        edge = self._edge
        hold = self._hold
        size = len(edge[x])
        h = hold[x]
        if excess < size:
            if type(h) is str and self._kids[x] is None:
                edge[x] = edge[x][: size - excess]  # u's own leaf: cut in place
                self._sizes[u] -= excess
                self._total -= excess
                return
            x = self._split(x, size - excess)
            size = excess
            h = hold[x]
        gone = type(h) is str
        if not gone:
            assert isinstance(h, dict)
            del h[u]
            if len(h) == 1:
                for v, ve in h.items():
                    hold[x] = v
                    self._ent[x] = ve
        # the entry passes to the parent if u holds it implicitly (same recency), else goes
        p = self._up[x]
        hp = hold[p]
        od = self._orders[u]
        if type(hp) is str:
            take = hp == u and self._ent[p] < 0
        else:
            take = isinstance(hp, dict) and hp.get(u, 0) < 0
        if take:
            od[e] = p
            if type(hp) is str:
                self._ent[p] = e
            else:
                assert isinstance(hp, dict)
                hp[u] = e
        else:
            del od[e]
            if self._glob is not None:
                del self._glob[e]
        self._sizes[u] -= size
        self._total -= size
        self._holdings -= 1
        if gone:  # no holder left, hence no child: unlink
            e0 = edge[x]
            ch = self._kids[p]
            assert ch is not None
            del ch[e0[0] if self._w == 1 else e0[: self._w]]
            if not ch:
                self._kids[p] = None
            edge[x] = ""
            hold[x] = None
            self._free.append(x)
            self._nodes -= 1

    def _evict_tenant(self, t: str, target: int) -> None:
        """Evict ``t``'s least recent prefixes until it holds <= ``target`` code points."""
        od = self._orders[t]
        sizes = self._sizes
        while sizes[t] > target:
            for e, x in od.items():
                self._drop(t, e, x, sizes[t] - target)
                break

    def _evict_global(self) -> None:
        """Evict the least recent (tenant, prefix) pairs until every global bound holds."""
        g = self._glob
        assert g is not None
        orders = self._orders
        while True:
            excess = self._total - self._max_chars
            if self._holdings > self._max_nodes:
                excess = _NONE  # whole nodes
            elif excess <= 0:
                return
            for e, u in g.items():
                self._drop(u, e, orders[u][e], excess)
                break

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
        with self._lock:
            if kind != self._kind and s and self._kind is not None:
                self._set_kind(kind, units, False)
            walk = self._walk(s)
            m.lengths = self._lengths(*walk)
            m._version = self._version
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
            assert isinstance(h, dict)
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
                    assert isinstance(h, dict)
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
        with self._lock:
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
                    k = _lcp(e, s, pos)
                    pos += k - k % w
                    break
                pos += len(e)
                node = c
            if last < 0:
                return 0, None
            h = self._hold[last]
            if type(h) is str:
                return pos // self._w, h
            assert isinstance(h, dict)
            return pos // self._w, next(reversed(h))

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
        t = tenant if type(tenant) is str else _tenant(tenant)
        if type(units) is str:
            s: str = units
            kind: Kind = "text"
        else:
            s, kind = _encode(units, self._code)
        with self._lock:
            if kind != self._kind and s:
                self._set_kind(kind, units, True)
            if t not in self._sizes:
                self._register(t)
            self._version += 1
            if s:
                if self._limits or self._glob is not None:
                    s = self._cut(s, t)
                path, pos, part, k = self._walk(s)  # (not *self._walk(s): slower)
                self._put(s, t, path, pos, part, k)

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
        t = tenant if type(tenant) is str else _tenant(tenant)
        s = match._s
        with self._lock:
            if match._kind != self._kind and s:
                if self._kind is not None:
                    raise fail(
                        "match", f"a match of {self._kind} (this tree's kind)", match, TypeError
                    )
                self._set_kind(match._kind, s, True)
            if t not in self._sizes:
                self._register(t)
            fresh = match._version == self._version
            self._version += 1
            if s:
                if self._limits or self._glob is not None:
                    cut = self._cut(s, t)
                    if cut is not s:
                        s = cut
                        fresh = False
                path, pos, part, k = match._walk if fresh else self._walk(s)
                self._put(s, t, path, pos, part, k)
        return match.lengths.get(t, 0)

    def match_and_insert(self, units: Units, choose: Any) -> tuple[str | None, int]:
        # temporary: removed when the policy moves to match/insert_match
        m = self.match(units)
        chosen = choose(dict(m.lengths))
        if chosen is None:
            return None, 0
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
            if t not in self._sizes:
                return 0
            self._version += 1
            before = self._sizes[t]
            if not s:
                self._evict_tenant(t, 0)
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
                x = self._split(x, off)
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
            for y in reversed(order):
                h = hold[y]
                self._drop(t, h[t] if isinstance(h, dict) else self._ent[y], y, _NONE)
            return (before - self._sizes[t]) // w

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
            if t in self._sizes:
                self._version += 1
                self._evict_tenant(t, 0)
                del self._sizes[t], self._orders[t]
                self._limits.pop(t, None)
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
            for t, size in list(self._sizes.items()):
                if size > target:
                    self._evict_tenant(t, target)
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
            self._register(t)
            self._version += 1
            self._overrides[t] = max_units
            cap = self._max_size_per_tenant if max_units is None else max_units
            if cap is None:
                self._limits.pop(t, None)
                return
            self._limits[t] = cap * self._w
            if self._sizes[t] > cap * self._w:
                self._evict_tenant(t, cap * self._w)

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
            return self._sizes.get(t, 0) // self._w

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
            return {t: n // w for t, n in self._sizes.items()}

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
            return list(self._sizes)

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
            if not self._sizes:
                return None
            return min(self._sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]

    @classmethod
    def max_nodes_for(cls, memory_bytes: int, max_size: int, *, kind: Kind = "text") -> int:
        """The ``max_nodes`` that keeps a tree with ``max_size`` within ``memory_bytes``.

        Worst case: ``NODE_BYTES`` per node (per holder) plus ``UNIT_BYTES[kind]`` per unit
        (times ``token_bytes`` = 4 for tokens).

        Args:
            memory_bytes: the budget for the tree's structure.
            max_size: the ``max_size`` it will have.
            kind: ``"text"`` or ``"tokens"``.

        Returns:
            A ``max_nodes`` >= 1.

        Raises:
            ValueError: ``max_size`` alone does not fit in the budget.

        >>> n = Tree.max_nodes_for(256 * 2**20, max_size=2**24)
        >>> t = Tree(max_size=2**24, max_nodes=n)
        """
        per_unit = cls.UNIT_BYTES[kind] * (4 if kind == "tokens" else 1)
        room = memory_bytes - per_unit * max_size
        if room < cls.NODE_BYTES:
            raise fail("max_size", f"<= {memory_bytes // per_unit} for this budget", max_size)
        return room // cls.NODE_BYTES

    def __repr__(self) -> str:
        return (
            f"Tree(kind={self._kind!r}, tenants={len(self._sizes)}, "
            f"total_size={self.total_size()}, max_size={self._max_size!r})"
        )

    def _node_count(self) -> int:
        """Nodes in the tree, the root excluded (tests and benchmarks). O(1)."""
        return self._nodes
