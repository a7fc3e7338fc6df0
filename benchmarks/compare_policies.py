"""Ours vs theirs: every routing policy over the evaluation matrix, in the simulator.

Cells: the two development traces (Mooncake conversations, Claude-Code sessions) and the
built-in workloads (``default``, ``shared_prefix``, ``bursty``), each at 8 workers, at 4
workers, and at 8 workers with arrivals twice as fast (``--speed 2``). Policies: every
policy registered by ``cacheroute`` (``cache_aware`` in both imbalance modes) and every
peer re-implementation in ``benchmarks/peers/``. Each cell prints TTFT p50/p99, E2E p99
and the token hit rate per policy, the best of each column marked with ``*``; the cell's
verdict line says whether the default policy (``cacheroute.DEFAULT_POLICY``) has the best
TTFT p99 and E2E p99 and how far its hit rate is from the best load-aware policy's.

Runs are sequential (one core each); a full run takes about an hour on a 2-core machine,
most of it the Claude-Code cells. Every number is deterministic for the seed.

    python benchmarks/compare_policies.py                      # the full matrix
    python benchmarks/compare_policies.py --quick              # built-ins, small, ~1 min
    python benchmarks/compare_policies.py --cells mooncake/8w,default/4w \
        --policies work_aware,dynamo
    python benchmarks/compare_policies.py --trace mine.jsonl.gz --format mooncake   # your trace
    python benchmarks/compare_policies.py --cells claude_code/8w --coarsen 16   # its options
    python benchmarks/compare_policies.py --json results.json --markdown results.md
    python benchmarks/compare_policies.py --cells default/8w --seeds 0,1,2,3,4   # seed means
    python benchmarks/compare_policies.py --cache-tokens 200000 --max-batch 64   # your engine

A p99 over the 1,024 requests of a built-in workload is its 11th slowest request, so it
moves with the seed: ``--seeds`` runs the built-in workloads once per seed and reports the
mean of each figure over the seeds (traces have no seed and run once).

``--cache-tokens`` and ``--max-batch`` change the modelled engine, as for ``cacheroute
simulate``; prefix policies that accept ``kv_capacity_tokens`` and ``max_batch`` are told
the engine's (see ``docs/simulator.md``).

Peers that keep time (Dynamo's 120 s TTL index, Preble's 3-minute load window) are given
the simulated arrival time of each request, as :func:`cacheroute.sim.simulate` gives every
policy accepting a ``clock``; in a gateway they use ``time.monotonic``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402

from cacheroute import DEFAULT_POLICY  # noqa: E402
from cacheroute.policies import available_policies  # noqa: E402
from cacheroute.sim import (  # noqa: E402
    WORKLOADS,
    EngineConfig,
    Summary,
    Workload,
    ideal_hit_tokens,
    load_trace,
    parse_policy_list,
    simulate,
    summarize,
)
from cacheroute.sim.cli import add_engine_options  # noqa: E402

TRACES = HERE.parent.parent / "shared" / "traces"
DEV_TRACES = {
    "mooncake": (TRACES / "mooncake" / "conversation_trace.jsonl.gz", "mooncake"),
    "claude_code": (TRACES / "claude_code" / "claude_code_traces.jsonl.gz", "claude_code"),
}
BUILTINS = ("default", "shared_prefix", "bursty")
CONFIGS = {"8w": (8, 1.0), "4w": (4, 1.0), "8w-x2": (8, 2.0)}

NOT_LOAD_AWARE = frozenset({"random", "round_robin", "vllm_router"})
"""Policies that never read load; the hit-rate criterion compares with the others."""


@dataclass
class Cell:
    """One workload at one cluster configuration."""

    workload: str
    config: str

    @property
    def label(self) -> str:
        return f"{self.workload}/{self.config}"


def default_policies() -> list[str]:
    """Ours (the default first, then every registered policy) and then the peers."""
    peer_names = list(peers.register_all())
    ours = [n for n in available_policies() if n not in peer_names]
    specs = [DEFAULT_POLICY]
    for name in ours:
        if name == DEFAULT_POLICY:
            continue
        if name == "cache_aware":
            specs += ["cache_aware:locality", "cache_aware:least_load"]
        else:
            specs.append(name)
    return specs + peer_names


def load_workload(
    name: str,
    limit: int | None,
    traces: dict[str, tuple[Path, str]],
    seed: int = 0,
    claude_code: Mapping[str, int] | None = None,
) -> Workload:
    """A built-in workload (for ``seed``) or a trace by its name in ``traces``;
    ``claude_code``: options of :func:`~cacheroute.sim.traces.load_claude_code`
    (``coarsen``, ``concurrency``) for traces in that format."""
    if name in traces:
        path, fmt = traces[name]
        options = dict(claude_code or {}) if fmt == "claude_code" else {}
        return load_trace(path, fmt, limit=limit, **options)
    return WORKLOADS[name](seed).limited(limit)


HEADLINE = ("hit_rate", "ttft_p50", "ttft_p99", "e2e_p99")
"""The figures a cell shows, and the ones averaged over ``--seeds``."""


def mean_over_seeds(runs: Sequence[Sequence[Any]], seeds: Sequence[int]) -> list[Any]:
    """Per policy, the mean of each :data:`HEADLINE` figure over one run per seed (``runs[k]``
    is the summaries of seed ``seeds[k]``, every run in the same policy order)."""
    out = []
    for per_seed in zip(*runs, strict=True):
        names = {s.policy for s in per_seed}
        assert len(names) == 1, names
        means = {k: sum(getattr(s, k) for s in per_seed) / len(per_seed) for k in HEADLINE}
        out.append(SimpleNamespace(policy=per_seed[0].policy, seeds=list(seeds), **means))
    return out


def run_cell(
    workload: Workload,
    workers: int,
    speed: float,
    policies: Sequence[str],
    progress: Callable[[str], None] | None = None,
    engine: EngineConfig | None = None,
) -> list[Summary]:
    """Every policy on one workload, sequentially; summaries in ``policies`` order.
    ``engine``: the modelled engine (default :class:`EngineConfig`)."""
    w = workload.scaled(speed)
    ideal = ideal_hit_tokens(w.requests)
    engine = engine if engine is not None else EngineConfig()
    out = []
    for text in policies:
        t0 = time.perf_counter()
        result = simulate(w, text, workers=workers, engine=engine)
        out.append(summarize(result, ideal))
        if progress is not None:
            progress(f"  {text}: {time.perf_counter() - t0:.1f} s")
    return out


def _best(values: list[float]) -> float:
    return min(values)


def format_cell(cell: Cell, summaries: Sequence[Any], default: str) -> str:
    """The cell's table and its verdict line."""
    ttft99 = _best([s.ttft_p99 for s in summaries])
    ttft50 = _best([s.ttft_p50 for s in summaries])
    e2e99 = _best([s.e2e_p99 for s in summaries])
    hit = max(s.hit_rate for s in summaries)
    width = max(len(s.policy) for s in summaries)
    lines = [
        f"{cell.label}",
        f"  {'policy':<{width}}  {'TTFT p50':>9}  {'TTFT p99':>9}  {'E2E p99':>9}  {'hit':>6}",
    ]
    for s in summaries:

        def mark(x: float, best: float) -> str:
            return "*" if x == best else " "

        lines.append(
            f"  {s.policy:<{width}}  {s.ttft_p50:8.3f}{mark(s.ttft_p50, ttft50)}"
            f"  {s.ttft_p99:8.3f}{mark(s.ttft_p99, ttft99)}"
            f"  {s.e2e_p99:8.3f}{mark(s.e2e_p99, e2e99)}"
            f"  {100 * s.hit_rate:5.1f}{'*' if s.hit_rate == hit else ' '}"
        )
    lines.append("  " + verdict(summaries, default))
    return "\n".join(lines)


def verdict(summaries: Sequence[Any], default: str) -> str:
    """Whether ``default`` is best on TTFT p99 and E2E p99, and its hit-rate gap."""
    ours = next((s for s in summaries if s.policy == default), None)
    if ours is None:
        return f"({default} not run)"
    others = [s for s in summaries if s is not ours]
    if not others:
        return f"{default}: alone"
    bt = min(others, key=lambda s: s.ttft_p99)
    be = min(others, key=lambda s: s.e2e_p99)
    aware = [s for s in summaries if s.policy.split(":")[0].split("[")[0] not in NOT_LOAD_AWARE]
    bh = max(aware, key=lambda s: s.hit_rate)
    parts = [
        _relation("TTFT p99", ours.ttft_p99, bt.ttft_p99, bt.policy),
        _relation("E2E p99", ours.e2e_p99, be.e2e_p99, be.policy),
        f"hit {100 * ours.hit_rate:.1f}% vs best load-aware {100 * bh.hit_rate:.1f}% "
        f"({bh.policy}): {100 * (ours.hit_rate - bh.hit_rate):+.1f} pt",
    ]
    return f"{default}: " + "; ".join(parts)


def _relation(what: str, ours: float, theirs: float, who: str) -> str:
    if ours <= theirs:
        return f"{what} best ({ours:.3f} vs {theirs:.3f} {who}, {ours / theirs:.2f}x)"
    return f"{what} NOT best ({ours:.3f} vs {theirs:.3f} {who}, +{100 * (ours / theirs - 1):.1f}%)"


def markdown(results: Mapping[str, Sequence[Any]], default: str) -> str:
    """One markdown table per workload (rows: policies; columns: its configs), each cell
    TTFT p50 / TTFT p99 / E2E p99 in seconds and the hit rate, the best of each in bold:
    the tables of docs/policies/work_aware.md. ``results`` maps ``WORKLOAD/CONFIG`` to
    summaries (or anything with their attributes, such as the ``--json`` records)."""
    by_workload: dict[str, list[str]] = {}
    for label in results:
        by_workload.setdefault(label.split("/", 1)[0], []).append(label)
    out = []
    for workload, labels in by_workload.items():
        names = [s.policy for s in results[labels[0]]]
        heads = [_CONFIG_TITLES.get(lb.split("/", 1)[1], lb.split("/", 1)[1]) for lb in labels]
        out += [
            f"**{workload}** (TTFT p50 / TTFT p99 / E2E p99 in seconds, hit rate; best of "
            "each column in bold)",
            "",
            "| policy | " + " | ".join(heads) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for k, name in enumerate(names):
            row = [f"`{name}`" if name != default else f"**`{name}`**"]
            for lb in labels:
                ss = results[lb]
                s = ss[k]
                parts = []
                for key in ("ttft_p50", "ttft_p99", "e2e_p99"):
                    x = getattr(s, key)
                    text = f"{x:,.3g}" if x < 1000 else f"{x:,.0f}"
                    parts.append(f"**{text}**" if x == min(getattr(y, key) for y in ss) else text)
                row.append(" / ".join(parts) + f" / {100 * s.hit_rate:.1f}%")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n")


_CONFIG_TITLES = {"8w": "8 workers", "4w": "4 workers", "8w-x2": "8 workers, speed 2"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="built-ins only, 400 requests each")
    ap.add_argument("--cells", help="comma-separated WORKLOAD/CONFIG (configs: 8w, 4w, 8w-x2)")
    ap.add_argument("--policies", help="comma-separated policy specs (default: every policy)")
    ap.add_argument("--limit", type=int, help="only the first N requests of each workload")
    ap.add_argument("--trace", help="run your own trace instead of the development traces")
    ap.add_argument("--format", choices=("mooncake", "claude_code"), help="format of --trace")
    for opt, what in (("concurrency", "sessions running at once"), ("coarsen", "blocks merged")):
        ap.add_argument(
            f"--{opt}",
            type=int,
            help=f"Claude-Code traces: {what} (as cacheroute simulate --{opt}, and its default)",
        )
    add_engine_options(ap)  # --cache-tokens, --max-batch, as cacheroute simulate has them
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds of the built-in workloads; with several, each cell "
        "shows the means over them (default 0)",
    )
    ap.add_argument("--json", help="write every summary to this file")
    ap.add_argument("--markdown", help="write the matrix as markdown tables to this file")
    ap.add_argument(
        "--from-json",
        metavar="PATH",
        help="run nothing: write --markdown from the results a --json run saved",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        if not args.markdown:
            ap.error("--from-json needs --markdown")
        saved = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        records = {k: [SimpleNamespace(**x) for x in v] for k, v in saved["cells"].items()}
        Path(args.markdown).write_text(markdown(records, saved["default"]) + "\n", "utf-8")
        return 0

    engine = replace(EngineConfig(), cache_tokens=args.cache_tokens, max_batch=args.max_batch)
    traces = dict(DEV_TRACES)
    if args.trace:
        if not args.format:
            ap.error("--trace needs --format")
        traces = {Path(args.trace).name: (Path(args.trace), args.format)}
    claude_code = {k: v for k in ("concurrency", "coarsen") if (v := getattr(args, k)) is not None}
    if args.policies:
        peers.register_all()
        policies = [spec.label for spec in parse_policy_list(args.policies)]
    else:
        policies = default_policies()
    if DEFAULT_POLICY not in policies:
        print(f"note: the default policy {DEFAULT_POLICY!r} is not among --policies")
    limit = args.limit
    if args.cells:
        cells = [Cell(*c.split("/", 1)) for c in args.cells.split(",")]
    elif args.quick:
        cells = [Cell(w, c) for w in BUILTINS for c in CONFIGS]
        limit = limit or 400
    else:
        workloads = [*traces, *BUILTINS] if not args.trace else list(traces)
        cells = [Cell(w, c) for w in workloads for c in CONFIGS]
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds must be distinct integers >= 0, got {args.seeds!r}")
    for c in cells:
        if c.config not in CONFIGS:
            ap.error(f"unknown config {c.config!r} in --cells; configs: {', '.join(CONFIGS)}")
        if c.workload not in traces and c.workload not in WORKLOADS:
            ap.error(f"unknown workload {c.workload!r}; known: {', '.join([*traces, *WORKLOADS])}")

    print(
        f"compare_policies: {len(cells)} cells x {len(policies)} policies, default "
        f"{DEFAULT_POLICY!r}, engine {engine.to_dict()}"
    )
    if len(seeds) > 1:
        print(f"built-in workloads: the mean over seeds {args.seeds}")
    results: dict[str, list[Any]] = {}
    loaded: dict[tuple[str, int], Workload] = {}
    started = time.perf_counter()
    for cell in cells:
        workers, speed = CONFIGS[cell.config]
        runs = []
        for seed in [0] if cell.workload in traces else seeds:
            key = (cell.workload, seed)
            if key not in loaded:
                try:
                    loaded[key] = load_workload(cell.workload, limit, traces, seed, claude_code)
                except (TypeError, ValueError) as e:  # a bad option or a malformed trace
                    ap.error(f"{cell.workload}: {e}")
            note = f" seed {seed}" if len(seeds) > 1 and cell.workload not in traces else ""
            print(f"[{time.perf_counter() - started:7.0f} s] {cell.label}{note}", file=sys.stderr)
            runs.append(
                run_cell(
                    loaded[key],
                    workers,
                    speed,
                    policies,
                    progress=lambda m: print(m, file=sys.stderr),
                    engine=engine,
                )
            )
        summaries = runs[0] if len(runs) == 1 else mean_over_seeds(runs, seeds)
        results[cell.label] = summaries
        print(format_cell(cell, summaries, DEFAULT_POLICY))
        print()
        sys.stdout.flush()
    if args.json:
        doc: dict[str, Any] = {
            "default": DEFAULT_POLICY,
            "policies": policies,
            "limit": limit,
            "engine": engine.to_dict(),
            "seeds": seeds,
            "cells": {
                k: [s.to_dict() if isinstance(s, Summary) else vars(s) for s in v]
                for k, v in results.items()
            },
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, DEFAULT_POLICY) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
