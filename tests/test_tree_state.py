"""Stateful tests: Tree against an independent brute-force model.

The model never reads the tree. Per tenant it keeps ``{held prefix: recency}`` (a clock
ticks once per insert) and evicts by the documented rule: the least recent prefix first,
the longest first among equals, one unit at a time, until the bound holds (the tenant's own
prefixes for a per-tenant cap, every tenant's for ``max_size``). So eviction choices,
bounds at equality, per-tenant limits, ``remove``, ``remove_tenant``, ``insert_match`` after
intervening writes and the tie order of ``prefix_match`` are all checked.

``check_invariants`` (used by ``test_tree.py`` too) reads the internals instead: structure,
sizes, node and holding counts, and that every recency order is the exact LRU order.
"""

from __future__ import annotations

import sys
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cacheroute.tree import Tree, TreeMatch

TENANTS = ["t0", "t1", "t2"]


class Model:
    """Brute force: every held prefix of every tenant, with its recency."""

    def __init__(self, max_size: int | None = None, per: int | None = None) -> None:
        self.rec: dict[str, dict[Any, int]] = {}
        self.clock = 0
        self.max_size = max_size
        self.per = per
        self.limits: dict[str, int | None] = {}

    def limit(self, t: str) -> int | None:
        own = self.limits.get(t)
        return self.per if own is None else own

    def size(self, t: str) -> int:
        return len(self.rec.get(t, {}))

    def total(self) -> int:
        return sum(len(r) for r in self.rec.values())

    def _evict_one(self, tenants: list[str]) -> None:
        # recency is unique per (tenant, insert) and lengths differ along one insert's path
        *_, t, p = min((r, -len(p), t, p) for t in tenants for p, r in self.rec[t].items())
        del self.rec[t][p]

    def _enforce(self, t: str) -> None:
        lim = self.limit(t)
        while lim is not None and self.size(t) > lim:
            self._evict_one([t])
        while self.max_size is not None and self.total() > self.max_size:
            self._evict_one(list(self.rec))

    def insert(self, s: Any, t: str) -> None:
        self.rec.setdefault(t, {})
        self.clock += 1
        for i in range(1, len(s) + 1):
            self.rec[t][s[:i]] = self.clock
        self._enforce(t)

    def held(self, t: str, q: Any) -> int:
        r = self.rec.get(t, {})
        n = 0
        while n < len(q) and q[: n + 1] in r:
            n += 1
        return n

    def lengths(self, q: Any) -> dict[str, int]:
        return {t: n for t in self.rec if (n := self.held(t, q))}

    def prefix_match(self, q: Any) -> tuple[int, str | None]:
        lengths = self.lengths(q)
        if not lengths:
            return 0, None
        n = max(lengths.values())
        best = [t for t, v in lengths.items() if v == n]
        return n, max(best, key=lambda t: self.rec[t][q[:n]])

    def remove(self, s: Any, t: str) -> int:
        r = self.rec.get(t, {})
        if len(s) and s not in r:
            return 0
        gone = [p for p in r if p[: len(s)] == s]
        for p in gone:
            del r[p]
        return len(gone)

    def evict_to(self, k: int) -> int:
        freed = 0
        for t in self.rec:
            while self.size(t) > k:
                self._evict_one([t])
                freed += 1
        return freed

    def set_limit(self, t: str, lim: int | None) -> None:
        self.rec.setdefault(t, {})
        self.limits[t] = lim
        lim = self.limit(t)
        while lim is not None and self.size(t) > lim:
            self._evict_one([t])


def check_invariants(tree: Tree) -> None:
    """Every structural invariant of ``tree`` (reads its internals). O(size * depth)."""
    w = tree._w
    edge, up, kids, hold, ent = tree._edge, tree._up, tree._kids, tree._hold, tree._ent
    K = 1 << 32

    def names(h: Any) -> set[str]:
        return {h} if type(h) is str else set(h)

    def stamp(x: int, u: str) -> int:
        h = hold[x]
        return ent[x] if type(h) is str else h[u] // K  # type: ignore[index]

    sizes = dict.fromkeys(tree._ten, 0)
    nodes: list[int] = []
    stack = [0]
    while stack:
        x = stack.pop()
        ch = kids[x]
        if ch is None:
            continue
        assert ch, "empty children dict"
        for key, c in ch.items():
            assert up[c] == x, "parent pointer"
            e = edge[c]
            assert e and len(e) % w == 0 and key == e[:w], "edge and key"
            h = hold[c]
            assert h is not None and (type(h) is str or len(h) >= 2), "holders"
            for u in names(h):  # the tenant's own name object: holders compare by identity
                assert any(u is v for v in names(h)) and tree._ten[u].name is next(
                    v for v in names(h) if v == u
                ), "holder names are the registered objects"
            if x:
                assert names(h) <= names(hold[x]), "holders shrink going down"
            for u in names(h):
                sizes[u] += len(e)
            nodes.append(c)
            stack.append(c)
    assert sizes == {u: o.size for u, o in tree._ten.items()}, sizes
    assert sum(sizes.values()) == tree._total
    assert all(o.name == u and type(o.name) is str for u, o in tree._ten.items())
    assert len(nodes) == tree._node_count()
    assert sum(len(names(hold[x])) for x in nodes) == tree._holdings
    assert len(set(tree._free)) == len(tree._free) and not set(tree._free) & {0, *nodes}
    assert len(nodes) + len(tree._free) + 1 == len(edge)
    assert all(kids[f] is None and hold[f] is None and not edge[f] for f in tree._free)
    assert all(ent[f] == 0 for f in [0, *tree._free]), "free nodes and the root: no stamp"
    # recency: a stamp on every leaf of a tenant; an unstamped (implicit) node is held
    # through its children; multi-holder values count the children each holder holds
    stamps: dict[str, dict[int, int]] = {u: {} for u in tree._ten}
    for x in nodes:
        h = hold[x]
        if type(h) is not str:
            assert ent[x] == 0, "a multi-holder node keeps its stamps in its holders"
        for u in names(h):
            held = sum(u in names(hold[c]) for c in (kids[x] or {}).values())
            if type(h) is not str:
                assert h[u] % K == held, "children held, per holder"  # type: ignore[index]
            e = stamp(x, u)
            assert e >= 0 and (e or held), "a leaf of a tenant has a stamp"
            if e:
                assert e not in stamps[u], "stamps are unique"
                stamps[u][e] = x
    owner: dict[int, Any] = {}
    for u, o in tree._ten.items():
        assert o.live == stamps[u], "live entries are the stamped nodes"
        assert list(o.live) == sorted(o.live), "live entries in recency order"
        q = list(o.q)
        assert q == sorted(set(q)) and set(o.live) <= set(q), "the queue: ascending, complete"
        assert len(q) - len(o.live) <= o.stale, "dead stamps counted"
        assert all(0 < e <= tree._version for e in q)
        owner.update(dict.fromkeys(o.live, o))
        assert o.cap == min(o.limit, tree._max_chars), "cut length"
    assert len(owner) == sum(len(o.live) for o in tree._ten.values()), "stamps are unique"
    g = tree._glob
    if g is not None:
        assert g == owner, "global order holds every entry, named by tenant"
        assert list(g) == sorted(g), "global order: least recent first"
        assert not g or tree._gf <= min(g)
        assert tree._total <= tree._max_chars and tree._holdings <= tree._max_nodes
    else:
        assert tree._max_size is None
    for u, o in tree._ten.items():
        lim = tree.tenant_limit(u)
        assert o.limit == (sys.maxsize if lim is None else lim * w), "per-tenant cap"
        assert o.size <= o.limit, "per-tenant cap"


def check_recency(tree: Tree, model: Model) -> None:
    """The tree's stamps order every (tenant, leaf) pair as the model's recency does."""
    pairs: list[tuple[int, int, str]] = []  # (stamp, model recency, tenant)
    stack: list[tuple[int, Any]] = [(0, "" if tree.kind != "tokens" else ())]
    w = tree._w
    while stack:
        x, prefix = stack.pop()
        for c in (tree._kids[x] or {}).values():
            e = tree._edge[c]
            units: Any = (
                e
                if tree.kind != "tokens"
                else tuple(
                    int.from_bytes(e[i : i + w].encode("latin-1"), "little")
                    for i in range(0, len(e), w)
                )
            )
            p = prefix + units
            h = tree._hold[c]
            for u in {h} if type(h) is str else set(h):
                rec = model.rec[u]
                n = len(prefix)
                # every prefix inside one node has one recency per holder
                assert len({rec[p[:i]] for i in range(n + 1, len(p) + 1)}) == 1
                held = any(
                    u == hd if type(hd := tree._hold[d]) is str else u in hd
                    for d in (tree._kids[c] or {}).values()
                )
                if not held:
                    v = tree._ent[c] if type(h) is str else h[u] >> 32
                    pairs.append((v, rec[p], u))
            stack.append((c, p))
    pairs.sort()
    assert [r for _, r, _ in pairs] == sorted(r for _, r, _ in pairs), "leaves in LRU order"


class TreeModel(RuleBasedStateMachine):
    units: st.SearchStrategy[Any] = st.text(alphabet="ab\U0001f600", max_size=7)
    max_size: int | None = None
    per: int | None = None
    token_bytes = 4

    def __init__(self) -> None:
        super().__init__()
        self.tree = Tree(
            max_size=self.max_size, max_size_per_tenant=self.per, token_bytes=self.token_bytes
        )
        self.model = Model(self.max_size, self.per)
        self.pending: list[tuple[TreeMatch, Any, dict[str, int]]] = []

    @staticmethod
    def key(u: Any) -> Any:
        return u if isinstance(u, str) else tuple(u)

    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def insert(self, data: st.DataObject, tenant: str) -> None:
        u = data.draw(self.units)
        self.tree.insert(u, tenant)
        self.model.insert(self.key(u), tenant)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        u = data.draw(self.units)
        m = self.tree.match(u)
        assert m.lengths == self.model.lengths(self.key(u))
        assert m.units == len(u)
        self.pending.append((m, self.key(u), dict(m.lengths)))

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def insert_match(self, data: st.DataObject, tenant: str) -> None:
        # any earlier match, so writes in between are common: it must re-descend then
        i = data.draw(st.integers(0, len(self.pending) - 1))
        m, u, lengths = self.pending.pop(i)
        assert self.tree.insert_match(m, tenant) == lengths.get(tenant, 0)
        self.model.insert(u, tenant)

    @rule(data=st.data())
    def prefix_match(self, data: st.DataObject) -> None:
        u = data.draw(self.units)
        assert self.tree.prefix_match(u) == self.model.prefix_match(self.key(u))

    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def prefix_match_tenant(self, data: st.DataObject, tenant: str) -> None:
        u = data.draw(self.units)
        assert self.tree.prefix_match_tenant(u, tenant) == self.model.held(tenant, self.key(u))

    @rule(data=st.data(), tenant=st.sampled_from(TENANTS), cut=st.integers(0, 7))
    def remove(self, data: st.DataObject, tenant: str, cut: int) -> None:
        held = sorted(self.model.rec.get(tenant, ()), key=repr)
        u = data.draw(st.sampled_from(held)) if held and cut else data.draw(self.units)
        u = u[: len(u) - cut % (len(u) + 1)] if held and cut else u
        freed = self.tree.remove(list(u) if isinstance(u, tuple) else u, tenant)
        assert freed == self.model.remove(self.key(u), tenant)

    @rule(tenant=st.sampled_from(TENANTS))
    def remove_tenant(self, tenant: str) -> None:
        self.tree.remove_tenant(tenant)
        self.model.rec.pop(tenant, None)
        self.model.limits.pop(tenant, None)

    @rule(k=st.integers(0, 8))
    def evict_tenant_by_size(self, k: int) -> None:
        assert self.tree.evict_tenant_by_size(k) == self.model.evict_to(k)

    @rule(tenant=st.sampled_from(TENANTS), lim=st.one_of(st.none(), st.integers(0, 8)))
    def set_tenant_limit(self, tenant: str, lim: int | None) -> None:
        self.tree.set_tenant_limit(tenant, lim)
        self.model.set_limit(tenant, lim)
        assert self.tree.tenant_limit(tenant) == self.model.limit(tenant)

    @invariant()
    def agree(self) -> None:
        check_invariants(self.tree)
        check_recency(self.tree, self.model)
        sizes = self.tree.used_size_per_tenant()
        assert sizes == {t: self.model.size(t) for t in self.model.rec}
        assert self.tree.total_size() == self.model.total()
        for t, held in self.model.rec.items():  # same sizes and a superset: the same sets
            for p in held:
                q = list(p) if type(p) is tuple else p
                assert self.tree.prefix_match_tenant(q, t) == len(p)
        if sizes:
            assert self.tree.smallest_tenant() == min(sizes, key=lambda t: (sizes[t], t))


class TokensModel(TreeModel):
    units = st.lists(st.sampled_from([0, 1, 0xD800, 2**32 - 1]), max_size=7)


class WideTokensModel(TreeModel):
    units = st.lists(st.sampled_from([0, 1, 2**40, 2**64 - 1]), max_size=6).map(tuple)
    token_bytes = 8
    max_size = 9


class BoundedTextModel(TreeModel):
    max_size = 12


class BoundedPerTenantModel(TreeModel):
    max_size = 14
    per = 6


class BoundedTokensModel(TokensModel):
    max_size = 10
    per = 7


FAST = settings(max_examples=30, stateful_step_count=30, deadline=None)
THOROUGH = settings(max_examples=300, stateful_step_count=60, deadline=None)

TestText = TreeModel.TestCase
TestTokens = TokensModel.TestCase
TestWideTokens = WideTokensModel.TestCase
TestBoundedText = BoundedTextModel.TestCase
TestBoundedPerTenant = BoundedPerTenantModel.TestCase
TestBoundedTokens = BoundedTokensModel.TestCase
TestText.settings = TestTokens.settings = TestWideTokens.settings = FAST
TestBoundedText.settings = TestBoundedPerTenant.settings = TestBoundedTokens.settings = FAST


@pytest.mark.slow
class TestThoroughText(TreeModel.TestCase):
    settings = THOROUGH


@pytest.mark.slow
class TestThoroughBounded(BoundedPerTenantModel.TestCase):
    settings = THOROUGH


@pytest.mark.slow
class TestThoroughBoundedTokens(BoundedTokensModel.TestCase):
    settings = THOROUGH
