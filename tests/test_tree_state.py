"""Stateful property tests: Tree against a brute-force model (text and tokens)."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cacheroute.tree import Tree

TENANTS = ["t0", "t1", "t2", "t3"]


def lcp(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class TreeModel(RuleBasedStateMachine):
    """Model: per tenant, the set of sequences it holds (as tuples/strs)."""

    units: st.SearchStrategy[Any] = st.text(alphabet="ab\U0001f600", max_size=7)
    max_size: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tree = Tree(max_size=self.max_size)
        self.model: dict[str, set[Any]] = {}
        self.last: dict[str, Any] = {}

    # helpers
    def key(self, u: Any) -> Any:
        return u if isinstance(u, str) else tuple(u)

    def m_match(self, tenant: str, u: Any) -> int:
        return max((lcp(s, self.key(u)) for s in self.model.get(tenant, ())), default=0)

    def m_size(self, tenant: str) -> int:
        return len({s[:i] for s in self.model.get(tenant, ()) for i in range(1, len(s) + 1)})

    def resync(self) -> None:
        """After a bounded eviction, take what the tree holds (checked separately)."""
        held = self.tree._held()
        self.model = {
            t: {self.key(self.tree._decode(s)) for s in seqs if s} for t, seqs in held.items()
        }
        self.last = {t: s for t, s in self.last.items() if self.m_match(t, s) == len(s)}

    # rules
    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def insert(self, data: st.DataObject, tenant: str) -> None:
        u = data.draw(self.units)
        self.tree.insert(u, tenant)
        self.model.setdefault(tenant, set())
        if len(u):
            self.model[tenant].add(self.key(u))
            self.last[tenant] = self.key(u)
        if self.max_size is not None:
            assert self.tree.total_size() <= self.max_size
            self.resync()

    @rule(data=st.data())
    def prefix_match(self, data: st.DataObject) -> None:
        u = data.draw(self.units)
        n, tenant = self.tree.prefix_match(u)
        best = max((self.m_match(t, u) for t in self.model), default=0)
        assert n == best
        if best == 0:
            assert tenant is None
        else:
            assert tenant is not None and self.m_match(tenant, u) == best

    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def prefix_match_tenant(self, data: st.DataObject, tenant: str) -> None:
        u = data.draw(self.units)
        assert self.tree.prefix_match_tenant(u, tenant) == self.m_match(tenant, u)

    @rule(data=st.data())
    def match_lengths(self, data: st.DataObject) -> None:
        u = data.draw(self.units)
        expected = {t: self.m_match(t, u) for t in self.model}
        assert self.tree.match_lengths(u) == {t: n for t, n in expected.items() if n}

    @rule(
        data=st.data(),
        pick=st.sampled_from(["longest", "none", "fixed", "raise"]),
        tenant=st.sampled_from(TENANTS),
    )
    def match_and_insert(self, data: st.DataObject, pick: str, tenant: str) -> None:
        u = data.draw(self.units)
        expected = {t: n for t in self.model if (n := self.m_match(t, u))}
        seen: list[dict[str, int]] = []

        def choose(lengths: dict[str, int]) -> str | None:
            seen.append(lengths)
            if pick == "none":
                return None
            if pick == "raise":
                raise KeyError("boom")
            if pick == "longest" and lengths:
                return max(sorted(lengths), key=lengths.__getitem__)
            return tenant

        if pick == "raise":
            before = self.tree._held()
            try:
                self.tree.match_and_insert(u, choose)
            except KeyError:
                pass
            else:  # pragma: no cover
                raise AssertionError("choose's exception was swallowed")
            assert self.tree._held() == before
            return
        chosen, n = self.tree.match_and_insert(u, choose)
        assert seen == [expected]
        if pick == "none":
            assert (chosen, n) == (None, 0)
            return
        assert chosen is not None
        assert n == expected.get(chosen, 0)
        self.model.setdefault(chosen, set())
        if len(u):
            self.model[chosen].add(self.key(u))
            self.last[chosen] = self.key(u)
        if self.max_size is not None:
            assert self.tree.total_size() <= self.max_size
            self.resync()

    @rule(tenant=st.sampled_from(TENANTS))
    def remove_tenant(self, tenant: str) -> None:
        self.tree.remove_tenant(tenant)
        self.model.pop(tenant, None)
        self.last.pop(tenant, None)

    @precondition(lambda self: self.model)
    @rule(k=st.integers(0, 12))
    def evict_tenant_by_size(self, k: int) -> None:
        before = {t: set(v) for t, v in self.model.items()}
        sizes_before = self.tree.used_size_per_tenant()
        freed = self.tree.evict_tenant_by_size(k)
        sizes = self.tree.used_size_per_tenant()
        assert freed == sum(sizes_before.values()) - sum(sizes.values())
        self.resync()
        for t, size in sizes.items():
            assert size <= k
            assert size == min(size, sizes_before[t])
            if sizes_before[t] <= k:
                assert size == sizes_before[t]
            last = self.last.get(t)
            if last is not None and len(last) <= k:
                assert self.tree.prefix_match_tenant(last, t) == len(last)
            # eviction only removes: everything held was held before
            for s in self.model[t]:
                assert any(b[: len(s)] == s for b in before.get(t, ()))
        self.last = {}  # "most recent survives" is checked at eviction time only

    @invariant()
    def sizes_agree(self) -> None:
        self.tree._check_invariants()
        sizes = self.tree.used_size_per_tenant()
        assert set(sizes) == set(self.model)
        for t in self.model:
            assert sizes[t] == self.m_size(t) == self.tree.size(t)
        assert self.tree.total_size() == sum(sizes.values())
        if sizes:
            assert self.tree.smallest_tenant() == min(sizes, key=lambda t: (sizes[t], t))


class TokensModel(TreeModel):
    units = st.one_of(
        st.lists(st.sampled_from([0, 1, 0xD800, 2**20]), max_size=7),
        st.lists(st.sampled_from([0, 1, 2**40]), max_size=5).map(tuple),
    )


class BoundedTextModel(TreeModel):
    max_size = 12


class BoundedTokensModel(TokensModel):
    max_size = 10


SETTINGS = settings(max_examples=50, stateful_step_count=30, deadline=None)

TestTextTree = TreeModel.TestCase
TestTextTree.settings = SETTINGS
TestTokensTree = TokensModel.TestCase
TestTokensTree.settings = SETTINGS
TestBoundedText = BoundedTextModel.TestCase
TestBoundedText.settings = SETTINGS
TestBoundedTokens = BoundedTokensModel.TestCase
TestBoundedTokens.settings = SETTINGS
