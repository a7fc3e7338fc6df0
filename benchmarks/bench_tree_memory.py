"""Memory of :class:`cacheroute.tree.Tree`: bytes per node and per unit, and the RSS of
trees filled to their bounds with the worst-case input.

Run::

    python benchmarks/bench_tree_memory.py           # ~1 min
    python benchmarks/bench_tree_memory.py --quick

Every scenario runs in a fresh process and reports the growth of its resident set (RSS,
``/proc/self/statm``) while the tree is built, after ``gc.collect()`` and
``malloc_trim(0)`` (so freed heap pages do not count), divided by the tree's nodes
(counted once per holder, as ``max_nodes`` counts them) and by its units
(``total_size()``).

* ``short-text``: distinct 2-character prompts (CJK, so no cached 1-character ``str``),
  one tenant per prompt out of 16: a node per unit, the worst case per unit.
* ``short-tokens``: distinct 2-token prompts, the same for token ids.
* ``shared``: 16 tenants inserting the same short prompts: the cost of an extra holder.
* ``long-text``: distinct 1,000-character prompts over 16 tenants (W3 of bench_tree.py).
* ``bounded-short`` / ``bounded-long``: ``Tree(max_size=2**24, max_nodes=
  Tree.max_nodes_for(256 MiB, 2**24))`` (what the cache-aware policy's default bound
  needs to stay within 256 MiB) fed 3x its node bound of short prompts, or long prompts
  until its unit bound binds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import string
import subprocess
import sys
from typing import Any

from cacheroute.tree import Tree

MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cjk(i: int) -> str:
    return chr(0x4E00 + i)


def scenario(name: str, scale: float) -> dict[str, Any]:
    rng = random.Random(0)
    side = int(1000 * scale**0.5)
    pairs = [(a, b) for a in range(side) for b in range(side)]
    rng.shuffle(pairs)
    if name == "bounded-short":  # made before the baseline RSS is read
        nodes = Tree.max_nodes_for(256 * MIB, 2**24)
        pairs = [(a, b) for a in range(4000) for b in range(4000)]
        pairs = rng.sample(pairs, 3 * nodes)
    settle()
    base = rss()
    if name == "short-text":
        t = Tree()
        for i, (a, b) in enumerate(pairs):
            t.insert(cjk(a) + cjk(b), f"w{i % 16}")
    elif name == "short-tokens":
        t = Tree()
        for i, (a, b) in enumerate(pairs):
            t.insert([100_000 + a, 100_000 + b], f"w{i % 16}")
    elif name == "shared":
        t = Tree()
        for a, b in pairs[: len(pairs) // 16]:
            for k in range(16):
                t.insert(cjk(a) + cjk(b), f"w{k}")
    elif name == "long-text":
        t = Tree()
        table = bytes(ord((string.ascii_letters + string.digits + " ")[x % 63]) for x in range(256))
        for i in range(int(100_000 * scale)):
            t.insert(rng.randbytes(1000).translate(table).decode(), f"w{i % 16}")
    elif name.startswith("bounded"):
        max_size = 2**24
        t = Tree(max_size=max_size, max_nodes=Tree.max_nodes_for(256 * MIB, max_size))
        if name == "bounded-short":
            for i, (a, b) in enumerate(pairs):
                t.insert(cjk(a) + cjk(b), f"w{i % 16}")
        else:
            table = bytes(ord(string.ascii_letters[x % 52]) for x in range(256))
            for i in range(int(max_size * 1.2) // 1000):
                t.insert(rng.randbytes(1000).translate(table).decode(), f"w{i % 16}")
    else:
        raise SystemExit(f"unknown scenario {name}")
    settle()
    grown = rss() - base
    return {
        "scenario": name,
        "nodes": t._node_count(),
        "holdings": t._holdings,
        "units": t.total_size(),
        "rss_mib": grown / MIB,
        "bytes_per_node": grown / max(1, t._holdings),
        "bytes_per_unit": grown / max(1, t.total_size()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    if args.one:
        print(json.dumps(scenario(args.one, scale)))
        return 0
    names = ["short-text", "short-tokens", "shared", "long-text", "bounded-short", "bounded-long"]
    print(f"# bench_tree_memory  python {sys.version.split()[0]}  quick={args.quick}")
    print(f"# Tree.NODE_BYTES = {Tree.NODE_BYTES}")
    print(
        f"{'scenario':14s} {'nodes':>10s} {'holdings':>10s} {'units':>11s} {'RSS MiB':>8s} "
        f"{'B/holding':>10s} {'B/unit':>8s}"
    )
    for name in names:
        argv = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
        r = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
        print(
            f"{name:14s} {r['nodes']:10,d} {r['holdings']:10,d} {r['units']:11,d} "
            f"{r['rss_mib']:8.1f} {r['bytes_per_node']:10.1f} {r['bytes_per_unit']:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
