"""End to end: 3 fake engines (subprocesses) and the example gateway, all on loopback.

Needs the ``examples`` extra (starlette, uvicorn, httpx); skipped without it.
Every client call has a timeout and each scenario runs under a hard deadline, so a bug
shows up as a failed assertion, never as a hung test run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from cacheroute import available_policies

if TYPE_CHECKING:
    import httpx
    import uvicorn
else:
    pytest.importorskip("starlette")
    uvicorn = pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOOPBACK = "127.0.0.1"


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_cacheroute_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gateway_mod = _load_example("gateway")


# --------------------------------------------------------------------------- servers


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(512)
    return sock


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


async def _await_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class Engine:
    """One ``fake_engine.py`` subprocess serving on a socket bound here (no port races)."""

    def __init__(self, name: str, log_dir: Path, *extra: str, port: int = 0) -> None:
        self.name = name
        sock = _listen(port)
        self.port = sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "fake_engine.py"), "--fd", str(sock.fileno()),
             "--name", name, "--decode-ms-per-token", "8", "--prefill-ms-per-token", "0.05",
             "--default-max-tokens", "12", *extra],
            pass_fds=(sock.fileno(),), stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # Only the engine may hold the socket: once it dies, connecting must be refused.
        sock.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}"
            try:
                return bool(httpx.get(self.url + "/health", timeout=1.0).status_code == 200)
            except httpx.HTTPError:
                return False

        _wait_until(up, timeout, f"{self.name} to serve /health")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.url + "/stats", timeout=5.0).json()
        return result

    def stop(self) -> None:
        """SIGKILL: in-flight streams are cut mid-way, as when an engine crashes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


class GatewayThread:
    """The example gateway served by uvicorn in a background thread of this process."""

    def __init__(self, worker_urls: list[str], policy: str, **options: Any) -> None:
        self.app = gateway_mod.create_app(worker_urls, policy, **options)
        self.gateway = self.app.state.gateway
        self._sock = _listen()
        self.url = f"http://{LOOPBACK}:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        _wait_until(lambda: self.server.started, 30.0, "the gateway to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self._sock.close()
        assert not self.thread.is_alive(), "the gateway did not shut down"

    def loads(self) -> list[int]:
        return [w.load() for w in self.gateway.workers]


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[Engine]]:
    started = [Engine(f"engine-{i}", tmp_path) for i in range(3)]
    try:
        for engine in started:
            engine.wait_ready()
        yield started
    finally:
        for engine in started:
            engine.stop()


def _cache_aware() -> str:
    if "cache_aware" not in available_policies():
        pytest.skip("the cache_aware policy is not registered yet")
    return "cache_aware"


def _run(coro: Any, limit: float) -> Any:
    """Run a scenario under a hard deadline."""
    return asyncio.run(asyncio.wait_for(coro, limit))


# --------------------------------------------------------------------------- clients


@dataclass
class Result:
    index: int
    group: int
    outcome: str  # completed | disconnected | http_error | stream_error | truncated | hang
    worker: str | None = None
    status: int | None = None
    started_after_kill: bool = False  # the engine was already dead when it was sent
    finished_before_kill: bool = False  # it ended before the kill began
    detail: str = ""


def _system_prompt(rng: random.Random, group: int) -> str:
    # Distinct from the first character on, so groups never share a prefix by accident.
    letters = "abcdefghijklmnopqrstuvwxyz     "
    return f"[group {group}] " + "".join(rng.choice(letters) for _ in range(1600))


def _payload(group: int, system: str, i: int, stream: bool) -> tuple[str, dict[str, Any]]:
    question = f"question {i}: " + "why is the sky blue " * 3
    body: dict[str, Any]
    if group % 2:  # odd groups chat, even groups use plain completions
        body = {
            "model": "fake-model",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
        }
        path = "/v1/chat/completions"
    else:
        body = {"model": "fake-model", "prompt": system + "\n" + question}
        path = "/v1/completions"
    body["stream"] = stream
    return path, body


async def _request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], disconnect_after: int | None
) -> tuple[str, str | None, int, str]:
    """Send one request; returns (outcome, served-by worker, HTTP status, detail)."""
    async with client.stream("POST", url, json=body) as r:
        worker = r.headers.get("x-cacheroute-worker")
        if r.status_code != 200:
            data = json.loads(await r.aread())
            assert "message" in data["error"], data  # a clear JSON error body
            return "http_error", worker, r.status_code, data["error"]["message"]
        if not body["stream"]:
            data = json.loads(await r.aread())
            assert data["choices"][0]["text" if "prompt" in body else "message"]
            return "completed", worker, 200, ""
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "completed", worker, 200, ""
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                return "stream_error", worker, 200, event["error"]["message"]
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                return "disconnected", worker, 200, ""  # leaving the block closes the socket
        return "truncated", worker, 200, f"stream ended after {events} events, no [DONE]"


# --------------------------------------------------------------------------- tests


def test_routing_text_uses_the_whole_conversation() -> None:
    turn1 = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "A1"},
                          {"role": "user", "content": "Q2"}]}  # fmt: skip
    other = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q9"}]}
    t1 = gateway_mod.chat_routing_text(turn1)
    t2 = gateway_mod.chat_routing_text(turn2)
    assert t2.startswith(t1) and "Q2" in t2 and "A1" in t2  # turn k+1 extends turn k
    assert gateway_mod.chat_routing_text(other) != t1  # not only the first message
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert "hi" in gateway_mod.chat_routing_text(parts)
    assert gateway_mod.routing_text("/v1/completions", {"prompt": [1, 2, 3]}) == [1, 2, 3]
    assert gateway_mod.routing_text("/v1/completions", {"prompt": "abc"}) == "abc"
    assert gateway_mod.routing_text("/v1/completions", {"prompt": None}) is None


def test_gateway_end_to_end(engines: list[Engine]) -> None:
    """A few hundred concurrent streams from 6 prefix groups; disconnects; an engine dies."""
    groups, per_group, concurrency = 6, 50, 48
    total = groups * per_group
    kill_after = total // 2  # completed requests before one engine is killed
    gw = GatewayThread(
        [e.url for e in engines],
        _cache_aware(),
        policy_config={"cache_threshold": 0.5, "balance_abs_threshold": 32,
                       "balance_rel_threshold": 1.5},
        connect_timeout=2.0, read_timeout=10.0, request_timeout=20.0,
        health_check_interval=0.25, health_check_timeout=3.0, max_failures=2, max_retries=2,
    )  # fmt: skip
    gw.start()
    rng = random.Random(0)
    systems = [_system_prompt(rng, g) for g in range(groups)]
    by_url = {e.url: e for e in engines}
    kill: dict[str, Any] = {}

    async def scenario() -> list[Result]:
        done = 0
        killing = asyncio.Event()
        killed = asyncio.Event()
        enough_done = asyncio.Event()
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency + 8)

        async with httpx.AsyncClient(timeout=15.0, limits=limits) as client:

            async def one(i: int) -> Result:
                nonlocal done
                group = i % groups  # interleaved, as independent users would be
                stream = i % 20 != 7  # a few plain JSON requests too
                disconnect = 2 if stream and i % 10 == 3 else None
                path, body = _payload(group, systems[group], i, stream)
                async with sem:
                    res = Result(i, group, "hang", started_after_kill=killed.is_set())
                    try:
                        res.outcome, res.worker, res.status, res.detail = await asyncio.wait_for(
                            _request(client, gw.url + path, body, disconnect), 30.0
                        )
                    except asyncio.TimeoutError:
                        res.detail = "no answer within 30 s"
                    except httpx.HTTPError as exc:  # the gateway itself must not fail
                        res.outcome, res.detail = "client_error", repr(exc)
                res.finished_before_kill = not killing.is_set()
                done += 1
                if done >= kill_after:
                    enough_done.set()
                return res

            async def killer() -> None:
                await enough_done.wait()
                # Kill the busiest engine, so streams are certainly cut mid-way.
                loads = gw.loads()
                victim = gw.gateway.workers[loads.index(max(loads))]
                kill.update(url=victim.url, load=max(loads))
                killing.set()
                await asyncio.to_thread(by_url[victim.url].stop)
                killed.set()

            kill_task = asyncio.create_task(killer())
            results = await asyncio.gather(*(one(i) for i in range(total)))
            await asyncio.wait_for(kill_task, 10.0)
            return list(results)

    try:
        results = _run(scenario(), 50.0)
        # Releases after client disconnects may trail the client by a moment.
        try:
            _wait_until(lambda: gw.loads() == [0, 0, 0], 10.0, "every load back to 0")
        finally:
            stats = httpx.get(gw.url + "/stats", timeout=5.0).json()
        engine_stats = [e.stats() for e in engines if e.url != kill["url"]]
    finally:
        gw.stop()

    outcomes = Counter(r.outcome for r in results)
    summary = f"outcomes={dict(outcomes)} kill={kill} stats={json.dumps(stats)}"

    # Every request completed, was dropped by its client, or got a clear error; no hangs.
    assert set(outcomes) <= {"completed", "disconnected", "http_error", "stream_error"}, summary
    for r in results:
        if r.outcome == "http_error":
            assert r.status in (502, 503, 504), (r, summary)
        if r.outcome == "stream_error":  # only streams cut by the engine's death
            assert r.worker == kill["url"], (r, summary)
    # Retries on other engines hide most of the crash from clients.
    assert outcomes["completed"] >= 0.8 * (total - outcomes["disconnected"]), summary

    # Load is back to 0 everywhere, seen from the objects and from /stats.
    assert gw.loads() == [0, 0, 0], summary
    assert [w["load"] for w in stats["workers"]] == [0, 0, 0], summary
    assert stats["policy"] == "cache_aware"

    # The killed engine is marked down; after the kill only survivors serve.
    dead = next(w for w in stats["workers"] if w["url"] == kill["url"])
    assert dead["healthy"] is False, summary
    assert all(
        r.worker != kill["url"]
        for r in results
        if r.started_after_kill and r.outcome == "completed"
    ), summary
    # Prefix groups stick to engines before the kill, while the load is spread.
    served: dict[int, Counter[str]] = defaultdict(Counter)
    for r in results:
        if r.finished_before_kill and r.worker and r.outcome != "http_error":
            served[r.group][r.worker] += 1
    per_engine: Counter[str] = Counter()
    for group, counts in served.items():
        n = counts.most_common(1)[0][1]
        share = n / sum(counts.values())
        assert share >= 0.8, f"group {group} spread over {dict(counts)}; {summary}"
        per_engine.update(counts)
    before = sum(per_engine.values())
    assert len(per_engine) == 3, f"not every engine was used: {dict(per_engine)}"
    for url, n in per_engine.items():
        assert n >= 0.15 * before, f"engine {url} served {n} of {before}: {dict(per_engine)}"

    # And the engines' prefix caches paid off.
    prompt = sum(s["prompt_tokens"] for s in engine_stats)
    cached = sum(s["cached_tokens"] for s in engine_stats)
    assert cached >= 0.5 * prompt, f"cache hit rate {cached / prompt:.2f}; {engine_stats}"


def test_engine_crash_mid_stream_ends_streams_with_an_error_event(tmp_path: Path) -> None:
    engine = Engine("doomed", tmp_path, "--decode-ms-per-token", "100")
    gw: GatewayThread | None = None
    try:
        engine.wait_ready()
        gw = GatewayThread([engine.url], "round_robin", read_timeout=10.0, request_timeout=20.0)
        gw.start()

        async def scenario() -> list[tuple[str, str | None, int, str]]:
            async with httpx.AsyncClient(timeout=15.0) as client:
                tasks = [
                    asyncio.create_task(
                        _request(client, gw.url + "/v1/completions",
                                 {"prompt": f"{i} hello", "stream": True}, None)
                    )
                    for i in range(10)
                ]  # fmt: skip
                # 12 tokens at 100 ms each: every stream is mid-way when the engine dies.
                await _await_until(lambda: gw.loads() == [10], 10.0, "all 10 streams in flight")
                await asyncio.sleep(0.3)
                await asyncio.to_thread(engine.stop)
                return list(await asyncio.gather(*tasks))

        results = _run(scenario(), 30.0)
        assert [r[0] for r in results] == ["stream_error"] * 10, results
        assert all("failed mid-stream" in r[3] for r in results), results
        _wait_until(lambda: gw.loads() == [0], 10.0, "load back to 0")
        assert not gw.gateway.workers[0].is_healthy()
        assert gw.gateway.stats()["requests"]["upstream_errors"] == 10
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


def test_client_disconnect_mid_stream_releases_and_stops_the_engine(tmp_path: Path) -> None:
    # 12 tokens at 500 ms each: a stream that is not cancelled would run for 6 s.
    engine = Engine("patient", tmp_path, "--decode-ms-per-token", "500")
    gw: GatewayThread | None = None
    try:
        engine.wait_ready()
        gw = GatewayThread([engine.url], "shortest_queue", read_timeout=10.0)
        gw.start()

        async def scenario() -> list[tuple[str, str | None, int, str]]:
            async with httpx.AsyncClient(timeout=15.0) as client:
                return list(
                    await asyncio.gather(
                        *(
                            _request(client, gw.url + "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": f"hi {i}"}],
                                      "stream": True}, disconnect_after=1)
                            for i in range(10)
                        )
                    )
                )  # fmt: skip

        results = _run(scenario(), 30.0)
        assert [r[0] for r in results] == ["disconnected"] * 10, results
        _wait_until(lambda: gw.loads() == [0], 4.0, "load back to 0 after the disconnects")
        _wait_until(lambda: engine.stats()["running"] == 0, 4.0, "the engine to stop generating")
        stats = gw.gateway.stats()
        assert stats["requests"]["client_disconnects"] == 10, stats
        assert stats["workers"][0]["healthy"] and stats["workers"][0]["failed"] == 0, stats
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


def test_engine_comes_back_after_health_check_recovers(tmp_path: Path) -> None:
    engines = [Engine(f"engine-{i}", tmp_path) for i in range(2)]
    gw: GatewayThread | None = None
    try:
        for e in engines:
            e.wait_ready()
        gw = GatewayThread(
            [e.url for e in engines], _cache_aware(), health_check_interval=0.2,
            health_check_timeout=1.0, read_timeout=10.0, request_timeout=20.0,
        )  # fmt: skip
        gw.start()
        workers = gw.gateway.workers
        engines[1].stop()
        _wait_until(lambda: not workers[1].is_healthy(), 10.0, "the dead engine marked down")
        # With one engine down, every request is served by the other.
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x" * 100}, timeout=10.0)
        assert r.status_code == 200 and r.headers["x-cacheroute-worker"] == engines[0].url
        # Restart it on the same address: the next passing health check brings it back.
        engines[1] = Engine("engine-1b", tmp_path, port=engines[1].port)
        engines[1].wait_ready()
        _wait_until(lambda: workers[1].is_healthy(), 10.0, "the engine marked up again")

        async def burst() -> set[str]:
            async with httpx.AsyncClient(timeout=15.0) as client:
                rs = await asyncio.gather(
                    *(
                        client.post(gw.url + "/v1/completions",
                                    json={"prompt": f"{i} new prefix " * 30, "max_tokens": 8})
                        for i in range(12)
                    )
                )  # fmt: skip
            assert all(r.status_code == 200 for r in rs)
            return {r.headers["x-cacheroute-worker"] for r in rs}

        assert _run(burst(), 30.0) == {e.url for e in engines}  # least load on misses
        _wait_until(lambda: gw.loads() == [0, 0], 10.0, "loads back to 0")
    finally:
        if gw is not None:
            gw.stop()
        for e in engines:
            e.stop()


def test_no_healthy_engine_is_a_503_and_timeouts_end_the_stream(tmp_path: Path) -> None:
    # A slow engine: 2,000 uncached tokens of prefill at 2 ms each is a 4 s first token,
    # and 1.5 s between tokens.
    slow = Engine("slow", tmp_path, "--prefill-ms-per-token", "2", "--decode-ms-per-token", "1500")
    gw: GatewayThread | None = None
    try:
        slow.wait_ready()
        gw = GatewayThread(
            [slow.url], "round_robin", read_timeout=0.5, request_timeout=5.0,
            health_check_interval=0.2, max_failures=2,
        )  # fmt: skip
        gw.start()
        # Silence before the first event: nothing was sent yet, so a clean 504 JSON error.
        body = {"prompt": "y" * 8000, "stream": True, "max_tokens": 4}
        r0 = httpx.post(gw.url + "/v1/completions", json=body, timeout=10.0)
        assert r0.status_code == 504 and r0.json()["error"]["type"] == "upstream_timeout"
        # Silence after the first event: the stream ends with an error event of its own.
        body = {"prompt": "short", "stream": True, "max_tokens": 4}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10.0) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert len(lines) == 2 and json.loads(lines[1][6:])["error"]["code"] == 504, lines
        assert "choices" in json.loads(lines[0][6:])
        _wait_until(lambda: gw.loads() == [0], 10.0, "load back to 0")
        slow.stop()
        _wait_until(lambda: not gw.gateway.workers[0].is_healthy(), 10.0, "engine marked down")
        r2 = httpx.post(gw.url + "/v1/completions", json={"prompt": "z"}, timeout=10.0)
        assert r2.status_code == 503 and r2.json()["error"]["type"] == "no_healthy_worker"
        assert gw.loads() == [0]
    finally:
        if gw is not None:
            gw.stop()
        slow.stop()
