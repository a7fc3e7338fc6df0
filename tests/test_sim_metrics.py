"""What decides tails: queueing delay at dispatch, TTFT SLO attainment and goodput,
requests larger than a whole engine cache; in the table and in the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cacheroute.cli import main
from cacheroute.sim import (
    DEFAULT_SLO_TTFT_S,
    EngineConfig,
    Request,
    Workload,
    chat,
    simulate,
    summarize,
)
from cacheroute.sim.engine import Engine
from cacheroute.sim.report import format_table

SMALL = ["--workload", "shared_prefix", "--limit", "64", "--workers", "2", "--progress", "off"]


def _req(n: int, out: int, t: float = 0.0, first_id: int = 0) -> Request:
    blocks = tuple(range(first_id, first_id + n))
    return Request(t, blocks, 10, 10 * n, 10 * n, out)


def test_queue_wait_is_the_time_from_arrival_to_admission_into_a_prefill() -> None:
    # One engine that runs one request at a time: the second waits for the first.
    w = Workload("two", [_req(2, 50), _req(2, 50, first_id=10)])
    cfg = EngineConfig(max_batch=1)
    res = simulate(w, "round_robin", workers=1, engine=cfg)
    assert res.admitted[0] == 0.0  # an idle engine admits at once
    assert res.admitted[1] == res.done[0]  # admitted when the first one left the batch
    for r, a, f in zip(w.requests, res.admitted, res.first_token, strict=True):
        assert r.arrival <= a < f
    s = summarize(res)
    assert s.queue_p50 == pytest.approx(res.done[0] / 2)
    assert s.queue_mean == pytest.approx(res.done[0] / 2)
    assert s.queue_p99 == pytest.approx(0.99 * res.done[0])


def test_engine_records_admission_times_in_the_list_it_is_given() -> None:
    reqs = [_req(1, 1), _req(1, 1, first_id=5)]
    first, hit, admitted = [0.0, 0.0], [0, 0], [-1.0, -1.0]
    eng = Engine(0, EngineConfig(max_prefill_tokens=10), reqs, first, hit, admitted)
    eng.enqueue(0, 0.0)
    eng.enqueue(1, 0.0)
    t = 0.0
    while eng.next_time is not None:
        t = eng.next_time
        eng.boundary(t)
    # Budget 10 tokens: request 0 alone in the first prefill, request 1 at its end.
    assert admitted == [0.0, first[0]] and first[1] > first[0]


def test_slo_attainment_and_goodput() -> None:
    w = chat(users=24, rounds=3, request_rate=60.0, seed=2)
    res = simulate(w, "round_robin", workers=2, engine=EngineConfig(max_batch=4))
    ttft = [f - r.arrival for f, r in zip(res.first_token, w.requests, strict=True)]
    slo = sorted(ttft)[len(ttft) // 2]  # about half meet it
    s = summarize(res, slo_ttft_s=slo)
    met = sum(t <= slo for t in ttft)
    assert 0 < met < len(ttft)
    assert s.slo_ttft_s == slo
    assert s.slo_met == met / len(ttft)
    assert s.goodput_rps == pytest.approx(met / s.makespan_s)
    assert summarize(res).slo_ttft_s == DEFAULT_SLO_TTFT_S == 2.0
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^slo_ttft_s must be a"):
            summarize(res, slo_ttft_s=bad)
    with pytest.raises(TypeError, match=r"^slo_ttft_s must be a real number, got True"):
        summarize(res, slo_ttft_s=True)


def test_oversized_counts_requests_larger_than_a_whole_engine_cache() -> None:
    cfg = EngineConfig(cache_tokens=100)
    reqs = [_req(5, 10), _req(12, 1, first_id=20), _req(9, 11, first_id=40), _req(9, 10, 60)]
    w = Workload("big", reqs)  # prompt + output: 60, 121, 101, 100
    res = simulate(w, "round_robin", workers=2, engine=cfg)
    expected = sum(r.input_tokens + r.output_tokens > 100 for r in w.requests)
    assert res.oversized == expected == 2
    assert summarize(res).oversized == 2


def test_table_and_json_show_the_tail_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.json"
    argv = ["--policies", "round_robin", "--slo-ttft", "0.5", "--json", str(out)]
    assert main(["simulate", *SMALL, "--cache-tokens", "2000", *argv]) == 0
    table = capsys.readouterr().out
    for row in (
        "queue wait p50 (s)",
        "queue wait p99 (s)",
        "queue wait mean (s)",
        "TTFT <= 0.5 s (SLO met)",
        "goodput (req/s, TTFT <= 0.5 s)",
        "requests > engine cache",
    ):
        assert row in table, row
    (result,) = json.loads(out.read_text())["results"]
    for key in ("queue_p50", "queue_p99", "queue_mean", "slo_met", "goodput_rps", "oversized"):
        assert key in result
    assert result["slo_ttft_s"] == 0.5
    assert result["oversized"] == 64  # every prompt is 2,176 tokens: all larger than 2,000
    assert json.loads(out.read_text())["config"]["slo_ttft_s"] == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_slo_ttft_option_is_validated(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", *SMALL, "--slo-ttft", value])
    assert info.value.code == 2
    assert "argument --slo-ttft" in capsys.readouterr().err


def test_format_table_labels_the_slo_of_each_summary() -> None:
    res = simulate(chat(users=4, rounds=2, seed=1), "round_robin", workers=2)
    text = format_table([summarize(res, slo_ttft_s=1.0), summarize(res, slo_ttft_s=3.0)])
    assert "TTFT SLO met (1 s; 3 s)" in text
