"""Benchmark for :class:`cacheroute.tree.Tree` (issue 3), with optional peers.

Run::

    python benchmarks/bench_tree.py           # full run (a few minutes on 2 cores)
    python benchmarks/bench_tree.py --quick   # smoke run (seconds)

Workloads (deterministic, seed 0):

* W1 shared-prefix: 64 random system prompts of 4,000 characters (letters,
  digits, space); 2,000 inserts of system prompt (i % 64) + a random
  400-character question, tenant = worker (group % 8) where group = i % 64;
  then 2,000 ``prefix_match`` calls with new questions for the same groups.
* W2 multi-turn: 200 conversations x 10 turns, turn k = turn k-1 + 300 random
  user characters + 300 random reply characters; tenant = conversation % 8;
  conversations interleaved in a seeded random order that keeps each one's
  turn order; ``prefix_match`` then ``insert`` on each turn.
* W3 scale: 100,000 distinct random 1,000-character prompts, tenant = i % 16;
  insert cost per block of 10,000, structure memory at the end, then 10,000
  matches of new prompts.  Once more with ``max_size`` = 10,000,000.

W1 and W2 also compare, on the same prompts (W1: its insert sequence), the
fused ``match_and_insert`` with two calls (``prefix_match`` or
``match_lengths``, then ``insert``) timed together, each on a fresh tree, runs
interleaved, and print the ratio of the p50s.

Per-op latency is measured with ``time.perf_counter_ns`` around each call (the
timer's own cost, printed as ``timer``, is included).  W1/W2 print the median
over ``--runs`` runs of each run's p50/p99/mean.  Memory: ``tracemalloc``
(allocated bytes still live, measured in a separate build so timings are not
slowed) and the process RSS growth.  The garbage collector is left enabled.

Peers, when importable (``pip install cacheroute[bench]``): ``pygtrie``
(``CharTrie``, one node per character) and Ray Serve's ``PrefixTree``
(``ray[serve]``).  The ratio printed is peer / ours (higher = ours faster).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import string
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from cacheroute.tree import Tree

ALPHABET = string.ascii_letters + string.digits + " "
_TABLE = bytes(ord(ALPHABET[b % len(ALPHABET)]) for b in range(256))


def rand_text(rng: random.Random, n: int) -> str:
    """n random characters from ALPHABET (byte % 63: near-uniform, fast)."""
    return rng.randbytes(n).translate(_TABLE).decode("ascii")


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def timer_overhead_ns() -> float:
    pc = time.perf_counter_ns
    samples = []
    for _ in range(20000):
        t0 = pc()
        samples.append(pc() - t0)
    return statistics.median(samples)


def stats(ns: list[int]) -> tuple[float, float, float]:
    """(p50, p99, mean) in microseconds."""
    s = sorted(ns)
    n = len(s)
    return s[n // 2] / 1e3, s[min(n - 1, (n * 99) // 100)] / 1e3, sum(s) / n / 1e3


def med(rows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return (
        statistics.median(r[0] for r in rows),
        statistics.median(r[1] for r in rows),
        statistics.median(r[2] for r in rows),
    )


def fmt(st: tuple[float, float, float]) -> str:
    return f"p50 {st[0]:8.2f}  p99 {st[1]:8.2f}  mean {st[2]:8.2f} us/op"


# --------------------------------------------------------------- adapters


class Adapter:
    name = "?"

    def new(self) -> None:
        raise NotImplementedError

    def insert(self, text: str, tenant: str) -> None:
        raise NotImplementedError

    def match(self, text: str) -> Any:
        raise NotImplementedError


class Ours(Adapter):
    name = "cacheroute.Tree"

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self.t = Tree(max_size=max_size)

    def new(self) -> None:
        self.t = Tree(max_size=self.max_size)

    def insert(self, text: str, tenant: str) -> None:
        self.t.insert(text, tenant)

    def match(self, text: str) -> Any:
        return self.t.prefix_match(text)


class RayPeer(Adapter):
    name = "ray PrefixTree"

    def __init__(self, cls: Any) -> None:
        self.cls = cls
        self.new()

    def new(self) -> None:
        self.t = self.cls()
        self.known: set[str] = set()

    def insert(self, text: str, tenant: str) -> None:
        if tenant not in self.known:  # Ray drops inserts for unknown tenants
            self.t.add_tenants([tenant], 0.0)
            self.known.add(tenant)
        self.t.insert(text, tenant, time.time())

    def match(self, text: str) -> Any:
        return self.t.prefix_match(text)


class PygtriePeer(Adapter):
    name = "pygtrie CharTrie"

    def __init__(self, mod: Any) -> None:
        self.mod = mod
        self.new()

    def new(self) -> None:
        self.t = self.mod.CharTrie()

    def insert(self, text: str, tenant: str) -> None:
        self.t[text] = tenant

    def match(self, text: str) -> Any:
        n = 0
        try:
            for _ in self.t.walk_towards(text):
                n += 1
        except KeyError:
            pass
        return n - 1


def load_peers() -> list[Adapter]:
    peers: list[Adapter] = []
    try:
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import (
            PrefixTree,
        )

        peers.append(RayPeer(PrefixTree))
    except Exception as exc:  # ImportError, or ray's own import-time errors
        print(f"# peer ray PrefixTree: not importable ({type(exc).__name__}: {exc})"[:150])
    try:
        import pygtrie

        peers.append(PygtriePeer(pygtrie))
    except ImportError:
        print("# peer pygtrie: not importable (pip install pygtrie)")
    return peers


# -------------------------------------------------------------- workloads


def w1_data(scale: float) -> tuple[list[tuple[str, str]], list[str]]:
    rng = random.Random(0)
    n = max(64, int(2000 * scale))
    systems = [rand_text(rng, 4000) for _ in range(64)]
    inserts = []
    for i in range(n):
        g = i % 64
        inserts.append((systems[g] + rand_text(rng, 400), f"worker-{g % 8}"))
    matches = [systems[i % 64] + rand_text(rng, 400) for i in range(n)]
    return inserts, matches


def run_w1(a: Adapter, data: tuple[list[tuple[str, str]], list[str]]) -> tuple[Any, Any]:
    a.new()
    pc = time.perf_counter_ns
    ins_ns = []
    for text, tenant in data[0]:
        t0 = pc()
        a.insert(text, tenant)
        ins_ns.append(pc() - t0)
    m_ns = []
    for text in data[1]:
        t0 = pc()
        a.match(text)
        m_ns.append(pc() - t0)
    return stats(ins_ns), stats(m_ns)


def w2_data(scale: float) -> list[tuple[str, str]]:
    rng = random.Random(0)
    convs = max(8, int(200 * scale))
    order = [c for c in range(convs) for _ in range(10)]
    rng.shuffle(order)
    state = [""] * convs
    turns = []
    for c in order:
        state[c] = state[c] + rand_text(rng, 300) + rand_text(rng, 300)
        turns.append((state[c], f"worker-{c % 8}"))
    return turns


def run_w2(a: Adapter, turns: list[tuple[str, str]]) -> tuple[Any, Any]:
    a.new()
    pc = time.perf_counter_ns
    m_ns = []
    ins_ns = []
    for text, tenant in turns:
        t0 = pc()
        a.match(text)
        t1 = pc()
        a.insert(text, tenant)
        t2 = pc()
        m_ns.append(t1 - t0)
        ins_ns.append(t2 - t1)
    return stats(ins_ns), stats(m_ns)


def run_fused(pairs: list[tuple[str, str]], mode: str) -> Any:
    """Per prompt, on a fresh tree: ``match_and_insert`` ("fused"), or
    ``prefix_match`` + ``insert`` ("pm+insert") or ``match_lengths`` + ``insert``
    ("ml+insert") on the same prompt, timed together.  The ``choose`` callback
    (returning the workload's tenant) is built before the clock starts."""
    t = Tree()
    pc = time.perf_counter_ns
    ns = []
    if mode == "fused":
        mai = t.match_and_insert
        for text, tenant in pairs:

            def choose(lengths: dict[str, int], tenant: str = tenant) -> str:
                return tenant

            t0 = pc()
            mai(text, choose)
            ns.append(pc() - t0)
    else:
        match: Callable[[str], Any] = t.prefix_match if mode == "pm+insert" else t.match_lengths
        ins = t.insert
        for text, tenant in pairs:
            t0 = pc()
            match(text)
            ins(text, tenant)
            ns.append(pc() - t0)
    return stats(ns)


def print_fused(label: str, pairs: list[tuple[str, str]], runs: int) -> None:
    """Fused vs two calls on the same prompts, interleaved runs, medians."""
    rows: dict[str, list[tuple[float, float, float]]] = {
        "fused": [],
        "pm+insert": [],
        "ml+insert": [],
    }
    for _ in range(runs):
        for mode in rows:
            rows[mode].append(run_fused(pairs, mode))
    fused = med(rows["fused"])
    for mode, name in (
        ("pm+insert", "prefix_match + insert"),
        ("ml+insert", "match_lengths + insert"),
    ):
        two = med(rows[mode])
        print(f"  {label} {name:24s} {fmt(two)}")
    pm, ml = med(rows["pm+insert"]), med(rows["ml+insert"])
    print(f"  {label} {'match_and_insert (fused)':24s} {fmt(fused)}")
    print(
        f"  {label} fused / two calls (p50): {fused[0] / pm[0]:.2f} vs prefix_match + insert, "
        f"{fused[0] / ml[0]:.2f} vs match_lengths + insert"
    )


def w3_prompts(seed: int, n: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n):
        yield rand_text(rng, 1000)


def run_w3_timed(a: Adapter, n: int, block: int, label: str) -> None:
    """Insert n prompts in blocks, printing per-block latency and RSS."""
    a.new()
    gc.collect()
    rss0 = rss_mb()
    pc = time.perf_counter_ns
    first = last = 0.0
    for b in range(n // block):
        prompts = list(w3_prompts(1000 + b, block))  # generated before timing
        tenants = [f"worker-{(b * block + i) % 16}" for i in range(block)]
        ns = []
        for text, tenant in zip(prompts, tenants, strict=True):
            t0 = pc()
            a.insert(text, tenant)
            ns.append(pc() - t0)
        del prompts
        st = stats(ns)
        if b == 0:
            first = st[0]
        last = st[0]
        print(f"  {label} insert block {b + 1:2d}: {fmt(st)}   RSS +{rss_mb() - rss0:7.1f} MB")
    print(f"  {label} insert last/first block p50 ratio: {last / first:.2f}")
    m_ns = []
    for text in list(w3_prompts(999, max(1, n // 10))):
        t0 = pc()
        a.match(text)
        m_ns.append(pc() - t0)
    print(f"  {label} match ({max(1, n // 10)} new prompts): {fmt(stats(m_ns))}")
    a.new()


def w3_memory(
    make: Callable[[], Adapter], n: int, block: int, label: str, per_block: bool
) -> float:
    """Build under tracemalloc; return MB still allocated by the structure."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    a = make()
    for b in range(n // block):
        for i, text in enumerate(w3_prompts(1000 + b, block)):
            a.insert(text, f"worker-{(b * block + i) % 16}")
        if per_block:
            cur = (tracemalloc.get_traced_memory()[0] - base) / 1e6
            print(f"  {label} tracemalloc after block {b + 1:2d}: {cur:7.1f} MB")
    gc.collect()
    cur = (tracemalloc.get_traced_memory()[0] - base) / 1e6
    tracemalloc.stop()
    del a
    gc.collect()
    return cur


# ------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--runs", type=int, default=None, help="W1/W2 repetitions (default 5)")
    ap.add_argument("--no-peers", action="store_true", help="skip peers")
    ap.add_argument(
        "--peer-memory",
        action="store_true",
        help="also measure peers' W3 memory with tracemalloc (slow)",
    )
    args = ap.parse_args(argv)
    quick = args.quick
    runs = args.runs or (1 if quick else 5)
    scale = 0.1 if quick else 1.0
    w3_n = 10_000 if quick else 100_000
    w3_block = 1_000 if quick else 10_000

    print(
        f"# bench_tree  python {platform.python_version()}  {platform.machine()}  "
        f"cpus={os.cpu_count()}  runs={runs}  quick={quick}  gc={gc.get_threshold()}"
    )
    print(f"# timer overhead ~{timer_overhead_ns():.0f} ns/op (included in figures)")
    peers = [] if args.no_peers else load_peers()
    ours = Ours()
    results: dict[str, dict[str, Any]] = {}

    d1 = w1_data(scale)
    d2 = w2_data(scale)
    print(f"\n## W1 shared-prefix ({len(d1[0])} inserts of 4,400 chars, {len(d1[1])} matches)")
    for a in [ours, *peers]:
        r = [run_w1(a, d1) for _ in range(runs if a is ours else max(1, runs // 5))]
        ins, mat = med([x[0] for x in r]), med([x[1] for x in r])
        results.setdefault(a.name, {})["w1"] = (ins, mat)
        print(f"  {a.name:18s} insert {fmt(ins)}")
        print(f"  {a.name:18s} match  {fmt(mat)}")
    print_fused(f"{ours.name:18s}", d1[0], runs)

    print(f"\n## W2 multi-turn ({len(d2)} turns, up to 6,000 chars)")
    for a in [ours, *peers]:
        r = [run_w2(a, d2) for _ in range(runs if a is ours else max(1, runs // 5))]
        ins, mat = med([x[0] for x in r]), med([x[1] for x in r])
        results.setdefault(a.name, {})["w2"] = (ins, mat)
        print(f"  {a.name:18s} insert {fmt(ins)}")
        print(f"  {a.name:18s} match  {fmt(mat)}")
    print_fused(f"{ours.name:18s}", d2, runs)

    print(f"\n## W3 scale ({w3_n:,} distinct 1,000-char prompts, 16 tenants)")
    run_w3_timed(ours, w3_n, w3_block, "ours")
    mem = w3_memory(Ours, w3_n, w3_block, "ours", per_block=False)
    t = Tree()
    for b in range(w3_n // w3_block):
        for i, text in enumerate(w3_prompts(1000 + b, w3_block)):
            t.insert(text, f"worker-{(b * w3_block + i) % 16}")
    nodes = t._node_count()
    units = t.total_size()
    del t
    gc.collect()
    print(f"  ours structure: {mem:.1f} MB (tracemalloc), {nodes:,} nodes, {units:,} units")
    bound = 10_000_000 if not quick else 1_000_000
    print(f"\n## W3 with max_size = {bound:,}")
    run_w3_timed(Ours(bound), w3_n, w3_block, "ours/bounded")
    mem_b = w3_memory(lambda: Ours(bound), w3_n, w3_block, "ours/bounded", per_block=True)
    print(f"  ours/bounded structure: {mem_b:.1f} MB (tracemalloc)")

    for a in peers:
        if isinstance(a, PygtriePeer):
            print(
                f"\n## W3 {a.name}: skipped (one Python node per character: "
                f"~{w3_n // 1000}M nodes do not fit in a few minutes / GBs)"
            )
            continue
        print(f"\n## W3 peer {a.name}")
        run_w3_timed(a, w3_n, w3_block, a.name)
        if args.peer_memory:
            pm = w3_memory(lambda a=a: (a.new(), a)[1], w3_n, w3_block, a.name, per_block=False)
            print(f"  {a.name} structure: {pm:.1f} MB (tracemalloc)")

    if peers:
        print("\n## ratios peer / ours (p50; higher = ours faster)")
        ow = results[ours.name]
        for a in peers:
            pw = results[a.name]
            parts = []
            for w in ("w1", "w2"):
                parts.append(
                    f"{w.upper()} insert {pw[w][0][0] / ow[w][0][0]:6.1f}x  "
                    f"match {pw[w][1][0] / ow[w][1][0]:6.1f}x"
                )
            print(f"  {a.name:18s} " + "   ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
