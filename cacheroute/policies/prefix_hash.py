"""``prefix_hash``: consistent hashing with bounded loads (CHWBL) on a prompt prefix.

Every prompt with the same first ``prefix_chars`` characters (text) or ``prefix_tokens``
tokens (token ids) hashes to the same point of a ring of ``virtual_nodes`` points per
worker. The request goes to the first worker clockwise from that point whose load stays
within the bound of *consistent hashing with bounded loads* (Mirrokni, Thorup and
Zadimoghaddam, 2018), with the bound exactly as KubeAI's ``PrefixHash`` load balancer
applies it:

    a worker qualifies when ``in_flight + 1 <= (total_in_flight + 1) / n * load_factor``

(``n`` eligible workers, ``total_in_flight`` their summed load; when the total is 0 every
worker qualifies). If no worker qualifies, the first eligible worker on the walk takes
the request. Requests sharing a prefix therefore share a worker while it is not
overloaded, and spill to the next worker on the ring (always the same one for that
prefix) when it is. KubeAI hashes the first 100 characters with 256 virtual nodes per
endpoint and a load factor of 1.25; SGLang's ``prefix_hash`` policy hashes the first 256
tokens with the same load factor. Those are the defaults here.

No tree, no per-request state: the decision is O(m) to hash the prefix (m units,
bounded by the prefix length) plus O(log(n * virtual_nodes)) for the ring search plus
O(n) for the loads and the walk. Removing or adding a worker moves only the prefixes
whose ring arc it owned (the consistent-hashing property).
"""

from __future__ import annotations

import array
import hashlib
import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from cacheroute._validation import check_callable, check_int, check_real, settle_config
from cacheroute.policies.base import (
    Decision,
    DecisionReason,
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    check_workers,
    estimate_tokens,
)
from cacheroute.policies.prefix import DecisionObserver
from cacheroute.worker import Worker, _not_a_worker, all_basic, read_loads

__all__ = ["PrefixHashConfig", "PrefixHashPolicy"]

_RING_CACHE = 8  # distinct URL lists whose ring is kept
_log = logging.getLogger("cacheroute.policies")


def _hash(data: bytes) -> int:
    """A 64-bit hash that is stable across processes and platforms (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class PrefixHashConfig:
    """Validated settings of :class:`PrefixHashPolicy` (frozen; nothing is clamped).

    Args:
        prefix_chars: int >= 1. Characters of a text prompt that are hashed. Default 100
            (KubeAI's ``prefixCharLength``): enough to separate system prompts, short
            enough that requests sharing one land together.
        prefix_tokens: int >= 1. Tokens of a token-id prompt that are hashed. Default 256
            (SGLang's ``prefix_hash``). With ``tokens_per_unit`` (a unit standing for a
            block of tokens) the first ``ceil(prefix_tokens / tokens_per_unit)`` units are
            hashed.
        virtual_nodes: int >= 1. Points per worker on the ring. Default 256 (KubeAI's
            replication): with n workers each owns ~1/n of the ring to within a few
            percent.
        load_factor: real >= 1. The bound's slack over the mean load. Default 1.25
            (KubeAI and SGLang). ``math.inf`` is plain consistent hashing.
        tokens_per_unit: real > 0 or ``None`` (1): tokens one unit of a token-id request
            stands for.
        on_decision: ``None`` or a callable receiving each
            :class:`~cacheroute.policies.base.Decision`; its exceptions are logged
            (logger ``cacheroute.policies``), never raised.

    Raises:
        TypeError: a value of the wrong type (the message names the field and the value).
        ValueError: a value out of range (the message names the field and the value).
    """

    prefix_chars: int = 100
    prefix_tokens: int = 256
    virtual_nodes: int = 256
    load_factor: float = 1.25
    tokens_per_unit: float | None = None
    on_decision: DecisionObserver | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_int("prefix_chars", self.prefix_chars, minimum=1)
        check_int("prefix_tokens", self.prefix_tokens, minimum=1)
        check_int("virtual_nodes", self.virtual_nodes, minimum=1, maximum=65536)
        lf = check_real("load_factor", self.load_factor, minimum=1.0, finite=False)
        tpu = check_real(
            "tokens_per_unit", self.tokens_per_unit, minimum=0.0, min_open=True, none_ok=True
        )
        check_callable("on_decision", self.on_decision, none_ok=True)
        object.__setattr__(self, "load_factor", lf)
        object.__setattr__(self, "tokens_per_unit", tpu)


class _Ring:
    """The hash ring of one URL list: sorted point hashes and the worker index of each."""

    __slots__ = ("basic", "hashes", "key", "owners")

    def __init__(self, key: tuple[Worker, ...], urls: tuple[str, ...], vnodes: int) -> None:
        self.key = key
        self.basic = all_basic(key)
        points = sorted(
            (_hash(f"{u}{k}".encode()), i) for i, u in enumerate(urls) for k in range(vnodes)
        )
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]


class PrefixHashPolicy(LoadBalancingPolicy):
    """Consistent hashing with bounded loads on the prompt's prefix (see the module doc).

    Build it with keyword settings (the fields of :class:`PrefixHashConfig`) or with
    ``config=``; ``make_policy("prefix_hash", ...)`` takes the same keys. Only healthy
    workers are chosen; an unhealthy worker's arcs fall to the next workers on the ring.
    Without text (``None``) the request goes to the least loaded worker (ties by fewest
    processed, then index). Thread-safe, no background thread.

    >>> from cacheroute import BasicWorker
    >>> ws = [BasicWorker(f"http://w{i}") for i in range(4)]
    >>> p = PrefixHashPolicy()
    >>> a = p.select_worker(ws, "You are a helpful assistant. " * 5 + "Hi")
    >>> p.select_worker(ws, "You are a helpful assistant. " * 5 + "Bye") == a
    True
    """

    name = "prefix_hash"
    description = "consistent hashing with bounded loads (1.25) on the prompt's prefix"
    needs_request_text = True

    def __init__(
        self,
        prefix_chars: int = 100,
        prefix_tokens: int = 256,
        virtual_nodes: int = 256,
        load_factor: float = 1.25,
        on_decision: DecisionObserver | None = None,
        *,
        tokens_per_unit: float | None = None,
        config: PrefixHashConfig | None = None,
    ) -> None:
        given: dict[str, object] = {
            "prefix_chars": prefix_chars,
            "prefix_tokens": prefix_tokens,
            "virtual_nodes": virtual_nodes,
            "load_factor": load_factor,
            "tokens_per_unit": tokens_per_unit,
        }
        config = settle_config(PrefixHashConfig, config, given, on_decision=on_decision)
        self._config = config
        tpu = config.tokens_per_unit
        self._token_units = max(1, math.ceil(config.prefix_tokens / (tpu or 1.0)))
        self._tpu = 1.0 if tpu is None else tpu
        self._rings: list[_Ring] = []
        self._lock = threading.Lock()

    @property
    def config(self) -> PrefixHashConfig:
        """The validated settings. O(1)."""
        return self._config

    def _ring(self, key: tuple[Worker, ...]) -> _Ring:
        rings = self._rings
        for r in rings:
            if r.key == key:
                return r
        try:
            urls = tuple(w.url for w in key)
        except AttributeError:
            raise _not_a_worker(key) from None
        ring = _Ring(key, urls, self._config.virtual_nodes)
        with self._lock:
            self._rings = [ring, *self._rings[: _RING_CACHE - 1]]
        return ring

    def _prefix_hash(self, request_text: str | Sequence[int]) -> int:
        if isinstance(request_text, str):
            return _hash(request_text[: self._config.prefix_chars].encode("utf-8", "surrogatepass"))
        try:
            ids = array.array("Q", request_text)  # validates every id at C speed
        except OverflowError:
            bad = next((t for t in request_text if type(t) is int and not 0 <= t < 2**64), None)
            raise ValueError(
                f"token ids must be ints in [0, 2**64), got {bad!r} in request_text"
            ) from None
        except TypeError:
            bad = next((t for t in request_text if type(t) is not int), None)
            raise TypeError(
                f"token ids must be ints, got {bad!r} ({type(bad).__name__}) in request_text"
            ) from None
        return _hash(b"t" + ids[: self._token_units].tobytes())

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        """Hash the prefix, walk the ring to the first worker within the load bound.

        Returns ``None`` when no worker is healthy (nothing is counted then).

        Raises:
            TypeError: ``workers`` or ``request_text`` of a wrong type, or a token id that
                is not an int; ValueError: a token id outside [0, 2**64).
        """
        check_request_text(request_text)
        check_workers(workers)
        key = workers if type(workers) is tuple else tuple(workers)
        ring = self._ring(key)
        loads = read_loads(key, ring.basic)
        n = total = 0
        for x in loads:
            if x >= 0:
                n += 1
                total += x
        if not n:
            return None
        if request_text is None:
            index = min(
                (i for i, x in enumerate(loads) if x >= 0),
                key=lambda i: (loads[i], key[i].processed(), i),
            )
        else:
            index = self._walk(ring, loads, n, total, self._prefix_hash(request_text))
        key[index].increment_processed()
        units = 0 if request_text is None else len(request_text)
        if request_text is None or isinstance(request_text, str):
            tokens = estimate_tokens(request_text)
        else:
            tokens = -int(-units * self._tpu // 1)
        decision = Decision(index, key[index].url, DecisionReason.HASH, units, 0, tokens, 0, None)
        observer = self._config.on_decision
        if observer is not None:
            try:
                observer(decision)
            except Exception:
                _log.exception("%s on_decision observer raised; decision kept", self.name)
        return decision

    def can_decide(self, workers: Sequence[Worker], request_text: RequestText = None) -> bool:
        """Whether :meth:`decide` would choose a worker now (some worker is healthy), without
        deciding: nothing is counted, no ring is built.

        Raises:
            TypeError: ``workers`` or ``request_text`` of a wrong type, or a token id that
                is not an int; ValueError: a token id outside [0, 2**64). As :meth:`decide`.

        Complexity: O(n) health reads + O(m) for m token ids (one C-level conversion) +
        hashing the prefix (the same validation as :meth:`decide`, by the same code).

        >>> from cacheroute import BasicWorker
        >>> PrefixHashPolicy().can_decide([BasicWorker("http://a")], [2**40])
        True
        """
        check_request_text(request_text)
        check_workers(workers)
        if request_text is not None:
            self._prefix_hash(request_text)  # refuses what decide refuses
        key = workers if type(workers) is tuple else tuple(workers)
        return max(read_loads(key), default=-1) >= 0

    def _walk(self, ring: _Ring, loads: list[int], n: int, total: int, h: int) -> int:
        """First eligible owner clockwise from ``h`` within the bound; else the first
        eligible owner met. O(points walked), at most until every eligible worker was seen."""
        hashes, owners = ring.hashes, ring.owners
        size = len(hashes)
        start = bisect_left(hashes, h)
        if start == size:
            start = 0
        bound = (total + 1) / n * self._config.load_factor
        first = -1
        seen: set[int] = set()
        for k in range(size):
            i = owners[(start + k) % size]
            if i in seen:
                continue
            seen.add(i)
            x = loads[i]
            if x < 0:
                continue
            if first < 0:
                first = i
            if total == 0 or x + 1 <= bound:
                return i
            if len(seen) == len(loads):
                break
        return first

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        """:meth:`decide`, returning only the index (``None`` when none is healthy)."""
        decision = self.decide(workers, request_text)
        return None if decision is None else decision.index

    def __repr__(self) -> str:
        c = self._config
        return (
            f"PrefixHashPolicy(prefix_chars={c.prefix_chars}, prefix_tokens={c.prefix_tokens}, "
            f"virtual_nodes={c.virtual_nodes}, load_factor={c.load_factor})"
        )
