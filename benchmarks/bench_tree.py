"""Benchmark of :class:`cacheroute.tree.Tree`, against a baseline revision and peers.

Run::

    python benchmarks/bench_tree.py --baseline-rev 719d2b2   # same-run ratios vs that tree
    python benchmarks/bench_tree.py --quick                  # smoke run (seconds)

Workloads (deterministic, seed 0; alphabet letters, digits and space):

* W1 shared prefix: 64 system prompts of 4,000 characters; 2,000 inserts of system prompt
  (i % 64) + a random 400-character question, tenant = (i % 64) % 8; then 2,000
  ``prefix_match`` of new questions on the same system prompts.
* W2 multi-turn: 200 conversations x 10 turns, each turn 600 characters longer than the
  last, interleaved (each keeps its order); tenant = conversation % 8; per turn
  ``prefix_match`` then ``insert`` (timed apart), and, on a fresh tree, the pair the cache
  aware policy makes: ``match`` + ``insert_match`` (the baseline: ``match_and_insert``).
* W3 scale: 100,000 distinct random 1,000-character prompts over 16 tenants, then 10,000
  ``prefix_match`` of new ones; once more with ``max_size=10,000,000`` (bounded).

Every op is timed on its own (``perf_counter``); cells are the mean, p50 and p99 per op.
Reps are interleaved (baseline, ours, ours, baseline, ...) and every ratio is
``baseline / ours`` within one rep, then the median over reps (> 1: ours is faster): the
machine is shared and noisy, so only same-run ratios mean something. The garbage collector
is left on; ``gc.callbacks`` time every collection by generation while W3 is built. The
bounded W3 also reports the worst single insert and how eviction is spread: units evicted
per insert (a *burst* evicts more than twice what the insert adds).

Before the first rep the process heap is grown once (``--heap-mb``: 512 MiB of 1 KiB
objects, allocated and freed; 64 with ``--quick``): a tree that grows takes fresh pages
from the kernel, and on a VM each first touch of a page is a fault of several
microseconds (tens on a new VM), which lands on whichever insert crossed the page (every
~4th insert of W3's 1,000-unit prompts), not on the tree's own work. A gateway's
long-lived heap is already grown; ``--cold-heap`` skips this, to see what growth costs
here.

``--baseline-rev REV`` loads ``git show REV:cacheroute/tree.py`` as a module. Peers, when
importable: ``pygtrie`` (``pip install -e '.[bench]'``), Ray Serve's ``PrefixTree`` and smg's
Rust ``StringTree`` (the ``smg_tree`` module that ``benchmarks/smg_tree/build.sh`` builds: put
its directory on ``PYTHONPATH``), each for one rep against ours in the same process (smg on
W3 as well).
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
from collections.abc import Callable
from typing import Any

from cacheroute.tree import Tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _revision import module_at

ALPHABET = string.ascii_letters + string.digits + " "
_TABLE = bytes(ord(ALPHABET[b % len(ALPHABET)]) for b in range(256))
PC = time.perf_counter


def rand_text(rng: random.Random, n: int) -> str:
    return rng.randbytes(n).translate(_TABLE).decode("ascii")


def load_baseline(rev: str) -> Any:
    """The ``Tree`` class of ``cacheroute/tree.py`` at git revision ``rev``."""
    return module_at(rev, "cacheroute/tree.py", "baseline_tree").Tree


def stats(ts: list[float]) -> dict[str, float]:
    s = sorted(ts)
    n = len(s)
    return {
        "mean": sum(s) / n * 1e6,
        "p50": s[n // 2] * 1e6,
        "p99": s[min(n - 1, n * 99 // 100)] * 1e6,
        "max": s[-1] * 1e6,
    }


# ------------------------------------------------------------------ workloads


def w1_data(scale: float) -> tuple[list[tuple[str, str]], list[str]]:
    rng = random.Random(0)
    n = max(64, int(2000 * scale))
    systems = [rand_text(rng, 4000) for _ in range(64)]
    ins = [(systems[i % 64] + rand_text(rng, 400), f"worker-{(i % 64) % 8}") for i in range(n)]
    return ins, [systems[i % 64] + rand_text(rng, 400) for i in range(n)]


def w2_data(scale: float) -> list[tuple[str, str]]:
    rng = random.Random(0)
    convs = max(8, int(200 * scale))
    order = [c for c in range(convs) for _ in range(10)]
    rng.shuffle(order)
    state = [""] * convs
    turns = []
    for c in order:
        state[c] += rand_text(rng, 300) + rand_text(rng, 300)
        turns.append((state[c], f"worker-{c % 8}"))
    return turns


def w3_data(n: int) -> tuple[list[tuple[str, str]], list[str]]:
    rng = random.Random(1000)
    ins = [(rand_text(rng, 1000), f"worker-{i % 16}") for i in range(n)]
    return ins, [rand_text(rng, 1000) for _ in range(max(1, n // 10))]


# ---------------------------------------------------------------------- cells


def grow_heap(mb: int) -> float:
    """Allocate and free ``mb`` MiB of 1 KiB objects (the size of W3's leaves); seconds."""
    t0 = PC()
    junk = [bytes(1024) for _ in range(mb * 1024)]
    del junk
    return PC() - t0


def timed(op: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[float]:
    ts = []
    for a in args:
        t0 = PC()
        op(*a)
        ts.append(PC() - t0)
    return ts


def run_w1(cls: Any, data: Any) -> dict[str, Any]:
    t = cls()
    return {
        "insert": timed(t.insert, data[0]),
        "match": timed(t.prefix_match, [(s,) for s in data[1]]),
    }


def run_w2(cls: Any, turns: list[tuple[str, str]]) -> dict[str, Any]:
    t = cls()
    mt, it = [], []
    for s, tenant in turns:
        t0 = PC()
        t.prefix_match(s)
        t1 = PC()
        t.insert(s, tenant)
        t2 = PC()
        mt.append(t1 - t0)
        it.append(t2 - t1)
    f = cls()
    ft = []
    if hasattr(f, "insert_match"):
        match, insert_match = f.match, f.insert_match
        for s, tenant in turns:
            t0 = PC()
            insert_match(match(s), tenant)
            ft.append(PC() - t0)
    elif hasattr(f, "match_and_insert"):  # the baseline's fused call, callbacks prebuilt
        choosers = {x: (lambda d, x=x: x) for _, x in turns}
        mai = f.match_and_insert
        for s, tenant in turns:
            ch = choosers[tenant]
            t0 = PC()
            mai(s, ch)
            ft.append(PC() - t0)
    out = {"insert": it, "match": mt}
    if ft:
        out["match+insert"] = ft
    return out


class GcClock:
    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self.t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.t0 = PC()
        else:
            self.pauses.append((info["generation"], PC() - self.t0))


def run_w3(cls: Any, data: Any, max_size: int | None) -> dict[str, Any]:
    t = cls(max_size=max_size)
    clock = GcClock()
    gc.collect()
    gc.callbacks.append(clock)
    ts, cpu, evicted = [], [], []
    tt = time.thread_time  # CPU time: tells the tree's own spikes from the scheduler's
    try:
        for s, tenant in data[0]:
            before = t.total_size()
            c0 = tt()
            t0 = PC()
            t.insert(s, tenant)
            ts.append(PC() - t0)
            cpu.append(tt() - c0)
            evicted.append(max(0, before + len(s) - t.total_size()))
    finally:
        gc.callbacks.remove(clock)
    out: dict[str, Any] = {"insert": ts, "gc": clock.pauses, "evicted": evicted, "cpu": cpu}
    out["match"] = timed(t.prefix_match, [(s,) for s in data[1]])
    return out


# ---------------------------------------------------------------------- report


def fmt(st: dict[str, float]) -> str:
    return f"mean {st['mean']:7.2f}  p50 {st['p50']:7.2f}  p99 {st['p99']:7.2f} us"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--reps", type=int, default=None, help="interleaved reps (default 5)")
    ap.add_argument("--baseline-rev", default=None, help="git revision of the baseline tree")
    ap.add_argument("--no-peers", action="store_true", help="skip pygtrie / Ray / smg")
    heap = ap.add_mutually_exclusive_group()
    heap.add_argument(
        "--heap-mb", type=int, default=None, help="heap grown before rep 1 (MiB; 512, quick 64)"
    )
    heap.add_argument("--cold-heap", action="store_true", help="do not grow the heap first")
    args = ap.parse_args(argv)
    if args.heap_mb is not None and args.heap_mb < 0:
        ap.error(f"--heap-mb must be >= 0, got {args.heap_mb}")
    reps = args.reps or (1 if args.quick else 5)
    scale = 0.1 if args.quick else 1.0
    n3 = 10_000 if args.quick else 100_000
    bound = 1_000_000 if args.quick else 10_000_000
    print(
        f"# bench_tree  python {platform.python_version()}  {platform.machine()}  "
        f"cpus={os.cpu_count()}  reps={reps}  quick={args.quick}  gc={gc.get_threshold()}"
    )
    trees: dict[str, Any] = {"ours": Tree}
    if args.baseline_rev:
        trees = {"baseline": load_baseline(args.baseline_rev), "ours": Tree}
        print(f"# baseline: cacheroute/tree.py at {args.baseline_rev}")
    d1, d2, d3 = w1_data(scale), w2_data(scale), w3_data(n3)
    if args.cold_heap:
        print("# heap: cold (--cold-heap): fresh pages are faulted in by the inserts")
    else:
        mb = args.heap_mb if args.heap_mb is not None else 64 if args.quick else 512
        print(f"# heap: grown by {mb} MiB in {grow_heap(mb):.2f} s before rep 1")
    cells: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    extra: dict[str, list[Any]] = {}
    for rep in range(reps):
        names = list(trees) if rep % 2 == 0 else list(reversed(trees))
        for name in names:
            cls = trees[name]
            for wl, res in (
                ("W1", run_w1(cls, d1)),
                ("W2", run_w2(cls, d2)),
                ("W3", run_w3(cls, d3, None)),
                ("W3 bounded", run_w3(cls, d3, bound)),
            ):
                for op in ("insert", "match", "match+insert"):
                    if op in res:
                        cells.setdefault((wl, op, name), []).append(stats(res[op]))
                if wl.startswith("W3"):
                    extra.setdefault(f"{wl}|{name}", []).append(res)
            gc.collect()
        print(f"# rep {rep + 1}/{reps} done", flush=True)

    print("\n## Per op (median over reps)")
    for (wl, op, name), rows in sorted(cells.items()):
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        ratio = med["p99"] / med["p50"]
        print(f"  {wl:10s} {op:12s} {name:8s} {fmt(med)}  p99/p50 {ratio:4.1f}")
    if "baseline" in trees:
        print("\n## Same-rep ratio baseline / ours (median over reps [min-max]; > 1 = ours faster)")
        for wl, op in sorted({(w, o) for w, o, _ in cells}):
            b, o = cells.get((wl, op, "baseline")), cells.get((wl, op, "ours"))
            if not b or not o:
                continue
            parts = []
            for k in ("mean", "p50", "p99"):
                rs = [x[k] / y[k] for x, y in zip(b, o, strict=True)]
                parts.append(f"{k} {statistics.median(rs):5.2f} [{min(rs):.2f}-{max(rs):.2f}]")
            print(f"  {wl:10s} {op:12s} " + "  ".join(parts))

    print("\n## W3 build: garbage-collector pauses (all reps), eviction and worst inserts")
    for key, runs in sorted(extra.items()):
        g2 = [d * 1e3 for r in runs for g, d in r["gc"] if g == 2]
        allp = [d * 1e3 for r in runs for _, d in r["gc"]]
        worst = [max(r["insert"]) * 1e3 for r in runs]
        worst_cpu = [max(r["cpu"]) * 1e3 for r in runs]
        print(
            f"  {key:22s} gen-2 collections {len(g2) / len(runs):4.1f}/build, worst "
            f"{max(g2, default=0):6.2f} ms; all collections worst {max(allp, default=0):5.2f} ms; "
            f"worst insert {statistics.median(worst):6.2f} ms (max {max(worst):.2f}), "
            f"in CPU time {statistics.median(worst_cpu):5.2f} ms (max {max(worst_cpu):.2f})"
        )
        if key.startswith("W3 bounded"):
            ev = [e for r in runs for e in r["evicted"]]
            sizes = [len(s) for s, _ in d3[0]] * len(runs)
            bursts = sum(1 for e, n in zip(ev, sizes, strict=True) if e > 2 * n)
            ev = [e if e > 16 else 0 for e in ev]  # a few units: the prompt's shared prefix
            ts = [x for r in runs for x in r["insert"]]
            over = sum(x for x in ts if x > 1e-3) / sum(ts)
            print(
                f"  {'':22s} evicting inserts {sum(1 for e in ev if e) / len(ev):5.1%}, max units "
                f"evicted by one insert {max(ev):,}, bursts (> 2x the insert) {bursts}, "
                f"time in inserts > 1 ms {over:.1%}"
            )

    if not args.no_peers:
        peers(d1, d2, d3)
    return 0


def run_w3_plain(cls: Any, data: Any) -> dict[str, Any]:
    """W3 unbounded, inserts then matches, timed per op (for a peer: no size probes)."""
    t = cls()
    gc.collect()
    return {
        "insert": timed(t.insert, data[0]),
        "match": timed(t.prefix_match, [(s,) for s in data[1]]),
    }


def peers(d1: Any, d2: Any, d3: Any) -> None:
    """pygtrie, Ray's PrefixTree and smg's StringTree on W1/W2 (smg on W3 too) when
    importable (one rep; p50 ratio)."""
    found: dict[str, Any] = {}
    w3_too: set[str] = set()
    try:
        import smg_tree  # benchmarks/smg_tree/build.sh

        class Smg:
            def __init__(self, max_size: int | None = None) -> None:
                t = smg_tree.StringTree()
                self.insert, self.prefix_match = t.insert, t.prefix_match

        name = f"smg StringTree {smg_tree.SMG_COMMIT}"
        found[name] = Smg
        w3_too.add(name)
    except ImportError:
        print("# peer smg StringTree: not importable (benchmarks/smg_tree/build.sh)")
    try:
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import (
            PrefixTree,
        )

        class Ray:
            def __init__(self, max_size: int | None = None) -> None:
                self.t = PrefixTree()
                self.known: set[str] = set()

            def insert(self, s: str, tenant: str) -> None:
                if tenant not in self.known:
                    self.t.add_tenants([tenant], 0.0)
                    self.known.add(tenant)
                self.t.insert(s, tenant, time.time())

            def prefix_match(self, s: str) -> Any:
                return self.t.prefix_match(s)

        found["ray PrefixTree"] = Ray
    except Exception as exc:  # ImportError, or ray's own import-time errors
        print(f"# peer ray PrefixTree: not importable ({type(exc).__name__})")
    try:
        import pygtrie

        class Trie:
            def __init__(self, max_size: int | None = None) -> None:
                self.t = pygtrie.CharTrie()

            def insert(self, s: str, tenant: str) -> None:
                self.t[s] = tenant

            def prefix_match(self, s: str) -> int:
                n = 0
                try:
                    for _ in self.t.walk_towards(s):
                        n += 1
                except KeyError:
                    pass
                return n - 1

        found["pygtrie CharTrie"] = Trie
    except ImportError:
        print("# peer pygtrie: not importable (pip install pygtrie)")
    if not found:
        return
    ours = {"W1": run_w1(Tree, d1), "W2": run_w2(Tree, d2)}
    if w3_too:
        ours["W3"] = run_w3_plain(Tree, d3)
    print("\n## Peers / ours (p50, one rep; > 1 = ours faster)")
    for name, cls in found.items():
        r = {"W1": run_w1(cls, d1), "W2": run_w2(cls, d2)}
        wls = ["W1", "W2"]
        if name in w3_too:
            r["W3"] = run_w3_plain(cls, d3)
            wls.append("W3")
        parts = [
            f"{wl} {op} {stats(r[wl][op])['p50'] / stats(ours[wl][op])['p50']:6.2f}x"
            for wl in wls
            for op in ("insert", "match")
        ]
        print(f"  {name:26s} " + "  ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
