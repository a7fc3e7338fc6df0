"""What the peer re-implementations share: a base class for policies with their own index,
chained block hashing, and the engine facts some peers are configured with.

Our own code, written from the peers' published algorithms (``../shared/design.md``
section 1 and each module's docstring); no peer code is copied.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from cacheroute.policies.base import (
    CHARS_PER_TOKEN,
    Decision,
    DecisionReason,
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    check_workers,
)
from cacheroute.worker import Worker, all_basic, read_work

__all__ = [
    "Clock",
    "PeerPolicy",
    "chained_hashes",
    "prefill_seconds",
    "units_to_tokens",
]

_log = logging.getLogger("cacheroute.peers")

Clock = Callable[[], float]
"""A zero-argument callable returning seconds (``time.monotonic`` in a gateway; the
simulated arrival time in ``benchmarks/compare_policies.py``)."""


def units_to_tokens(request_text: RequestText, tokens_per_unit: float | None) -> float:
    """Tokens a request stands for: units x tokens per unit (text: chars / 4)."""
    if request_text is None:
        return 0.0
    if isinstance(request_text, str):
        return (
            len(request_text) / CHARS_PER_TOKEN
            if tokens_per_unit is None
            else (len(request_text) * tokens_per_unit)
        )
    return len(request_text) * (1.0 if tokens_per_unit is None else tokens_per_unit)


def chained_hashes(units: str | Sequence[int], block: int, limit: int | None = None) -> list[int]:
    """Chained 64-bit hashes of the full ``block``-unit blocks of ``units``.

    ``hash[i]`` covers blocks 0..i (it hashes block i together with ``hash[i-1]``), so two
    prompts share their first k hashes exactly when they share their first k blocks, as in
    vLLM's prefix cache, Dynamo's block hashes and llm-d's prefix index. A trailing partial
    block is not hashed. ``limit``: at most this many blocks.
    """
    out: list[int] = []
    prev = b"\x00" * 8
    n = len(units) // block
    if limit is not None:
        n = min(n, limit)
    text = isinstance(units, str)
    for k in range(n):
        chunk = units[k * block : (k + 1) * block]
        data = chunk.encode("utf-8", "surrogatepass") if text else repr(tuple(chunk)).encode()
        prev = hashlib.blake2b(prev + data, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def prefill_seconds(
    new_tokens: float,
    cached_tokens: float,
    per_token_s: float = 3.25e-5,
    attention_s: float = 1.06e-9,
) -> float:
    """Prefill time of ``new_tokens`` after ``cached_tokens`` on the simulator's engine
    (Llama-3.1-8B, one H100): the model a peer that profiles its engines (Preble) would fit."""
    return per_token_s * new_tokens + attention_s * new_tokens * (cached_tokens + new_tokens / 2)


class PeerPolicy(LoadBalancingPolicy):
    """Base of the peers that keep their own index: eligibility, the processed count, the
    observer and the :class:`~cacheroute.policies.base.Decision` are done here.

    Subclasses implement :meth:`choose`, which sees every worker's load (``-1`` for an
    unhealthy one), pending prefill tokens and decode tokens, read once.
    """

    needs_request_text = True

    def _init_peer(
        self,
        seed: int | None,
        on_decision: Callable[[Decision], None] | None,
        tokens_per_unit: float | None,
    ) -> None:
        self._rng = random.Random(seed)
        self._observer = on_decision
        self._tpu_setting = tokens_per_unit
        self._basic: dict[tuple[Worker, ...], bool] = {}

    def tpu(self, request_text: RequestText) -> float:
        """Tokens per unit of ``request_text``."""
        if self._tpu_setting is not None:
            return self._tpu_setting
        return 1.0 / CHARS_PER_TOKEN if isinstance(request_text, str) else 1.0

    def choose(
        self,
        workers: tuple[Worker, ...],
        eligible: list[int],
        loads: list[int],
        prefill: list[int],
        decode: list[int],
        request_text: RequestText,
    ) -> tuple[int, int, float | None]:
        """``(index, matched units on it, cost)`` for one request."""
        raise NotImplementedError

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        """Read the pool once, let :meth:`choose` decide, count and report it."""
        check_request_text(request_text)
        check_workers(workers)
        key = workers if type(workers) is tuple else tuple(workers)
        basic = self._basic.get(key)
        if basic is None:
            basic = self._basic[key] = all_basic(key)
        loads, prefill, decode = read_work(key, basic)
        eligible = [i for i, x in enumerate(loads) if x >= 0]
        if not eligible:
            return None
        index, matched, cost = self.choose(key, eligible, loads, prefill, decode, request_text)
        key[index].increment_processed()
        n = 0 if request_text is None else len(request_text)
        tpu = self.tpu(request_text)
        decision = Decision(
            index,
            key[index].url,
            DecisionReason.POLICY,
            n,
            matched,
            math.ceil(n * tpu),
            int(matched * tpu),
            cost,
        )
        if self._observer is not None:
            try:
                self._observer(decision)
            except Exception:
                _log.exception("%s on_decision observer raised; decision kept", self.name)
        return decision

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        """:meth:`decide`'s index."""
        decision = self.decide(workers, request_text)
        return None if decision is None else decision.index

    def pick_min(self, eligible: list[int], score: list[float]) -> int:
        """The eligible index with the least score; ties at random (seeded)."""
        best = min(score[i] for i in eligible)
        ties = [i for i in eligible if score[i] == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)

    def pick_max(self, eligible: list[int], score: list[float]) -> int:
        """The eligible index with the highest score; ties at random (seeded)."""
        best = max(score[i] for i in eligible)
        ties = [i for i in eligible if score[i] == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)


def describe(**settings: Any) -> str:
    """``key=value, ...`` for a repr."""
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())
