"""The background ZMQ subscriber behind :meth:`KVEventIndex.subscribe`.

One thread per subscribed worker owns three sockets of the index's ZMQ context:

* a SUB socket connected to the engine's PUB ``endpoint`` (messages
  ``[topic, seq, payload]``), with ZMTP heartbeats so a dead publisher is noticed;
* a monitor of that SUB socket (connected / disconnected), which drives staleness;
* with ``replay``, a DEALER socket connected to the engine's ROUTER replay socket. A
  request is ``[b"", start_seq]`` (8 bytes big-endian); the engine answers with one
  message per buffered batch from ``start_seq`` on, ``[b"", seq, payload]`` (vLLM since
  PR #45177: ``[b"", topic, seq, payload]``), then ``seq = -1`` to end. A DEALER is used
  rather than a REQ socket because a REQ socket takes only the first reply of a request.

The thread polls with a short timeout so :meth:`Subscription.stop` ends it promptly; every
error in handling one message is counted and logged, never raised out of the loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from cacheroute._validation import check_int, check_str

if TYPE_CHECKING:
    from cacheroute.events.index import KVEventIndex

__all__ = ["Subscription", "dp_endpoint"]

log = logging.getLogger("cacheroute.events")

_POLL_MS = 50
_DRAIN = 256  # messages handled per wake-up before the monitor is looked at again


def dp_endpoint(endpoint: str, dp_rank: int) -> str:
    """The endpoint a data-parallel rank's publisher uses: vLLM and SGLang add the rank to
    the TCP port (``tcp://h:5557`` -> ``tcp://h:5558`` for rank 1) and suffix ``_dp<rank>``
    to an ``inproc://`` name.

    >>> dp_endpoint("tcp://10.0.0.1:5557", 2)
    'tcp://10.0.0.1:5559'
    """
    check_str("endpoint", endpoint)
    check_int("dp_rank", dp_rank, minimum=0)
    if dp_rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{dp_rank}"
    head, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint must end with ':<port>', got {endpoint!r}")
    if int(port) + dp_rank > 65535:
        raise ValueError(
            f"dp_rank must keep the port <= 65535, got {dp_rank} (port {port} of {endpoint!r})"
        )
    return f"{head}:{int(port) + dp_rank}"


class _Stopped(Exception):
    """Raised inside a replay when :meth:`Subscription.stop` is called."""


class Subscription(threading.Thread):
    """One worker's subscriber thread (made by :meth:`KVEventIndex.subscribe`).

    Sockets are created here, in the caller's thread (so a malformed endpoint raises at
    once), and used only by the thread afterwards.
    """

    def __init__(
        self,
        index: KVEventIndex,
        key: str,
        ctx: Any,
        endpoint: str,
        replay: str | None,
        *,
        topic: str,
        dp_rank: int | None,
        catch_up: bool,
        heartbeat: float,
        replay_timeout: float,
    ) -> None:
        super().__init__(name=f"cacheroute-kv-events[{key}]", daemon=True)
        import zmq

        self._zmq = zmq
        self._index = index
        self._key = key
        self._ctx = ctx
        self._replay_endpoint = replay
        self._dp_rank = dp_rank
        self._catch_up = catch_up
        self._replay_timeout = replay_timeout
        # Set when the connection drops: the publisher may restart and publish past our
        # last seq before we are back, so the first live batch then proves nothing.
        self._verify_next = False
        self._stop_event = threading.Event()
        hb = max(1, int(heartbeat * 1000))
        sub = ctx.socket(zmq.SUB)
        mon = None
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.HEARTBEAT_IVL, hb)
            sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * hb)
            sub.setsockopt(zmq.HEARTBEAT_TTL, 3 * hb)
            sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            self._mon = mon = sub.get_monitor_socket(events)
            sub.connect(endpoint)
        except Exception:  # a malformed address: leave no socket behind
            if mon is not None:
                with contextlib.suppress(Exception):
                    sub.disable_monitor()
                mon.close(linger=0)
            sub.close(linger=0)
            raise
        self._sub = sub
        try:
            self._dealer: Any = self._new_dealer() if replay is not None else None
        except Exception:  # a malformed replay address: leave no socket behind
            self._mon.close(linger=0)
            sub.close(linger=0)
            raise

    def _new_dealer(self) -> Any:
        zmq = self._zmq
        d = self._ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        try:
            d.connect(self._replay_endpoint)
        except Exception:
            d.close(linger=0)
            raise
        return d

    def stop(self) -> None:
        """Ask the thread to end (it does within one poll interval)."""
        self._stop_event.set()

    def run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        try:
            while not self._stop_event.is_set():
                try:
                    ready = dict(poller.poll(_POLL_MS))
                    if self._mon in ready:
                        self._monitor()
                    if self._sub in ready:
                        self._drain()
                except _Stopped:  # stopped inside a replay: nothing of its batch applied
                    break
                except Exception as exc:  # a bug or a socket error: log, keep going
                    if self._stop_event.is_set():
                        break
                    log.exception("KV event subscriber for %s: %s", self._key, exc)
                    time.sleep(_POLL_MS / 1000)
        finally:
            self._close()

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._sub.disable_monitor()
        self._mon.close(linger=0)
        self._sub.close(linger=0)
        if self._dealer is not None:
            self._dealer.close(linger=0)

    def _monitor(self) -> None:
        zmq = self._zmq
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                msg = self._mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._index._set_connected(self._key, True)
            elif event == zmq.EVENT_DISCONNECTED:
                self._index._set_connected(self._key, False)
                self._verify_next = True

    def _drain(self) -> None:
        zmq = self._zmq
        for _ in range(_DRAIN):
            if self._stop_event.is_set():
                return
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        index, key = self._index, self._key
        if len(frames) != 3 or len(frames[1]) != 8:
            index._bad(
                key, None, f"expected [topic, seq(8 bytes), payload], got {len(frames)} frames"
            )
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq < 0:
            index._bad(key, seq, "negative sequence number")
            return
        last = index._last_seq(key)
        verify, self._verify_next = self._verify_next, False
        if last is not None and seq <= last:
            # A PUB socket sends each batch once and replays come over the DEALER, so a
            # live batch not above the last is a new publisher process (numbering from 0
            # again), even seq 0 after an old process that published only seq 0.
            index._restart(key)  # its old cache is gone
            last = None
        gap = False
        if self._dealer is not None:
            start = None
            if last is not None and verify:
                # Back after a disconnection: the batch at our last seq, replayed, is the
                # one we applied unless the publisher restarted meanwhile.
                batches = self._fetch(last, seq)
                if batches and batches[0][0] == last and index._is_last(key, batches[0][1]):
                    if seq > last + 1:
                        gap = True
                        index._count(key, "gaps")
                    self._apply_replayed(batches[1:])
                else:  # restarted (or its buffer no longer reaches our last seq)
                    index._restart(key)
                    last = None
            if last is None:
                if self._catch_up and seq > 0:
                    start = 0
            elif seq > last + 1 and not verify:
                start = last + 1
                gap = True
                index._count(key, "gaps")
            if start is not None:
                self._apply_replayed(self._fetch(start, seq))
        index._apply(key, seq, frames[2], self._dp_rank, gap_noted=gap)

    def _apply_replayed(self, batches: list[tuple[int, bytes]] | None) -> None:
        for seq, payload in batches or ():
            self._index._apply(self._key, seq, payload, self._dp_rank, replayed=True)

    def _fetch(self, start: int, upto: int) -> list[tuple[int, bytes]] | None:
        """The buffered batches ``start..upto-1``, in order (``None``: no end in time)."""
        index, key = self._index, self._key
        index._count(key, "replays")
        dealer = self._dealer
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        deadline = time.monotonic() + self._replay_timeout
        got: list[tuple[int, bytes]] = []
        while True:
            if self._stop_event.is_set():
                raise _Stopped  # ends the thread (run())
            left = deadline - time.monotonic()
            if left > 0 and not dealer.poll(min(_POLL_MS, int(left * 1000) + 1)):
                continue
            if left <= 0:
                # No end marker in time: drop this DEALER so late replies cannot be taken
                # for the next replay's.
                log.warning("KV events from %s: replay from seq %d timed out", key, start)
                dealer.close(linger=0)
                self._dealer = self._new_dealer()
                return got or None
            frames = dealer.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) == 3:  # [topic, seq, payload] (vLLM PR #45177)
                frames = frames[1:]
            if len(frames) != 2 or len(frames[0]) != 8:
                if len(frames) <= 1 or not frames[0]:  # early vLLM ended with b""
                    return got
                index._bad(key, None, "malformed replay reply")
                continue
            seq = int.from_bytes(frames[0], "big", signed=True)
            if seq < 0:
                return got  # end of replay
            if start <= seq < upto:
                got.append((seq, frames[1]))
