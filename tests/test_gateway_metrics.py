"""``GET /metrics`` of the real gateway after a few real requests: the exposition text.

Fake engines publish KV events (real processes, real ZMQ on loopback); the gateway routes
with ``--tokenizer fake`` in precise mode, so every number below is exact: token ids, whole
blocks, what the policy predicted and what the engine reported.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
else:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("prometheus_client")

from test_gateway_e2e import GatewayThread, _wait_until
from test_gateway_events import PreciseGateway, Publisher, _ids, _prompt, fake_engine, started
from test_gateway_faults import ScriptedEngine, _chunk, _sse_head, scripted

__all__ = ["scripted", "started"]  # fixtures used here


def _samples(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_metrics_after_a_few_requests(tmp_path: Path, started: list[Any]) -> None:
    engines = [Publisher(f"engine-{i}", tmp_path) for i in range(2)]
    started.extend(engines)
    gw = PreciseGateway(engines)
    started.append(gw)
    a, b = (e.url for e in engines)
    p = _prompt("P", 6)  # 96 tokens, 6 whole blocks
    messages = [{"role": "system", "content": _prompt("S", 3)},
                {"role": "user", "content": "why is the sky blue?"}]  # fmt: skip
    chat = _ids(fake_engine.chat_prompt(messages))
    n = len(chat)

    assert gw.post(p).headers["x-cacheroute-worker"] == a  # a miss: ties go to engine 0
    _wait_until(lambda: gw.holds(a, p) == 96, 10.0, "engine 0's BlockStored for P")
    body = {"prompt": p, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10.0) as r:
        assert r.headers["x-cacheroute-worker"] == a  # a hit on engine 0's report
        assert r.read().endswith(b"data: [DONE]\n\n")
    r = httpx.post(gw.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                   timeout=10.0)  # fmt: skip
    assert r.headers["x-cacheroute-worker"] == b  # a miss: least load, smallest tree share
    _wait_until(lambda: gw.stat(b).batches == 1, 10.0, "engine 1's BlockStored for the chat")
    _wait_until(lambda: gw.loads() == [0, 0], 10.0, "every lease released")

    r = httpx.get(gw.url + "/metrics", timeout=5.0)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    text = r.text
    ns = 'policy="cache_aware"'
    assert sorted(_samples(text, "cacheroute_decisions_total")) == sorted([
        f'cacheroute_decisions_total{{{ns},reason="cache_miss",worker="{a}"}} 1.0',
        f'cacheroute_decisions_total{{{ns},reason="cache_hit",worker="{a}"}} 1.0',
        f'cacheroute_decisions_total{{{ns},reason="cache_miss",worker="{b}"}} 1.0',
    ])  # fmt: skip
    assert _samples(text, "cacheroute_match_ratio_count") == [
        f"cacheroute_match_ratio_count{{{ns}}} 3.0"
    ]
    assert _samples(text, "cacheroute_match_ratio_sum") == [
        f"cacheroute_match_ratio_sum{{{ns}}} 1.0"
    ]
    assert f'cacheroute_match_ratio_bucket{{le="0.0",{ns}}} 2.0' in text
    # Predicted (the policy, at routing time) against reported (the engines' answers).
    assert _samples(text, "cacheroute_prompt_tokens_total") == [
        f'cacheroute_prompt_tokens_total{{{ns},worker="{a}"}} 192.0',
        f'cacheroute_prompt_tokens_total{{{ns},worker="{b}"}} {float(n)}',
    ]
    assert _samples(text, "cacheroute_predicted_cached_tokens_total") == [
        f'cacheroute_predicted_cached_tokens_total{{{ns},worker="{a}"}} 96.0',
        f'cacheroute_predicted_cached_tokens_total{{{ns},worker="{b}"}} 0.0',
    ]
    assert _samples(text, "cacheroute_engine_prompt_tokens_total") == [
        f'cacheroute_engine_prompt_tokens_total{{worker="{a}"}} 192.0',
        f'cacheroute_engine_prompt_tokens_total{{worker="{b}"}} {float(n)}',
    ]
    assert _samples(text, "cacheroute_engine_cached_tokens_total") == [
        f'cacheroute_engine_cached_tokens_total{{worker="{a}"}} 96.0',
        f'cacheroute_engine_cached_tokens_total{{worker="{b}"}} 0.0',
    ]
    # Worker gauges, read at scrape time.
    m = 'model="default"'
    for worker, processed in ((a, 2), (b, 1)):
        assert f'cacheroute_worker_load{{{m},worker="{worker}"}} 0.0' in text
        assert f'cacheroute_worker_pending_prefill_tokens{{{m},worker="{worker}"}} 0.0' in text
        assert f'cacheroute_worker_decode_tokens{{{m},worker="{worker}"}} 0.0' in text
        assert f'cacheroute_worker_healthy{{{m},worker="{worker}"}} 1.0' in text
        assert f'cacheroute_worker_processed_total{{{m},worker="{worker}"}} {processed}.0' in text
    # The routed history's tree (token ids: one unit a token).
    tree = f'kind="tokens",{m},{ns}'
    assert _samples(text, "cacheroute_tree_size") == [f"cacheroute_tree_size{{{tree}}} {96.0 + n}"]
    assert sorted(_samples(text, "cacheroute_tree_worker_size")) == sorted([
        f'cacheroute_tree_worker_size{{{tree},worker="{a}"}} 96.0',
        f'cacheroute_tree_worker_size{{{tree},worker="{b}"}} {float(n)}',
    ])  # fmt: skip
    # The KV-event index, per engine: one batch each (P's second request stored nothing new).
    ix = 'index="kv_events"'
    for key, va, vb in [
        ("batches_total", 1, 1),
        ("blocks_stored_total", 6, n // 16),
        ("blocks", 6, n // 16),
        ("last_seq", 0, 0),
        ("gaps_total", 0, 0),
        ("resets_total", 0, 0),
        ("connected", 1, 1),
        ("stale", 0, 0),
    ]:
        assert _samples(text, f"cacheroute_index_{key}{{") == [
            f'cacheroute_index_{key}{{{ix},worker="{a}"}} {float(va)}',
            f'cacheroute_index_{key}{{{ix},worker="{b}"}} {float(vb)}',
        ], key
    assert "# TYPE cacheroute_index_batches_total counter" in text
    assert "# TYPE cacheroute_index_blocks gauge" in text
    # /stats says the same about the index.
    stats = httpx.get(gw.url + "/stats", timeout=5.0).json()
    assert stats["kv_events"][a]["batches"] == 1 and stats["tokenizer"] == "fake"


def _usage_in_body(conn: socket.socket, request: bytes) -> None:
    """An engine that reports usage only in its answers (no x-*-tokens headers): vLLM-like."""
    usage = {"prompt_tokens": 40, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 32}}  # fmt: skip
    if not re.search(rb'"stream": ?true', request):
        body = json.dumps({"choices": [{"index": 0, "text": "ok"}], "usage": usage}).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        return
    _sse_head(conn)
    for event in ({"choices": [{"index": 0, "text": "o"}], "usage": None},
                  {"choices": [{"index": 0, "text": "k"}], "usage": None},
                  {"choices": [], "usage": {**usage, "prompt_tokens": 50}}):  # fmt: skip
        conn.sendall(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
    conn.sendall(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def test_engine_usage_is_read_from_the_answer(
    scripted: Callable[..., ScriptedEngine], tmp_path: Path
) -> None:
    engine = scripted(_usage_in_body)
    gw = GatewayThread([engine.url], "round_robin", read_timeout=5.0)
    gw.start()
    try:
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "hi"}, timeout=10.0)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 40
        with httpx.stream("POST", gw.url + "/v1/completions",
                          json={"prompt": "hi", "stream": True}, timeout=10.0) as s:  # fmt: skip
            assert s.read().endswith(b"data: [DONE]\n\n")
        _wait_until(lambda: gw.loads() == [0], 10.0, "leases released")
        text = httpx.get(gw.url + "/metrics", timeout=5.0).text
    finally:
        gw.stop()
    assert _samples(text, "cacheroute_engine_prompt_tokens_total") == [
        f'cacheroute_engine_prompt_tokens_total{{worker="{engine.url}"}} 90.0'
    ]
    assert _samples(text, "cacheroute_engine_cached_tokens_total") == [
        f'cacheroute_engine_cached_tokens_total{{worker="{engine.url}"}} 64.0'
    ]
    # round_robin has no on_decision: the gateway observes each lease's decision itself.
    assert _samples(text, "cacheroute_decisions_total") == [
        f'cacheroute_decisions_total{{policy="round_robin",reason="policy",worker="{engine.url}"}}'
        " 2.0"
    ]
    assert _samples(text, "cacheroute_tree_size") == []  # round_robin keeps no tree


def test_engine_usage_is_recorded_when_the_client_leaves_mid_stream(
    tmp_path: Path, started: list[Any]
) -> None:
    # 500 ms a token: the client is gone long before the stream ends.
    engine = Publisher("engine-0", tmp_path, "--decode-ms-per-token", "500")
    started.append(engine)
    gw = PreciseGateway([engine])
    started.append(gw)
    prompt = _prompt("P", 3)
    body = {"prompt": prompt, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10.0) as r:
        assert r.headers["x-prompt-tokens"] == "48"
        next(line for line in r.iter_lines() if line.startswith("data: "))
    _wait_until(lambda: gw.loads() == [0], 10.0, "the lease released")
    assert gw.gateway.stats()["requests"]["client_disconnects"] == 1
    text = httpx.get(gw.url + "/metrics", timeout=5.0).text
    # The engine prefilled 48 tokens, none cached, whatever the client did afterwards.
    assert _samples(text, "cacheroute_engine_prompt_tokens_total") == [
        f'cacheroute_engine_prompt_tokens_total{{worker="{engine.url}"}} 48.0'
    ]
    assert _samples(text, "cacheroute_engine_cached_tokens_total") == [
        f'cacheroute_engine_cached_tokens_total{{worker="{engine.url}"}} 0.0'
    ]
