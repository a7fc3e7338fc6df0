"""Multi-tenant radix tree with O(1) LRU bookkeeping and a hard size bound.

The :class:`Tree` is the approximate prefix cache behind cache-aware routing:
for every request a router asks which worker (*tenant*) already holds the
longest prefix of the prompt, then records that the chosen worker now holds the
whole prompt.  See ``docs/tree.md`` for the concept page, the complexity table
and benchmark figures.

Design notes (why it is fast in pure Python):

* Edges are ``str`` objects.  Text is stored as is (one unit = one code point);
  token ids are converted at C speed (``array`` + a codec) into a ``str`` with
  one code point per token, so both kinds share one implementation.  Token ids
  of ``0x110000`` and above switch the tree, once, to a *wide* encoding of
  8 code points per token (the id's 8 little-endian bytes through ``latin-1``).
* Edge comparison is ``str.startswith(edge, pos)`` (a C ``memcmp``); a
  mismatch inside an edge is located by a few short C-level slice compares
  (galloping + binary search), never a per-unit Python loop over long runs.
* Per node there is one collector-tracked object (the node; internal nodes add
  their children ``dict``).  The per-node tenant map holds only ``str`` keys
  and ``int`` values, which CPython does not track.
* Holder sets shrink going down and a node held by one tenant stores just that
  ``str``, so a path is a run of multi-holder nodes followed by a run held by
  one tenant; the per-call work outside the descent is proportional to the
  first run (usually one or two nodes near the root), not to the path.
* Recency is kept in one ``OrderedDict`` per tenant (plus one global one when
  ``max_size`` is set); eviction pops the front entry in O(1) (amortized), with
  no scan and no heap.  A tenant's leaves (nodes it holds without holding a
  child) are always in its order; a multi-holder node counts, per holder, the
  children that holder holds, so "is this a leaf of t" is O(1).

  - Without ``max_size`` recency is *lazy*: an insert refreshes only its
    deepest node.  An ancestor's recency is the most recent of its own
    touches and its descendants'; when the front entry turns out to have
    children held by the tenant it is dropped (it comes back, at the front,
    when its last such child is evicted, which is exactly its recency then).
    The eviction order is the same as the eager one below (tested).
  - With ``max_size`` recency is *eager*: every node on the inserted path is
    moved to the end, deepest first, in the tenant's order and the global one,
    so every node comes before its ancestors and the front entry is a leaf.
    (Global eviction removes a tenant's leaf out of order; only the eager form
    keeps every ancestor at its exact place in every order then.)
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

__all__ = ["Tree", "Units"]

Units = str | Sequence[int]
"""A prompt: ``str`` (units are code points) or a sequence of non-negative
``int`` token ids (``list``, ``tuple``, ``range``, ``array.array``...)."""

Kind = Literal["text", "tokens"]

_U32 = "I" if array("I").itemsize == 4 else "L"
_WIDE = 8  # code points per token in the wide token encoding
_NARROW_LIMIT = 0x110000  # token ids below this map to one code point


Holders = str | dict[str, int]


class _Node:
    """One radix-tree node.

    ``holders`` is the single tenant holding it (a ``str``: the common case,
    no extra object; every child is held by it too), or a ``dict`` (two or more
    tenants) whose key order is the order of the tenants' last touches (most
    recent last) and whose value for a tenant is the number of children that
    tenant holds.  Invariant: a child's holders are a subset of its parent's;
    a node without holders is unlinked.
    """

    __slots__ = ("children", "edge", "holders", "parent")

    def __init__(self, edge: str, parent: _Node | None, holders: Holders) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str, _Node] | None = None
        self.holders = holders


def _lcp(e: str, s: str, pos: int) -> int:
    """Length of the common prefix of ``e`` and ``s[pos:]``; ``e[0] == s[pos]``.

    A short Python loop settles the common case (mismatch within a few units);
    longer runs are found with galloping then binary search over C-level
    ``startswith`` slice compares: O(log L) compares, O(L) bytes touched.
    """
    hi = len(e)
    rest = len(s) - pos
    if rest < hi:
        hi = rest
    i = 1
    lim = 8 if hi > 8 else hi
    while i < lim:
        if e[i] != s[pos + i]:
            return i
        i += 1
    if i >= hi:
        return hi
    lo = i  # e[:lo] matches
    step = 16
    while True:
        m = lo + step
        if m >= hi:
            m = hi
        if s.startswith(e[lo:m], pos + lo):
            lo = m
            if lo == hi:
                return lo
            step <<= 1
        else:
            hi = m - 1
            break
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if s.startswith(e[lo:mid], pos + lo):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _names(h: Holders) -> frozenset[str]:
    """Tenants in a holders value (slow; introspection only)."""
    return frozenset((h,)) if isinstance(h, str) else frozenset(h)


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (type {type(value).__name__})"


def _token_error(units: Sequence[object]) -> Exception:
    """Build the error for a token sequence ``array`` refused (slow path only)."""
    for i, v in enumerate(units):
        if not isinstance(v, int):
            return TypeError(f"units: token ids must be int; units[{i}] is {_describe(v)}")
        if v < 0:
            return ValueError(f"units: token ids must be non-negative; units[{i}] is {v!r}")
        if v >= 1 << 64:
            return ValueError(f"units: token ids must be < 2**64; units[{i}] is {v!r}")
    return TypeError(f"units: could not read token ids from {_describe(units)}")


def _check_tenant(tenant: object) -> str:
    if type(tenant) is not str and not isinstance(tenant, str):
        raise TypeError(f"tenant: expected str, got {_describe(tenant)}")
    return tenant


def _check_count(name: str, value: object, *, allow_none: bool, minimum: int) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name}: expected int{' or None' if allow_none else ''}, got {_describe(value)}"
        )
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    return value


class Tree:
    """Multi-tenant radix tree over text or token ids, with LRU eviction.

    One ``Tree`` holds one *kind* of units, fixed by the first non-empty
    insert: ``"text"`` (``str``; a unit is a code point, any ``str`` works,
    including emoji, combining marks and lone surrogates) or ``"tokens"``
    (sequences of non-negative ``int`` < 2**64; ``bool`` values, being ints,
    are accepted as 0/1).  Mixing kinds raises :class:`TypeError`.  Empty units
    never fix or conflict with the kind.

    A tenant *holds* every prefix of every sequence inserted for it (until
    evicted).  ``size(tenant)`` is the number of distinct non-empty prefixes it
    holds, which equals the number of edge units of the nodes it holds.

    Recency: ``insert`` and ``match_and_insert`` refresh the recency of every
    node on the inserted path for that tenant (without ``max_size`` lazily:
    same eviction order, less work per insert; see the module notes).
    ``prefix_match``,
    ``prefix_match_tenant`` and ``match_lengths`` are read-only and do *not*
    refresh recency.

    Bounds (all enforced inside the inserting call, no background thread):

    * ``max_size``: cap on :meth:`total_size` (units summed over tenants).
      When an insert takes the total above it, whole nodes are evicted,
      least recently used (by any tenant) first, for every tenant holding
      them, until the total is at most ``low_water * max_size`` (the
      *low-water target*, at least 1).  The inserting caller pays.
    * ``max_size_per_tenant``: the same per tenant; only the inserting tenant
      can exceed it and it pays, evicting its own LRU nodes.
    * A single sequence longer than a low-water target is stored truncated to
      its first ``target`` units (the prefix is what a prefix cache can use).

    Thread-safety: every public method takes one internal
    :class:`threading.RLock`, so a ``Tree`` can be shared between threads.
    Tip for latency-sensitive servers holding millions of nodes: call
    :func:`gc.freeze` after warm-up so full collections skip old nodes.

    Complexities below use *m* = length of the argument in units, *d* = nodes
    on the matched path (d <= m), *T* = number of tenants, *e* = nodes evicted.
    Character comparisons run inside C ``str`` operations.
    """

    __slots__ = (
        "_cap_chars",
        "_glru",
        "_kind",
        "_lock",
        "_low_water",
        "_lru",
        "_max_chars",
        "_max_size",
        "_max_size_per_tenant",
        "_max_tenant_chars",
        "_root",
        "_sizes",
        "_total",
        "_w",
    )

    def __init__(
        self,
        max_size: int | None = None,
        max_size_per_tenant: int | None = None,
        low_water: float = 0.9,
    ) -> None:
        """Create an empty tree.

        :param max_size: cap on total units across tenants, or ``None``.
        :param max_size_per_tenant: cap on each tenant's units, or ``None``.
        :param low_water: fraction in (0, 1] of a cap that eviction shrinks
            to once the cap is exceeded (amortizes eviction).
        :raises TypeError: a parameter has the wrong type.
        :raises ValueError: a cap is <= 0 or ``low_water`` is not in (0, 1].

        Complexity: O(1).
        """
        self._max_size = _check_count("max_size", max_size, allow_none=True, minimum=1)
        self._max_size_per_tenant = _check_count(
            "max_size_per_tenant", max_size_per_tenant, allow_none=True, minimum=1
        )
        if isinstance(low_water, bool) or not isinstance(low_water, (int, float)):
            raise TypeError(f"low_water: expected float, got {_describe(low_water)}")
        if not 0.0 < low_water <= 1.0:  # also rejects NaN
            raise ValueError(f"low_water: must be in (0, 1], got {low_water!r}")
        self._low_water = float(low_water)
        self._lock = threading.RLock()
        self._root = _Node("", None, {})
        self._kind: Kind | None = None
        self._w = 1
        self._total = 0  # in code points (units * self._w)
        self._sizes: dict[str, int] = {}  # tenant -> code points
        self._lru: dict[str, OrderedDict[_Node, None]] = {}
        self._glru: OrderedDict[_Node, None] | None = (
            OrderedDict() if self._max_size is not None else None
        )
        self._max_chars = 0
        self._max_tenant_chars = 0
        self._cap_chars = -1
        self._set_limits()

    # ------------------------------------------------------------------ setup

    def _set_limits(self) -> None:
        w = self._w
        self._max_chars = -1 if self._max_size is None else self._max_size * w
        self._max_tenant_chars = (
            -1 if self._max_size_per_tenant is None else self._max_size_per_tenant * w
        )
        caps = [
            self._target(c) * w
            for c in (self._max_size, self._max_size_per_tenant)
            if c is not None
        ]
        self._cap_chars = min(caps) if caps else -1

    def _target(self, cap: int) -> int:
        """Low-water target in units for a cap in units (at least 1)."""
        return max(1, int(cap * self._low_water))

    def _register(self, tenant: str) -> OrderedDict[_Node, None]:
        od = self._lru.get(tenant)
        if od is None:
            od = self._lru[tenant] = OrderedDict()
            self._sizes[tenant] = 0
        return od

    # --------------------------------------------------------------- encoding

    def _encode(self, units: object, for_insert: bool) -> str:
        """Validate ``units`` and return the internal ``str`` form.

        For a read (``for_insert=False``) on a narrow token tree, a query with
        an id >= 0x110000 is cut before that id (no such id is stored, so the
        match cannot extend past it).  For an insert, the tree is widened.
        """
        if isinstance(units, str):
            if self._kind == "tokens" and units:
                raise TypeError("units: this Tree holds token ids (kind 'tokens'); got a str")
            return units
        if isinstance(units, (bytes, bytearray, memoryview)) or not isinstance(
            units, (list, tuple, array, range, Sequence)
        ):
            raise TypeError(
                f"units: expected str or a sequence of int token ids, got {_describe(units)}"
            )
        if self._kind == "text" and len(units) > 0:
            raise TypeError(
                f"units: this Tree holds text (kind 'text'); got a token sequence "
                f"({type(units).__name__})"
            )
        if self._w == 1:
            try:
                a = array(_U32, units)
            except OverflowError:
                a = None
            except TypeError:
                raise _token_error(units) from None
            if a is not None:
                raw = a.tobytes()
                try:
                    return raw.decode("utf-32-le", "surrogatepass")
                except UnicodeDecodeError as exc:
                    if not for_insert:
                        return raw[: exc.start].decode("utf-32-le", "surrogatepass")
            elif not for_insert:
                try:
                    q = array("Q", units)
                except (OverflowError, TypeError):
                    raise _token_error(units) from None
                # Some id is >= 2**32: cut before the first id a narrow tree
                # cannot hold (slow path, rare).
                cut = next(i for i, v in enumerate(q) if v >= _NARROW_LIMIT)
                return array(_U32, q[:cut]).tobytes().decode("utf-32-le", "surrogatepass")
        try:
            q = array("Q", units)
        except (OverflowError, TypeError):
            raise _token_error(units) from None
        if self._w == 1:
            self._widen()
        return q.tobytes().decode("latin-1")

    def _widen(self) -> None:
        """Switch a narrow token tree to the wide encoding (once; O(size))."""
        w = _WIDE
        nodes: list[_Node] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                nodes.extend(node.children.values())
                stack.extend(node.children.values())
        for node in nodes:
            codes = array(_U32)
            codes.frombytes(node.edge.encode("utf-32-le", "surrogatepass"))
            node.edge = array("Q", codes).tobytes().decode("latin-1")
        for node in [self._root, *nodes]:
            if node.children:
                node.children = {c.edge[:w]: c for c in node.children.values()}
        self._w = w
        self._total *= w
        for t in self._sizes:
            self._sizes[t] *= w
        self._set_limits()

    # ----------------------------------------------------------------- reads

    def prefix_match(self, units: Units) -> tuple[int, str | None]:
        """Longest prefix of ``units`` held by any tenant.

        :returns: ``(matched_units, tenant)``; among tenants holding the
            deepest matched node the most recently used one wins;
            ``(0, None)`` when nothing matches (or ``units`` is empty).
        :raises TypeError, ValueError: invalid ``units`` or mixed kinds.

        Read-only: does not refresh recency.  Thread-safe.
        Complexity: O(m) C-level compares + O(d) Python steps + O(holders of
        the last node).
        """
        lock = self._lock
        lock.acquire()
        try:
            if type(units) is str and self._kind != "tokens":
                s: str = units
            else:
                s = self._encode(units, False)
            n = len(s)
            w = self._w
            node = self._root
            last: _Node | None = None
            pos = 0
            if w != 1:
                path, pos, last, k = self._walk(s)
                pos += k
                if last is None and path:
                    last = path[-1]
            else:  # inline walk (see _walk), one code point per unit
                while pos < n:
                    ch = node.children
                    if ch is None:
                        break
                    child = ch.get(s[pos])
                    if child is None:
                        break
                    last = child
                    e = child.edge
                    if s.startswith(e, pos):
                        pos += len(e)
                        node = child
                    else:
                        pos += _lcp(e, s, pos)
                        break
            if last is None:
                return 0, None
            h = last.holders
            if isinstance(h, str):
                return pos // w, h
            for t in reversed(h):  # most recently used holder
                return pos // w, t
            return pos // w, None  # pragma: no cover - nodes always have holders
        finally:
            lock.release()

    def prefix_match_tenant(self, units: Units, tenant: str) -> int:
        """Longest prefix of ``units`` held by ``tenant`` (0 if unknown).

        Read-only: does not refresh recency.  Thread-safe.
        Complexity: O(m) C-level compares + O(d) Python steps.
        """
        _check_tenant(tenant)
        lock = self._lock
        lock.acquire()
        try:
            s = self._encode(units, False)
            n = len(s)
            w = self._w
            node = self._root
            pos = 0
            while pos < n:
                ch = node.children
                if ch is None:
                    break
                child = ch.get(s[pos] if w == 1 else s[pos : pos + w])
                if child is None:
                    break
                h = child.holders
                if (h != tenant) if isinstance(h, str) else (tenant not in h):
                    break
                e = child.edge
                if s.startswith(e, pos):
                    pos += len(e)
                    node = child
                else:
                    k = _lcp(e, s, pos)
                    pos += k - k % w
                    break
            return pos // w
        finally:
            lock.release()

    def _walk(self, s: str) -> tuple[list[_Node], int, _Node | None, int]:
        """Descend along ``s``.

        :returns: ``(path, pos, partial, k)``: ``path`` are the nodes whose
            edges ``s`` fully covers (``pos`` code points in total); ``partial``
            is the child whose edge matched only ``k`` code points (0 < k), or
            ``None`` (then ``k == 0``).
        """
        n = len(s)
        node = self._root
        path: list[_Node] = []
        pos = 0
        w = self._w
        while pos < n:
            ch = node.children
            if ch is None:
                break
            child = ch.get(s[pos] if w == 1 else s[pos : pos + w])
            if child is None:
                break
            e = child.edge
            if s.startswith(e, pos):
                pos += len(e)
                path.append(child)
                node = child
            else:
                k = _lcp(e, s, pos)
                return path, pos, child, k - k % w
        return path, pos, None, 0

    def _lengths(
        self, path: list[_Node], pos: int, partial: _Node | None, k: int
    ) -> tuple[dict[str, int], int]:
        """Per-tenant matched code points for a walk (see :meth:`_walk`).

        Holder sets only shrink going down, and a single-holder node (a ``str``)
        has single-holder descendants only, so the path is a run of ``j``
        multi-holder nodes followed by a run held by one tenant.  Only the
        first run is visited (top-down, deeper ends overwrite shallower ones);
        the second one contributes its deepest end alone.

        :returns: ``(lengths, j)``.  O(j + tenants matched).  Key order: that
            of the deepest node among those holding as many tenants as the
            first one (as it always was; ``choose`` callbacks may see it).
        """
        res: dict[str, int] = {}
        top = 0  # holder count of the first node (the largest set)
        end = 0
        j = 0
        for nd in path:
            h = nd.holders
            if isinstance(h, str):
                break
            j += 1
            end += len(nd.edge)
            if len(h) == top or not top:
                top = len(h)
                res = dict.fromkeys(h, end)
            else:
                res.update(dict.fromkeys(h, end))
        if partial is not None:
            h = partial.holders
            if isinstance(h, str):
                res[h] = pos + k
            elif len(h) == top or not top:
                res = dict.fromkeys(h, pos + k)
            else:
                res.update(dict.fromkeys(h, pos + k))
        elif j < len(path):
            h = path[-1].holders
            assert isinstance(h, str)
            res[h] = pos
        return res, j

    def match_lengths(self, units: Units) -> dict[str, int]:
        """Matched units for every tenant with a non-zero match, in one walk.

        Read-only: does not refresh recency.  Thread-safe.
        Complexity: O(m) C-level compares + O(d + tenants matched) Python steps.
        """
        lock = self._lock
        lock.acquire()
        try:
            s = self._encode(units, False)
            res = self._lengths(*self._walk(s))[0]
            w = self._w
            if w != 1:
                for t in res:
                    res[t] //= w
            return res
        finally:
            lock.release()

    # ---------------------------------------------------------------- writes

    def add_tenant(self, tenant: str) -> None:
        """Register ``tenant`` with size 0 (no-op if known).  Thread-safe. O(1)."""
        _check_tenant(tenant)
        with self._lock:
            self._register(tenant)

    def insert(self, units: Units, tenant: str) -> None:
        """Record that ``tenant`` holds every prefix of ``units``.

        Refreshes the recency of every node on the path for ``tenant``.  Empty
        ``units`` only registers the tenant.  Enforces ``max_size`` and
        ``max_size_per_tenant`` before returning (see the class docstring).

        :raises TypeError: ``tenant`` is not a ``str``; ``units`` has a wrong
            type, a non-int element, or is of the other kind than the tree.
        :raises ValueError: a token id is negative or >= 2**64.

        Thread-safe.  Complexity: O(m) C-level compares + O(d) Python steps
        for the descent; then O(1) per multi-holder node on the path and per
        node ``tenant`` newly holds (plus, with ``max_size``, O(1) per node on
        the path); plus amortized O(1) per node evicted by a bound (amortized
        further by the low-water mark).
        """
        if type(tenant) is not str:
            _check_tenant(tenant)
        lock = self._lock
        lock.acquire()
        try:
            if type(units) is str and self._kind == "text":
                s: str = units
            else:
                s = self._encode(units, True)
                if not s:
                    self._register(tenant)
                    return
                if self._kind is None:
                    self._kind = "text" if isinstance(units, str) else "tokens"
            if tenant not in self._sizes:
                self._register(tenant)
            if 0 <= self._cap_chars < len(s):
                s = s[: self._cap_chars]
            path, pos, partial, k = self._walk(s)
            self._insert_walked(s, tenant, path, pos, partial, k)
        finally:
            lock.release()

    def match_and_insert(
        self, units: Units, choose: Callable[[dict[str, int]], str | None]
    ) -> tuple[str | None, int]:
        """Match, let ``choose`` pick a tenant, insert for it: one descent.

        ``choose`` receives :meth:`match_lengths` of ``units`` (a fresh dict it
        may keep) and is called while this tree's lock is held, so it may call
        read methods such as :meth:`size`.  If it returns a tenant, ``units`` is
        inserted for it exactly as :meth:`insert` would; if it returns ``None``
        nothing is inserted.  If ``choose`` raises, the tree is unchanged.

        The descent is done once: the path it records (and the per-tenant
        lengths read off it) is reused by the insert, so no edge is compared
        twice.  (Exceptions, each needing a second descent: a token prompt with
        an id >= 0x110000 on a narrow tree, and a prompt longer than a size
        cap's low-water target.)

        :returns: ``(chosen, matched_units_of_chosen)`` (0 for None/no match).
        Thread-safe.  Complexity: O(m) C-level compares + O(d + T) Python
        steps, plus what :meth:`insert` may evict.
        """
        lock = self._lock
        lock.acquire()
        try:
            if type(units) is str and self._kind != "tokens":
                s: str = units
                fast = self._kind == "text"
            else:
                s = self._encode(units, False)  # no widening before choose succeeds
                fast = False
            w = self._w
            n = len(s)
            path, pos, partial, k = self._walk(s)
            res, j = self._lengths(path, pos, partial, k)
            if w != 1:
                for t in res:
                    res[t] //= w
            chosen = choose(dict(res))
            if chosen is None:
                return None, 0
            if type(chosen) is not str:
                _check_tenant(chosen)
            if chosen not in self._sizes:
                self._register(chosen)
            if fast and self._cap_chars < 0:  # text into a text tree, no bound
                self._insert_walked(s, chosen, path, pos, partial, k, j)
                return chosen, res.get(chosen, 0)
            if w == 1 and n != len(units) and not isinstance(units, str):
                # the read form stopped before an id >= 0x110000: insert the full
                # prompt (this widens the tree)
                s = self._encode(units, True)
            if s:
                if self._kind is None:
                    self._kind = "text" if isinstance(units, str) else "tokens"
                if 0 <= self._cap_chars < len(s):
                    s = s[: self._cap_chars]
                if len(s) != n or self._w != w:  # rare: see the docstring
                    path, pos, partial, k = self._walk(s)
                    j = -1
                self._insert_walked(s, chosen, path, pos, partial, k, j)
            return chosen, res.get(chosen, 0)
        finally:
            lock.release()

    def _insert_walked(
        self,
        s: str,
        t: str,
        path: list[_Node],
        pos: int,
        partial: _Node | None,
        k: int,
        j: int = -1,
    ) -> None:
        """Second half of insert, from a walk of ``s`` (see :meth:`_walk`).

        ``j``: number of multi-holder nodes at the top of ``path`` if known
        (see :meth:`_lengths`), else -1.

        O(1) for the new nodes, O(1) per node of ``path`` that ``t`` did not
        hold yet and per multi-holder node of ``path``; without ``max_size``
        the run of nodes held by ``t`` alone is not visited at all (lazy
        recency, see the class notes), with it every node of ``path`` is
        refreshed in both recency orders.
        """
        od = self._lru[t]
        glru = self._glru
        w = self._w
        added = 0
        n = len(s)
        last = len(path) - 1
        parent = path[last] if path else self._root
        # ``nxt``: the node below the one being processed is on this insert;
        # ``new``: and ``t`` did not hold it before (so the count of children
        # ``t`` holds grows by one).
        tail = nxt = new = pos < n or partial is not None
        if partial is not None:
            # split ``partial`` at k: a new upper node takes its first k units
            e = partial.edge
            ph = partial.holders
            pos += k
            uh: Holders
            if isinstance(ph, str):
                if ph == t:
                    uh = t
                    new = False
                else:
                    uh = {ph: 1, t: 1 if pos < n else 0}
                    added += k
            else:
                uh = dict.fromkeys(ph, 1)  # each holds one child: ``partial``
                c = uh.pop(t, -1)
                if c < 0:
                    added += k
                    uh[t] = 1 if pos < n else 0
                else:
                    uh[t] = 2 if pos < n else 1  # most recent last
                    new = False
            upper = _Node(e[:k], parent, uh)
            low = e[k:]
            partial.edge = low
            partial.parent = upper
            assert parent.children is not None
            parent.children[e[0] if w == 1 else e[:w]] = upper
            if pos < n:
                rest = s[pos:]
                leaf = _Node(rest, upper, t)
                upper.children = {
                    low[0] if w == 1 else low[:w]: partial,
                    rest[0] if w == 1 else rest[:w]: leaf,
                }
                od[leaf] = None
                added += n - pos
                if glru is not None:
                    glru[leaf] = None
                    od[upper] = None
                    glru[upper] = None
            else:
                upper.children = {low[0] if w == 1 else low[:w]: partial}
                od[upper] = None
                if glru is not None:
                    glru[upper] = None
        elif pos < n:
            rest = s[pos:]
            leaf = _Node(rest, parent, t)
            ch = parent.children
            if ch is None:
                parent.children = {rest[0] if w == 1 else rest[:w]: leaf}
            else:
                ch[rest[0] if w == 1 else rest[:w]] = leaf
            od[leaf] = None
            added += n - pos
            if glru is not None:
                glru[leaf] = None
        # The path is a run of ``j`` multi-holder nodes, then a run of nodes
        # held by one tenant (holders shrink going down).  Without a global
        # bound, recency is lazy: only the deepest node of this insert is
        # refreshed for ``t`` (see the class notes).  With one, it is eager:
        # every node of the path is refreshed deepest first, in both orders.
        if j < 0:
            j = 0
            while j <= last and not isinstance(path[j].holders, str):
                j += 1
        if j <= last:
            h = path[j].holders
            if h == t:  # t holds the whole path already
                if glru is not None:
                    move = od.move_to_end
                    gmove = glru.move_to_end
                    for i in range(last, j - 1, -1):
                        nd = path[i]
                        try:
                            move(nd)
                        except KeyError:  # held implicitly: a split made it
                            od[nd] = None
                        gmove(nd)
                elif not nxt:
                    try:
                        od.move_to_end(path[last])
                    except KeyError:
                        od[path[last]] = None
                new = False
            else:  # ``t`` joins the whole run, deepest first
                assert isinstance(h, str)
                adj = partial is None and tail  # a new leaf hangs below path[-1]
                for i in range(last, j - 1, -1):
                    nd = path[i]
                    c = len(nd.children) if nd.children else 0
                    if adj:
                        c -= 1
                        adj = False
                    nd.holders = {h: c, t: 1 if nxt else 0}
                    added += len(nd.edge)
                    if glru is not None:
                        od[nd] = None
                        glru.move_to_end(nd)
                    nxt = True
                if glru is None and not tail:
                    od[path[last]] = None
                new = True
            nxt = True
        for i in range(j - 1, -1, -1):
            nd = path[i]
            hd = nd.holders
            assert type(hd) is dict
            c = hd.pop(t, -1)
            if c < 0:
                hd[t] = 1 if nxt else 0
                added += len(nd.edge)
                if glru is not None or not nxt:
                    od[nd] = None
                new = True
            else:
                hd[t] = c + 1 if new else c  # most recent last
                if glru is not None or not nxt:
                    try:
                        od.move_to_end(nd)
                    except KeyError:
                        od[nd] = None
                new = False
            if glru is not None:
                glru.move_to_end(nd)
            nxt = True
        if added:
            sizes = self._sizes
            sizes[t] += added
            self._total += added
            if self._cap_chars >= 0:  # some bound is set
                if 0 <= self._max_tenant_chars < sizes[t]:
                    assert self._max_size_per_tenant is not None
                    self._evict_tenant(t, self._target(self._max_size_per_tenant) * w)
                if 0 <= self._max_chars < self._total:
                    assert self._max_size is not None
                    self._evict_global(self._target(self._max_size) * w)

    # -------------------------------------------------------------- eviction

    def _unlink(self, x: _Node) -> None:
        """Remove a node without holders (hence without children)."""
        p = x.parent
        assert p is not None and p.children is not None
        e = x.edge
        del p.children[e[0] if self._w == 1 else e[: self._w]]
        if not p.children:
            p.children = None
        if self._glru is not None:
            self._glru.pop(x, None)
        x.parent = None

    def _evict_tenant(self, t: str, target: int) -> int:
        """Evict ``t``'s LRU nodes until its size <= target code points.

        Amortized O(1) per node evicted: an entry popped for a node that still
        has children held by ``t`` (left by lazy recency) is dropped, and the
        node comes back when its last such child goes.
        """
        od = self._lru[t]
        sizes = self._sizes
        freed = 0
        size = sizes[t]
        while size > target and od:
            x, _ = od.popitem(last=False)
            h = x.holders
            if type(h) is dict:
                if h[t]:
                    continue  # not a leaf of t: its recency is its descendants'
            elif x.children:
                continue
            n = len(x.edge)
            size -= n
            freed += n
            p = x.parent
            if isinstance(h, str):
                self._unlink(x)
            else:
                del h[t]
                if len(h) == 1:
                    for only in h:
                        x.holders = only
            self._lost_child(p, t, od)
        sizes[t] = size
        self._total -= freed
        return freed

    def _lost_child(self, p: _Node | None, t: str, od: OrderedDict[_Node, None]) -> None:
        """Tenant ``t`` just lost a child of ``p``: fix ``p``'s child count for ``t``.

        A ``p`` that ``t`` held through its children only, and no longer holds
        any child of, is now ``t``'s least recently used leaf: it goes to the
        front of ``t``'s order. O(1).
        """
        if p is self._root or p is None:
            return
        ph = p.holders
        if type(ph) is dict:
            c = ph[t] - 1
            ph[t] = c
        else:
            c = len(p.children) if p.children else 0
        if not c and p not in od:
            od[p] = None
            od.move_to_end(p, last=False)

    def _evict_global(self, target: int) -> None:
        """Evict globally LRU nodes (for all holders) until total <= target."""
        glru = self._glru
        assert glru is not None
        lru = self._lru
        sizes = self._sizes
        total = self._total
        while total > target and glru:
            x = next(iter(glru))  # a leaf of the whole tree; _unlink drops it
            n = len(x.edge)
            p = x.parent
            h = x.holders
            self._unlink(x)
            for u in (h,) if isinstance(h, str) else h:
                od = lru[u]
                del od[x]
                sizes[u] -= n
                total -= n
                self._lost_child(p, u, od)
        self._total = total

    def evict_tenant_by_size(self, max_units: int) -> int:
        """Shrink every tenant above ``max_units`` to at most ``max_units``.

        Each such tenant loses its least recently used leaves first; a node's
        edge is freed when its last tenant leaves, nodes shared with other
        tenants stay for them.  A tenant's most recently inserted sequence
        survives whole when its length is at most ``max_units``.

        :returns: units evicted (summed over tenants).
        Thread-safe.  Complexity: O(T + e), amortized (with lazy recency an
        entry may be popped and dropped once per insert that left it stale).
        """
        _check_count("max_units", max_units, allow_none=False, minimum=0)
        with self._lock:
            w = self._w
            target = max_units * w
            freed = 0
            for t in list(self._sizes):
                if self._sizes[t] > target:
                    freed += self._evict_tenant(t, target)
            return freed // w

    def remove_tenant(self, tenant: str) -> None:
        """Forget ``tenant`` entirely (no-op if unknown).

        Thread-safe.  Complexity: O(nodes it held).
        """
        _check_tenant(tenant)
        with self._lock:
            if tenant not in self._lru:
                return
            self._evict_tenant(tenant, -1)
            del self._lru[tenant]
            del self._sizes[tenant]

    # ------------------------------------------------------------- accounting

    @property
    def kind(self) -> Kind | None:
        """``"text"``, ``"tokens"``, or ``None`` before the first non-empty insert."""
        return self._kind

    def size(self, tenant: str) -> int:
        """Units held by ``tenant`` (0 if unknown).  Thread-safe.  O(1)."""
        _check_tenant(tenant)
        with self._lock:
            return self._sizes.get(tenant, 0) // self._w

    def used_size_per_tenant(self) -> dict[str, int]:
        """``{tenant: units}`` for every registered tenant.  Thread-safe.  O(T)."""
        with self._lock:
            w = self._w
            return {t: n // w for t, n in self._sizes.items()}

    def total_size(self) -> int:
        """Units summed over tenants.  Thread-safe.  O(1)."""
        with self._lock:
            return self._total // self._w

    def __len__(self) -> int:
        """Same as :meth:`total_size`."""
        return self.total_size()

    def tenants(self) -> list[str]:
        """Registered tenants, in registration order (a new list).  O(T)."""
        with self._lock:
            return list(self._sizes)

    def smallest_tenant(self) -> str | None:
        """Tenant with the fewest units, ties by name; ``None`` if none.  O(T)."""
        with self._lock:
            if not self._sizes:
                return None
            return min(self._sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]

    def __repr__(self) -> str:
        return (
            f"Tree(kind={self._kind!r}, tenants={len(self._sizes)}, "
            f"total_size={self.total_size()}, max_size={self._max_size!r})"
        )

    # ----------------------------------------------------- test introspection

    def _node_count(self) -> int:
        """Number of nodes (excluding the root).  O(nodes)."""
        with self._lock:
            count = 0
            stack = [self._root]
            while stack:
                nd = stack.pop()
                if nd.children:
                    count += len(nd.children)
                    stack.extend(nd.children.values())
            return count

    def _held(self) -> dict[str, set[str]]:
        """Internal form of every maximal sequence each tenant holds (tests)."""
        with self._lock:
            out: dict[str, set[str]] = {t: set() for t in self._sizes}
            stack: list[tuple[_Node, str]] = [(self._root, "")]
            while stack:
                nd, prefix = stack.pop()
                kids = nd.children.values() if nd.children else ()
                for u in _names(nd.holders):
                    if not any(u in _names(c.holders) for c in kids):
                        out[u].add(prefix)
                for c in kids:
                    stack.append((c, prefix + c.edge))
            return out

    def _decode(self, s: str) -> str | tuple[int, ...]:
        """Internal form back to user units (tests)."""
        if self._kind != "tokens":
            return s
        if self._w == 1:
            a = array(_U32)
            a.frombytes(s.encode("utf-32-le", "surrogatepass"))
            return tuple(a)
        q = array("Q")
        q.frombytes(s.encode("latin-1"))
        return tuple(q)

    def _check_invariants(self) -> None:
        """Assert every structural invariant (tests; O(size))."""
        with self._lock:
            w = self._w
            sizes: dict[str, int] = dict.fromkeys(self._sizes, 0)
            nodes: list[_Node] = []
            stack = [self._root]
            while stack:
                nd = stack.pop()
                if nd.children is not None:
                    assert nd.children, "empty children dict"
                    for key, c in nd.children.items():
                        assert c.parent is nd
                        assert c.edge and len(c.edge) % w == 0
                        assert key == c.edge[:w]
                        ch_h = _names(c.holders)
                        assert ch_h, "node without holders"
                        assert isinstance(c.holders, str) or len(ch_h) >= 2
                        if nd is not self._root:
                            assert ch_h <= _names(nd.holders)
                        for u in ch_h:
                            sizes[u] += len(c.edge)
                        nodes.append(c)
                        stack.append(c)
            assert sizes == self._sizes, (sizes, self._sizes)
            assert sum(sizes.values()) == self._total
            assert all(v >= 0 for v in sizes.values())
            node_ids = {id(x) for x in nodes}
            eager = self._glru is not None
            for x in nodes:
                h = x.holders
                if type(h) is dict:  # child counts per holder
                    kids = x.children.values() if x.children else ()
                    for u, cnt in h.items():
                        assert cnt == sum(1 for c in kids if u in _names(c.holders)), "count"
            for u, od in self._lru.items():
                order = {id(x): i for i, x in enumerate(od)}
                for x in od:
                    assert id(x) in node_ids and u in _names(x.holders)
                    p = x.parent
                    if eager and p is not None and p is not self._root and id(p) in order:
                        assert order[id(p)] > order[id(x)], "ancestor before node"
                for x in nodes:
                    if u in _names(x.holders) and id(x) not in order:
                        # implicit: held through children held by u (exactly one
                        # in eager mode), never a leaf of u
                        kids = x.children.values() if x.children else ()
                        held = sum(1 for c in kids if u in _names(c.holders))
                        assert held == 1 if eager else held >= 1, "implicit leaf"
            if self._glru is not None:
                assert len(self._glru) == len(nodes)
                gorder = {id(x): i for i, x in enumerate(self._glru)}
                for x in nodes:
                    p = x.parent
                    if p is not None and p is not self._root:
                        assert gorder[id(p)] > gorder[id(x)]
                assert self._max_size is not None
                assert self._total <= self._max_size * w
            if self._max_size_per_tenant is not None:
                assert max(sizes.values(), default=0) <= self._max_size_per_tenant * w
