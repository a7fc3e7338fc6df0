"""cacheroute.metrics: the exposition text of small scenarios, read back with prometheus_client.

Needs the ``metrics`` extra (prometheus_client); skipped without it.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from cacheroute import BasicWorker, Decision, acquire, make_policy

if TYPE_CHECKING:
    import prometheus_client
else:
    prometheus_client = pytest.importorskip("prometheus_client")

from cacheroute.metrics import RouterMetrics


def samples(registry: prometheus_client.CollectorRegistry) -> str:
    """The exposition text without comments and ``_created`` timestamps (deterministic)."""
    text = prometheus_client.generate_latest(registry).decode()
    return "\n".join(
        line
        for line in text.splitlines()
        if line and not line.startswith("#") and "_created{" not in line
    )


def family(registry: prometheus_client.CollectorRegistry, prefix: str) -> list[str]:
    return [line for line in samples(registry).splitlines() if line.startswith(prefix)]


@pytest.fixture
def registry() -> prometheus_client.CollectorRegistry:
    return prometheus_client.CollectorRegistry()


def test_import_cacheroute_imports_no_optional_dependency() -> None:
    code = (
        "import sys, cacheroute, cacheroute.integrations; "
        "bad = [m for m in ('prometheus_client', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exposition_of_a_small_scenario(registry: prometheus_client.CollectorRegistry) -> None:
    metrics = RouterMetrics(registry, namespace="cr", policy="ca")
    policy = make_policy("cache_aware", on_decision=metrics.observe)
    a, b = BasicWorker("http://a", model_id="m"), BasicWorker("http://b", model_id="m")
    workers = [a, b]
    metrics.track_workers(workers)
    metrics.track_policy(policy, name="ca")

    system = list(range(100))  # token ids: 1 unit = 1 token, so the numbers below are exact
    with acquire(policy, workers, [*system, 1000, 1001]) as first:  # miss: least load -> a
        assert first.worker is a
        held = acquire(policy, workers, [*system, 2000, 2001])  # hit on a (100 of 102)
        assert held.worker is a
        held.first_token()
    miss = acquire(policy, workers, [7] * 40)  # miss: least load -> b
    assert miss.worker is b
    metrics.record_engine_usage("http://a", 102, 96)

    ratio = "".join(
        f'cr_match_ratio_bucket{{le="{le}",policy="ca"}} 2.0\n'
        for le in ("0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9")
    )
    expected = (
        'cr_decisions_total{policy="ca",reason="cache_miss",worker="http://a"} 1.0\n'
        'cr_decisions_total{policy="ca",reason="cache_miss",worker="http://b"} 1.0\n'
        'cr_decisions_total{policy="ca",reason="cache_hit",worker="http://a"} 1.0\n'
        f"{ratio}"
        'cr_match_ratio_bucket{le="1.0",policy="ca"} 3.0\n'
        'cr_match_ratio_bucket{le="+Inf",policy="ca"} 3.0\n'
        'cr_match_ratio_count{policy="ca"} 3.0\n'
        'cr_match_ratio_sum{policy="ca"} 0.9803921568627451\n'
        'cr_prompt_tokens_total{policy="ca",worker="http://a"} 204.0\n'
        'cr_prompt_tokens_total{policy="ca",worker="http://b"} 40.0\n'
        'cr_predicted_cached_tokens_total{policy="ca",worker="http://a"} 100.0\n'
        'cr_predicted_cached_tokens_total{policy="ca",worker="http://b"} 0.0\n'
        'cr_engine_prompt_tokens_total{worker="http://a"} 102.0\n'
        'cr_engine_cached_tokens_total{worker="http://a"} 96.0\n'
        # read at scrape time: `held` is decoding on a, `miss` is prefilling on b
        'cr_worker_load{model="m",worker="http://a"} 1.0\n'
        'cr_worker_load{model="m",worker="http://b"} 1.0\n'
        'cr_worker_pending_prefill_tokens{model="m",worker="http://a"} 0.0\n'
        'cr_worker_pending_prefill_tokens{model="m",worker="http://b"} 40.0\n'
        'cr_worker_decode_tokens{model="m",worker="http://a"} 102.0\n'
        'cr_worker_decode_tokens{model="m",worker="http://b"} 0.0\n'
        'cr_worker_healthy{model="m",worker="http://a"} 1.0\n'
        'cr_worker_healthy{model="m",worker="http://b"} 1.0\n'
        'cr_worker_processed_total{model="m",worker="http://a"} 2.0\n'
        'cr_worker_processed_total{model="m",worker="http://b"} 1.0\n'
        'cr_tree_size{kind="tokens",model="m",policy="ca"} 144.0\n'
        'cr_tree_worker_size{kind="tokens",model="m",policy="ca",worker="http://a"} 104.0\n'
        'cr_tree_worker_size{kind="tokens",model="m",policy="ca",worker="http://b"} 40.0'
    )
    assert samples(registry) == expected

    held.release()
    miss.release()
    b.set_healthy(False)
    assert family(registry, "cr_worker_load") == [
        'cr_worker_load{model="m",worker="http://a"} 0.0',
        'cr_worker_load{model="m",worker="http://b"} 0.0',
    ]
    assert 'cr_worker_healthy{model="m",worker="http://b"} 0.0' in samples(registry)
    text = prometheus_client.generate_latest(registry).decode()
    for name, kind in [
        ("cr_decisions_total", "counter"),
        ("cr_match_ratio", "histogram"),
        ("cr_worker_load", "gauge"),
        ("cr_worker_processed_total", "counter"),
        ("cr_tree_size", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text


def test_default_registry_and_one_metrics_per_registry(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    RouterMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RouterMetrics(registry)
    assert RouterMetrics(prometheus_client.CollectorRegistry(), namespace="gw").namespace == "gw"


def test_observers_per_policy_label_are_cached(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    metrics = RouterMetrics(registry)  # its own observer: policy="default"
    obs = metrics.observer("prefill")
    assert metrics.observer("prefill") is obs
    obs(Decision(0, "http://p", "cache_hit", 10, 5, 3, 1))
    obs(Decision(0, "http://p", "cache_hit", 10, 5, 3, 1))
    metrics.observe(Decision(1, "http://q", "policy"))  # no text: no ratio, no tokens
    assert family(registry, "cacheroute_decisions_total") == [
        'cacheroute_decisions_total{policy="default",reason="policy",worker="http://q"} 1.0',
        'cacheroute_decisions_total{policy="prefill",reason="cache_hit",worker="http://p"} 2.0',
    ]
    assert family(registry, "cacheroute_match_ratio_count") == [
        'cacheroute_match_ratio_count{policy="default"} 0.0',
        'cacheroute_match_ratio_count{policy="prefill"} 2.0',
    ]
    assert family(registry, 'cacheroute_match_ratio_bucket{le="0.5"') == [
        'cacheroute_match_ratio_bucket{le="0.5",policy="default"} 0.0',
        'cacheroute_match_ratio_bucket{le="0.5",policy="prefill"} 2.0',  # 5/10 <= 0.5
    ]
    assert family(registry, "cacheroute_predicted_cached_tokens_total") == [
        'cacheroute_predicted_cached_tokens_total{policy="default",worker="http://q"} 0.0',
        'cacheroute_predicted_cached_tokens_total{policy="prefill",worker="http://p"} 2.0',
    ]
    # one row per (reason, worker), built on the first decision and reused after
    rows = obs._rows  # type: ignore[attr-defined]
    assert list(rows) == ["cache_hit"] and rows["cache_hit"] == {"http://p": [2, 6, 2]}

    metrics.forget_worker("http://p")
    assert family(registry, "cacheroute_decisions_total") == [
        'cacheroute_decisions_total{policy="default",reason="policy",worker="http://q"} 1.0'
    ]
    assert family(registry, "cacheroute_prompt_tokens_total") == [
        'cacheroute_prompt_tokens_total{policy="default",worker="http://q"} 0.0'
    ]
    obs(Decision(0, "http://p", "cache_hit", 10, 5, 3, 1))  # comes back from zero
    assert family(registry, 'cacheroute_decisions_total{policy="prefill"') == [
        'cacheroute_decisions_total{policy="prefill",reason="cache_hit",worker="http://p"} 1.0'
    ]


def test_policies_without_trees_and_with_duplicate_labels(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    metrics = RouterMetrics(registry)
    assert metrics.track_policy(make_policy("round_robin")) == "round_robin"
    assert metrics.track_policy(make_policy("cache_aware"), name="prefill") == "prefill"
    with pytest.raises(ValueError, match="already tracked"):
        metrics.track_policy(make_policy("cache_aware"), name="prefill")
    with pytest.raises(TypeError, match="LoadBalancingPolicy"):
        metrics.track_policy(object())  # type: ignore[arg-type]
    assert metrics.tracked_policy_labels() == ["round_robin", "prefill"]
    assert family(registry, "cacheroute_tree") == []  # no request yet: no tree


class StubIndex:
    """Stands in for the KV-event index: any object with stats() -> dict."""

    def __init__(self) -> None:
        self.value: Any = {
            "events_applied_total": 120,
            "gaps_total": 1,
            "subscribed": True,
            "lag_seconds": {"http://w1:8000": 0.02, "http://w2:8000": 0.5},
            "last_seq": {"http://w1:8000": 41, "http://w2:8000": None},
            "mode": "precise",  # not a number: skipped
            "bad-name.x": 3,
        }

    def stats(self) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_index_collector_exports_any_stats_object(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    metrics = RouterMetrics(registry)
    index = StubIndex()
    metrics.track_index(index)
    assert family(registry, "cacheroute_index") == [
        'cacheroute_index_events_applied_total{index="kv_events"} 120.0',
        'cacheroute_index_gaps_total{index="kv_events"} 1.0',
        'cacheroute_index_subscribed{index="kv_events"} 1.0',
        'cacheroute_index_lag_seconds{index="kv_events",worker="http://w1:8000"} 0.02',
        'cacheroute_index_lag_seconds{index="kv_events",worker="http://w2:8000"} 0.5',
        'cacheroute_index_last_seq{index="kv_events",worker="http://w1:8000"} 41.0',
        'cacheroute_index_bad_name_x{index="kv_events"} 3.0',
    ]
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE cacheroute_index_gaps_total counter" in text
    assert "# TYPE cacheroute_index_lag_seconds gauge" in text

    index.value = {"gaps_total": 2}
    assert family(registry, "cacheroute_index") == [
        'cacheroute_index_gaps_total{index="kv_events"} 2.0'
    ]
    with pytest.raises(ValueError, match="already tracked"):
        metrics.track_index(StubIndex())
    with pytest.raises(TypeError, match="stats"):
        metrics.track_index(object(), name="other")


def test_kv_event_index_stats_are_exported_one_metric_per_counter(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    """KVEventIndex.stats() is {url: WorkerStats}: one metric per counter, a worker label."""
    pytest.importorskip("msgpack")
    from cacheroute.events import BlockRemoved, BlockStored, KVEventIndex, encode_batch

    now = [100.0]
    index = KVEventIndex(block_size=4, stale_after=30.0, clock=lambda: now[0])
    w1, w2 = "http://w1:8000", "http://w2:8000"
    # w1: 2 blocks stored (seq 0), then one removed at seq 2: seq 1 was lost (a gap).
    assert index.apply(w1, 0, encode_batch([BlockStored([11, 12], None, list(range(8)), 4)]))
    assert index.apply(w1, 2, encode_batch([BlockRemoved([12])]))
    # w2: one block, the same batch twice (a duplicate), then a message that is not a batch.
    stored = encode_batch([BlockStored([21], None, [1, 2, 3, 4], 4)])
    assert index.apply(w2, 0, stored)
    assert not index.apply(w2, 0, stored)
    now[0] = 140.0  # w1 heard at 100, w2 at 140
    assert not index.apply(w2, 1, b"not msgpack")
    metrics = RouterMetrics(registry)
    metrics.track_index(index)

    def rows(counter: str) -> list[str]:
        return family(registry, f"cacheroute_index_{counter}{{")

    def row(counter: str, value: float) -> list[str]:
        return [f'cacheroute_index_{counter}{{index="kv_events",worker="{w}"}} {value}'
                for w in (w1, w2)]  # fmt: skip

    for counter, v1, v2 in [
        ("batches_total", 2.0, 1.0),
        ("events_total", 2.0, 1.0),
        ("blocks_stored_total", 2.0, 1.0),
        ("blocks_removed_total", 1.0, 0.0),
        ("gaps_total", 1.0, 0.0),
        ("lost_batches_total", 1.0, 0.0),
        ("duplicates_total", 0.0, 1.0),
        ("bad_messages_total", 0.0, 1.0),
        ("blocks", 1.0, 1.0),
        ("last_seq", 2.0, 1.0),
        ("stale", 1.0, 0.0),  # w1 silent for 40 s > stale_after
        ("seconds_since_heard", 40.0, 0.0),
    ]:
        assert rows(counter) == [
            f'cacheroute_index_{counter}{{index="kv_events",worker="{w1}"}} {v1}',
            f'cacheroute_index_{counter}{{index="kv_events",worker="{w2}"}} {v2}',
        ], counter
    assert rows("resets_total") == row("resets_total", 0.0)
    assert rows("connected") == []  # None: fed by apply(), not subscribed
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE cacheroute_index_batches_total counter" in text
    assert "# TYPE cacheroute_index_gaps_total counter" in text
    assert "# TYPE cacheroute_index_blocks gauge" in text
    assert "# TYPE cacheroute_index_stale gauge" in text
    # Every counter of WorkerStats is exported, none twice.
    names = {line.split("{")[0] for line in family(registry, "cacheroute_index_")}
    assert len(names) == 19 + 4  # 19 counters; blocks, last_seq, stale, seconds_since_heard
    with pytest.raises(TypeError, match="row_gauges"):
        metrics.track_index(index, name="other", row_gauges="blocks")
    index.close()


def test_a_failing_source_is_skipped_not_the_scrape(
    registry: prometheus_client.CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = RouterMetrics(registry)
    index = StubIndex()
    index.value = RuntimeError("subscriber crashed")
    metrics.track_index(index)
    metrics.track_index(type("NotAMapping", (), {"stats": lambda self: [1, 2]})(), name="x")

    def broken() -> list[BasicWorker]:
        raise RuntimeError("discovery down")

    metrics.track_workers(broken)
    metrics.track_workers(lambda: [BasicWorker("http://ok")])
    metrics.track_workers([BasicWorker("http://ok"), BasicWorker("http://other")])  # dup url
    with caplog.at_level("ERROR", logger="cacheroute.metrics"):
        assert family(registry, "cacheroute_worker_load") == [
            'cacheroute_worker_load{model="default",worker="http://ok"} 0.0',
            'cacheroute_worker_load{model="default",worker="http://other"} 0.0',
        ]
        assert family(registry, "cacheroute_index") == []
    assert "discovery down" in caplog.text and "subscriber crashed" in caplog.text
    with pytest.raises(TypeError, match="workers"):
        metrics.track_workers(42)  # type: ignore[arg-type]


def test_workers_without_work_accounting_read_zero_work(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    class Plain:
        url, model_id = "http://plain", "m"

        def load(self) -> int:
            return 3

        def is_healthy(self) -> bool:
            return True

        def processed(self) -> int:
            return 9

    metrics = RouterMetrics(registry)
    metrics.track_workers(lambda: [Plain()])  # type: ignore[list-item, return-value]
    text = samples(registry)
    assert 'cacheroute_worker_load{model="m",worker="http://plain"} 3.0' in text
    assert 'cacheroute_worker_pending_prefill_tokens{model="m",worker="http://plain"} 0.0' in text
    assert 'cacheroute_worker_processed_total{model="m",worker="http://plain"} 9.0' in text


def test_bad_arguments(registry: prometheus_client.CollectorRegistry) -> None:
    with pytest.raises(TypeError, match="namespace"):
        RouterMetrics(registry, namespace=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy"):
        RouterMetrics(registry, policy="")


def test_a_namespace_that_is_not_a_metric_name_is_refused(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    # prometheus_client >= 0.22 accepts any UTF-8 name and escapes it in the text format,
    # so "cache-route" would be exported as cache_route_*, silently; and a second
    # RouterMetrics(namespace="cache_route") on the same registry is not refused, though
    # both export the very same names.
    with pytest.raises(ValueError, match="namespace"):
        RouterMetrics(registry, namespace="cache-route")
    with pytest.raises(ValueError, match="namespace"):
        RouterMetrics(prometheus_client.CollectorRegistry(), namespace="1st")
    RouterMetrics(registry, namespace="cache_route")  # the valid one still registers


def test_a_decision_with_bad_counts_is_refused_and_counts_nothing(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    metrics = RouterMetrics(registry)
    metrics.observe(Decision(0, "http://a", "cache_hit", 10, 5, 3, 1))
    before = samples(registry)
    with pytest.raises(TypeError, match="prompt_tokens"):
        metrics.observe(Decision(0, "http://a", "cache_hit", 10, 5, None, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_tokens"):
        metrics.observe(Decision(0, "http://a", "cache_hit", 10, 5, -3, 0))
    assert samples(registry) == before  # no decision counted, no counter gone down
