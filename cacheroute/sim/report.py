"""Reports of a comparison: the side-by-side table, the JSON document and the plot."""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from cacheroute._validation import check_sequence, check_str, fail
from cacheroute.sim.metrics import Summary
from cacheroute.sim.simulator import RunResult
from cacheroute.sim.traces import _check_path

__all__ = ["format_table", "plot_results", "require_matplotlib", "to_json", "write_json"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _secs(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _rate(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:,.0f}"


# (label, format); "{slo}" in a label becomes the summaries' TTFT objective.
_ROWS: list[tuple[str, Callable[[Summary], str]]] = [
    ("cache hit rate (tokens)", lambda s: _pct(s.hit_rate)),
    ("ideal hit rate (1 cache)", lambda s: _pct(s.ideal_hit_rate)),
    ("TTFT p50 (s)", lambda s: _secs(s.ttft_p50)),
    ("TTFT p90 (s)", lambda s: _secs(s.ttft_p90)),
    ("TTFT p99 (s)", lambda s: _secs(s.ttft_p99)),
    ("queue wait p50 (s)", lambda s: _secs(s.queue_p50)),
    ("queue wait p99 (s)", lambda s: _secs(s.queue_p99)),
    ("queue wait mean (s)", lambda s: _secs(s.queue_mean)),
    ("TTFT <= {slo} (SLO met)", lambda s: _pct(None if math.isnan(s.slo_met) else s.slo_met)),
    ("E2E p50 (s)", lambda s: _secs(s.e2e_p50)),
    ("E2E p99 (s)", lambda s: _secs(s.e2e_p99)),
    ("goodput (req/s, TTFT <= {slo})", lambda s: _rate(s.goodput_rps)),
    ("throughput (out tok/s)", lambda s: f"{s.output_throughput:,.0f}"),
    ("throughput (all tok/s)", lambda s: f"{s.total_throughput:,.0f}"),
    ("request share max/mean", lambda s: f"{s.share_max_over_mean:.2f}"),
    ("load-balancing decisions", lambda s: _pct(s.lb_fraction)),
    ("requests > engine cache", lambda s: f"{s.oversized:,}"),
    ("sim wall time (s)", lambda s: f"{s.wall_s:.1f}"),
]


def _label(label: str, summaries: Sequence[Summary]) -> str:
    """``label`` with its ``{slo}`` filled in: the one objective of every summary, or, when
    they differ, a label listing them (each column then has its own)."""
    if "{slo}" not in label:
        return label
    slos = sorted({s.slo_ttft_s for s in summaries})
    if len(slos) == 1:
        return label.format(slo=f"{slos[0]:g} s")
    listed = "; ".join(f"{x:g} s" for x in slos)
    return f"TTFT SLO met ({listed})" if "SLO met" in label else f"goodput (req/s; {listed})"


def _check_summary(param: str, value: object) -> None:
    if not isinstance(value, Summary):
        raise fail(param, "a Summary", value, TypeError)


def _check_run_result(param: str, value: object) -> None:
    if not isinstance(value, RunResult):
        raise fail(param, "a RunResult", value, TypeError)


def format_table(summaries: Sequence[Summary], title: str = "") -> str:
    """The policies side by side: one column per policy, one row per metric.

    Raises:
        TypeError: ``summaries`` is not a list or tuple of :class:`Summary`, or ``title``
            not a ``str``.
    """
    check_sequence("summaries", summaries, item=_check_summary)
    check_str("title", title, empty_ok=True)
    header = ["", *(s.policy for s in summaries)]
    rows = [[_label(label, summaries), *(fmt(s) for s in summaries)] for label, fmt in _ROWS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [title] if title else []
    out.append(line(header))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def to_json(summaries: Sequence[Summary], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: ``{"config": ..., "results": [summary, ...]}``.

    Raises:
        TypeError: ``summaries`` is not a list or tuple of :class:`Summary`, or ``config``
            not a ``dict``.
    """
    check_sequence("summaries", summaries, item=_check_summary)
    if not isinstance(config, dict):
        raise fail("config", "a dict", config, TypeError)
    return {"config": config, "results": [s.to_dict() for s in summaries]}


def write_json(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` (NaN written as ``null``).

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike`` (an ``int`` would be
            written to, and closed, as a file descriptor), or ``doc`` not a ``dict``.
    """
    _check_path(path)
    if not isinstance(doc, dict):
        raise fail("doc", "a dict", doc, TypeError)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(doc), f, indent=2)
        f.write("\n")


def require_matplotlib() -> Any:
    """Import matplotlib (the ``plot`` extra) with the Agg backend, or raise a clear error.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib (the 'plot' extra), which is not installed: "
            "pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    return matplotlib


def plot_results(path: str | os.PathLike[str], results: Sequence[RunResult], title: str) -> None:
    """Draw TTFT distributions per policy and per-worker load over time; save to ``path``.

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike``, ``results`` is not a list
            or tuple of :class:`~cacheroute.sim.simulator.RunResult`, or ``title`` is not a
            ``str``.
        ValueError: ``results`` is empty.
        RuntimeError: matplotlib is not installed.
    """
    _check_path(path)
    if not check_sequence("results", results, item=_check_run_result):
        raise fail("results", "at least one RunResult", results)
    check_str("title", title, empty_ok=True)
    require_matplotlib()
    plt: Any = importlib.import_module("matplotlib.pyplot")

    n = len(results)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = plt.figure(figsize=(5 * cols, 4 + 3 * rows), layout="constrained")
    grid = fig.add_gridspec(rows + 1, cols)
    ax = fig.add_subplot(grid[0, :])
    for res in results:
        reqs = res.workload.requests
        ttft = sorted(max(f - r.arrival, 1e-6) for f, r in zip(res.first_token, reqs, strict=True))
        ys = [(k + 1) / len(ttft) for k in range(len(ttft))]
        ax.plot(ttft, ys, label=res.policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT distribution: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    for k, res in enumerate(results):
        sub = fig.add_subplot(grid[1 + k // cols, k % cols])
        if res.timeline:
            times = [t for t, _ in res.timeline]
            for w in range(res.workers):
                sub.plot(times, [loads[w] for _, loads in res.timeline], linewidth=0.7)
        sub.set_title(f"{res.policy}: load per worker", fontsize="small")
        sub.set_xlabel("time (s)")
        sub.set_ylabel("requests in flight")
    fig.savefig(path, dpi=110)
    plt.close(fig)
