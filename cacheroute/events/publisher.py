"""A small KV-event publisher speaking the vLLM/SGLang wire protocol.

For tests, fake engines and anything that wants to feed a :class:`KVEventIndex` (ours or
a peer's) over real sockets: a PUB socket sending ``[topic, seq, payload]`` and, with
``replay``, a ROUTER socket answering replay requests from a bounded buffer the way the
engines do (one message per buffered batch from the asked sequence number on, then the
end marker ``seq = -1``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

from cacheroute._validation import check_bool, check_int, check_str, fail
from cacheroute.events.wire import KVEvent, encode_batch

__all__ = ["KVEventPublisher"]

_END = (-1).to_bytes(8, "big", signed=True)


class KVEventPublisher:
    """Publish KV-event batches on ``endpoint`` (bound), replay on ``replay`` (bound).

    Args:
        endpoint: PUB address to bind, e.g. ``"tcp://127.0.0.1:5557"``; port ``*`` binds a
            free port (read :attr:`endpoint` afterwards).
        replay: ROUTER address to bind for replay, or ``None``.
        topic: topic frame of every message.
        buffer_steps: batches kept for replay (vLLM's default is 10000).
        replay_topic: replies carry the topic frame (vLLM since PR #45177); ``False``
            answers ``[seq, payload]`` as older engines do.
        first_seq: sequence number of the first batch (engines start at 0).
    """

    def __init__(
        self,
        endpoint: str,
        replay: str | None = None,
        *,
        topic: str = "",
        buffer_steps: int = 10_000,
        replay_topic: bool = True,
        first_seq: int = 0,
    ) -> None:
        check_str("endpoint", endpoint)
        check_str("replay", replay, none_ok=True)
        check_str("topic", topic, empty_ok=True)
        check_int("buffer_steps", buffer_steps, minimum=1)
        check_bool("replay_topic", replay_topic)
        check_int("first_seq", first_seq, minimum=0)
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._topic = topic.encode()
        self._replay_topic = replay_topic
        self._lock = threading.Lock()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = first_seq
        self._pub = self._bind(zmq.PUB, endpoint)
        self.endpoint: str = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        """The bound PUB address (with the real port)."""
        self.replay_endpoint: str | None = None
        """The bound ROUTER address, or ``None``."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if replay is not None:
            self._router = self._bind(zmq.ROUTER, replay)
            self.replay_endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._thread = threading.Thread(
                target=self._serve, name="cacheroute-kv-publisher-replay", daemon=True
            )
            self._thread.start()

    def _bind(self, kind: int, addr: str) -> Any:
        s = self._ctx.socket(kind)
        s.setsockopt(self._zmq.LINGER, 0)
        try:
            s.bind(addr)
        except Exception:
            self._ctx.destroy(linger=0)  # every socket of it: the PUB too when replay fails
            raise
        return s

    @property
    def next_seq(self) -> int:
        """Sequence number the next batch gets."""
        with self._lock:
            return self._seq

    def publish(
        self,
        events: Sequence[KVEvent],
        *,
        shape: Literal["map", "array"] = "map",
        dp_rank: int | None = None,
        send: bool = True,
    ) -> int:
        """Encode ``events`` as one batch, buffer it for replay and send it.

        ``send=False`` buffers without sending: a subscriber sees a gap it can replay
        (the way a message lost past the PUB high-water mark looks).

        Returns:
            The batch's sequence number.
        """
        check_bool("send", send)
        payload = encode_batch(events, shape=shape, dp_rank=dp_rank)
        return self.publish_raw(payload, send=send)

    def publish_raw(self, payload: bytes, *, send: bool = True) -> int:
        """Send an already encoded (or deliberately malformed) payload as the next batch."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise fail("payload", "bytes", payload, TypeError)
        check_bool("send", send)
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, bytes(payload)))
            if send:
                self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])
            return seq

    def _serve(self) -> None:
        zmq = self._zmq
        router = self._router
        try:
            while not self._stop.is_set():
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or len(frames[2]) != 8:
                    continue  # not [identity, b"", start_seq]: ignored, as engines do
                ident, _, start_b = frames
                start = int.from_bytes(start_b, "big")
                with self._lock:
                    batches = [(s, p) for s, p in self._buffer if s >= start]
                head = [ident, b""] + ([self._topic] if self._replay_topic else [])
                for s, p in batches:
                    router.send_multipart([*head, s.to_bytes(8, "big"), p])
                router.send_multipart([*head, _END, b""])
        except zmq.ZMQError:  # pragma: no cover - context terminated under us
            pass
        finally:
            router.close(linger=0)

    def close(self) -> None:
        """Stop the replay thread and close the sockets (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if not self._pub.closed:
                self._pub.close(linger=0)
        with contextlib.suppress(Exception):
            self._ctx.term()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
