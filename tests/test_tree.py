"""Unit and edge-case tests for cacheroute.tree.Tree."""

from __future__ import annotations

import random
import threading
from array import array

import pytest

from cacheroute.tree import Tree


def check(t: Tree) -> None:
    t._check_invariants()
    sizes = t.used_size_per_tenant()
    assert all(v >= 0 for v in sizes.values())
    assert sum(sizes.values()) == t.total_size() == len(t)


# ------------------------------------------------------------------ basics


def test_empty_tree() -> None:
    t = Tree()
    assert t.kind is None
    assert t.prefix_match("abc") == (0, None)
    assert t.prefix_match_tenant("abc", "a") == 0
    assert t.match_lengths("abc") == {}
    assert t.size("a") == 0
    assert t.total_size() == 0
    assert t.tenants() == []
    assert t.smallest_tenant() is None
    assert t.used_size_per_tenant() == {}


def test_insert_and_match_text() -> None:
    t = Tree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.kind == "text"
    assert t.prefix_match("hello world!") == (11, "a")
    assert t.prefix_match("hello th") == (8, "b")
    assert t.prefix_match("xyz") == (0, None)
    assert t.prefix_match_tenant("hello there", "a") == 6
    assert t.prefix_match_tenant("hello there", "b") == 11
    assert t.prefix_match_tenant("hello there", "nobody") == 0
    assert t.match_lengths("hello thx") == {"a": 6, "b": 8}
    assert t.match_lengths("q") == {}
    # sizes: distinct non-empty prefixes held
    assert t.size("a") == 11
    assert t.size("b") == 11
    assert t.total_size() == 22
    check(t)


def test_size_counts_distinct_prefixes() -> None:
    t = Tree()
    t.insert("abc", "a")
    t.insert("abd", "a")
    t.insert("ab", "a")
    t.insert("abc", "a")
    assert t.size("a") == 4  # a, ab, abc, abd
    t.insert("abcdef", "b")
    assert t.size("b") == 6
    assert t.used_size_per_tenant() == {"a": 4, "b": 6}
    check(t)


def test_empty_units_registers_tenant_only() -> None:
    t = Tree()
    t.insert("", "w1")
    t.insert([], "w2")
    assert t.kind is None
    assert t.tenants() == ["w1", "w2"]
    assert t.size("w1") == 0
    assert t.prefix_match("") == (0, None)
    assert t.match_lengths("") == {}
    t.insert("abc", "w1")
    assert t.kind == "text"
    t.insert([], "w3")  # empty units never conflict with the kind
    assert t.smallest_tenant() == "w2"


def test_add_tenant_and_smallest() -> None:
    t = Tree()
    t.insert("aaaa", "b")
    t.insert("bb", "a")
    assert t.smallest_tenant() == "a"
    t.add_tenant("z")
    assert t.smallest_tenant() == "z"
    assert "z" in t.tenants()
    t.add_tenant("c")
    assert t.smallest_tenant() == "c"  # tie at 0: by name
    t.add_tenant("c")  # idempotent
    assert t.tenants().count("c") == 1


def test_tie_goes_to_most_recently_used() -> None:
    t = Tree()
    t.insert("shared prefix one", "a")
    t.insert("shared prefix two", "b")
    assert t.prefix_match("shared prefix")[1] == "b"
    t.insert("shared prefix one", "a")
    assert t.prefix_match("shared prefix")[1] == "a"
    t.match_and_insert("shared prefix three", lambda lengths: "b")
    assert t.prefix_match("shared prefix")[1] == "b"
    # matching does not refresh recency
    t.prefix_match("shared prefix one")
    t.match_lengths("shared prefix one")
    assert t.prefix_match("shared prefix")[1] == "b"
    # the deepest node decides: only a holds "shared prefix one"
    assert t.prefix_match("shared prefix one!") == (17, "a")


def test_tie_many_tenants() -> None:
    t = Tree()
    for i in range(20):
        t.insert("common", f"w{i}")
    assert t.prefix_match("common") == (6, "w19")
    t.insert("comm", "w3")
    assert t.prefix_match("common") == (6, "w19")  # deepest node: "mon" part
    assert t.prefix_match("comm") == (4, "w3")


def test_remove_tenant() -> None:
    t = Tree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    t.remove_tenant("a")
    assert "a" not in t.tenants()
    assert t.size("a") == 0
    assert t.prefix_match("hello world") == (6, "b")
    assert t.match_lengths("hello world") == {"b": 6}
    assert t.total_size() == 11
    t.remove_tenant("unknown")  # no-op
    t.remove_tenant("b")
    assert t.total_size() == 0
    assert t._node_count() == 0
    check(t)


def test_remove_tenant_frees_implicit_split_nodes() -> None:
    t = Tree()
    t.insert("abcdef", "a")
    t.insert("abcxyz", "b")  # splits a's node: "abc" is held by a implicitly
    t.insert("abcdef", "c")
    t.remove_tenant("a")
    check(t)
    t.remove_tenant("c")
    check(t)
    assert t._held() == {"b": {"abcxyz"}}
    assert t.size("b") == 6


# ------------------------------------------------------------ match_and_insert


def test_match_and_insert() -> None:
    t = Tree()
    t.insert("system prompt A", "w1")
    t.add_tenant("w2")
    seen: list[dict[str, int]] = []

    def choose(lengths: dict[str, int]) -> str | None:
        seen.append(lengths)
        assert t.size("w1") == 15  # re-entrant lock: choose may read the tree
        return "w2"

    assert t.match_and_insert("system prompt B", choose) == ("w2", 0)
    assert seen == [{"w1": 14}]
    assert t.prefix_match_tenant("system prompt B", "w2") == 15
    assert t.match_and_insert("system prompt B!", lambda d: "w2") == ("w2", 15)
    assert t.match_and_insert("system prompt C", lambda d: "w1") == ("w1", 14)
    assert t.match_and_insert("zzz", lambda d: None) == (None, 0)
    assert t.prefix_match("zzz") == (0, None)
    assert t.match_and_insert("", lambda d: "w3") == ("w3", 0)
    assert "w3" in t.tenants()
    check(t)


def test_match_and_insert_choose_raises_leaves_tree_unchanged() -> None:
    t = Tree(max_size=100)
    t.insert("abcdef", "a")
    before = (t._held(), t.used_size_per_tenant())

    def boom(lengths: dict[str, int]) -> str:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        t.match_and_insert("abcxyz", boom)
    with pytest.raises(TypeError, match="tenant"):
        t.match_and_insert("abcxyz", lambda d: 5)  # type: ignore[arg-type,return-value]
    assert (t._held(), t.used_size_per_tenant()) == before
    check(t)


def test_match_and_insert_equals_insert() -> None:
    rng = random.Random(1)
    a, b = Tree(), Tree()
    for _ in range(300):
        s = "".join(rng.choices("ab", k=rng.randint(0, 12)))
        tenant = rng.choice("xyz")
        assert a.match_lengths(s) == b.match_lengths(s)
        a.insert(s, tenant)
        b.match_and_insert(s, lambda d, tenant=tenant: tenant)
        assert a._held() == b._held()
        assert a.prefix_match(s) == b.prefix_match(s)
    check(b)


# ------------------------------------------------------------------ tokens


def test_tokens_list_tuple_array_range() -> None:
    t = Tree()
    t.insert([1, 2, 3, 4], "a")
    t.insert((1, 2, 9), "b")
    assert t.kind == "tokens"
    assert t.prefix_match(array("I", [1, 2, 3])) == (3, "a")
    assert t.prefix_match(range(1, 3)) == (2, "b")
    assert t.match_lengths([1, 2, 3, 7]) == {"a": 3, "b": 2}
    assert t.prefix_match_tenant(array("q", [1, 2, 9, 9]), "b") == 3
    assert t.size("a") == 4 and t.size("b") == 3
    check(t)


def test_token_surrogate_range_and_zero() -> None:
    t = Tree()
    seq = [0, 0xD800, 0xDFFF, 0xDC00, 0x10FFFF]
    t.insert(seq, "a")
    assert t.prefix_match(seq) == (5, "a")
    assert t.prefix_match([0, 0xD800, 0xDFFF, 5]) == (3, "a")
    check(t)


def test_wide_token_ids_switch_encoding() -> None:
    t = Tree(max_size=100)
    t.insert([1, 2, 3], "a")
    t.insert([1, 2, 3, 4], "b")
    # a narrow tree answers a query with a huge id without widening
    assert t.prefix_match([1, 2, 0x110000]) == (2, "b")
    assert t.prefix_match([1, 2, 3, 2**40]) == (3, "b")
    t.insert([1, 2, 2**63, 7], "c")  # widens the tree once
    check(t)
    assert t.match_lengths([1, 2, 3, 4]) == {"a": 3, "b": 4, "c": 2}
    assert t.prefix_match([1, 2, 2**63, 7]) == (4, "c")
    assert t.prefix_match([1, 2, 2**63 + 1]) == (2, "c")
    # 7 and 0x107 share their first byte: the match must stop at a whole unit
    assert t.prefix_match([1, 2, 2**63, 0x107]) == (3, "c")
    assert t.used_size_per_tenant() == {"a": 3, "b": 4, "c": 4}
    assert t.total_size() == 11
    # shares bytes but not units: no partial-unit matches
    t.insert([0x0101], "d")
    assert t.prefix_match([0x0102]) == (0, None)
    assert t.evict_tenant_by_size(2) == 1 + 2 + 2
    check(t)
    assert t.used_size_per_tenant() == {"a": 2, "b": 2, "c": 2, "d": 1}
    assert t._decode(next(iter(t._held()["c"]))) == (1, 2)


def test_tokens_bool_is_int() -> None:
    t = Tree()
    t.insert([True, False], "a")
    assert t.prefix_match([1, 0]) == (2, "a")


# ------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    "bad",
    [b"abc", bytearray(b"abc"), memoryview(b"abc"), 5, 3.5, None, {"a": 1}, {1, 2}, object()],
)
def test_wrong_units_type(bad: object) -> None:
    t = Tree()
    for call in (
        lambda: t.insert(bad, "a"),  # type: ignore[arg-type]
        lambda: t.prefix_match(bad),  # type: ignore[arg-type]
        lambda: t.match_lengths(bad),  # type: ignore[arg-type]
        lambda: t.prefix_match_tenant(bad, "a"),  # type: ignore[arg-type]
        lambda: t.match_and_insert(bad, lambda d: "a"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=r"units.*" + type(bad).__name__):
            call()
    assert t.tenants() == []


def test_bad_token_elements() -> None:
    t = Tree()
    with pytest.raises(TypeError, match=r"units\[2\].*'x'.*str"):
        t.insert([1, 2, "x"], "a")
    with pytest.raises(TypeError, match=r"units\[1\].*1\.5.*float"):
        t.insert([1, 1.5], "a")
    with pytest.raises(TypeError, match=r"units\[0\].*None"):
        t.prefix_match([None])
    with pytest.raises(ValueError, match=r"units\[1\].*-3"):
        t.insert([1, -3], "a")
    with pytest.raises(ValueError, match=r"2\*\*64.*units\[0\]"):
        t.insert([2**64], "a")
    with pytest.raises(ValueError, match=r"units\[0\]"):
        t.prefix_match([-1])
    with pytest.raises(TypeError, match="units"):
        t.insert(array("d", [1.0]), "a")
    assert t.total_size() == 0 and t.kind is None


def test_mixing_kinds() -> None:
    t = Tree()
    t.insert("text", "a")
    with pytest.raises(TypeError, match=r"units.*'text'"):
        t.insert([1, 2], "a")
    with pytest.raises(TypeError, match=r"units.*'text'"):
        t.prefix_match((1,))
    u = Tree()
    u.insert([1, 2], "a")
    with pytest.raises(TypeError, match=r"units.*'tokens'"):
        u.insert("text", "a")
    with pytest.raises(TypeError, match=r"units.*'tokens'"):
        u.match_lengths("x")
    with pytest.raises(TypeError, match=r"units.*'tokens'"):
        u.match_and_insert("x", lambda d: "a")
    assert u.size("a") == 2 and t.size("a") == 4


@pytest.mark.parametrize("bad", [1, None, b"w", ("w",)])
def test_tenant_must_be_str(bad: object) -> None:
    t = Tree()
    with pytest.raises(TypeError, match="tenant"):
        t.insert("abc", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tenant"):
        t.add_tenant(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tenant"):
        t.size(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tenant"):
        t.prefix_match_tenant("abc", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tenant"):
        t.remove_tenant(bad)  # type: ignore[arg-type]
    assert t.total_size() == 0


def test_tenant_str_subclass() -> None:
    class Name(str):
        pass

    t = Tree()
    t.insert("abc", Name("w"))
    t.insert("abd", "w")
    assert t.size("w") == 4
    assert t.prefix_match("abc") == (3, "w")
    check(t)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"max_size": 0}, ValueError, r"max_size.*0"),
        ({"max_size": -5}, ValueError, r"max_size.*-5"),
        ({"max_size": 1.5}, TypeError, r"max_size.*1\.5"),
        ({"max_size": "10"}, TypeError, r"max_size.*'10'"),
        ({"max_size": True}, TypeError, r"max_size.*True"),
        ({"max_size_per_tenant": 0}, ValueError, r"max_size_per_tenant.*0"),
        ({"max_size_per_tenant": 2.0}, TypeError, r"max_size_per_tenant"),
        ({"low_water": 0}, ValueError, r"low_water.*0"),
        ({"low_water": 1.5}, ValueError, r"low_water.*1\.5"),
        ({"low_water": -0.1}, ValueError, r"low_water"),
        ({"low_water": float("nan")}, ValueError, r"low_water.*nan"),
        ({"low_water": "0.5"}, TypeError, r"low_water.*'0\.5'"),
    ],
)
def test_config_errors(kwargs: dict[str, object], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        Tree(**kwargs)  # type: ignore[arg-type]


def test_evict_tenant_by_size_arg_errors() -> None:
    t = Tree()
    with pytest.raises(ValueError, match=r"max_units.*-1"):
        t.evict_tenant_by_size(-1)
    with pytest.raises(TypeError, match=r"max_units"):
        t.evict_tenant_by_size(1.0)  # type: ignore[arg-type]


def test_low_water_one_is_accepted() -> None:
    t = Tree(max_size=10, low_water=1)
    for s in ("aaaaaa", "bbbbbb", "cccccc"):
        t.insert(s, "x")
        assert t.total_size() <= 10
    assert t.prefix_match("cccccc") == (6, "x")


# ----------------------------------------------------------------- unicode


def test_unicode_emoji_combining_surrogates() -> None:
    t = Tree()
    fam = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ family: 5 code points
    t.insert(fam + " hi", "a")
    t.insert("e\u0301te\u0301", "b")  # combining acute accents
    t.insert("x\ud800y\udfffz", "c")  # lone surrogates
    t.insert("x\ud800\udc00", "d")  # a surrogate *pair* as two code points
    assert t.prefix_match(fam) == (5, "a")
    assert t.prefix_match("\U0001f468") == (1, "a")
    assert t.prefix_match("e\u0301t") == (3, "b")
    assert t.prefix_match("e") == (1, "b")
    assert t.prefix_match("x\ud800y") == (3, "c")
    assert t.match_lengths("x\ud800\udc00!") == {"c": 2, "d": 3}
    assert t.size("a") == 8 and t.size("c") == 5 and t.size("d") == 3
    check(t)


def test_mixed_width_strings() -> None:
    t = Tree()
    t.insert("abc\u00e9\u4e2d\U0001f600", "a")
    t.insert("abc\u00e9\u4e2dX", "b")
    assert t.prefix_match("abc\u00e9\u4e2d\U0001f600") == (6, "a")
    assert t.match_lengths("abc\u00e9\u4e2d") == {"a": 5, "b": 5}


# ---------------------------------------------------------------- big cases


def test_million_unit_prompt() -> None:
    t = Tree()
    big = "ab" * 500_000
    t.insert(big, "a")
    other = big[:700_001] + "Z" + big[700_002:]
    t.insert(other, "b")
    assert t.prefix_match(big) == (1_000_000, "a")
    assert t.prefix_match(other) == (1_000_000, "b")
    assert t.match_lengths(big[:900_000] + "!") == {"a": 900_000, "b": 700_001}
    assert t.size("a") == t.size("b") == 1_000_000
    toks = list(range(1_000_000))
    u = Tree()
    u.insert(toks, "a")
    toks[999_999] = 5
    assert u.prefix_match(toks) == (999_999, "a")
    u.remove_tenant("a")
    assert u.total_size() == 0


def test_deep_chain_100k_nodes() -> None:
    n = 100_000
    t = Tree()
    base = "a" * n
    t.insert(base, "a")
    # a branch at every depth, shallower each time: each insert splits the
    # top node, so the tree becomes a chain n nodes deep
    for i in range(n - 1, 0, -1):
        t.insert(base[:i] + "!", "b")  # branch at depth i: one node per level
    assert t._node_count() >= n
    assert t.prefix_match(base) == (n, "a")
    assert t.prefix_match(base[:5000] + "!") == (5001, "b")
    lengths = t.match_lengths(base)
    assert lengths == {"a": n, "b": n - 1}
    t.evict_tenant_by_size(10)
    assert t.size("b") <= 10
    check(t)
    t.remove_tenant("a")
    t.remove_tenant("b")
    assert t._node_count() == 0
    assert t.total_size() == 0


# ---------------------------------------------------------------- eviction


def test_evict_tenant_by_size_basic() -> None:
    t = Tree()
    t.insert("aaaa", "x")
    t.insert("bbbb", "x")
    t.insert("cccc", "x")
    t.insert("aaaa", "y")
    freed = t.evict_tenant_by_size(5)
    assert freed == 8
    assert t.size("x") == 4
    assert t.prefix_match_tenant("cccc", "x") == 4  # most recent survives
    assert t.prefix_match_tenant("aaaa", "x") == 0
    assert t.prefix_match_tenant("aaaa", "y") == 4  # shared node stays for y
    check(t)


def test_evict_lru_leaf_first_and_parent_later() -> None:
    t = Tree()
    t.insert("abcdef", "x")
    t.insert("abcxyz", "x")
    t.insert("abc", "x")  # "abc" refreshed last
    assert t.evict_tenant_by_size(3) == 6
    assert t._held() == {"x": {"abc"}}


def test_evict_tenant_by_size_zero_removes_all_holdings() -> None:
    t = Tree()
    t.insert("abc", "x")
    t.insert("abd", "y")
    t.evict_tenant_by_size(0)
    assert t.total_size() == 0
    assert t._node_count() == 0
    assert t.tenants() == ["x", "y"]  # still registered


def test_most_recent_sequence_survives_random() -> None:
    rng = random.Random(7)
    for _ in range(60):
        t = Tree()
        last: dict[str, str] = {}
        for _ in range(rng.randint(1, 30)):
            s = "".join(rng.choices("abc", k=rng.randint(1, 8)))
            tenant = rng.choice("pq")
            if rng.random() < 0.3:
                t.match_and_insert(s, lambda d, tenant=tenant: tenant)
            else:
                t.insert(s, tenant)
            last[tenant] = s
        k = rng.randint(0, 12)
        before = t._held()
        t.evict_tenant_by_size(k)
        check(t)
        for tenant, size in t.used_size_per_tenant().items():
            assert size <= k
            if len(last[tenant]) <= k:
                assert t.prefix_match_tenant(last[tenant], tenant) == len(last[tenant])
        after = t._held()
        for tenant in after:  # eviction only removes
            for s in after[tenant]:
                assert any(b.startswith(s) for b in before[tenant])


def test_max_size_bound_stream() -> None:
    rng = random.Random(3)
    t = Tree(max_size=2_000, low_water=0.5)
    peak_nodes = 0
    for i in range(3_000):
        s = "".join(rng.choices("abcdefgh", k=rng.randint(1, 60)))
        t.insert(s, f"w{i % 5}")
        assert t.total_size() <= 2_000
        assert t.prefix_match_tenant(s, f"w{i % 5}") == len(s)  # newest kept
        peak_nodes = max(peak_nodes, t._node_count())
        if i % 500 == 0:
            check(t)
    check(t)
    assert peak_nodes <= 2_000  # memory tracks the bound


def test_max_size_distinct_prompts_keeps_structure_bounded() -> None:
    t = Tree(max_size=50_000)
    rng = random.Random(0)
    counts = []
    for i in range(2_000):
        t.insert("".join(rng.choices("abcdefghij", k=200)), f"w{i % 4}")
        if i % 200 == 199:
            counts.append(t._node_count())
    assert t.total_size() <= 50_000
    assert max(counts[2:]) <= 1.3 * min(counts[2:])  # flat, not growing
    check(t)


def test_max_size_with_shared_prefixes_multiple_tenants() -> None:
    t = Tree(max_size=100, low_water=0.8)
    for i in range(200):
        t.insert("system:" + str(i % 7) * 10 + str(i), f"w{i % 3}")
        assert t.total_size() <= 100
    check(t)
    # the system prefix is refreshed constantly, so it survives
    assert t.prefix_match("system:")[0] == 7


def test_max_size_single_insert_longer_than_bound_is_truncated() -> None:
    t = Tree(max_size=100, low_water=0.5)
    t.insert("x" * 30, "a")
    t.insert("y" * 1000, "b")
    assert t.total_size() <= 100
    assert t.size("b") == 50  # first low_water*max_size units kept
    assert t.prefix_match("y" * 1000) == (50, "b")
    assert t.size("a") == 30  # room left for a: nothing else was evicted
    t.insert("z" * 100, "c")
    assert t.total_size() <= 100
    assert t.prefix_match("z" * 100) == (50, "c")
    check(t)


def test_max_size_tiny_bound() -> None:
    t = Tree(max_size=1, low_water=0.5)
    for s in ("abc", "b", "cd"):
        t.insert(s, "x")
        assert t.total_size() <= 1
    assert t.prefix_match("c") == (1, "x")
    check(t)


def test_max_size_per_tenant() -> None:
    t = Tree(max_size_per_tenant=20, low_water=0.5)
    rng = random.Random(5)
    for i in range(300):
        s = "".join(rng.choices("abcd", k=rng.randint(1, 15)))
        tenant = f"w{i % 3}"
        t.insert(s, tenant)
        assert t.size(tenant) <= 20
        # kept whole, or truncated to low_water * max_size_per_tenant = 10
        assert t.prefix_match_tenant(s, tenant) == min(len(s), 10)
    t.insert("q" * 100, "w0")
    assert t.size("w0") <= 20
    assert t.prefix_match_tenant("q" * 100, "w0") == 10
    check(t)


def test_max_size_tokens_and_widening() -> None:
    t = Tree(max_size=40)
    for i in range(100):
        t.insert([i % 3, i, i + 1, 2**40 if i == 50 else 1, 5], f"w{i % 2}")
        assert t.total_size() <= 40
        if i % 10 == 0:
            check(t)
    check(t)


def test_implicit_nodes_eviction_order() -> None:
    # y's node gets split by x's inserts; y's LRU must still behave
    t = Tree()
    t.insert("abcdefgh", "y")
    t.insert("zzz", "y")
    t.insert("abcdXXXX", "x")
    t.insert("abQQ", "x")
    check(t)
    assert t.evict_tenant_by_size(3) == 8 + 8
    assert t._held() == {"y": {"zzz"}, "x": {"ab"}}
    check(t)
    t.insert("abcdefgh", "y")
    assert t.evict_tenant_by_size(8) == 3
    assert t._held()["y"] == {"abcdefgh"}
    check(t)


@pytest.mark.parametrize("max_size", [None, 10**9])
def test_lru_order_with_ancestors_touched_directly(max_size: int | None) -> None:
    # Without max_size only the deepest node of an insert is refreshed (lazy
    # recency); the eviction order must still be exact LRU by whole nodes.
    # Nodes: "abc" (3 units), "de" and "xy" (2 each) below it.
    for order, after_5, after_3 in (
        (["abc", "abcde", "abcxy"], {"abcxy"}, {"abc"}),
        (["abcde", "abcxy", "abc"], {"abcxy"}, {"abc"}),
        (["abcde", "abc", "abcxy"], {"abcxy"}, {"abc"}),
        (["abcxy", "abcde", "abc", "abcde"], {"abcde"}, {"abc"}),
        (["abcxy", "abcde", "abc", "abcxy", "abc"], {"abcxy"}, {"abc"}),
    ):
        t = Tree(max_size=max_size)
        for s in order:
            t.insert(s, "t")
        check(t)
        assert t.evict_tenant_by_size(5) == 2
        assert t._held()["t"] == after_5, order
        check(t)
        assert t.evict_tenant_by_size(3) == 2
        assert t._held()["t"] == after_3, order
        check(t)
        assert t.evict_tenant_by_size(0) == 3
        assert t._held()["t"] == set() and t.total_size() == 0
        check(t)


def test_lazy_recency_equals_eager() -> None:
    # Tree() refreshes lazily, Tree(max_size=huge) eagerly; with no global
    # eviction ever triggered, both must hold exactly the same after any ops.
    for seed in range(60):
        rng = random.Random(seed)
        per = rng.choice([None, 9, 20])
        lazy = Tree(max_size_per_tenant=per)
        eager = Tree(max_size=10**9, max_size_per_tenant=per)
        tenants = ["a", "b", "c", "d"][: rng.randint(1, 4)]
        for _ in range(250):
            s = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 14)))
            op = rng.random()
            if op < 0.5:
                tenant = rng.choice(tenants)
                lazy.insert(s, tenant)
                eager.insert(s, tenant)
            elif op < 0.7:
                tenant = rng.choice(tenants)
                got = lazy.match_and_insert(s, lambda d, tenant=tenant: tenant)
                assert got == eager.match_and_insert(s, lambda d, tenant=tenant: tenant)
            elif op < 0.85:
                k = rng.randint(0, 20)
                assert lazy.evict_tenant_by_size(k) == eager.evict_tenant_by_size(k)
            elif op < 0.9:
                tenant = rng.choice(tenants)
                lazy.remove_tenant(tenant)
                eager.remove_tenant(tenant)
            else:
                assert list(lazy.match_lengths(s).items()) == list(eager.match_lengths(s).items())
                assert lazy.prefix_match(s) == eager.prefix_match(s)
            assert lazy._held() == eager._held(), seed
            assert lazy.used_size_per_tenant() == eager.used_size_per_tenant()
        lazy._check_invariants()
        eager._check_invariants()


# ------------------------------------------------------------------ threads


def test_thread_safety_smoke() -> None:
    t = Tree(max_size=5_000)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                s = "".join(rng.choices("abc", k=rng.randint(1, 30)))
                op = rng.random()
                if op < 0.5:
                    t.insert(s, f"w{seed}")
                elif op < 0.8:
                    t.prefix_match(s)
                elif op < 0.9:
                    t.match_and_insert(s, lambda d: min(d, default=f"w{seed}"))
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
    check(t)


def test_repr() -> None:
    t = Tree(max_size=10)
    t.insert("abc", "a")
    assert "total_size=3" in repr(t) and "text" in repr(t)
