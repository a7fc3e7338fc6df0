"""Unit and edge-case tests for cacheroute.tree (the model-based ones: test_tree_state.py)."""

from __future__ import annotations

import gc
import random
import threading
import weakref
from array import array
from enum import Enum
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_tree_state import Model, check_invariants

from cacheroute.tree import Tree, TreeMatch, _lcp


def held(t: Tree) -> dict[str, set[str]]:
    """Every maximal sequence each tenant holds (text trees)."""
    out: dict[str, set[str]] = {u: set() for u in t.tenants()}
    stack = [(0, "")]
    while stack:
        x, prefix = stack.pop()
        kids = list((t._kids[x] or {}).values())
        for u in {t._hold[x]} if type(t._hold[x]) is str else set(t._hold[x] or ()):
            if not any(u == t._hold[c] or u in (t._hold[c] or ()) for c in kids):
                out[u].add(prefix)
        stack.extend((c, prefix + t._edge[c]) for c in kids)
    return out


# ------------------------------------------------------------------ basics


def test_empty_tree() -> None:
    t = Tree()
    assert t.kind is None
    assert t.prefix_match("abc") == (0, None)
    assert t.prefix_match_tenant("abc", "a") == 0
    assert t.match_lengths("abc") == {} == t.match([1, 2]).lengths
    assert t.remove("abc", "a") == 0
    assert (t.size("a"), t.total_size(), len(t), t.tenants()) == (0, 0, 0, [])
    assert t.smallest_tenant() is None and t.used_size_per_tenant() == {}
    assert "total_size=0" in repr(t)


def test_insert_and_match_text() -> None:
    t = Tree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.kind == "text"
    assert t.prefix_match("hello world!") == (11, "a")
    assert t.prefix_match("hello th") == (8, "b")
    assert t.prefix_match("xyz") == (0, None)
    assert [t.prefix_match_tenant("hello there", u) for u in "ab?"] == [6, 11, 0]
    assert t.match_lengths("hello thx") == {"a": 6, "b": 8}
    assert (t.size("a"), t.size("b"), t.total_size()) == (11, 11, 22)
    t.insert("abc", "a")
    t.insert("abd", "a")
    t.insert("ab", "a")
    assert t.size("a") == 11 + 4  # distinct non-empty prefixes: a, ab, abc, abd
    check_invariants(t)


def test_empty_units_registers_the_tenant_only() -> None:
    t = Tree()
    t.insert("", "w1")
    t.insert([], "w2")
    t.insert_match(t.match(()), "w4")
    assert t.kind is None and t.tenants() == ["w1", "w2", "w4"] and t.size("w1") == 0
    t.insert("abc", "w1")
    t.insert([], "w3")  # empty units never conflict with the kind
    assert t.kind == "text" and t.smallest_tenant() == "w2"
    t.add_tenant("c")
    t.add_tenant("c")
    assert t.tenants().count("c") == 1 and t.smallest_tenant() == "c"


def test_tie_goes_to_the_most_recent_holder_of_the_longest_match() -> None:
    t = Tree()
    t.insert("shared prefix one", "a")
    t.insert("shared prefix two", "b")
    assert t.prefix_match("shared prefix") == (13, "b")
    t.insert("shared prefix one", "a")
    assert t.prefix_match("shared prefix") == (13, "a")
    t.insert_match(t.match("shared prefix three"), "b")
    assert t.prefix_match("shared prefix")[1] == "b"
    t.prefix_match("shared prefix one")  # reads do not refresh
    t.match_lengths("shared prefix one")
    t.match("shared prefix one")
    assert t.prefix_match("shared prefix")[1] == "b"
    assert t.prefix_match("shared prefix one!") == (17, "a")  # only a holds it
    for i in range(20):
        t.insert("common", f"w{i}")
    t.insert("comm", "w3")
    assert t.prefix_match("common") == (6, "w19") and t.prefix_match("comm") == (4, "w3")


def test_remove_tenant() -> None:
    t = Tree(max_size_per_tenant=50)
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    t.set_tenant_limit("a", 20)
    t.remove_tenant("a")
    assert "a" not in t.tenants() and t.size("a") == 0 and t.tenant_limit("a") == 50
    assert t.prefix_match("hello world") == (6, "b") and t.total_size() == 11
    t.remove_tenant("unknown")
    t.insert("abcdef", "a")
    t.insert("abcxyz", "b")  # splits a's node: "abc" is a's through one child
    t.insert("abcdef", "c")
    t.remove_tenant("a")
    check_invariants(t)
    t.remove_tenant("c")
    assert held(t)["b"] == {"abcxyz", "hello there"}
    t.remove_tenant("b")
    assert t.total_size() == 0 and t._node_count() == 0
    check_invariants(t)


# ------------------------------------------------------- match / insert_match


def test_match_then_insert_match() -> None:
    t = Tree()
    t.insert("system prompt A", "w1")
    m = t.match("system prompt B")
    assert isinstance(m, TreeMatch) and m.lengths == {"w1": 14} and m.units == 15
    assert "units=15" in repr(m)
    m.lengths["w9"] = 3  # the caller's own dict
    assert t.match("system prompt B").lengths == {"w1": 14}
    assert t.insert_match(m, "w2") == 0
    assert t.insert_match(t.match("system prompt B!"), "w2") == 15
    assert t.insert_match(t.match("system prompt C"), "w1") == 14
    assert t.match_lengths("system prompt B!") == {"w1": 14, "w2": 16}
    check_invariants(t)


def test_insert_match_reuses_the_descent_unless_the_tree_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = Tree()
    t.insert("abcdef", "a")
    walks: list[str] = []
    real = Tree._walk
    monkeypatch.setattr(Tree, "_walk", lambda self, s: walks.append(s) or real(self, s))
    m = t.match("abcxyz")
    assert walks == ["abcxyz"]
    t.insert_match(m, "b")
    assert walks == ["abcxyz"]  # no second descent
    m1, m2 = t.match("abq"), t.match("abcxyz!")
    t.insert("abcdeX", "c")  # a write in between: both re-descend
    t.insert_match(m2, "d")
    t.insert_match(m1, "d")
    t.insert_match(m1, "e")  # used twice: the first use wrote
    assert walks[-3:] == ["abcxyz!", "abq", "abq"]
    assert held(t)["d"] == {"abq", "abcxyz!"}
    assert t.match_lengths("abcxyz!") == {"a": 3, "b": 6, "c": 3, "d": 7, "e": 2}
    check_invariants(t)


def test_insert_match_errors_leave_the_tree_unchanged() -> None:
    t, other = Tree(), Tree()
    t.insert("abc", "a")
    with pytest.raises(TypeError, match=r"match must be a TreeMatch.*None \(NoneType\)"):
        t.insert_match(None, "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"match must be a TreeMatch from this tree"):
        t.insert_match(other.match("abc"), "a")
    with pytest.raises(TypeError, match=r"tenant must be a str, got 5 \(int\)"):
        t.insert_match(t.match("abd"), 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"made by Tree\.match"):
        TreeMatch()
    u = Tree()
    m = u.match([1, 2])
    u.insert("text", "a")  # the tree's kind is fixed after the match
    with pytest.raises(TypeError, match=r"match must be a match of text"):
        u.insert_match(m, "b")
    assert t.used_size_per_tenant() == {"a": 3} and u.tenants() == ["a"]


def test_match_and_insert_is_match_choose_insert_match() -> None:
    t = Tree()
    t.insert("system prompt A", "w1")
    seen: list[dict[str, int]] = []

    def choose(lengths: dict[str, int]) -> str:
        seen.append(lengths)
        return "w2"

    assert t.match_and_insert("system prompt B", choose) == ("w2", 0)
    assert t.match_and_insert("system prompt B, more", choose) == ("w2", 15)
    assert seen == [{"w1": 14}, {"w1": 14, "w2": 15}]
    assert t.match_and_insert("system prompt C", lambda lengths: None) == (None, 0)
    assert t.match_lengths("system prompt C") == {"w1": 14, "w2": 14}  # nothing inserted
    assert held(t)["w2"] == {"system prompt B, more"}
    check_invariants(t)


def test_match_and_insert_may_read_the_tree_inside_choose() -> None:
    t = Tree()
    t.insert("abc", "a")
    t.insert("xyz", "b")
    # the lock is not held while choosing: a smallest-tenant rule can ask the tree
    assert t.match_and_insert("q", lambda lengths: t.smallest_tenant()) == ("a", 0)


def test_match_and_insert_errors_leave_the_tree_unchanged() -> None:
    t = Tree()
    t.insert("abc", "a")

    def boom(lengths: dict[str, int]) -> str:
        raise RuntimeError("no worker")

    with pytest.raises(RuntimeError, match="no worker"):
        t.match_and_insert("abd", boom)
    with pytest.raises(TypeError, match=r"choose\(lengths\) must be a str, got 7 \(int\)"):
        t.match_and_insert("abd", lambda lengths: 7)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match=r"choose must be callable, got 'a' \(str\)"):
        t.match_and_insert("abd", "a")  # type: ignore[arg-type]
    assert t.used_size_per_tenant() == {"a": 3} and t.tenants() == ["a"]
    check_invariants(t)


# ------------------------------------------------------------------- remove


def test_remove_drops_the_sequence_and_everything_after_it() -> None:
    t = Tree()
    t.insert("abcdef", "a")
    t.insert("abcxyz", "a")
    t.insert("abcdef", "b")
    assert t.remove("abcd", "a") == 3  # abcd, abcde, abcdef
    assert held(t)["a"] == {"abcxyz"} and held(t)["b"] == {"abcdef"}
    assert t.remove("abcd", "a") == 0  # not held any more
    assert t.remove("abq", "a") == 0  # never held
    assert t.remove("abcxyz!", "a") == 0  # longer than what it holds
    assert t.remove("ab", "a") == 5  # ab, abc, abcx, abcxy, abcxyz
    assert held(t)["a"] == {"a"}
    assert t.remove("", "b") == 6 and t.size("b") == 0 and "b" in t.tenants()
    assert t.remove("a", "unknown") == 0
    check_invariants(t)


def test_remove_tokens_like_a_block_removed_event() -> None:
    t = Tree(max_size=100)
    t.insert([1, 2, 3, 4, 5], "e0")
    t.insert([1, 2, 3, 9], "e0")
    t.insert([1, 2, 3, 4, 5], "e1")
    assert t.remove([1, 2, 3], "e0") == 4  # block 3 and everything after it
    assert t.prefix_match_tenant([1, 2, 3, 4, 5], "e0") == 2
    assert t.prefix_match_tenant([1, 2, 3, 4, 5], "e1") == 5
    check_invariants(t)


# ------------------------------------------------------------ bounds


def test_max_size_is_exact_and_evicts_about_what_each_insert_adds() -> None:
    t = Tree(max_size=10)
    t.insert("aaaa", "x")
    t.insert("bbbbbb", "y")
    assert t.total_size() == 10  # at the bound: nothing evicted
    t.insert("cc", "x")
    assert t.total_size() == 10  # "aaaa" lost its last 2 units, nothing more
    assert held(t) == {"x": {"aa", "cc"}, "y": {"bbbbbb"}}
    rng = random.Random(3)
    t = Tree(max_size=2_000)
    for i in range(3_000):
        s = "".join(rng.choices("abcdefgh", k=rng.randint(1, 60)))
        before = t.total_size()
        t.insert(s, f"w{i % 5}")
        assert t.total_size() <= 2_000 and t.prefix_match_tenant(s, f"w{i % 5}") == len(s)
        assert t.total_size() >= min(2_000, before) - len(s)  # no burst below the bound
        if i % 500 == 0:
            check_invariants(t)
    assert t._node_count() <= 2_000


def test_a_prompt_longer_than_its_cap_keeps_its_first_units() -> None:
    t = Tree(max_size=100, max_size_per_tenant=60)
    t.insert("x" * 30, "a")
    t.insert("y" * 1000, "b")
    assert (t.size("a"), t.size("b")) == (30, 60)
    t.insert("z" * 1000, "c")  # the cap of c is 60, the global 100: a and b pay
    assert t.size("c") == 60 and t.total_size() == 100 and t.size("a") == 0
    t.set_tenant_limit("c", None)
    t.set_tenant_limit("d", 500)
    t.insert("q" * 1000, "d")
    assert t.size("d") == 100 and t.total_size() == 100
    check_invariants(t)


def test_per_tenant_limits() -> None:
    t = Tree(max_size_per_tenant=10)
    assert t.tenant_limit("w1") == 10
    t.insert("abcdefghij", "w1")
    assert t.size("w1") == 10  # at the cap: kept
    t.set_tenant_limit("w1", 4)  # below: enforced at once, LRU first
    assert t.size("w1") == 4 and t.tenant_limit("w1") == 4
    t.insert("xyz", "w1")  # the inserting tenant pays with its own prefixes
    assert held(t)["w1"] == {"a", "xyz"}
    t.insert("klmnopqrst", "w2")
    assert t.size("w2") == 10  # the default applies to w2
    t.set_tenant_limit("w1", 0)
    assert t.size("w1") == 0
    t.insert("abc", "w1")
    assert t.size("w1") == 0 and t.size("w2") == 10
    t.set_tenant_limit("w1", None)
    assert t.tenant_limit("w1") == 10
    assert Tree().tenant_limit("x") is None
    check_invariants(t)


def test_evict_tenant_by_size() -> None:
    t = Tree()
    t.insert("aaaa", "x")
    t.insert("bbbb", "x")
    t.insert("cccc", "x")
    t.insert("aaaa", "y")
    assert t.evict_tenant_by_size(5) == 7  # x: all of aaaa, then bbbb from its end
    assert held(t) == {"x": {"b", "cccc"}, "y": {"aaaa"}}
    t.insert("abcdef", "z")
    t.insert("abcxyz", "z")
    t.insert("abc", "z")  # abc refreshed last: the two branches go first
    assert t.evict_tenant_by_size(3) == 2 + 1 + 6  # x, y and z shrink to 3
    assert held(t) == {"x": {"ccc"}, "y": {"aaa"}, "z": {"abc"}}
    assert t.evict_tenant_by_size(0) == 3 + 3 + 3
    assert t.total_size() == 0 and t._node_count() == 0 and t.tenants() == ["x", "y", "z"]


def test_max_nodes_counts_nodes_per_holder_and_evicts_lru_pairs() -> None:
    t = Tree(max_nodes=3)
    t.insert("ab", "x")
    t.insert("ac", "x")  # nodes a, b, c
    assert t._holdings == 3
    t.insert("ad", "y")  # y joins a and adds d: 5 holdings, x's LRU pairs go
    assert t._holdings <= 3
    assert t.prefix_match_tenant("ad", "y") == 2  # the newest insert is kept
    check_invariants(t)
    rng = random.Random(1)
    t = Tree(max_size=500, max_nodes=40)
    m = Model(max_size=None)  # eviction by nodes: the survivors are the newest pairs
    for i in range(400):
        s = "".join(rng.choices("abc", k=rng.randint(1, 6)))
        t.insert(s, f"w{i % 3}")
        m.insert(s, f"w{i % 3}")
        assert t._holdings <= 40 and t.total_size() <= 500
        for u in t.tenants():  # every prefix a tenant still holds is newer than every one
            held = {p: t.prefix_match_tenant(p, u) == len(p) for p in m.rec[u]}  # it lost
            lost = [m.rec[u][q] for q, kept in held.items() if not kept]
            if lost:
                newest_lost = max(lost)
                for p, kept in held.items():
                    if kept:
                        assert m.rec[u][p] >= newest_lost
        check_invariants(t)


def test_max_nodes_holds_after_remove_and_set_tenant_limit_too() -> None:
    """A remove or a lower tenant limit can split a shared node (one more holding per
    other holder); the node bound is enforced there as in every insert."""
    rng = random.Random(7)
    for trial in range(200):
        bound, units = rng.randint(2, 12), rng.randint(3, 20)
        t = Tree(max_nodes=bound, max_size=units if trial % 2 else None)
        for _ in range(30):
            s = "".join(rng.choices("ab", k=rng.randint(1, 6)))
            op = rng.random()
            who = f"w{rng.randrange(3)}"
            if op < 0.6:
                t.insert(s, who)
            elif op < 0.85:
                t.remove(s[: rng.randint(1, len(s))], who)
            else:
                t.set_tenant_limit(who, rng.randint(1, 6))
            assert t._holdings <= bound, (trial, op, t._holdings, bound)
            assert trial % 2 == 0 or t.total_size() <= units
            check_invariants(t)


def test_max_nodes_for_a_memory_budget() -> None:
    n = Tree.max_nodes_for(256 * 2**20, max_size=2**24)
    assert n * Tree.NODE_BYTES + 2**24 * 4 <= 256 * 2**20
    assert Tree.max_nodes_for(256 * 2**20, max_size=10**6, unit_bytes=8) > n
    with pytest.raises(ValueError, match=r"^max_size must be <= "):
        Tree.max_nodes_for(2**20, max_size=2**24)
    with pytest.raises(TypeError, match=r"^memory_bytes must be an int"):
        Tree.max_nodes_for(1.5, max_size=2)  # type: ignore[arg-type]


# ------------------------------------------------------------------ tokens


def test_tokens_list_tuple_array_range() -> None:
    t = Tree()
    t.insert([1, 2, 3, 4], "a")
    t.insert((1, 2, 9), "b")
    assert t.kind == "tokens"
    assert t.prefix_match(array("I", [1, 2, 3])) == (3, "a")  # the buffer, as is
    assert t.prefix_match(range(1, 3)) == (2, "b")
    assert t.match_lengths([1, 2, 3, 7]) == {"a": 3, "b": 2}
    assert t.prefix_match_tenant(array("q", [1, 2, 9, 9]), "b") == 3
    assert t.match(array("H", [1, 2])).units == 2
    assert (t.size("a"), t.size("b")) == (4, 3)
    t.insert([True, False], "c")  # bools are ints
    assert t.prefix_match([1, 0]) == (2, "c")
    check_invariants(t)


def test_token_ids_match_whole_tokens_only() -> None:
    t = Tree()
    seq = [0, 0xD800, 0xDFFF, 0xDC00, 0x10FFFF, 0x110000, 2**32 - 1]  # no slow path
    t.insert(seq, "a")
    assert t.prefix_match(seq) == (7, "a")
    assert t.prefix_match([0, 0xD800, 0xDFFF, 5]) == (3, "a")
    t.insert([0x0101, 7], "d")
    assert t.prefix_match([0x0102]) == (0, None)  # shares a byte, not a token
    assert t.prefix_match([0x0101, 0x0107]) == (1, "d")
    assert t.remove([0x0101, 7], "d") == 1
    check_invariants(t)


def test_token_ids_out_of_range() -> None:
    t = Tree()
    with pytest.raises(
        ValueError, match=r"units\[1\] must be a token id in \[0, 2\*\*32\).*4294967296"
    ):
        t.insert([1, 2**32], "a")
    with pytest.raises(ValueError, match=r"units\[0\].*-1 \(int\)"):
        t.prefix_match([-1])
    wide = Tree(token_bytes=8)
    wide.insert([1, 2**40, 2**64 - 1], "a")
    assert wide.prefix_match([1, 2**40, 7]) == (2, "a") and wide.size("a") == 3
    with pytest.raises(ValueError, match=r"units\[0\] must be a token id in \[0, 2\*\*64\)"):
        wide.insert([2**64], "a")
    assert t.kind is None and t.tenants() == []


# ------------------------------------------------------------- bad input


BAD_UNITS = [b"abc", bytearray(b"abc"), memoryview(b"abc"), 5, 3.5, None, {"a": 1}, {1, 2}]


@pytest.mark.parametrize("bad", [*BAD_UNITS, [[1]], [1, "x"], [1.5], array("d", [1.0])])
def test_bad_units_name_the_parameter_and_change_nothing(bad: Any) -> None:
    t = Tree(max_size=100)
    t.insert("keep", "k")
    calls = [
        lambda: t.insert(bad, "a"),
        lambda: t.match(bad),
        lambda: t.prefix_match(bad),
        lambda: t.match_lengths(bad),
        lambda: t.prefix_match_tenant(bad, "a"),
        lambda: t.remove(bad, "k"),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"^units(\[\d\])? must be .*, got "):
            call()
    u = Tree()
    with pytest.raises(TypeError, match="units"):
        u.insert(bad, "a")
    assert (t.tenants(), t.total_size(), u.tenants(), u.kind) == (["k"], 4, [], None)


def test_mixing_kinds() -> None:
    t = Tree()
    t.insert("text", "a")
    for call in (lambda: t.insert([1, 2], "a"), lambda: t.prefix_match((1,))):
        with pytest.raises(TypeError, match=r"units must be a str \(this tree holds text\)"):
            call()
    u = Tree()
    u.insert([1, 2], "a")
    for call in (lambda: u.insert("x", "a"), lambda: u.match("x"), lambda: u.remove("x", "a")):
        with pytest.raises(TypeError, match=r"units must be .* \(this tree holds tokens\)"):
            call()
    assert u.size("a") == 2 and t.size("a") == 4


@pytest.mark.parametrize("bad", [1, None, b"w", ("w",)])
def test_tenant_must_be_a_str(bad: Any) -> None:
    t = Tree()
    calls = [
        lambda: t.insert("abc", bad),
        lambda: t.add_tenant(bad),
        lambda: t.size(bad),
        lambda: t.prefix_match_tenant("abc", bad),
        lambda: t.remove_tenant(bad),
        lambda: t.remove("abc", bad),
        lambda: t.set_tenant_limit(bad, 3),
        lambda: t.tenant_limit(bad),
        lambda: t.insert_match(t.match("abc"), bad),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"^tenant must be a str, got "):
            call()
    assert t.tenants() == [] and t.kind is None


def test_str_subclass_tenant_and_units() -> None:
    class Name(str):
        pass

    t = Tree()
    t.insert(Name("abc"), Name("w"))
    t.insert("abd", "w")
    assert t.size("w") == 4 and type(t.tenants()[0]) is str
    check_invariants(t)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"max_size": 0}, ValueError, r"^max_size must be an int >= 1 or None, got 0 \(int\)"),
        ({"max_size": 1.5}, TypeError, r"^max_size must be an int or None, got 1\.5"),
        ({"max_size": "10"}, TypeError, r"max_size.*'10'"),
        ({"max_size": True}, TypeError, r"max_size.*True"),
        ({"max_size_per_tenant": 0}, ValueError, r"max_size_per_tenant.*0"),
        ({"max_nodes": -1}, ValueError, r"max_nodes.*-1"),
        ({"token_bytes": 2}, ValueError, r"^token_bytes must be 4 or 8, got 2"),
        ({"token_bytes": 4.0}, TypeError, r"token_bytes"),
        ({"low_water": 0.9}, TypeError, r"low_water"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        Tree(**kwargs)


def test_count_argument_errors() -> None:
    t = Tree()
    t.insert("abc", "a")
    with pytest.raises(ValueError, match=r"^max_units must be an int >= 0, got -1"):
        t.evict_tenant_by_size(-1)
    with pytest.raises(TypeError, match=r"^max_units must be an int, got 1\.0"):
        t.evict_tenant_by_size(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^max_units must be an int >= 0 or None, got -2"):
        t.set_tenant_limit("a", -2)
    with pytest.raises(TypeError, match=r"max_units.*'3'"):
        t.set_tenant_limit("b", "3")  # type: ignore[arg-type]
    assert t.tenants() == ["a"] and t.size("a") == 3 and t.tenant_limit("a") is None


# ----------------------------------------------------------------- unicode


def test_unicode_emoji_combining_and_lone_surrogates() -> None:
    t = Tree()
    fam = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ family: 5 code points
    t.insert(fam + " hi", "a")
    t.insert("e\u0301te\u0301", "b")
    t.insert("x\ud800y\udfffz", "c")
    t.insert("x\ud800\udc00", "d")  # a surrogate pair as two code points
    t.insert("abc\u00e9\u4e2d\U0001f600", "e")
    t.insert("abc\u00e9\u4e2dX", "f")
    assert t.prefix_match(fam) == (5, "a") and t.prefix_match("\U0001f468") == (1, "a")
    assert t.prefix_match("e\u0301t") == (3, "b") and t.prefix_match("x\ud800y") == (3, "c")
    assert t.match_lengths("x\ud800\udc00!") == {"c": 2, "d": 3}
    assert t.match_lengths("abc\u00e9\u4e2d") == {"e": 5, "f": 5}
    assert (t.size("a"), t.size("c"), t.size("d")) == (8, 5, 3)
    check_invariants(t)


# ---------------------------------------------------------------- big cases


@pytest.mark.slow
def test_million_unit_prompt() -> None:
    t = Tree()
    big = "ab" * 500_000
    t.insert(big, "a")
    other = big[:700_001] + "Z" + big[700_002:]
    t.insert(other, "b")
    assert t.prefix_match(big) == (1_000_000, "a") and t.prefix_match(other) == (10**6, "b")
    assert t.match_lengths(big[:900_000] + "!") == {"a": 900_000, "b": 700_001}
    assert t.remove(big[:10], "a") == 999_991
    toks = list(range(1_000_000))
    u = Tree()
    u.insert(toks, "a")
    toks[999_999] = 5
    assert u.prefix_match(toks) == (999_999, "a")
    u.remove_tenant("a")
    assert u.total_size() == 0


@pytest.mark.slow
def test_deep_chain_100k_nodes() -> None:
    n = 100_000
    t = Tree()
    base = "a" * n
    t.insert(base, "a")
    for i in range(n - 1, 0, -1):  # a branch at every depth: a chain n nodes deep
        t.insert(base[:i] + "!", "b")
    assert t._node_count() >= n
    assert t.prefix_match(base) == (n, "a") and t.prefix_match(base[:5000] + "!") == (5001, "b")
    assert t.match_lengths(base) == {"a": n, "b": n - 1}
    t.set_tenant_limit("b", 10)
    assert t.size("b") == 10
    assert t.remove("a", "a") == n
    t.remove_tenant("b")
    assert t._node_count() == 0 and t.total_size() == 0


# ------------------------------------------------------ memory, gc, threads


def test_a_dropped_tree_is_freed_without_the_collector() -> None:
    freed: list[bool] = []
    gc.disable()
    gc.freeze()  # even objects that existed before are never collected now
    try:
        t = Tree(max_size=1000)
        for i in range(200):
            t.insert(f"prompt {i} " * 3, f"w{i % 4}")
        t.set_tenant_limit("w1", 10)
        m = t.match("prompt 1")
        del m
        ref = weakref.ref(t, lambda _: freed.append(True))
        del t
        assert freed == [True] and ref() is None
    finally:
        gc.unfreeze()
        gc.enable()


def test_nodes_are_not_tracked_by_the_collector() -> None:
    t = Tree()
    for i in range(2000):
        t.insert(f"{i % 7} shared " + str(i) * 3, f"w{i % 5}")
    tracked = [x for x in t._kids + t._hold if x is not None and gc.is_tracked(x)]
    assert tracked == []


def test_thread_safety_smoke() -> None:
    t = Tree(max_size=5_000, max_size_per_tenant=1_500)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                s = "".join(rng.choices("abc", k=rng.randint(1, 30)))
                op = rng.random()
                if op < 0.4:
                    t.insert(s, f"w{seed}")
                elif op < 0.6:
                    t.prefix_match(s)
                elif op < 0.8:
                    t.insert_match(t.match(s), f"w{rng.randint(0, 3)}")
                elif op < 0.9:
                    t.remove(s[:3], f"w{seed}")
                else:
                    t.evict_tenant_by_size(100)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    check_invariants(t)


# ------------------------------------------------------------ common prefix


# Strings of every width: ASCII (text: the xor path), latin-1 (token ids: the xor path with
# latin1=True), and UCS-2 / astral / lone surrogates (text: halving only). The shared run
# and each tail draw their widths apart, so an ASCII edge meets a wider prompt and back.
_LCP_RUNS = {
    "ascii": "xyz",
    "latin1": "x\x00\xff",
    "ucs2": "x\u4e2d\u00e9",
    "astral": "x\U0001f600\ud800",
}
_LCP_TAILS = ("ab", "ac", "\x80a", "\x81a", "\u4e00a", "\u4e01a", "\udfffa", "\U0001f601a")


@given(
    shared=st.integers(1, 5000),
    run_chars=st.sampled_from(sorted(_LCP_RUNS)),
    e_chars=st.sampled_from(_LCP_TAILS),
    s_chars=st.sampled_from(_LCP_TAILS),
    e_extra=st.integers(0, 40),
    s_extra=st.integers(0, 40),
    pos=st.integers(0, 3),
)
def test_lcp_is_the_common_prefix_length(
    shared: int, run_chars: str, e_chars: str, s_chars: str, e_extra: int, s_extra: int, pos: int
) -> None:
    # Long shared runs reach the halving and the xor of the last window; the tails end
    # them anywhere, or not at all.
    rng = random.Random(shared * 64 + e_extra)
    run = "".join(rng.choice(_LCP_RUNS[run_chars]) for _ in range(shared))
    e = run + "".join(rng.choice(e_chars) for _ in range(e_extra))
    s = "q" * pos + run + "".join(rng.choice(s_chars) for _ in range(s_extra))
    assume(not s.startswith(e, pos))  # its contract: the edge does not match whole
    want = next(
        (i for i, (a, b) in enumerate(zip(e, s[pos:], strict=False)) if a != b),
        min(len(e), len(s) - pos),
    )
    assert _lcp(e, s, pos) == want
    if max(e + s) < "\u0100":  # as in a token tree: every unit below 256
        assert _lcp(e, s, pos, True) == want


# ----------------------------------------------------------------------------- shared_length


def _shared_brute(stored: list[list[int]], s: list[int]) -> int:
    """shared_length by its definition, over the prompts stored (units as lists)."""

    def lcp(a: list[int], b: list[int]) -> int:
        pairs = enumerate(zip(a, b, strict=False))
        return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))

    matched = max((lcp(q, s) for q in stored), default=0)
    best = 0

    def ways(depth: int) -> tuple[set[int], set[int]]:
        """Next units of the stored prompts through s[:depth]: all, and those going on."""
        through = [q for q in stored if q[:depth] == s[:depth] and len(q) > depth]
        return {q[depth] for q in through}, {q[depth] for q in through if len(q) - depth >= 2}

    for depth in range(1, matched + 1):  # forks of stored prompts along the match
        every, going = ways(depth)
        if len(every) >= 3 or (len(every) == 2 and len(going) == 2):
            best = depth
    if matched == len(s):  # it ends inside the tree: shared if a longer prompt goes on
        if any(len(q) > len(s) and q[: len(s)] == s for q in stored):
            best = len(s)
    elif len(s) - matched >= 2:  # it leaves the tree: a new branch beside the stored ones
        every, going = ways(matched)
        if len(every) >= 2 or (len(every) == 1 and len(going) == 1):
            best = matched
    return best


_short_prompts = st.lists(st.integers(0, 2), max_size=7)


@given(st.lists(_short_prompts, max_size=8), _short_prompts, st.booleans())
def test_shared_length_is_the_longest_prefix_continued_two_ways(
    stored: list[list[int]], s: list[int], text: bool
) -> None:
    t = Tree()
    enc = (lambda u: "".join("xyz"[i] for i in u)) if text else (lambda u: u)
    for k, q in enumerate(stored):
        t.insert(enc(q), f"w{k % 3}")
    stored = [q for q in stored if q]
    assert t.shared_length(t.match(enc(s))) == _shared_brute(stored, s)


def test_shared_length_tells_a_system_prompt_from_a_conversation() -> None:
    t = Tree()
    system = list(range(100, 140))
    t.insert([*system, 1, 2, 3], "a")  # session one
    t.insert([*system, 7, 8, 9], "b")  # session two: the system prompt is now forked
    assert t.shared_length(t.match([*system, 4, 5, 6])) == 40
    # a conversation: turn 2 extends turn 1, and a block-hash turn 3 forks turn 2's last
    # (partial) block: neither is sharing
    turn1 = list(range(1000, 1020))
    t.insert(turn1, "c")
    t.insert([*turn1, 1020, 1021, 1022], "c")
    assert t.shared_length(t.match([*turn1, 1020, 1021, 5555, 5556, 5557])) == 0
    t.insert([*turn1, 1020, 1021, 5555, 5556, 5557], "c")
    assert t.shared_length(t.match([*turn1, 1020, 1021, 5555, 5556, 5557, 5558])) == 0


def test_shared_length_rematches_after_a_write_and_checks_its_argument() -> None:
    t = Tree()
    t.insert("abcdef", "a")
    m = t.match("abcxyz")
    assert t.shared_length(m) == 3  # it would fork "abcdef" after "abc"
    t.insert("abcxyz", "b")
    t.insert("abcq", "c")  # the tree changed: the prompt is matched again
    assert t.shared_length(m) == 3
    with pytest.raises(TypeError, match="match"):
        t.shared_length("abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="match"):
        Tree().shared_length(m)
    assert t.shared_length(t.match("")) == 0


def test_evict_tenant_by_size_keeps_the_node_bound() -> None:
    # Cutting one tenant's part of a shared node splits it: one holding more per other holder.
    t = Tree(max_nodes=3)
    t.insert("abcd", "x")
    t.insert("abcd", "y")
    t.insert("zz", "x")  # 3 holdings: abcd {x, y}, zz {x}
    t.evict_tenant_by_size(4)  # x loses "cd" of the shared node: ab {x, y}, cd {y}, zz {x}
    assert t._holdings <= 3
    check_invariants(t)


def test_str_enum_tenants_and_units_keep_their_value() -> None:
    class Worker(str, Enum):  # equal to "w1", but str(Worker.A) is "Worker.A" (3.11+)
        A = "w1"

    class Prompt(str, Enum):
        SYS = "abc"

    t = Tree()
    t.insert("abc", Worker.A)
    t.insert("abd", "w1")
    assert t.tenants() == ["w1"] and t.size("w1") == 4
    assert t.match_and_insert("abx", lambda lengths: Worker.A) == ("w1", 2)
    t.insert(Prompt.SYS, "w2")
    assert t.prefix_match_tenant("abc", "w2") == 3
    check_invariants(t)


def test_max_nodes_for_names_memory_bytes_when_not_one_node_fits() -> None:
    with pytest.raises(ValueError, match=r"^memory_bytes must be >= \d+ .*got 100"):
        Tree.max_nodes_for(100, max_size=1)
