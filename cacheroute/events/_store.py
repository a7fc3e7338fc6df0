"""Per-namespace token store behind :class:`~cacheroute.events.KVEventIndex`.

The index keeps one :class:`cacheroute.tree.Tree` per cache namespace, tenant = worker,
and needs four operations on it: ``insert(prefix, worker)``, ``match_lengths(prefix)``,
``remove(prefix, worker)`` (the worker stops holding ``prefix`` and everything that
extends it, keeps shorter prefixes) and ``remove_tenant(worker)``. ``Tree.remove`` is
being added on the tree branch; until a ``Tree`` has it, :class:`_BlockTrie` (a small trie
over whole blocks with the same operations) stands in. Units are ``str`` with one code
point per token (the Tree's own narrow token encoding), so both stores see the same keys.
"""

from __future__ import annotations

from typing import Protocol, cast

from cacheroute.tree import Tree


class Store(Protocol):
    def insert(self, units: str, tenant: str) -> None: ...
    def match_lengths(self, units: str) -> dict[str, int]: ...
    def remove(self, units: str, tenant: str) -> int: ...
    def remove_tenant(self, tenant: str) -> None: ...
    def __len__(self) -> int: ...


class _Node:
    __slots__ = ("children", "holders")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.holders: set[str] = set()


class _BlockTrie:
    """Stand-in for ``Tree`` until ``Tree.remove`` lands: a trie whose edges are whole
    blocks of ``block_size`` units (a trailing partial block is ignored; the index only
    inserts whole blocks). Not thread-safe by itself: the index locks around it."""

    __slots__ = ("_bs", "_last", "_root")

    def __init__(self, block_size: int) -> None:
        self._bs = block_size
        self._root = _Node()
        # tenant -> (units of its last insert, node at their end): a chain that grows one
        # block at a time (decode) resumes there instead of walking from the root.
        self._last: dict[str, tuple[str, _Node]] = {}

    def insert(self, units: str, tenant: str) -> None:
        bs = self._bs
        node = self._root
        start = 0
        last = self._last.get(tenant)
        if last is not None and len(last[0]) <= len(units) and units.startswith(last[0]):
            start, node = len(last[0]), last[1]
        for i in range(start, len(units) - bs + 1, bs):
            key = units[i : i + bs]
            nxt = node.children.get(key)
            if nxt is None:
                nxt = node.children[key] = _Node()
            nxt.holders.add(tenant)
            node = nxt
        if node is not self._root:
            self._last[tenant] = (units[: len(units) - len(units) % bs], node)

    def match_lengths(self, units: str) -> dict[str, int]:
        bs = self._bs
        node = self._root
        out: dict[str, int] = {}
        depth = 0
        for i in range(0, len(units) - bs + 1, bs):
            nxt = node.children.get(units[i : i + bs])
            if nxt is None:
                break
            depth += bs
            for t in nxt.holders:
                out[t] = depth
            node = nxt
        return out

    def remove(self, units: str, tenant: str) -> int:
        self._last.clear()  # removals may unlink or vacate cached nodes
        bs = self._bs
        n = len(units) - len(units) % bs
        if n == 0:
            return 0
        parent = self._root
        for i in range(0, n - bs, bs):  # down to the parent of the last block
            nxt = parent.children.get(units[i : i + bs])
            if nxt is None or tenant not in nxt.holders:
                return 0
            parent = nxt
        return self._drop(parent, units[n - bs : n], tenant)

    def _drop(self, parent: _Node, key: str, tenant: str) -> int:
        """``tenant`` leaves ``parent.children[key]`` and its subtree; emptied nodes go
        (a child's holders are a subset of its parent's, so an emptied node's subtree is
        empty too). Returns the nodes ``tenant`` left."""
        removed = 0
        stack = [(parent, key)]
        while stack:
            p, k = stack.pop()
            node = p.children.get(k)
            if node is None or tenant not in node.holders:
                continue
            node.holders.discard(tenant)
            removed += 1
            if node.holders:
                stack.extend((node, c) for c in node.children)
            else:
                del p.children[k]
        return removed

    def remove_tenant(self, tenant: str) -> None:
        self._last.clear()
        for key in list(self._root.children):
            self._drop(self._root, key, tenant)

    def __len__(self) -> int:
        """Non-zero while some tenant holds something (the index drops empty stores)."""
        return len(self._root.children)


def make_store(block_size: int) -> Store:
    """A ``Tree`` when it can remove a prefix for one tenant, else the stand-in."""
    if hasattr(Tree, "remove"):
        return cast(Store, Tree())
    return _BlockTrie(block_size)
