"""KV-event index: route by what the engines report they cache.

vLLM and SGLang publish every change of their prefix cache (blocks stored, blocks removed,
cache cleared) over ZMQ. :class:`KVEventIndex` subscribes to those streams and keeps, per
worker, an exact view of which token prefixes its engine holds, so a policy can ask
:meth:`KVEventIndex.match` instead of guessing from what it routed where.

>>> from cacheroute.events import BlockStored, KVEventIndex, encode_batch
>>> with KVEventIndex(block_size=4) as index:
...     _ = index.apply("http://w1:8000", 0, encode_batch([
...         BlockStored([101, 102], None, list(range(8)), 4)]))
...     index.match(list(range(6)))
{'http://w1:8000': 4}

The ZMQ transport and the msgpack codec are the ``events`` extra
(``pip install '.[events]'`` in a checkout); importing this package needs neither. See
``docs/events.md``.
"""

from cacheroute.events.index import KVEventIndex, WorkerStats
from cacheroute.events.publisher import KVEventPublisher
from cacheroute.events.subscriber import dp_endpoint
from cacheroute.events.wire import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    WireFormatError,
    decode_batch,
    encode_batch,
)

__all__ = [
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventBatch",
    "KVEventIndex",
    "KVEventPublisher",
    "WireFormatError",
    "WorkerStats",
    "decode_batch",
    "dp_endpoint",
    "encode_batch",
]
