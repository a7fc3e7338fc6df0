"""Regenerate the tables of docs/precise_mode.md: index modes x gateway replicas, in the simulator.

    python benchmarks/precise_tables.py               # the full matrix; rewrite the tables
    python benchmarks/precise_tables.py --check       # exit 1 if the doc's tables are stale
    python benchmarks/precise_tables.py --jobs 2      # two runs at a time (same output)
    python benchmarks/precise_tables.py --limit 2000 --doc /tmp/slice.md   # a prefix slice

For each development trace (Mooncake conversations, Claude-Code sessions; the files of
``../shared/traces/`` next to the checkout, loaded as ``cacheroute simulate`` loads them),
each policy (``work_aware``, the default, and ``cache_aware``), each index mode
(``approximate``, ``precise``, ``hybrid``) and each number of gateway replicas R (1, 2, 4,
8), one ``simulate`` run on 8 workers with the engines' default (bounded) KV cache; plus,
per trace and policy, one reference run with unbounded engine caches (approximate, R=1).
KV events reach the index ``--kv-event-delay`` seconds after the engine emits them
(default 0). Each run reports the token hit rate, TTFT p99 and E2E p99 (the rows of the
same names in ``cacheroute simulate``).

Two capacity references per trace, computed without routing or timing: the ideal hit
rate (one unbounded cache seeing every request, the simulator's ``ideal hit rate`` row)
and a *pooled LRU* hit rate: one LRU cache as large as the whole cluster's (8 x 450,000
tokens) seeing every request in arrival order. The latter is roughly what the cluster's
memory allows when no block is ever cached twice.

The doc's generated part lies between ``<!-- precise-tables -->`` and
``<!-- /precise-tables -->``; everything else in the doc is prose and is kept. The
simulator is deterministic for a seed and the generated part holds no wall time, so
regenerating gives identical text (``--check`` compares it). Runs are independent;
``--jobs N`` spreads them over N processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cacheroute.sim import (
    EngineConfig,
    Request,
    Workload,
    load_trace,
    simulate,
    summarize,
)
from cacheroute.sim.precise import INDEX_MODES
from cacheroute.sim.request import matched_blocks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "precise_mode.md"
COMMAND = "python benchmarks/precise_tables.py"
TRACES = ROOT.parent / "shared" / "traces"
DEV_TRACES: dict[str, tuple[Path, str, str]] = {
    "mooncake": (
        TRACES / "mooncake" / "conversation_trace.jsonl.gz",
        "mooncake",
        "Mooncake conversations",
    ),
    "claude_code": (
        TRACES / "claude_code" / "claude_code_traces.jsonl.gz",
        "claude_code",
        "Claude-Code sessions",
    ),
}
POLICIES = ("work_aware", "cache_aware")
ROUTERS = (1, 2, 4, 8)
WORKERS = 8
BEGIN = "<!-- precise-tables -->"
END = "<!-- /precise-tables -->"


@dataclass(frozen=True)
class Run:
    """One cell of the matrix: ``cache_tokens=None`` is the unbounded reference."""

    trace: str
    policy: str
    index: str
    routers: int
    cache_tokens: int | None


@dataclass(frozen=True)
class Result:
    """What the tables show of one run."""

    run: Run
    requests: int
    hit_rate: float
    ideal_hit_rate: float
    ttft_p99: float
    e2e_p99: float


@dataclass(frozen=True)
class Settings:
    """The matrix's fixed parameters (shown above the tables)."""

    workers: int = WORKERS
    cache_tokens: int = EngineConfig().cache_tokens or 0
    kv_event_delay_s: float = 0.0
    limit: int | None = None
    seed: int = 0


def matrix(
    traces: Iterable[str],
    settings: Settings,
    policies: Sequence[str] = POLICIES,
    routers: Sequence[int] = ROUTERS,
    modes: Sequence[str] = INDEX_MODES,
) -> list[Run]:
    """Every run, in table order: per trace and policy, the bounded cells, then the reference."""
    runs = []
    for trace in traces:
        for policy in policies:
            for mode in modes:
                runs += [Run(trace, policy, mode, r, settings.cache_tokens) for r in routers]
            runs.append(Run(trace, policy, "approximate", 1, None))
    return runs


def pooled_lru_hit_rate(requests: Sequence[Request], capacity_tokens: float) -> float:
    """Token hit rate of one LRU block cache of ``capacity_tokens`` seeing every request.

    No routing, no timing: each request hits its longest cached prefix, then all its blocks
    become the most recent (the root most of all, so the cache stays prefix-closed) and
    the least recent blocks go until the cache fits.
    """
    lru: OrderedDict[int, int] = OrderedDict()  # block -> tokens, least recent first
    used = 0
    hit = total = 0
    for r in requests:
        k = matched_blocks(r.blocks, lru)
        hit += r.hit_tokens(k)
        total += r.input_tokens
        bs, span = r.block_size, r.span_tokens
        for i in range(len(r.blocks) - 1, -1, -1):
            b = r.blocks[i]
            if b in lru:
                lru.move_to_end(b)
            else:
                t = lru[b] = min(bs, span - i * bs)
                used += t
        while used > capacity_tokens and lru:
            used -= lru.popitem(last=False)[1]
    return hit / total if total else 0.0


@cache
def _trace(name: str, limit: int | None) -> Workload:
    path, fmt, _ = DEV_TRACES[name]
    return load_trace(path, fmt, limit=limit)


def execute(run: Run, workload: Workload, settings: Settings) -> Result:
    """One ``simulate`` run and its summary."""
    delay = None if run.index == "approximate" else settings.kv_event_delay_s
    result = simulate(
        workload,
        run.policy,
        workers=settings.workers,
        engine=EngineConfig(cache_tokens=run.cache_tokens),
        seed=settings.seed,
        routers=run.routers,
        kv_event_delay_s=delay,
        index=run.index,
    )
    s = summarize(result)
    return Result(run, s.requests, s.hit_rate, s.ideal_hit_rate, s.ttft_p99, s.e2e_p99)


def _execute_trace_run(job: tuple[Run, Settings]) -> Result:
    run, settings = job
    return execute(run, _trace(run.trace, settings.limit), settings)


def run_all(
    runs: Sequence[Run],
    settings: Settings,
    workload: Callable[[str], Workload] | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = lambda s: None,
) -> list[Result]:
    """Every run's result, in ``runs`` order. ``workload`` maps a trace name to its
    workload (default: the development trace, ``settings.limit`` requests); ``jobs > 1``
    runs trace runs in that many processes."""
    started = time.perf_counter()

    def done(res: Result) -> Result:
        r = res.run
        cache_label = "unbounded" if r.cache_tokens is None else "bounded"
        log(
            f"{r.trace} {r.policy} {r.index} R={r.routers} {cache_label}: "
            f"hit {100 * res.hit_rate:.1f}% ({time.perf_counter() - started:.0f} s so far)"
        )
        return res

    if workload is None and jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = pool.map(_execute_trace_run, [(r, settings) for r in runs])
            return [done(res) for res in results]
    get = workload if workload is not None else (lambda name: _trace(name, settings.limit))
    return [done(execute(r, get(r.trace), settings)) for r in runs]


# --------------------------------------------------------------------------- rendering


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _secs(x: float) -> str:
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def _closed(mode: float, approx: float, unbounded: float) -> str:
    """``mode``'s change from ``approx`` in points, and the share of the gap to
    ``unbounded`` it closes (only when that gap is at least a point: a share of a
    smaller gap says nothing)."""
    change = f"{100 * (mode - approx):+.1f} pt"
    gap = unbounded - approx
    if gap < 0.01:
        return change
    return f"{change} ({100 * (mode - approx) / gap:+.0f}%)"


def render(
    results: Sequence[Result],
    settings: Settings,
    titles: Mapping[str, str],
    pooled: Mapping[str, float],
) -> str:
    """The generated part of the doc (Markdown, no wall time: deterministic)."""
    limit = "full traces" if settings.limit is None else f"first {settings.limit:,} requests"
    out = [
        f"Generated by `{COMMAND}`"
        + (f" `--limit {settings.limit}`" if settings.limit is not None else "")
        + f": {settings.workers} workers, KV cache {settings.cache_tokens:,} tokens per"
        f" worker (the simulator's default), KV-event delay {settings.kv_event_delay_s:g} s"
        f" (precise and hybrid), seed {settings.seed}, {limit}.",
        "",
    ]
    traces = list(dict.fromkeys(r.run.trace for r in results))
    for trace in traces:
        rows = [r for r in results if r.run.trace == trace]
        n, ideal = rows[0].requests, rows[0].ideal_hit_rate
        cap = settings.workers * settings.cache_tokens
        out += [
            f"### {titles.get(trace, trace)}",
            "",
            f"{n:,} requests. Ideal hit rate (one unbounded cache): {_pct(ideal)}; pooled"
            f" LRU ({settings.workers} x {settings.cache_tokens:,} = {cap:,} tokens, no"
            f" routing): {_pct(pooled[trace])}.",
            "",
            "| policy | index | R | hit rate | TTFT p99 (s) | E2E p99 (s) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            label = r.run.index if r.run.cache_tokens is not None else "approximate, unbounded"
            out.append(
                f"| {r.run.policy} | {label} | {r.run.routers} | {_pct(r.hit_rate)}"
                f" | {_secs(r.ttft_p99)} | {_secs(r.e2e_p99)} |"
            )
        out += [
            "",
            f"Hit rate by R ({titles.get(trace, trace)}); the last two columns: each mode's"
            " change from approximate at the same R, and (when the gap is at least a point)"
            " the share of approximate's gap to the unbounded reference it closes:",
            "",
            "| policy | R | approximate | precise | hybrid | unbounded (R=1) "
            "| precise closes | hybrid closes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for policy in dict.fromkeys(r.run.policy for r in rows):
            mine = [r for r in rows if r.run.policy == policy]
            ref = next((r for r in mine if r.run.cache_tokens is None), None)
            bounded = {(r.run.index, r.run.routers): r for r in mine if r.run.cache_tokens}
            for routers in dict.fromkeys(k[1] for k in bounded):
                cells = {m: bounded.get((m, routers)) for m in INDEX_MODES}
                hits = {m: c.hit_rate for m, c in cells.items() if c is not None}
                unb = ref.hit_rate if ref is not None else float("nan")
                a = hits.get("approximate")
                row = [policy, str(routers)]
                row += [_pct(hits[m]) if m in hits else "-" for m in INDEX_MODES]
                row.append(_pct(unb) if ref is not None else "-")
                for m in ("precise", "hybrid"):
                    if a is None or m not in hits or ref is None:
                        row.append("-")
                    else:
                        row.append(_closed(hits[m], a, unb))
                out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def splice(text: str, generated: str) -> str:
    """``text`` with its generated part replaced (``ValueError`` without the markers)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return f"{text[: start + len(BEGIN)]}\n{generated}{text[end:]}"


def build(
    traces: Sequence[str],
    settings: Settings,
    workload: Callable[[str], Workload] | None = None,
    titles: Mapping[str, str] | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = lambda s: None,
    policies: Sequence[str] = POLICIES,
    routers: Sequence[int] = ROUTERS,
) -> str:
    """Run the matrix over ``traces`` and render it (see :func:`run_all`)."""
    get = workload if workload is not None else (lambda name: _trace(name, settings.limit))
    pooled = {
        t: pooled_lru_hit_rate(get(t).requests, settings.workers * settings.cache_tokens)
        for t in traces
    }
    runs = matrix(traces, settings, policies, routers)
    results = run_all(runs, settings, workload, jobs, log)
    if titles is None:
        titles = {name: title for name, (_, _, title) in DEV_TRACES.items()}
    return render(results, settings, titles, pooled)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file (%(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the tables are stale")
    parser.add_argument("--limit", type=int, help="only the first N requests of each trace")
    parser.add_argument(
        "--traces",
        default=",".join(DEV_TRACES),
        help="comma-separated development traces (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-event-delay", type=float, default=0.0, help="seconds (default: %(default)s)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes (default: %(default)s)")
    args = parser.parse_args(argv)
    traces = [t for t in args.traces.split(",") if t]
    unknown = [t for t in traces if t not in DEV_TRACES]
    if unknown or not traces:
        parser.error(f"--traces: choose from {', '.join(DEV_TRACES)}")
    text = args.doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"{args.doc}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    settings = Settings(kv_event_delay_s=args.kv_event_delay, limit=args.limit)
    started = time.perf_counter()

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    try:
        new = splice(text, build(traces, settings, jobs=args.jobs, log=log))
    except ValueError as e:
        print(f"{args.doc}: {e}", file=sys.stderr)
        return 1
    log(f"{time.perf_counter() - started:.0f} s")
    if args.check:
        if new != text:
            print(f"stale: {args.doc} (run {COMMAND})", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.doc.write_text(new, encoding="utf-8")
    print(f"{args.doc}: {'changed' if new != text else 'unchanged'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
