"""examples/load.py and benchmarks/e2e/compare.py against real routers on loopback.

``load.py`` must need nothing from the router but the OpenAI API: the per-engine figures
come from the engines (their ``/stats``, or each answer's headers). The SGLang router cases
run only where ``sglang-router`` is installed (the ``e2e`` extra).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
else:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("aiohttp")
    pytest.importorskip("uvicorn")

from test_gateway_e2e import Engine, GatewayThread, _cache_aware, _load_example

ROOT = Path(__file__).resolve().parents[1]
load = _load_example("load")
FAST = ("--prefill-ms-per-token", "0.01", "--decode-ms-per-token", "1")


def _compare() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_cacheroute_e2e_compare", ROOT / "benchmarks" / "e2e" / "compare.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["shared", "multiturn"])
def test_load_reads_the_engines_not_the_gateway(tmp_path: Path, workload: str) -> None:
    engines = [Engine(f"engine-{i}", tmp_path, *FAST) for i in range(3)]
    gw: GatewayThread | None = None
    try:
        for e in engines:
            e.wait_ready()
        gw = GatewayThread([e.url for e in engines], _cache_aware(), read_timeout=10.0)
        gw.start()
        urls = [e.url for e in engines]
        report = asyncio.run(
            load.run_workload(gw.url, urls, workload=workload, requests=36, concurrency=4,
                              max_tokens=3, label="ours")
        )  # fmt: skip
        assert len(report.outcomes) == 36 and not report.errors, report.errors
        # Per-engine requests are the engines' own counts, and add up.
        assert report.engine_requests == [e.stats()["requests"] for e in engines]
        assert sum(report.engine_requests) == 36
        stats = [e.stats() for e in engines]
        assert report.hit_rate == pytest.approx(
            sum(s["cached_tokens"] for s in stats) / sum(s["prompt_tokens"] for s in stats)
        )
        assert report.hit_rate > 0.3  # shared prefixes and growing conversations hit
        assert all(o.ttft is not None and o.engine for o in report.outcomes)
        assert "ours: 36 requests" in report.line()

        # Without engine URLs, the answers' own headers give the hit rate.
        blind = asyncio.run(
            load.run_workload(gw.url, [], workload=workload, requests=12, concurrency=2,
                              max_tokens=3, seed=5)
        )  # fmt: skip
        assert blind.engine_requests == [] and blind.hit_rate is not None
        assert all(o.cached_tokens is not None for o in blind.outcomes)
    finally:
        if gw is not None:
            gw.stop()
        for e in engines:
            e.stop()


def test_load_counts_errors_it_sees(tmp_path: Path) -> None:
    engine = Engine("only", tmp_path, *FAST)
    gw: GatewayThread | None = None
    try:
        engine.wait_ready()
        gw = GatewayThread([engine.url], "round_robin", health_check_interval=0)
        gw.start()
        engine.stop()  # every request now fails with a 502/503 from the gateway
        report = asyncio.run(load.run_workload(gw.url, [engine.url], requests=4, concurrency=2))
        assert sum(report.errors.values()) == 4, report.errors
        assert all(k.startswith("HTTP 50") for k in report.errors), report.errors
        assert report.engine_requests == [None] and report.hit_rate is None
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


@pytest.mark.parametrize("kind", ["ours", "sglang"])
def test_compare_measures_a_router(tmp_path: Path, kind: str) -> None:
    compare = _compare()
    if kind == "sglang" and not compare.sglang_available():
        pytest.skip("sglang-router is not installed (pip install -e '.[e2e]')")
    row = compare.run_one(kind, "cache_aware", "cpu c=1", tmp_path, scale=0.2)
    assert (row.router, row.policy, row.requests, row.errors) == (kind, "cache_aware", 60, "0")
    assert float(row.cpu_ms) > 0 and row.hit != "-"
    assert sum(int(n) for n in row.per_engine.split(" / ")) == 60
    assert f"| {kind} | cache_aware | cpu c=1 | 60 |" in compare.table([row])
