"""Precise mode end to end: fake engines publish KV events over real ZMQ, the gateway follows.

Every engine is a real ``fake_engine.py`` process publishing its block cache in vLLM's wire
format (``--kv-events-endpoint``, ``--kv-events-replay-endpoint``); the gateway is the real
one on uvicorn, with ``--tokenizer fake`` (the engines' own ids) and a
:class:`cacheroute.events.KVEventIndex` subscribed to each engine, passed to ``cache_aware``
in precise mode. Requests sent *directly* to an engine change its cache without the
gateway's routed history knowing: only the engine's events can tell the gateway.

Every wait is on a condition with a timeout (``_wait_until``), never a fixed sleep.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
else:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")

from test_gateway_e2e import (
    Engine,
    GatewayThread,
    _cache_aware,
    _load_example,
    _wait_until,
    gateway_mod,
)

fake_engine = _load_example("fake_engine")

BLOCK_CHARS = 4 * 16  # the fake tokenizer: 4 characters a token, 16 tokens a block
ANY_PORT = "tcp://127.0.0.1:*"


def _prompt(tag: str, blocks: int) -> str:
    """A text of exactly ``blocks`` whole blocks, distinct per tag from its first block."""
    rng = random.Random(tag)
    head = f"[{tag}] "
    body = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(blocks * BLOCK_CHARS))
    return (head + body)[: blocks * BLOCK_CHARS]


def _ids(text: str) -> list[int]:
    return list(fake_engine.token_ids(text))


class Publisher(Engine):
    """A fake engine publishing KV events; ``events`` are its bound (PUB, replay) addresses."""

    def __init__(
        self,
        name: str,
        log_dir: Path,
        *extra: str,
        port: int = 0,
        events: tuple[str, str] = (ANY_PORT, ANY_PORT),
    ) -> None:
        super().__init__(
            name, log_dir, "--kv-events-endpoint", events[0],
            "--kv-events-replay-endpoint", events[1], *extra, port=port,
        )  # fmt: skip
        self.wait_ready()
        info = httpx.get(self.url + "/kv_events", timeout=5.0).json()
        assert info["enabled"] and info["block_size"] == 16, info
        self.events: tuple[str, str] = (info["endpoint"], info["replay_endpoint"])

    def post(self, prompt: str) -> httpx.Response:
        """A request straight to the engine: its cache changes, the gateway routed nothing."""
        r = httpx.post(self.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                       timeout=10.0)  # fmt: skip
        assert r.status_code == 200, r.text
        return r

    def kv_events(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.url + "/kv_events", timeout=5.0).json()
        return result


class PreciseGateway(GatewayThread):
    """The gateway following ``engines``' events, ``cache_aware`` in precise mode."""

    def __init__(self, engines: list[Publisher], **options: Any) -> None:
        options = {"health_check_interval": 0.2, "read_timeout": 10.0, **options}
        super().__init__(
            [e.url for e in engines], _cache_aware(), tokenizer="fake",
            kv_events={e.url: e.events for e in engines}, index_mode="precise", **options,
        )  # fmt: skip
        self.start()
        self.index = self.gateway.index
        self.wait_connected()

    def wait_connected(self) -> None:
        _wait_until(
            lambda: all(s.connected for s in self.index.stats().values()),
            15.0, "every KV-event subscriber connected",
        )  # fmt: skip

    def stat(self, url: str) -> Any:
        return self.index.stats()[url]

    def holds(self, url: str, text: str) -> int:
        """Tokens of ``text`` the index says ``url``'s engine holds."""
        return int(self.index.match(_ids(text)).get(url, 0))

    def post(self, prompt: str) -> httpx.Response:
        r = httpx.post(self.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                       timeout=10.0)  # fmt: skip
        assert r.status_code == 200, r.text
        return r

    def routed(self, url: str, text: str) -> int:
        """Tokens of ``text`` the routed history (the policy's own tree) gives ``url``."""
        tree = self.gateway.policy.tree("default", "tokens")
        return 0 if tree is None else int(tree.match_lengths(_ids(text)).get(url, 0))

    def decisions(self) -> list[str]:
        text = httpx.get(self.url + "/metrics", timeout=5.0).text
        return [line for line in text.splitlines() if line.startswith("cacheroute_decisions_total")]


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Everything a test starts, stopped at the end whatever happens (gateways first)."""
    things: list[Any] = []
    try:
        yield things
    finally:
        for thing in reversed(things):
            thing.stop()


def _decision(worker: str, reason: str, n: int) -> str:
    return (
        f'cacheroute_decisions_total{{policy="cache_aware",reason="{reason}",worker="{worker}"}} '
        f"{float(n)}"
    )


def test_an_evicted_prefix_is_no_longer_routed_to_its_old_engine(
    tmp_path: Path, started: list[Any]
) -> None:
    # Caches of 8 blocks: one 8-block prompt evicts everything else.
    engines = [Publisher(f"engine-{i}", tmp_path, "--cache-blocks", "8") for i in range(3)]
    started.extend(engines)
    gw = PreciseGateway(engines)
    started.append(gw)
    a = engines[0].url
    p = _prompt("P", 6)

    first = gw.post(p)  # nothing cached anywhere: least load, ties to engine 0
    assert first.headers["x-cacheroute-worker"] == a
    _wait_until(lambda: gw.holds(a, p) == 96, 10.0, "engine 0's BlockStored for P")
    again = gw.post(p)  # the engine's report says engine 0 holds all of it: a hit
    assert again.headers["x-cacheroute-worker"] == a
    assert again.headers["x-cached-tokens"] == "96"

    # Engine 0 evicts P (8 new blocks sent to it directly): its BlockRemoved events say so.
    engines[0].post(_prompt("Q", 8))
    _wait_until(lambda: gw.holds(a, p) == 0, 10.0, "engine 0's BlockRemoved for P")
    assert gw.stat(a).blocks_removed == 6 and gw.stat(a).blocks == 8
    assert gw.routed(a, p) == 96  # the routed history still places P on engine 0

    third = gw.post(p)  # precise: nobody holds P, so a miss, routed by load
    assert third.headers["x-cacheroute-worker"] != a
    assert third.headers["x-cached-tokens"] == "0"
    other = third.headers["x-cacheroute-worker"]
    assert sorted(gw.decisions()) == sorted(
        [_decision(a, "cache_miss", 1), _decision(a, "cache_hit", 1),
         _decision(other, "cache_miss", 1)]
    )  # fmt: skip


def test_a_prefix_cache_reset_clears_the_index(tmp_path: Path, started: list[Any]) -> None:
    engines = [Publisher(f"engine-{i}", tmp_path) for i in range(2)]
    started.extend(engines)
    gw = PreciseGateway(engines)
    started.append(gw)
    a = engines[0].url
    p = _prompt("P", 6)
    assert gw.post(p).headers["x-cacheroute-worker"] == a
    _wait_until(lambda: gw.holds(a, p) == 96, 10.0, "engine 0's BlockStored for P")

    r = httpx.post(a + "/reset_prefix_cache", timeout=5.0)
    assert r.status_code == 200 and r.json()["blocks_cleared"] == 6
    _wait_until(lambda: gw.stat(a).clears == 1, 10.0, "AllBlocksCleared from engine 0")
    assert gw.stat(a).blocks == 0 and gw.index.match(_ids(p)) == {}
    assert gw.routed(a, p) == 96  # the routed history still places P on engine 0

    after = gw.post(p)  # no affinity left: a miss, not a hit on engine 0
    assert after.headers["x-cacheroute-worker"] != a
    assert after.headers["x-cached-tokens"] == "0"
    assert _decision(a, "cache_hit", 1) not in gw.decisions()

    # Shutting the gateway down stops every subscriber thread.
    assert any(t.name.startswith("cacheroute-kv-events") for t in threading.enumerate())
    gw.stop()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("cacheroute-kv-events")]


def test_a_restarted_engine_is_resynced(tmp_path: Path, started: list[Any]) -> None:
    engines = [Publisher(f"engine-{i}", tmp_path) for i in range(2)]
    started.extend(engines)
    gw = PreciseGateway(engines)
    started.append(gw)
    old = engines[0]
    a = old.url
    before = [_prompt(f"old-{i}", 3) for i in range(3)]
    for text in before:  # batches 0, 1, 2 of the first process
        old.post(text)
    _wait_until(lambda: gw.stat(a).last_seq == 2, 10.0, "batches 0-2 of engine 0")
    assert all(gw.holds(a, text) == 48 for text in before)

    # A crash, then a new process on the same HTTP and ZMQ ports: its sequence starts at 0.
    old.stop()
    _wait_until(lambda: gw.stat(a).connected is False, 10.0, "the subscriber to notice")
    new = Publisher("engine-0-again", tmp_path, port=old.port, events=old.events)
    started.append(new)
    assert new.events == old.events
    gw.wait_connected()
    fresh = [_prompt(f"new-{i}", 4) for i in range(2)]
    for text in fresh:  # batches 0 and 1 of the new process
        new.post(text)

    _wait_until(lambda: gw.stat(a).resets == 1 and gw.holds(a, fresh[1]) == 64, 10.0,
                "the index to reset engine 0's view and apply the new events")  # fmt: skip
    assert gw.holds(a, fresh[0]) == 64
    assert [gw.holds(a, text) for text in before] == [0, 0, 0]  # the old view is gone
    assert gw.stat(a).last_seq == 1 and gw.stat(a).blocks == 8

    # The gateway routes on the rebuilt view: fresh[0] was never routed, only reported.
    _wait_until(lambda: gw.gateway.workers[0].is_healthy(), 10.0, "engine 0 healthy again")
    assert gw.routed(a, fresh[0]) == 0
    r = gw.post(fresh[0])
    assert r.headers["x-cacheroute-worker"] == a and r.headers["x-cached-tokens"] == "64"


def test_a_dropped_batch_is_replayed(tmp_path: Path, started: list[Any]) -> None:
    # Engine 0 keeps batch 1 off the wire (it stays in its replay buffer).
    engines = [Publisher("engine-0", tmp_path, "--kv-events-drop-seq", "1"),
               Publisher("engine-1", tmp_path)]  # fmt: skip
    started.extend(engines)
    gw = PreciseGateway(engines)
    started.append(gw)
    e0 = engines[0]
    a = e0.url
    p0, p1, p2 = (_prompt(f"P{i}", 4) for i in range(3))
    e0.post(p0)  # batch 0
    _wait_until(lambda: gw.stat(a).last_seq == 0, 10.0, "batch 0")
    e0.post(p1)  # batch 1: published to the replay buffer only
    assert e0.kv_events()["batches_dropped"] == 1
    assert gw.holds(a, p1) == 0 and gw.stat(a).last_seq == 0  # nothing arrived
    e0.post(p2)  # batch 2: the index sees the gap and replays batch 1 over its DEALER
    _wait_until(lambda: gw.holds(a, p2) == 64, 10.0, "batch 2")
    stats = gw.stat(a)
    assert gw.holds(a, p1) == 64
    assert (stats.gaps, stats.replays, stats.replayed_batches, stats.lost_batches) == (1, 1, 1, 0)
    assert stats.last_seq == 2 and stats.batches == 3

    # p1 was never routed; the replayed report alone sends it to engine 0.
    r = gw.post(p1)
    assert r.headers["x-cacheroute-worker"] == a and r.headers["x-cached-tokens"] == "64"

    # Chat: the gateway's ids of the templated conversation are the engine's own.
    messages = [{"role": "system", "content": _prompt("S", 5)},
                {"role": "user", "content": "why is the sky blue?"}]  # fmt: skip
    direct = httpx.post(a + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                        timeout=10.0)  # fmt: skip
    assert direct.status_code == 200
    chat_ids = _ids(fake_engine.chat_prompt(messages))
    whole = len(chat_ids) // 16 * 16
    _wait_until(lambda: gw.index.match(chat_ids).get(a) == whole, 10.0, "the chat's blocks")
    # The routed history has p1 (and more) on engine 0: a tie-break would pick engine 1.
    via = httpx.post(gw.url + "/v1/chat/completions",
                     json={"messages": messages, "max_tokens": 2}, timeout=10.0)  # fmt: skip
    assert via.status_code == 200
    assert via.headers["x-cacheroute-worker"] == a
    assert via.headers["x-cached-tokens"] == str(whole)


def test_worker_events_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parse = gateway_mod.parse_worker_events
    workers = ["http://a:1/", "http://b:2", "http://c:3"]
    assert parse(workers, []) == {}
    assert parse(workers, ["tcp://a:5557,tcp://a:5558", "none", "tcp://c:5557"]) == {
        "http://a:1": ("tcp://a:5557", "tcp://a:5558"),
        "http://c:3": ("tcp://c:5557", None),
    }
    with pytest.raises(ValueError, match="one --worker-events per --worker"):
        parse(workers, ["tcp://a:5557"])
    with pytest.raises(ValueError, match="PUB\\[,REPLAY\\]"):
        parse(workers[:1], ["tcp://a:1,tcp://a:2,tcp://a:3"])

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            gateway_mod.main(["--worker", "http://a:1", *argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "does not read a KV-event index" in error(
        "--policy", "round_robin", "--worker-events", "tcp://127.0.0.1:5557"
    )
    assert "--index-mode needs --worker-events" in error("--index-mode", "precise")
    assert "must look like tcp://host:port" in error("--worker-events", "localhost:5557")
    with pytest.raises(ValueError, match="not a worker"):
        gateway_mod.Gateway(["http://a:1"], kv_events={"http://b:2": "tcp://b:5557"})


def test_a_restart_after_a_single_batch_is_resynced(tmp_path: Path, started: list[Any]) -> None:
    engine = Publisher("engine-0", tmp_path)
    started.append(engine)
    gw = PreciseGateway([engine])
    started.append(gw)
    a = engine.url
    old = _prompt("old", 3)
    engine.post(old)  # the only batch of the first process: seq 0
    _wait_until(lambda: gw.holds(a, old) == 48, 10.0, "batch 0 of the first process")
    engine.stop()
    _wait_until(lambda: gw.stat(a).connected is False, 10.0, "the subscriber to notice")
    new = Publisher("engine-0-again", tmp_path, port=engine.port, events=engine.events)
    started.append(new)
    gw.wait_connected()
    fresh = [_prompt(f"new-{i}", 4) for i in range(2)]
    for text in fresh:  # seq 0 again (a restart, not a duplicate) and seq 1
        new.post(text)
    _wait_until(lambda: gw.stat(a).last_seq == 1, 10.0, "batch 1 of the new process")
    assert (gw.stat(a).resets, gw.stat(a).duplicates) == (1, 0)
    assert gw.holds(a, old) == 0  # a prefix the new process never cached
    assert gw.holds(a, fresh[0]) == 64  # its batch 0 was applied
