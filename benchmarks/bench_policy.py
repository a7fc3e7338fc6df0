"""Decision latency of the ``cache_aware`` and ``work_aware`` policies, against the Tree's
own match + insert.

Workloads (the Tree issue's, seed 0):

* **W1 shared-prefix**: 64 random system prompts of 4,000 characters (letters, digits,
  space); 2,000 requests of system prompt ``i % 64`` + a random 400-character question,
  then 2,000 more with new questions for the same groups (4,000 decisions).
* **W2 multi-turn**: 200 conversations x 10 turns; turn k = turn k-1 + 300 random user
  characters + 300 random reply characters; conversations interleaved in a seeded random
  order that keeps each one's turn order (2,000 decisions).

For each policy and workload, 8 and 64 workers, either idle (every load 0: the worst case
for tie-breaks on a miss) or busy (fixed, seeded loads, pending prefill and decode tokens,
as a loaded cluster shows them to the policy), ``select_worker`` is timed per call, in one
thread and in two threads sharing the policy. The Tree baseline replays, on a fresh
``Tree`` with the same bound, the same prompts with ``match`` + ``insert_match`` for the tenant
the policy chose: the tree's own share of the work. ``ratio`` = policy p50 / tree p50
(target <= 2).

``--floor`` adds a ``floor`` row per case: a prefix policy whose choice is a constant (the
first eligible worker) run through the same machinery (the workers' loads read, the tree's
match and insert, the decision recorded). It is what any prefix policy pays before it
prices a single worker: the part of a ratio no pricing rule can remove. A last line per
policy gives the range of its ratio minus the floor's in the same case (one thread): what
its rule costs, in tree match + inserts.

``--baseline-rev REV`` compares each policy with its own module at git revision ``REV``
(``cacheroute/policies/NAME.py``, loaded against today's package) instead: one thread,
reps interleaved (baseline first, then ours first, ...), and per case the median over
reps of ``baseline p50 / ours p50`` (> 1: ours is faster) and whether both chose the same
worker for every request (what an optimisation that must not change decisions shows).

Run: ``python benchmarks/bench_policy.py`` (``--quick`` for a smoke run; ``--policies
work_aware`` for one policy; ``--floor`` for the floor rows; ``--baseline-rev REV``).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import string
import sys
import threading
import time
from collections.abc import Callable

from cacheroute import BasicWorker, CacheAwarePolicy, DecisionReason, make_policy, register_policy
from cacheroute.policies.prefix import PoolView, PrefixPolicy
from cacheroute.tree import Tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _revision import module_at

ALPHABET = string.ascii_letters + string.digits + " "


def _rand(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(ALPHABET, k=n))


def w1(quick: bool) -> list[str]:
    """W1 prompts, in request order."""
    rng = random.Random(0)
    groups, per, sys_len, q_len = (16, 200, 4000, 400) if quick else (64, 2000, 4000, 400)
    systems = [_rand(rng, sys_len) for _ in range(groups)]
    first = [systems[i % groups] + _rand(rng, q_len) for i in range(per)]
    second = [systems[i % groups] + _rand(rng, q_len) for i in range(per)]
    return first + second


def w2(quick: bool) -> list[str]:
    """W2 prompts, in request order (interleaved conversations)."""
    rng = random.Random(0)
    convs, turns = (40, 5) if quick else (200, 10)
    order = [c for c in range(convs) for _ in range(turns)]
    rng.shuffle(order)
    history = [""] * convs
    prompts = []
    for c in order:
        history[c] = history[c] + _rand(rng, 300) + _rand(rng, 300)
        prompts.append(history[c])
    return prompts


class FloorPolicy(PrefixPolicy):
    """The first eligible worker, through the prefix machinery: the floor of any prefix
    policy's decision cost (``--floor``)."""

    name = "floor"
    description = "benchmark floor: the first eligible worker, tree match and insert included"

    def __init__(self) -> None:
        self._init_prefix(CacheAwarePolicy().config.max_tree_size, None, None, None, None)

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        return view.eligible[0], DecisionReason.CACHE_HIT, None


def load_baseline(name: str, rev: str, root: str | None = None) -> str:
    """Register policy ``name`` as its module ``cacheroute/policies/NAME.py`` was at git
    revision ``rev`` of the repository at ``root`` (default: this one); the registered
    name (``NAME@REV``)."""
    path = f"cacheroute/policies/{name}.py"
    mod = module_at(rev, path, f"baseline_{name}", root)
    found = [
        c for c in vars(mod).values() if isinstance(c, type) and getattr(c, "name", None) == name
    ]
    if not found:
        raise SystemExit(f"no policy class named {name!r} in {rev}:{path}")
    registered = f"{name}@{rev}"
    register_policy(registered, found[0], replace=True)
    return registered


def compare_baseline(names: list[str], rev: str, quick: bool, repeat: int) -> None:
    """Print, per policy and case, the same-rep ratio baseline p50 / ours p50."""
    workloads: dict[str, Callable[[bool], list[str]]] = {"W1": w1, "W2": w2}
    print(f"# baseline: cacheroute/policies/NAME.py at {rev}; one thread; ratio > 1: ours faster")
    print(
        f"{'policy':12} {'load':4} {'state':5} {'workers':>7} {'base p50':>9} {'ours p50':>9} "
        f"{'ratio':>6} {'[min-max]':>13} same choices"
    )
    for name in names:
        base = load_baseline(name, rev)
        for wname, gen in workloads.items():
            prompts = gen(quick)
            for busy in (False, True):
                for n_workers in (8, 64):
                    ratios, b50s, o50s, same = [], [], [], True
                    for rep in range(repeat):
                        order = (base, name) if rep % 2 == 0 else (name, base)
                        got = {n: run_policy(n, prompts, n_workers, 1, busy) for n in order}
                        b50, o50 = _pct(got[base][0], 0.5), _pct(got[name][0], 0.5)
                        b50s.append(b50)
                        o50s.append(o50)
                        ratios.append(b50 / o50)
                        same = same and got[base][2] == got[name][2]
                    state = "busy" if busy else "idle"
                    print(
                        f"{name:12} {wname:4} {state:5} {n_workers:7d} "
                        f"{statistics.median(b50s):9.2f} {statistics.median(o50s):9.2f} "
                        f"{statistics.median(ratios):6.2f} "
                        f"{f'[{min(ratios):.2f}-{max(ratios):.2f}]':>13} "
                        f"{'yes' if same else 'no'}"
                    )


def _pct(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0


def make_workers(n_workers: int, busy: bool) -> list[BasicWorker]:
    """Idle workers, or busy ones: seeded loads (0-12), pending prefill and decode tokens."""
    workers = [BasicWorker(f"http://w{i}:8000") for i in range(n_workers)]
    if busy:
        rng = random.Random(1)
        for w in workers:
            for _ in range(rng.randint(0, 12)):
                w.increment_load()
            w.add_work(rng.randint(0, 20_000), rng.randint(0, 200_000))
    return workers


def run_policy(
    name: str, prompts: list[str], n_workers: int, threads: int, busy: bool
) -> tuple[list[int], float, list[str]]:
    """Per-call ns, decisions/s, and the chosen url per prompt."""
    workers = make_workers(n_workers, busy)
    policy = make_policy(name)
    select = policy.select_worker
    chosen: list[str] = [""] * len(prompts)
    lat: list[list[int]] = [[] for _ in range(threads)]
    clock = time.perf_counter_ns

    def work(t: int) -> None:
        out = lat[t]
        for k in range(t, len(prompts), threads):
            p = prompts[k]
            t0 = clock()
            i = select(workers, p)
            out.append(clock() - t0)
            assert i is not None
            chosen[k] = workers[i].url

    gc.collect()
    start = time.perf_counter()
    if threads == 1:
        work(0)
    else:
        ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    wall = time.perf_counter() - start
    return [x for xs in lat for x in xs], len(prompts) / wall, chosen


def run_tree(prompts: list[str], chosen: list[str]) -> list[int]:
    """The Tree's match + insert_match on the same prompts, for the same tenants."""
    tree = Tree(max_size=CacheAwarePolicy().config.max_tree_size)
    match, insert_match = tree.match, tree.insert_match
    clock = time.perf_counter_ns
    out: list[int] = []
    gc.collect()
    for p, url in zip(prompts, chosen, strict=True):
        t0 = clock()
        insert_match(match(p), url)
        out.append(clock() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; medians are printed")
    ap.add_argument(
        "--policies", default="cache_aware,work_aware", help="comma-separated policy names"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also time a constant choice through the same machinery (see the module doc)",
    )
    ap.add_argument(
        "--baseline-rev",
        default=None,
        metavar="REV",
        help="compare each policy with its module at this git revision (see the module doc)",
    )
    args = ap.parse_args(argv)
    names = args.policies.split(",")
    repeat = 1 if args.quick else max(1, args.repeat)
    if args.baseline_rev:
        compare_baseline(names, args.baseline_rev, args.quick, repeat)
        return 0
    if args.floor:
        register_policy(FloorPolicy.name, FloorPolicy, replace=True)
        names.insert(0, FloorPolicy.name)
    workloads: dict[str, Callable[[bool], list[str]]] = {"W1": w1, "W2": w2}
    print(
        f"cacheroute bench_policy  python {sys.version.split()[0]}  "
        f"{'quick' if args.quick else 'full'}  repeat={repeat} (median shown)"
    )
    print(
        f"{'policy':12} {'load':4} {'state':5} {'workers':>7} {'thr':>3} {'decisions':>9} "
        f"{'p50 us':>8} {'p99 us':>8} {'dec/s':>9} "
        f"{'tree p50':>9} {'tree p99':>9} {'ratio':>6}"
    )
    worst: dict[str, float] = {}
    single: dict[tuple[str, str, bool, int], float] = {}  # 1-thread ratio per case
    for name in names:
        for wname, gen in workloads.items():
            prompts = gen(args.quick)
            for busy in (False, True):
                for n_workers in (8, 64):
                    for threads in (1, 2):
                        p50s, p99s, rates, t50s, t99s = [], [], [], [], []
                        for _ in range(repeat):
                            lat, rate, chosen = run_policy(name, prompts, n_workers, threads, busy)
                            tl = run_tree(prompts, chosen)
                            p50s.append(_pct(lat, 0.5))
                            p99s.append(_pct(lat, 0.99))
                            rates.append(rate)
                            t50s.append(_pct(tl, 0.5))
                            t99s.append(_pct(tl, 0.99))
                        p50, p99 = statistics.median(p50s), statistics.median(p99s)
                        t50, t99 = statistics.median(t50s), statistics.median(t99s)
                        ratio = p50 / t50
                        if threads == 1:
                            single[name, wname, busy, n_workers] = ratio
                            if n_workers == 64:
                                worst[name] = max(worst.get(name, 0.0), ratio)
                        state = "busy" if busy else "idle"
                        print(
                            f"{name:12} {wname:4} {state:5} {n_workers:7d} {threads:3d} "
                            f"{len(prompts):9d} "
                            f"{p50:8.2f} {p99:8.2f} {statistics.median(rates):9.0f} "
                            f"{t50:9.2f} {t99:9.2f} {ratio:6.2f}"
                        )
    for name, ratio in worst.items():
        print(
            f"{name}: worst single-thread ratio at 64 workers "
            f"(policy p50 / tree match+insert p50): {ratio:.2f}"
        )
    if args.floor:  # what a policy adds to the machinery, in tree match + inserts
        for name in names[1:]:
            spans = []
            for n_workers in (8, 64):
                above = [
                    r - single[(FloorPolicy.name, *case[1:])]
                    for case, r in single.items()
                    if case[0] == name and case[3] == n_workers
                ]
                spans.append(f"{n_workers} workers {min(above):.2f} to {max(above):.2f}")
            print(
                f"{name}: above the floor (its ratio minus the floor's, 1 thread): "
                + ", ".join(spans)
            )
    print(
        "2-thread p50/p99 include waiting for the GIL and the tree lock; "
        "dec/s is the total over both threads."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
