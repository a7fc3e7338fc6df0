"""KVEventIndex against real ZMQ sockets on loopback: a PUB/ROUTER publisher speaking
the engines' protocol, the index's SUB/DEALER subscriber threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from cacheroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventIndex,
    KVEventPublisher,
    dp_endpoint,
    encode_batch,
    subscriber,
)

W = "http://w1:8000"
ANY = "tcp://127.0.0.1:*"


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def blocks(*ids: int) -> list[int]:
    return [i * 10 + k for i in ids for k in range(4)]


def stored(h: int, parent: int | None, *ids: int) -> BlockStored:
    return BlockStored(list(range(h, h + len(ids))), parent, blocks(*ids), 4)


@pytest.fixture
def index() -> Iterator[KVEventIndex]:
    idx = KVEventIndex(block_size=4, stale_after=0.5, heartbeat=0.1)
    yield idx
    idx.close()


@pytest.fixture
def pub() -> Iterator[KVEventPublisher]:
    p = KVEventPublisher(ANY, ANY)
    yield p
    p.close()


def connect(index: KVEventIndex, pub: KVEventPublisher, url: str = W, **kw: object) -> None:
    index.subscribe(url, pub.endpoint, pub.replay_endpoint, **kw)  # type: ignore[arg-type]
    wait_for(lambda: index.stats()[url].connected)
    time.sleep(0.05)  # the subscription reaches the PUB side just after the handshake


@pytest.mark.parametrize("shape", ["map", "array"])
def test_events_over_the_wire_build_the_view(
    index: KVEventIndex, pub: KVEventPublisher, shape: str
) -> None:
    connect(index, pub)
    pub.publish([stored(1, None, 1, 2, 3)], shape=shape)  # type: ignore[arg-type]
    pub.publish([stored(4, 3, 4), BlockRemoved([2])], shape=shape)  # type: ignore[arg-type]
    wait_for(lambda: index.stats()[W].batches == 2)
    assert index.match(blocks(1, 2, 3, 4)) == {W: 4}
    pub.publish([AllBlocksCleared()], shape=shape)  # type: ignore[arg-type]
    wait_for(lambda: index.stats()[W].clears == 1)
    assert index.match(blocks(1)) == {}
    assert not index.is_stale(W)


@pytest.mark.parametrize("replay_topic", [True, False])
def test_gaps_are_replayed_over_dealer(index: KVEventIndex, replay_topic: bool) -> None:
    with KVEventPublisher(ANY, ANY, topic="kv@w1", replay_topic=replay_topic) as pub:
        connect(index, pub, topic="kv@w1")
        pub.publish([stored(1, None, 1)])
        for i in range(2, 6):  # four batches lost on the way
            pub.publish([stored(i, i - 1, i)], send=False)
        pub.publish([stored(6, 5, 6)])
        wait_for(lambda: index.stats()[W].last_seq == 5)
        s = index.stats()[W]
        assert (s.gaps, s.replays, s.replayed_batches, s.lost_batches) == (1, 1, 4, 0)
        assert index.match(blocks(1, 2, 3, 4, 5, 6)) == {W: 24}


def test_a_gap_beyond_the_replay_buffer_is_counted_lost(index: KVEventIndex) -> None:
    with KVEventPublisher(ANY, ANY, buffer_steps=2) as pub:
        connect(index, pub)
        pub.publish([stored(1, None, 1)])
        for i in range(2, 6):
            pub.publish([stored(i, i - 1, i)], send=False)  # only the last two stay buffered
        pub.publish([stored(6, 5, 6)])
        wait_for(lambda: index.stats()[W].last_seq == 5)
        s = index.stats()[W]
        assert (s.gaps, s.replayed_batches, s.lost_batches) == (1, 1, 3)
        assert s.orphan_blocks == 2  # their parents were in lost batches
        assert index.match(blocks(1, 2)) == {W: 4}


def test_catch_up_replays_what_was_published_before_subscribing(
    index: KVEventIndex, pub: KVEventPublisher
) -> None:
    pub.publish([stored(1, None, 1, 2)])
    pub.publish([stored(3, 2, 3)])
    connect(index, pub)
    pub.publish([stored(4, 3, 4)])
    wait_for(lambda: index.stats()[W].last_seq == 2)
    assert index.match(blocks(1, 2, 3, 4)) == {W: 16}
    s = index.stats()[W]
    assert (s.replays, s.replayed_batches, s.gaps, s.lost_batches) == (1, 2, 0, 0)


def test_without_replay_a_gap_is_lost(index: KVEventIndex, pub: KVEventPublisher) -> None:
    index.subscribe(W, pub.endpoint)
    wait_for(lambda: index.stats()[W].connected)
    time.sleep(0.05)
    pub.publish([stored(1, None, 1)])
    pub.publish([stored(2, 1, 2)], send=False)
    pub.publish([stored(3, 2, 3)])
    wait_for(lambda: index.stats()[W].last_seq == 2)
    s = index.stats()[W]
    assert (s.gaps, s.lost_batches, s.replays, s.orphan_blocks) == (1, 1, 0, 1)


def test_publisher_restart_resets_the_view(index: KVEventIndex) -> None:
    pub = KVEventPublisher(ANY, ANY)
    endpoint, replay = pub.endpoint, pub.replay_endpoint
    connect(index, pub)
    for i in range(1, 4):
        pub.publish([stored(i, i - 1 if i > 1 else None, i)])
    wait_for(lambda: index.stats()[W].last_seq == 2)
    assert index.match(blocks(1, 2, 3)) == {W: 12}
    pub.close()
    wait_for(lambda: index.stats()[W].connected is False)
    # the engine comes back on the same ports, sequence from 0, empty cache
    pub = KVEventPublisher(endpoint, replay)
    try:
        wait_for(lambda: index.stats()[W].connected)
        time.sleep(0.1)
        pub.publish([stored(50, None, 9)])
        wait_for(lambda: index.stats()[W].resets == 1)
        wait_for(lambda: index.match(blocks(9)) == {W: 4})
        assert index.match(blocks(1)) == {}
        assert index.stats()[W].last_seq == 0
    finally:
        pub.close()


@pytest.mark.parametrize("same_bytes", [False, True])
def test_a_restart_after_a_single_batch_resets_the_view(
    index: KVEventIndex, same_bytes: bool
) -> None:
    # The first process publishes only seq 0; the restarted one starts at seq 0 again.
    # On the live stream (not a replay) a seq already seen is a restart even when the
    # payload is byte-identical: a PUB socket never sends a batch twice.
    pub = KVEventPublisher(ANY, ANY)
    endpoint, replay = pub.endpoint, pub.replay_endpoint
    connect(index, pub)
    pub.publish_raw(encode_batch([stored(1, None, 1, 2)], ts=1.0))
    wait_for(lambda: index.stats()[W].last_seq == 0)
    assert index.match(blocks(1, 2)) == {W: 8}
    pub.close()
    wait_for(lambda: index.stats()[W].connected is False)
    pub = KVEventPublisher(endpoint, replay)
    try:
        wait_for(lambda: index.stats()[W].connected)
        time.sleep(0.1)
        if same_bytes:
            pub.publish_raw(encode_batch([stored(1, None, 1, 2)], ts=1.0))
        else:
            pub.publish_raw(encode_batch([stored(50, None, 9)], ts=2.0))
        pub.publish_raw(encode_batch([stored(60, None, 8)], ts=3.0))
        wait_for(lambda: index.stats()[W].last_seq == 1)
        s = index.stats()[W]
        assert (s.resets, s.duplicates) == (1, 0)
        assert index.match(blocks(8)) == {W: 4}
        if same_bytes:
            assert index.match(blocks(1, 2)) == {W: 8}
        else:
            assert index.match(blocks(9)) == {W: 4}
            assert index.match(blocks(1)) == {}
    finally:
        pub.close()


def test_a_restart_unseen_during_a_disconnection_is_found_by_replay(
    index: KVEventIndex,
) -> None:
    # The restarted engine publishes past the old last seq before the subscriber is back:
    # the first live batch looks like a gap. After a disconnection the subscriber replays
    # from its last seq and compares that batch's bytes with the one it applied.
    pub = KVEventPublisher(ANY, ANY)
    endpoint, replay = pub.endpoint, pub.replay_endpoint
    connect(index, pub)
    for i in range(1, 4):
        pub.publish_raw(encode_batch([stored(i, i - 1 if i > 1 else None, i)], ts=float(i)))
    wait_for(lambda: index.stats()[W].last_seq == 2)
    pub.close()
    wait_for(lambda: index.stats()[W].connected is False)
    pub = KVEventPublisher(endpoint, replay)
    try:
        for k in range(4):  # seq 0..3, before the subscriber reconnects: lost live, buffered
            pub.publish_raw(encode_batch([stored(50 + k, None, 9 - k)], ts=10.0 + k))
        wait_for(lambda: index.stats()[W].connected)
        time.sleep(0.1)
        pub.publish_raw(encode_batch([stored(60, None, 4)], ts=20.0))  # seq 4, live
        wait_for(lambda: index.stats()[W].last_seq == 4)
        assert index.stats()[W].resets == 1
        assert index.match(blocks(1)) == {}  # the old process's cache is gone
        assert index.match(blocks(9)) == {W: 4} and index.match(blocks(4)) == {W: 4}
    finally:
        pub.close()


def test_a_disconnection_without_restart_keeps_the_view_and_replays_the_gap(
    index: KVEventIndex, pub: KVEventPublisher
) -> None:
    connect(index, pub)
    pub.publish_raw(encode_batch([stored(1, None, 1)], ts=1.0))
    wait_for(lambda: index.stats()[W].last_seq == 0)
    index._set_connected(W, False)  # as the monitor reports a dropped connection
    sub = index._subs[W]  # type: ignore[attr-defined]
    sub._verify_next = True  # what the monitor's EVENT_DISCONNECTED sets
    pub.publish_raw(encode_batch([stored(2, None, 2)], ts=2.0))  # seq 1
    wait_for(lambda: index.stats()[W].last_seq == 1)
    s = index.stats()[W]
    assert s.resets == 0
    assert index.match(blocks(1)) == {W: 4} and index.match(blocks(2)) == {W: 4}


def test_a_silent_publisher_is_stale_and_a_connected_idle_one_is_not(
    index: KVEventIndex,
) -> None:
    pub = KVEventPublisher(ANY, ANY)
    connect(index, pub)
    pub.publish([stored(1, None, 1)])
    wait_for(lambda: index.stats()[W].batches == 1)
    time.sleep(0.8)  # idle longer than stale_after, but connected (heartbeats)
    assert not index.is_stale(W)
    pub.close()
    wait_for(lambda: index.stats()[W].connected is False)
    assert not index.is_stale(W)  # not yet: stale_after has not passed
    wait_for(lambda: index.is_stale(W), timeout=3)
    assert index.stale_urls() == [W]
    assert index.match(blocks(1)) == {W: 4}  # last view kept; the policy decides
    assert index.match(blocks(1), include_stale=False) == {}


def test_a_never_reachable_endpoint_goes_stale(index: KVEventIndex) -> None:
    index.subscribe(W, "tcp://127.0.0.1:1")  # nothing listens there
    assert not index.is_stale(W)
    wait_for(lambda: index.is_stale(W), timeout=3)


def test_bad_messages_do_not_stop_the_subscriber(index: KVEventIndex) -> None:
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        index.subscribe(W, f"tcp://127.0.0.1:{port}")
        wait_for(lambda: index.stats()[W].connected)
        time.sleep(0.1)
        raw.send_multipart([b"", (0).to_bytes(8, "big"), b"\xc1\xc1 not msgpack"])
        raw.send_multipart([b"", b"short", b""])
        raw.send_multipart([b"only one frame"])
        raw.send_multipart([b"", (1).to_bytes(8, "big"), encode_batch([stored(1, None, 1)])])
        wait_for(lambda: index.stats()[W].batches == 1)
        assert index.stats()[W].bad_messages == 3
        assert index.match(blocks(1)) == {W: 4}
    finally:
        raw.close()
        ctx.term()


def test_dp_ranks_are_separate_workers(index: KVEventIndex) -> None:
    base = KVEventPublisher(ANY)
    port = int(base.endpoint.rsplit(":", 1)[1])
    base.close()
    ep0 = f"tcp://127.0.0.1:{port}"
    try:
        pubs = [KVEventPublisher(dp_endpoint(ep0, r)) for r in (0, 1)]
    except zmq.ZMQError:
        pytest.skip("the port next to a free one is taken")
    try:
        for r in range(len(pubs)):
            index.subscribe(f"{W}#dp{r}", dp_endpoint(ep0, r), dp_rank=r)
            wait_for(lambda r=r: index.stats()[f"{W}#dp{r}"].connected)
        time.sleep(0.1)
        pubs[0].publish([stored(1, None, 1)], dp_rank=0)
        pubs[1].publish([stored(1, None, 1, 2)], dp_rank=1)
        wait_for(lambda: sum(s.batches for s in index.stats().values()) == 2)
        assert index.match(blocks(1, 2)) == {f"{W}#dp0": 4, f"{W}#dp1": 8}
    finally:
        for p in pubs:
            p.close()


def test_subscribe_checks_and_refuses_twice(index: KVEventIndex, pub: KVEventPublisher) -> None:
    index.subscribe(W, pub.endpoint)
    with pytest.raises(RuntimeError, match="already subscribed"):
        index.subscribe(W, pub.endpoint)
    with pytest.raises(TypeError, match="endpoint must be a str"):
        index.subscribe("x", 5557)  # type: ignore[arg-type]
    with pytest.raises(zmq.ZMQError):
        index.subscribe("y", "not-an-endpoint")
    with pytest.raises(zmq.ZMQError):
        index.subscribe("z", pub.endpoint, "not-a-replay-endpoint")
    assert not {"y", "z"} & set(index.stats())  # no trace of either failure
    index.unsubscribe(W)
    index.subscribe(W, pub.endpoint)  # again after unsubscribing


def test_sync_subscriptions_follows_the_pool(index: KVEventIndex) -> None:
    a, b, b2 = (KVEventPublisher(ANY, ANY) for _ in range(3))
    try:

        def feed(p: KVEventPublisher) -> dict[str, object]:
            return {"endpoint": p.endpoint, "replay": p.replay_endpoint}

        index.apply("manual", 0, encode_batch([stored(9, None, 9)]))  # fed by hand: kept
        index.sync_subscriptions({"a": feed(a), "b": feed(b)})
        wait_for(lambda: index.stats()["a"].connected and index.stats()["b"].connected)
        time.sleep(0.05)
        a.publish([stored(1, None, 1)])
        b.publish([stored(1, None, 1, 2)])
        wait_for(lambda: index.match(blocks(1, 2)) == {"a": 4, "b": 8})
        thread_a = index._subs["a"]
        index.sync_subscriptions({"a": feed(a), "b": feed(b)})  # nothing changed
        assert index._subs["a"] is thread_a and index.match(blocks(1, 2))["b"] == 8
        # b restarted elsewhere: its old view describes a dead process, so it goes
        index.sync_subscriptions({"a": feed(a), "b": feed(b2)})
        assert index.match(blocks(1, 2)) == {"a": 4}
        wait_for(lambda: index.stats()["b"].connected)
        time.sleep(0.05)
        b2.publish([stored(1, None, 1)])
        wait_for(lambda: index.match(blocks(1, 2)) == {"a": 4, "b": 4})
        index.sync_subscriptions({"b": feed(b2)})  # a left the pool
        assert "a" not in index.urls() and "a" not in index._subs
        assert index.match(blocks(1, 2)) == {"b": 4}
        assert index.match(blocks(9)) == {"manual": 4}
    finally:
        for p in (a, b, b2):
            p.close()


def test_sync_subscriptions_refuses_bad_feeds_changing_nothing(
    index: KVEventIndex, pub: KVEventPublisher
) -> None:
    index.sync_subscriptions({W: {"endpoint": pub.endpoint}})
    before = dict(index._feeds)
    bad: list[tuple[object, type[Exception], str]] = [
        ([W], TypeError, r"feeds must be a mapping of url -> feed, got \['http"),
        ({W: "tcp://x:1"}, TypeError, r"feeds\['http://w1:8000'\] must be a mapping"),
        ({W: {"replay": pub.endpoint}}, TypeError, r"\['endpoint'\] must be a str, got None"),
        ({W: {"endpoint": pub.endpoint, "port": 1}}, ValueError, r"catch_up, dp_rank, endpoint"),
        ({W: {"endpoint": pub.endpoint, "dp_rank": -1}}, ValueError, r"\['dp_rank'\] must be"),
        ({5: {"endpoint": pub.endpoint}}, TypeError, r"feeds key must be a str, got 5"),
    ]
    for feeds, exc, message in bad:
        with pytest.raises(exc, match=message):
            index.sync_subscriptions(feeds)  # type: ignore[arg-type]
        assert index._feeds == before
    # an address ZMQ refuses: the other urls still sync; the failed one is named
    with pytest.raises(ValueError, match=r"could not subscribe to 'y': "):
        index.sync_subscriptions({W: {"endpoint": pub.endpoint}, "y": {"endpoint": "nope"}})
    assert index._feeds == before and "y" not in index._subs
    index.close()
    with pytest.raises(RuntimeError, match="closed"):
        index.sync_subscriptions({})


def test_close_stops_every_subscriber_thread() -> None:
    before = set(threading.enumerate())
    pubs = [KVEventPublisher(ANY, ANY) for _ in range(3)]
    with KVEventIndex(block_size=4) as index:
        for i, p in enumerate(pubs):
            index.subscribe(f"w{i}", p.endpoint, p.replay_endpoint)
        wait_for(lambda: all(s.connected for s in index.stats().values()))
        assert len(set(threading.enumerate()) - before) == 6  # 3 subscribers, 3 replay servers
        for p in pubs:
            p.publish([stored(1, None, 1)])
        wait_for(lambda: all(s.batches == 1 for s in index.stats().values()))
    after_index = set(threading.enumerate()) - before
    assert all(t.name.startswith("cacheroute-kv-publisher") for t in after_index)
    with pytest.raises(RuntimeError, match="closed"):
        index.subscribe("w9", pubs[0].endpoint)
    assert index.match(blocks(1)) == {"w0": 4, "w1": 4, "w2": 4}  # the view stays readable
    index.close()  # idempotent
    for p in pubs:
        p.close()
    assert set(threading.enumerate()) == before


def test_match_from_request_threads_while_the_subscriber_applies(
    index: KVEventIndex, pub: KVEventPublisher
) -> None:
    connect(index, pub)
    pub.publish([stored(1, None, 1)])
    wait_for(lambda: index.stats()[W].batches == 1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                got = index.match(blocks(1, 2, 3))
                assert got.get(W, 0) in (4, 8, 12)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    for _ in range(200):
        pub.publish([stored(2, 1, 2, 3)])
        pub.publish([BlockRemoved([2])])
    wait_for(lambda: index.stats()[W].batches == 401)
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    assert index.match(blocks(1, 2, 3)) == {W: 4}
    assert index.stats()[W].lost_batches == 0


def test_a_publisher_with_a_bad_replay_address_raises_and_closes_its_pub() -> None:
    raised: list[BaseException] = []

    def make() -> None:
        try:
            KVEventPublisher(ANY, "not-a-replay-endpoint")
        except BaseException as exc:  # (reported to the test thread)
            raised.append(exc)

    t = threading.Thread(target=make, daemon=True)
    t.start()
    t.join(5.0)
    assert not t.is_alive(), "KVEventPublisher() hung instead of raising"
    assert len(raised) == 1 and isinstance(raised[0], zmq.ZMQError)


def test_close_racing_a_subscribe_stops_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    pub = KVEventPublisher(ANY)
    index = KVEventIndex(block_size=4)
    errors: list[BaseException] = []

    def close() -> None:
        try:
            index.close()
        except BaseException as exc:  # (reported to the test thread)
            errors.append(exc)

    closer = threading.Thread(target=close)
    real_start = subscriber.Subscription.start

    def start(self: subscriber.Subscription) -> None:
        closer.start()  # another thread closes the index as subscribe() starts the thread
        closer.join(0.5)
        real_start(self)

    monkeypatch.setattr(subscriber.Subscription, "start", start)
    try:
        index.subscribe(W, pub.endpoint)
        closer.join(5.0)
        assert not errors, errors
        wait_for(
            lambda: not [t for t in threading.enumerate() if t.name.startswith("cacheroute-kv")]
        )
    finally:
        for s in list(index._subs.values()):
            s.stop()
        pub.close()


def test_dp_endpoint_refuses_a_port_past_65535() -> None:
    assert dp_endpoint("tcp://10.0.0.1:65534", 1) == "tcp://10.0.0.1:65535"
    with pytest.raises(ValueError, match=r"dp_rank.*65535"):
        dp_endpoint("tcp://10.0.0.1:65535", 1)


def test_a_malformed_endpoint_leaves_no_socket_that_blocks_close() -> None:
    # The failed subscribe's exception (kept by the caller, a logger, a debugger) must not
    # keep an open monitor socket: the index's close() terminates the ZMQ context, which
    # waits for every socket of it.
    index = KVEventIndex(block_size=4)
    with pytest.raises(zmq.ZMQError) as excinfo:
        index.subscribe("y", "not-an-endpoint")
    closer = threading.Thread(target=index.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "close() hangs on a socket the failed subscribe left open"
    del excinfo


def test_an_endpoint_that_never_completes_a_handshake_goes_stale() -> None:
    # Something that is not the engine's PUB socket listens there (a misconfigured port):
    # every reconnection fails its handshake with EVENT_DISCONNECTED. The subscriber never
    # was connected, so the worker must go stale after stale_after.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    index = KVEventIndex(block_size=4, stale_after=0.5, heartbeat=0.1)
    try:
        index.subscribe(W, f"tcp://127.0.0.1:{port}")
        wait_for(lambda: index.is_stale(W), timeout=4)
        assert index.stats()[W].connected is False
    finally:
        index.close()
        listener.close()


def _silent_replay() -> tuple[zmq.Context, zmq.Socket, str]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ANY)
    return ctx, router, router.getsockopt(zmq.LAST_ENDPOINT).decode()


def test_unsubscribe_does_not_wait_out_a_replay_in_flight() -> None:
    # Subscription.stop: "it does within one poll interval", even while a replay waits.
    ctx, router, replay = _silent_replay()  # takes the request, never answers
    pub = KVEventPublisher(ANY, first_seq=3)
    index = KVEventIndex(block_size=4, replay_timeout=10.0, heartbeat=0.1)
    try:
        index.subscribe(W, pub.endpoint, replay)
        wait_for(lambda: index.stats()[W].connected)
        time.sleep(0.1)
        pub.publish([stored(1, None, 1)])  # seq 3: a catch-up replay from 0 is asked for
        assert router.poll(5000), "no replay request"
        t0 = time.monotonic()
        index.unsubscribe(W)
        assert time.monotonic() - t0 < 1.0
    finally:
        index.close()
        pub.close()
        router.close()
        ctx.term()


def test_unsubscribe_during_the_reconnection_check_keeps_the_view() -> None:
    # unsubscribe: "its view stays". Stopping while the post-disconnection replay is in
    # flight is not a sign that the publisher restarted.
    ctx, router, replay = _silent_replay()
    pub = KVEventPublisher(ANY)
    index = KVEventIndex(block_size=4, replay_timeout=10.0, heartbeat=0.1)
    try:
        index.subscribe(W, pub.endpoint, replay)
        wait_for(lambda: index.stats()[W].connected)
        time.sleep(0.1)
        pub.publish([stored(1, None, 1)])  # seq 0
        wait_for(lambda: index.stats()[W].last_seq == 0)
        index._subs[W]._verify_next = True  # type: ignore[attr-defined]  # as after EVENT_DISCONNECTED
        pub.publish([stored(2, None, 2)])  # seq 1: the check replays from seq 0
        assert router.poll(5000), "no replay request"
        index.unsubscribe(W)
        s = index.stats()[W]
        assert s.resets == 0 and s.last_seq == 0
        assert index.match(blocks(1)) == {W: 4}
    finally:
        index.close()
        pub.close()
        router.close()
        ctx.term()
