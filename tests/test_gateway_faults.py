"""Faults found by an adversarial pass on the example gateway, each pinned by a test.

The misbehaving engines here are real TCP servers on loopback that answer with scripted
bytes (a truncated JSON body, a cut stream, a closed connection); the gateway is the real
one, served by uvicorn; the well-behaved engines are real ``fake_engine.py`` processes.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
else:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")

from test_gateway_e2e import LOOPBACK, Engine, GatewayThread, _cache_aware


class ScriptedEngine:
    """A loopback HTTP server whose answer to each POST is ``script(conn, request_bytes)``.

    ``GET /health`` always answers 200, so the gateway believes the engine is up.
    ``posts`` counts the POSTs it received.
    """

    def __init__(self, script: Callable[[socket.socket, bytes], None]) -> None:
        self.posts = 0
        engine = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(rest) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        rest += data
                    request, buf = head + b"\r\n\r\n" + rest[:length], rest[length:]
                    if head.startswith(b"GET /health"):
                        body = b'{"status": "ok"}'
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(body), body)
                        )
                        continue
                    engine.posts += 1
                    script(conn, request)
                    return  # every scripted answer ends the connection

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedEngine]]:
    started: list[ScriptedEngine] = []

    def make(script: Callable[[socket.socket, bytes], None]) -> ScriptedEngine:
        started.append(ScriptedEngine(script))
        return started[-1]

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def gateway() -> Iterator[Callable[..., GatewayThread]]:
    started: list[GatewayThread] = []

    def make(urls: list[str], policy: str = "round_robin", **options: Any) -> GatewayThread:
        options = {"read_timeout": 5.0, "request_timeout": 10.0, **options}
        gw = GatewayThread(urls, policy, **options)
        gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def _stream(url: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    with httpx.stream("POST", url, json=body, timeout=10.0) as r:
        return r.status_code, r.headers.get("content-type", ""), r.read()


def _sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of a well-formed SSE body (events end with a blank line)."""
    text = raw.decode()
    assert text.endswith("\n\n"), f"the last event is not terminated: {text[-200:]!r}"
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), f"not an SSE event: {block!r}"
        events.append("\n".join(line[len("data: ") :] for line in lines))
    return events


def _assert_openai_error(data: Any, status: int, kind: str) -> dict[str, Any]:
    assert set(data) == {"error"}, data
    error: dict[str, Any] = data["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["type"] == kind and error["code"] == status, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


# --------------------------------------------------------------------------- 1a


def _json_cut_short(conn: socket.socket, request: bytes) -> None:
    # A 200 JSON answer (not SSE) to a stream request, closed after a few bytes.
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
        b'{"choices": ['
    )


def test_stream_request_answered_by_cut_json_is_a_clean_502(
    scripted: Callable[..., ScriptedEngine], gateway: Callable[..., GatewayThread]
) -> None:
    engine = scripted(_json_cut_short)
    gw = gateway([engine.url], max_retries=0)
    status, ctype, raw = _stream(gw.url + "/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 502, raw
    assert ctype.startswith("application/json"), ctype
    _assert_openai_error(json.loads(raw), 502, "upstream_error")
    assert gw.loads() == [0]


def _json_whole(conn: socket.socket, request: bytes) -> None:
    body = b'{"choices": [{"index": 0, "text": "whole", "finish_reason": "length"}]}'
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


def test_stream_request_answered_by_whole_json_relays_the_json(
    scripted: Callable[..., ScriptedEngine], gateway: Callable[..., GatewayThread]
) -> None:
    engine = scripted(_json_whole)
    gw = gateway([engine.url])
    status, ctype, raw = _stream(gw.url + "/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 200 and ctype.startswith("application/json"), (status, ctype, raw)
    assert json.loads(raw)["choices"][0]["text"] == "whole"


def _sse_head(conn: socket.socket) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse_cut_before_any_event(conn: socket.socket, request: bytes) -> None:
    _sse_head(conn)
    conn.sendall(_chunk(b'data: {"choices": [{"te'))


def test_stream_cut_before_any_event_is_a_clean_502(
    scripted: Callable[..., ScriptedEngine], gateway: Callable[..., GatewayThread]
) -> None:
    engine = scripted(_sse_cut_before_any_event)
    gw = gateway([engine.url], max_retries=0)
    status, ctype, raw = _stream(gw.url + "/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 502 and ctype.startswith("application/json"), (status, ctype, raw)
    _assert_openai_error(json.loads(raw), 502, "upstream_error")
    assert gw.loads() == [0]


_EVENT = b'data: {"choices": [{"index": 0, "text": "one ", "finish_reason": null}]}\n\n'


def _sse_cut_mid_event(conn: socket.socket, request: bytes) -> None:
    _sse_head(conn)
    conn.sendall(_chunk(_EVENT + b'data: {"choices": [{"te'))


def test_stream_cut_mid_event_ends_with_its_own_error_event(
    scripted: Callable[..., ScriptedEngine], gateway: Callable[..., GatewayThread]
) -> None:
    engine = scripted(_sse_cut_mid_event)
    gw = gateway([engine.url])
    status, ctype, raw = _stream(gw.url + "/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream"), (status, ctype, raw)
    events = _sse_events(raw)
    assert len(events) == 2, events
    assert json.loads(events[0])["choices"][0]["text"] == "one "
    _assert_openai_error(json.loads(events[1]), 502, "upstream_error")
    assert gw.loads() == [0]


# --------------------------------------------------------------------------- 1b


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("path", "raw", "param", "words"),
    [
        ("/v1/completions", b'{"prompt": [18446744073709551616], "max_tokens": 2}',
         "prompt", "2**32"),
        ("/v1/completions", b'{"prompt": [1, 2, -3]}', "prompt", "token id"),
        ("/v1/completions", b'{"prompt": [[5, 6], [18446744073709551616]]}', "prompt", "2**32"),
        ("/v1/completions", _nested(100_000), None, "nested"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}]}", None, "nested"),
        ("/v1/completions", b'{"prompt": "x", ', None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", None, "JSON object"),
    ],
    ids=["token-2**64", "negative-token", "batch-token-2**64", "nested-100k",
         "chat-nested-100k", "truncated-json", "not-an-object"],
)  # fmt: skip
def test_bad_request_bodies_are_400_with_an_openai_error(
    tmp_path: Path,
    gateway: Callable[..., GatewayThread],
    path: str,
    raw: bytes,
    param: str | None,
    words: str,
) -> None:
    engine = Engine("bystander", tmp_path)
    try:
        engine.wait_ready()
        gw = gateway([engine.url], _cache_aware())
        r = httpx.post(gw.url + path, content=raw, timeout=10.0,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400, r.text[:300]
        error = _assert_openai_error(r.json(), 400, "invalid_request_error")
        assert error["param"] == param, error
        assert words.lower() in error["message"].lower(), error
        # The engine never saw it, and the gateway still serves good requests.
        assert engine.stats()["requests"] == 0
        ok = httpx.post(gw.url + "/v1/completions", json={"prompt": [1, 2, 2**32 - 1]},
                        timeout=10.0)  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert gw.loads() == [0]
    finally:
        engine.stop()


# --------------------------------------------------------------------------- 1c


def _hang_up(conn: socket.socket, request: bytes) -> None:
    conn.shutdown(socket.SHUT_RDWR)  # read the request, answer nothing, close


def test_retry_excludes_the_engine_that_failed(
    tmp_path: Path,
    scripted: Callable[..., ScriptedEngine],
    gateway: Callable[..., GatewayThread],
) -> None:
    broken = scripted(_hang_up)
    good = Engine("good", tmp_path)
    try:
        good.wait_ready()
        # On an empty tree cache_aware breaks the tie to the first engine: the broken one.
        # Its retry must go elsewhere, although the tree now matches the prompt there.
        gw = gateway([broken.url, good.url], _cache_aware(), max_retries=2)
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "p" * 400}, timeout=10.0)
        assert r.status_code == 200, r.text
        assert r.headers["x-cacheroute-worker"] == good.url
        assert broken.posts == 1
        assert gw.gateway.stats()["requests"]["retries"] == 1
        assert gw.loads() == [0, 0]
    finally:
        good.stop()


def test_retry_with_no_engine_left_is_the_error(
    scripted: Callable[..., ScriptedEngine], gateway: Callable[..., GatewayThread]
) -> None:
    broken = scripted(_hang_up)
    gw = gateway([broken.url], _cache_aware(), max_retries=2)
    r = httpx.post(gw.url + "/v1/completions", json={"prompt": "p" * 400}, timeout=10.0)
    assert r.status_code == 502, r.text
    _assert_openai_error(r.json(), 502, "upstream_error")
    assert broken.posts == 1  # not the same engine three times
    assert gw.loads() == [0]


def test_engine_failing_before_the_first_event_is_retried_elsewhere(
    tmp_path: Path,
    scripted: Callable[..., ScriptedEngine],
    gateway: Callable[..., GatewayThread],
) -> None:
    # Nothing reached the client, and the engine is not working on it any more (the
    # connection is gone): another engine may serve it.
    broken = scripted(_sse_cut_before_any_event)
    good = Engine("good", tmp_path)
    try:
        good.wait_ready()
        gw = gateway([broken.url, good.url], _cache_aware(), max_retries=2)
        status, ctype, raw = _stream(gw.url + "/v1/completions",
                                     {"prompt": "q" * 400, "stream": True})  # fmt: skip
        assert status == 200 and ctype.startswith("text/event-stream"), raw
        events = _sse_events(raw)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events), events
        assert broken.posts == 1 and good.stats()["requests"] == 1
        assert gw.gateway.stats()["requests"]["retries"] == 1
        assert gw.loads() == [0, 0]
    finally:
        good.stop()
