"""The modelled serving engine: a prefix KV cache plus a continuous-batching scheduler.

One :class:`Engine` stands for one SGLang or vLLM replica. It is driven by the
discrete-event loop in :mod:`cacheroute.sim.simulator` and never looks at a clock.

**KV cache.** Exact and block-granular: a block (one chained id of the workload) is
resident or not. Blocks used by running requests are *pinned*; unpinned resident blocks
sit in one LRU list and are evicted least recently used first, as vLLM's and SGLang's
prefix caches do. When a request finishes, its blocks are unpinned leaf first, so a
block always stays more recent than its descendants: the cache is prefix-closed and a
prefix match is a binary search. Capacity counts tokens: resident blocks (their real
token counts), plus every running request's un-identified tail and its reserved output.
Generated tokens are not cached (trace formats do not identify them).

**Scheduling.** First come, first served. Each iteration is either a *prefill* of the
waiting requests that fit (batch size, memory, and a token budget per iteration; the
head of the queue is always admitted into an empty engine, even when it is larger than
the cache), or one or more *decode steps* of the running batch (prefill first, as
SGLang does). A prefill iteration produces each admitted request's first token; every
decode step produces one more token for each running request. Runs of decode steps with
an unchanged batch are simulated as one event, split at a step boundary when a new
request arrives, so the cost of the simulation grows with the number of requests, not
the number of tokens. Requests sharing blocks within one prefill batch hit each other's
blocks (as if the engine deduplicated the batch); that keeps the one-unbounded-cache
ceiling exact and favours no policy.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

from cacheroute._validation import check_int, check_real
from cacheroute.sim.request import MAX_TOKENS, Request, matched_blocks

__all__ = ["EngineConfig", "Engine", "KVEvent"]


@dataclass(frozen=True, slots=True)
class KVEvent:
    """A change to one engine's prefix cache, as engines publish it to routers.

    vLLM and SGLang publish such events (``BlockStored`` / ``BlockRemoved``) so that a
    router can track every engine's cache exactly instead of predicting it; the
    simulator delivers them to router replicas after a delay (see
    :func:`cacheroute.sim.simulate`'s ``kv_event_delay_s``).

    Attributes:
        time: when the engine emitted it: ``"stored"`` when the prefill that computed
            the blocks finished, ``"removed"`` when they were evicted.
        worker: the engine's index.
        kind: ``"stored"`` or ``"removed"``.
        blocks: the chained block ids (the workload's ids, which are also what the
            router sees as the request's units): for ``"stored"``, one run of a chain
            (each block extends the one before it); for ``"removed"``, any blocks.
        parent: for ``"stored"``, the block the run extends (``None``: the run starts a
            chain); ``None`` for ``"removed"``.
    """

    time: float
    worker: int
    kind: str
    blocks: tuple[int, ...]
    parent: int | None = None


_TIME_FIELDS = (
    "prefill_overhead_s",
    "prefill_per_token_s",
    "prefill_attention_s",
    "decode_weights_s",
    "decode_per_seq_s",
    "decode_per_context_token_s",
)


@dataclass(frozen=True)
class EngineConfig:
    """Constants of the engine model. Defaults: Llama-3.1-8B in bf16 on one H100 SXM (80 GB).

    Model facts used below: 8.03e9 parameters (16.06 GB in bf16); 32 layers; 32 query
    heads and 8 KV heads of 128 dims (hidden 4,096). Hardware: 989 TFLOP/s dense bf16,
    3.35 TB/s HBM3, 81,559 MiB of memory.

    Attributes:
        cache_tokens: KV-cache capacity in tokens, ``None`` for unbounded. KV per token =
            2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 131,072 B
            (128 KiB). Memory for the pool: 85.5 GB x 0.9 (the static memory fraction
            SGLang uses on an 80 GB GPU) - 16.06 GB weights - ~2 GB activations and CUDA
            graphs = ~58.9 GB, / 131,072 B = ~450,000 tokens.
        max_batch: maximum running requests (vLLM's ``max_num_seqs`` default, 256).
        max_prefill_tokens: uncached tokens one prefill iteration may take (a typical
            chunked-prefill budget); the first request of an iteration is always taken.
        prefill_overhead_s: fixed cost of one prefill iteration (scheduling, launches):
            5 ms.
        prefill_per_token_s: linear-layer cost per prefilled token: 2 x 8.03e9 FLOP at
            50% of 989 TFLOP/s = 32.5 us (~31k tokens/s).
        prefill_attention_s: attention cost per (new token x context token): 4 x 4,096 x
            32 layers = 524,288 FLOP at 50% of 989 TFLOP/s = 1.06 ns. A prefill of ``u``
            new tokens after ``c`` cached ones costs ``u * (c + u / 2)`` of these, which is
            what makes long cached contexts still cost something.
        decode_weights_s: reading all weights once per decode step: 16.06 GB at 80% of
            3.35 TB/s = 6.0 ms; the floor of a step (~165 tokens/s for one stream).
        decode_per_seq_s: compute per sequence per step, 32.5 us (as prefill); a step
            costs ``max(decode_weights_s, batch * decode_per_seq_s)`` (roofline: memory
            bound up to ~185 sequences, compute bound above).
        decode_per_context_token_s: reading one token of KV per step: 131,072 B at 80% of
            3.35 TB/s = 48.9 ns, times the batch's total context.

    Raises:
        TypeError: a count that is not an ``int`` (``cache_tokens`` may be ``None``) or a
            time constant that is not a real number (``bool`` is neither).
        ValueError: a count below 1 or above :data:`~cacheroute.sim.request.MAX_TOKENS`,
            a time constant negative, infinite or NaN, or both ``decode_weights_s`` and
            ``decode_per_seq_s`` zero. Nothing is clamped.
    """

    cache_tokens: int | None = 450_000
    max_batch: int = 256
    max_prefill_tokens: int = 16_384
    prefill_overhead_s: float = 0.005
    prefill_per_token_s: float = 3.25e-5
    prefill_attention_s: float = 1.06e-9
    decode_weights_s: float = 0.006
    decode_per_seq_s: float = 3.25e-5
    decode_per_context_token_s: float = 4.89e-8

    def __post_init__(self) -> None:
        check_int("cache_tokens", self.cache_tokens, minimum=1, maximum=MAX_TOKENS, none_ok=True)
        for name in ("max_batch", "max_prefill_tokens"):
            check_int(name, getattr(self, name), minimum=1, maximum=MAX_TOKENS)
        for name in _TIME_FIELDS:
            check_real(name, getattr(self, name), minimum=0.0)
        if self.decode_weights_s <= 0 and self.decode_per_seq_s <= 0:
            raise ValueError(
                "decode_weights_s or decode_per_seq_s must be > 0 (a decode step must take "
                f"time), got decode_weights_s={self.decode_weights_s!r} and "
                f"decode_per_seq_s={self.decode_per_seq_s!r}"
            )

    def prefill_time(self, new_tokens: int, attention_units: float) -> float:
        """Seconds for one prefill iteration of ``new_tokens`` uncached tokens."""
        if type(new_tokens) is not int or new_tokens < 0:
            check_int("new_tokens", new_tokens, minimum=0)
        if not (type(attention_units) in (int, float) and 0 <= attention_units < math.inf):
            check_real("attention_units", attention_units, minimum=0.0)
        return (
            self.prefill_overhead_s
            + self.prefill_per_token_s * new_tokens
            + self.prefill_attention_s * attention_units
        )

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        """Seconds for one decode step of ``batch`` sequences holding ``context_tokens``."""
        check_int("batch", batch, minimum=0)
        check_int("context_tokens", context_tokens, minimum=0)
        return (
            max(self.decode_weights_s, batch * self.decode_per_seq_s)
            + self.decode_per_context_token_s * context_tokens
        )

    def to_dict(self) -> dict[str, Any]:
        """The constants as a plain dict (for reports)."""
        return asdict(self)


_IDLE, _PREFILL, _DECODE = 0, 1, 2


class Engine:
    """One modelled serving engine. Driven by the simulator; see the module docstring.

    The simulator calls :meth:`enqueue` when the router sends a request here and
    :meth:`boundary` at the time this engine asked for (``next_time``); an event
    whose version is not ``version`` is stale and must be skipped.

    Per-request results are written into the lists passed at construction, indexed by
    request id: ``first_token[rid]`` (time of the first token), ``hit[rid]`` (hit
    tokens) and, when given, ``admitted[rid]`` (when the request left the queue for a
    prefill batch: its queueing delay is that minus its arrival).
    """

    __slots__ = (
        "_admitted",
        "_ctx_input",
        "_ctx_start",
        "_lru",
        "_lru_tokens",
        "_phase",
        "_ref",
        "_run_dt",
        "_run_start",
        "_run_steps",
        "_running",
        "_seq",
        "_steps",
        "_storing",
        "_tok",
        "_waiting",
        "admitted",
        "capacity",
        "config",
        "events",
        "first_token",
        "hit",
        "index",
        "next_time",
        "oversized",
        "peak_used",
        "prefilled",
        "requests",
        "used",
        "version",
    )

    def __init__(
        self,
        index: int,
        config: EngineConfig,
        requests: list[Request],
        first_token: list[float],
        hit: list[int],
        admitted: list[float] | None = None,
        events: list[KVEvent] | None = None,
    ) -> None:
        self.index = index
        self.events = events  # None: no KV events (no cost)
        # (parent, run of new blocks) per request of the prefill in progress
        self._storing: list[tuple[int | None, tuple[int, ...]]] = []
        self.admitted = admitted if admitted is not None else [0.0] * len(requests)
        self.config = config
        self.requests = requests
        self.first_token = first_token
        self.hit = hit
        self.capacity: float = math.inf if config.cache_tokens is None else config.cache_tokens
        self.used = 0  # resident block tokens + tails and output reservations of running
        self.peak_used = 0
        self.oversized = 0  # requests admitted alone although larger than free memory
        self._tok: dict[int, int] = {}  # resident block -> tokens
        self._ref: dict[int, int] = {}  # pinned block -> running requests using it
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident, LRU first
        self._lru_tokens = 0
        self._waiting: deque[int] = deque()
        self._running: list[tuple[int, int]] = []  # heap of (finish step, rid)
        self._ctx_input = 0  # sum of input tokens of running requests
        self._ctx_start = 0  # sum of their start steps (context = input + steps since)
        self._steps = 0  # decode steps done so far
        self._phase = _IDLE
        self._admitted: list[int] = []
        self._run_start = 0.0
        self._run_dt = 0.0
        self._run_steps = 0
        self._seq = 0
        self.version = 0
        self.prefilled: list[int] = []  # request ids whose first token the last boundary made
        self.next_time: float | None = None

    # ---------------------------------------------------------------- queries

    def queued(self) -> int:
        """Requests waiting for prefill."""
        return len(self._waiting)

    def running(self) -> int:
        """Requests in the running (decode) batch or in the prefill in progress."""
        return len(self._running) + len(self._admitted)

    def resident_tokens(self) -> int:
        """Tokens of the resident (cached) blocks."""
        return sum(self._tok.values())

    # ----------------------------------------------------------------- events

    def enqueue(self, rid: int, now: float) -> bool:
        """Queue request ``rid`` at time ``now``.

        Returns ``True`` when ``next_time`` changed (the simulator must schedule an
        event at it, with the current ``version``).

        Raises:
            TypeError, ValueError: ``rid`` is not an index into the engine's requests, or
                ``now`` is not a finite real number (nothing is queued then).
        """
        if type(rid) is not int or not 0 <= rid < len(self.requests):
            check_int("rid", rid, minimum=0, maximum=len(self.requests) - 1)
        if not (type(now) in (float, int) and -math.inf < now < math.inf):
            check_real("now", now)
        self._waiting.append(rid)
        if self._phase == _IDLE:
            self._schedule(now)
            return True
        if self._phase == _DECODE and len(self._waiting) == 1:
            # Cut the decode run at the end of the step in progress so the newcomer's
            # prefill can start there.
            done = math.ceil((now - self._run_start) / self._run_dt - 1e-9)
            done = max(done, 0)
            if done < self._run_steps:
                self._run_steps = done
                self.next_time = max(now, self._run_start + done * self._run_dt)
                self.version += 1
                return True
        return False

    def boundary(self, now: float) -> list[int]:
        """Finish the iteration ending at ``now``; return the request ids that completed.

        Afterwards ``next_time`` is the next boundary (``None`` when idle) with a new
        ``version``, and ``prefilled`` lists the requests whose first token this
        boundary produced (the simulator reports them to their leases).

        Raises:
            TypeError, ValueError: ``now`` is not a finite real number (nothing changes).
        """
        if not (type(now) in (float, int) and -math.inf < now < math.inf):
            check_real("now", now)
        finished: list[int] = []
        self.prefilled = []
        if self._phase == _PREFILL:
            if self._storing and self.events is not None:
                for parent, run in self._storing:
                    self.events.append(KVEvent(now, self.index, "stored", run, parent))
                self._storing = []
            self.prefilled = self._admitted
            first_token = self.first_token
            reqs = self.requests
            running = self._running
            steps = self._steps
            for rid in self._admitted:
                first_token[rid] = now
                r = reqs[rid]
                if r.output_tokens <= 1:
                    self._release(r, now)
                    finished.append(rid)
                else:
                    heapq.heappush(running, (steps + r.output_tokens - 1, rid))
                    self._ctx_input += r.input_tokens
                    self._ctx_start += steps
            self._admitted = []
        elif self._phase == _DECODE:
            steps = self._steps = self._steps + self._run_steps
            running = self._running
            reqs = self.requests
            while running and running[0][0] <= steps:
                finish, rid = heapq.heappop(running)
                r = reqs[rid]
                self._ctx_input -= r.input_tokens
                self._ctx_start -= finish - r.output_tokens + 1
                self._release(r, now)
                finished.append(rid)
        self._schedule(now)
        return finished

    # ------------------------------------------------------------- internals

    def _schedule(self, now: float) -> None:
        self.version += 1
        if self._waiting and self._prefill(now):
            return
        running = self._running
        if running:
            cfg = self.config
            batch = len(running)
            context = self._ctx_input + batch * self._steps - self._ctx_start
            dt = max(cfg.decode_weights_s, batch * cfg.decode_per_seq_s) + (
                cfg.decode_per_context_token_s * context
            )
            self._phase = _DECODE
            self._run_start = now
            self._run_dt = dt
            self._run_steps = running[0][0] - self._steps
            self.next_time = now + self._run_steps * dt
        else:
            self._phase = _IDLE
            self.next_time = None

    def _prefill(self, now: float) -> bool:
        """Admit what fits from the queue into a prefill iteration; ``False`` if nothing."""
        cfg = self.config
        waiting = self._waiting
        reqs = self.requests
        tok = self._tok
        lru = self._lru
        ref = self._ref
        capacity = self.capacity
        slots = cfg.max_batch - len(self._running)
        budget = cfg.max_prefill_tokens
        admitted = self._admitted
        storing = self._storing if self.events is not None else None
        new_total = 0
        attention = 0.0
        while waiting and slots > 0:
            rid = waiting[0]
            r = reqs[rid]
            blocks = r.blocks
            k = matched_blocks(blocks, tok)
            hit = r.hit_tokens(k)
            new = r.input_tokens - hit
            empty = not admitted and not self._running
            if admitted and new_total + new > budget:
                break
            need = new + r.output_tokens
            lru_matched = 0
            for i in range(k):
                b = blocks[i]
                if b in lru:
                    lru_matched += tok[b]
            if self.used + need - (self._lru_tokens - lru_matched) > capacity:
                if not empty:
                    break
                self.oversized += 1
            waiting.popleft()
            # Pin the matched blocks.
            for i in range(k):
                b = blocks[i]
                c = ref.get(b)
                if c is None:
                    del lru[b]
                    ref[b] = 1
                else:
                    ref[b] = c + 1
            self._lru_tokens -= lru_matched
            # Evict least recently used unpinned blocks until the request fits.
            used = self.used
            removed: list[int] = []
            while used + need > capacity and lru:
                b, _ = lru.popitem(last=False)
                t = tok.pop(b)
                used -= t
                self._lru_tokens -= t
                removed.append(b)
            if removed and self.events is not None:
                self.events.append(KVEvent(now, self.index, "removed", tuple(removed)))
            # Insert the new blocks, pinned. (A new block can only be resident already
            # when ids are not chained; the books stay exact anyway.)
            bs = r.block_size
            span = r.span_tokens
            added = r.input_tokens - span + r.output_tokens
            start = -1  # first block this request stores
            for i in range(k, len(blocks)):
                b = blocks[i]
                if b in tok:
                    c = ref.get(b)
                    if c is None:
                        del lru[b]
                        self._lru_tokens -= tok[b]
                        ref[b] = 1
                    else:
                        ref[b] = c + 1
                    continue
                t = tok[b] = min(bs, span - i * bs)
                ref[b] = 1
                added += t
                if start < 0:
                    start = i
            if storing is not None and start >= 0:
                storing.append((blocks[start - 1] if start else None, blocks[start:]))
            used += added
            self.used = used
            if used > self.peak_used:
                self.peak_used = used
            self.hit[rid] = hit
            self.admitted[rid] = now
            admitted.append(rid)
            slots -= 1
            new_total += new
            attention += new * (hit + new / 2.0)
        if not admitted:
            return False
        self._phase = _PREFILL
        self.next_time = now + cfg.prefill_time(new_total, attention)
        return True

    def _release(self, r: Request, now: float) -> None:
        """Unpin a finished request's blocks (leaf first) and free its reservations."""
        ref = self._ref
        lru = self._lru
        tok = self._tok
        freed = 0
        for b in reversed(r.blocks):
            c = ref[b] - 1
            if c:
                ref[b] = c
            else:
                del ref[b]
                lru[b] = None
                freed += tok[b]
        self._lru_tokens += freed
        self.used -= r.input_tokens - r.span_tokens + r.output_tokens
        if self.used > self.capacity:
            # An oversized request left: shrink back to capacity.
            removed: list[int] = []
            while self.used > self.capacity and lru:
                b, _ = lru.popitem(last=False)
                t = tok.pop(b)
                self.used -= t
                self._lru_tokens -= t
                removed.append(b)
            if removed and self.events is not None:
                self.events.append(KVEvent(now, self.index, "removed", tuple(removed)))
