"""Behaviours where the example gateway is ahead of the real SGLang router (0.3.2).

Each test drives the real gateway (uvicorn on loopback) in front of real fake engines.
``benchmarks/e2e/compare.py`` shows the same behaviours side by side with the SGLang
router: it keeps a recovered engine out for its 60 s circuit-breaker timeout, cuts a
stream silently when its engine dies, and rewrites request bodies (``max_tokens`` becomes
``max_completion_tokens``, unknown fields are dropped).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
    import uvicorn
else:
    httpx = pytest.importorskip("httpx")
    uvicorn = pytest.importorskip("uvicorn")

from test_gateway_e2e import (
    Engine,
    GatewayThread,
    _await_until,
    _cache_aware,
    _listen,
    _load_example,
    _run,
    _wait_until,
)
from test_gateway_faults import _sse_events

fake_engine = _load_example("fake_engine")


def test_recovered_engine_is_routed_to_again_within_seconds(tmp_path: Path) -> None:
    """With the gateway's default health settings, a restarted engine serves within ~5 s."""
    engines = [Engine(f"engine-{i}", tmp_path) for i in range(2)]
    gw: GatewayThread | None = None
    try:
        for e in engines:
            e.wait_ready()
        gw = GatewayThread([e.url for e in engines], _cache_aware())  # default health settings
        gw.start()
        workers = gw.gateway.workers
        engines[1].stop()
        # Requests keep being served (the refused one is retried on the other engine),
        # and the dead engine is marked down on the first refused connection.
        for i in range(4):
            r = httpx.post(gw.url + "/v1/completions", json={"prompt": f"{i} down " * 40},
                           timeout=10.0)  # fmt: skip
            assert r.status_code == 200 and r.headers["x-cacheroute-worker"] == engines[0].url
        assert not workers[1].is_healthy()

        engines[1] = Engine("engine-1-again", tmp_path, port=engines[1].port)
        engines[1].wait_ready()
        back_at = time.monotonic()
        served_by: list[str] = []
        while time.monotonic() - back_at < 8.0:
            # New prefixes: cache_aware sends misses to the least busy engine.
            prompt = f"{len(served_by)} new " * 40
            r = httpx.post(gw.url + "/v1/completions", json={"prompt": prompt}, timeout=10.0)
            assert r.status_code == 200, r.text
            served_by.append(r.headers["x-cacheroute-worker"])
            if served_by[-1] == engines[1].url:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - back_at
        assert served_by[-1] == engines[1].url, f"not routed to again after {elapsed:.1f} s"
        assert elapsed < 7.0  # one health-check interval (5 s) plus slack; SGLang: 60 s
    finally:
        if gw is not None:
            gw.stop()
        for e in engines:
            e.stop()


def test_stream_cut_by_engine_death_ends_with_a_readable_error_event(tmp_path: Path) -> None:
    engine = Engine("doomed", tmp_path, "--decode-ms-per-token", "100")
    gw: GatewayThread | None = None
    try:
        engine.wait_ready()
        gw = GatewayThread([engine.url], "round_robin", read_timeout=10.0)
        gw.start()

        async def scenario() -> tuple[int, bytes]:
            async with httpx.AsyncClient(timeout=15.0) as client:
                body = {"messages": [{"role": "user", "content": "tell me"}], "stream": True}
                async with client.stream("POST", gw.url + "/v1/chat/completions",
                                         json=body) as r:  # fmt: skip
                    chunks, killed = [], False
                    async for chunk in r.aiter_raw():
                        chunks.append(chunk)
                        if not killed and b"".join(chunks).count(b"\n\n") >= 3:
                            killed = True  # three tokens in: the engine crashes
                            await asyncio.to_thread(engine.stop)
                    return r.status_code, b"".join(chunks)

        status, raw = _run(scenario(), 30.0)
        assert status == 200
        events = _sse_events(raw)  # every event well-formed, the last one terminated
        assert "[DONE]" not in events
        assert all("choices" in json.loads(e) for e in events[:-1]), events
        assert len(events) >= 4, events
        error = json.loads(events[-1])["error"]
        assert error["type"] == "upstream_error" and error["code"] == 502, error
        assert "mid-stream" in error["message"], error
        _wait_until(lambda: gw.loads() == [0], 10.0, "load back to 0")
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


class RecordingEngine:
    """``fake_engine.py``'s app in a uvicorn thread, recording every POST body it receives."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        app = fake_engine.create_app(fake_engine.EngineConfig(name="recorder"))

        async def recording(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                return await app(scope, receive, send)
            chunks: list[bytes] = []

            async def receive_and_record() -> Any:
                message = await receive()
                if message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        self.bodies.append(b"".join(chunks))
                        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
                return message

            await app(scope, receive_and_record, send)

        self._sock = _listen()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(recording, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self.thread.start()
        _wait_until(lambda: self.server.started, 30.0, "the recording engine")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self._sock.close()


# Odd spacing, key order, escapes, duplicate keys, unknown fields: all must arrive as sent.
_BODIES = [
    ("/v1/chat/completions",
     b'{"max_tokens":3,  "model":"fake-model","messages":[{"role":"user","content":'
     b'"caf\\u00e9 \\"quoted\\" \xc3\xa9"}],\n "stream":true, "vendor_knob": {"a": [1, 2.50]},'
     b' "max_tokens": 4}'),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],'
     b' "max_tokens": 2, "stream": false, "logprobs": null, "x-unknown": 1e3}'),
    ("/v1/completions",
     b'{ "prompt" : [1, 2, 4294967295], "max_tokens" : 2 , "stream" : true }'),
    ("/v1/completions", b'{"prompt": "plain", "max_tokens": 2, "seed": 7, "extra": [true]}'),
]  # fmt: skip


def test_request_bodies_reach_the_engine_byte_for_byte() -> None:
    engine = RecordingEngine()
    gw: GatewayThread | None = None
    try:
        gw = GatewayThread([engine.url], _cache_aware(), read_timeout=10.0)
        gw.start()

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=15.0) as client:
                for path, raw in _BODIES:
                    r = await client.post(gw.url + path, content=raw,
                                          headers={"content-type": "application/json",
                                                   "x-trace": "t-1"})  # fmt: skip
                    assert r.status_code == 200, r.text
                await _await_until(lambda: len(engine.bodies) == len(_BODIES), 5.0, "bodies")

        _run(scenario(), 30.0)
        assert engine.bodies == [raw for _, raw in _BODIES]
        for headers, body in zip(engine.headers, engine.bodies, strict=True):
            assert headers["content-type"] == "application/json"
            assert headers["content-length"] == str(len(body))
            assert headers["x-trace"] == "t-1"  # end-to-end headers are forwarded too
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


def test_fake_engine_advertises_no_model_path() -> None:
    """The SGLang router fetches a tokenizer when an engine names a model path: ours names none."""
    engine = RecordingEngine()
    try:
        for path in ("/get_model_info", "/model_info", "/get_server_info", "/server_info"):
            assert httpx.get(engine.url + path, timeout=5.0).status_code == 404, path
        models = httpx.get(engine.url + "/v1/models", timeout=5.0).json()
        assert [m["id"] for m in models["data"]] == ["fake-model"]
        assert not any("path" in key or key == "root" for m in models["data"] for key in m)
    finally:
        engine.stop()


def test_first_upstream_byte_moves_the_lease_from_prefill_to_decode(tmp_path: Path) -> None:
    """The gateway reports the first token: work-aware policies see prefill end there."""
    engine = Engine("engine-0", tmp_path)
    gw: GatewayThread | None = None
    try:
        engine.wait_ready()
        gw = GatewayThread([engine.url], _cache_aware())
        gw.start()
        worker = gw.gateway.workers[0]
        body = {"prompt": "tokens " * 200, "stream": True, "max_tokens": 40}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10.0) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert first != "data: [DONE]"
            assert worker.load() == 1
            assert worker.pending_prefill_tokens() == 0  # type: ignore[attr-defined]
            assert worker.decode_tokens() > 0  # type: ignore[attr-defined]
            for _ in lines:
                pass
        _wait_until(lambda: worker.load() == 0, 5.0, "the lease released")
        assert worker.decode_tokens() == 0  # type: ignore[attr-defined]
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()
