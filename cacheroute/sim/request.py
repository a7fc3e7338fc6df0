"""What the simulator replays: :class:`Request` and :class:`Workload`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Request", "Workload", "ideal_hit_tokens", "matched_blocks"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload.

    The prompt is described by *chained block ids*: ``blocks[i]`` identifies the first
    ``i + 1`` blocks of the prompt, so two prompts share a prefix of ``k`` blocks exactly
    when their first ``k`` ids are equal. Block ``i`` holds
    ``min(block_size, span_tokens - i * block_size)`` tokens (only the last block may be
    partial). Tokens after ``span_tokens`` (up to ``input_tokens``) have no id: they are
    never shared and never hit.

    Attributes:
        arrival: arrival time in seconds from the start of the workload.
        blocks: chained block ids (non-negative ints; also what the router sees).
        block_size: tokens per full block.
        span_tokens: tokens covered by ``blocks``.
        input_tokens: prompt length in tokens (``>= span_tokens``).
        output_tokens: tokens to generate (``>= 1``; the first comes out of prefill).
    """

    arrival: float
    blocks: tuple[int, ...]
    block_size: int
    span_tokens: int
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        for name in ("block_size", "span_tokens", "input_tokens", "output_tokens"):
            value = getattr(self, name)
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if not isinstance(self.blocks, tuple):
            raise TypeError(
                f"blocks must be a tuple of ints, got {type(self.blocks).__name__}: "
                f"{self.blocks!r:.60}"
            )
        arrival = self.arrival
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)):
            raise TypeError(
                f"arrival must be a real number, got {type(arrival).__name__}: {arrival!r}"
            )
        n = len(self.blocks)
        bs = self.block_size
        if bs < 1:
            raise ValueError(f"block_size must be >= 1, got {bs}")
        if not (n - 1) * bs < self.span_tokens <= n * bs and not (n == 0 == self.span_tokens):
            raise ValueError(
                f"span_tokens={self.span_tokens} does not fit {n} blocks of {bs} tokens"
            )
        if self.input_tokens < self.span_tokens:
            raise ValueError(
                f"input_tokens={self.input_tokens} is less than span_tokens={self.span_tokens}"
            )
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")
        if not 0.0 <= arrival < math.inf:  # also rejects NaN
            raise ValueError(f"arrival must be a finite number >= 0, got {arrival!r}")

    def hit_tokens(self, matched: int) -> int:
        """Tokens covered by the first ``matched`` blocks."""
        return min(matched * self.block_size, self.span_tokens)


@dataclass
class Workload:
    """Requests sorted by arrival, plus a name and a description of where they came from.

    Attributes:
        name: short name shown in reports (e.g. ``"shared_prefix"``).
        requests: the requests, sorted by ``arrival`` (the constructor sorts them, stably).
        params: the parameters that produced the workload (for the JSON report).
    """

    name: str
    requests: list[Request]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requests = sorted(self.requests, key=lambda r: r.arrival)

    def __len__(self) -> int:
        return len(self.requests)

    def limited(self, limit: int | None) -> Workload:
        """The first ``limit`` requests by arrival (all when ``limit`` is ``None``).

        Raises:
            TypeError: ``limit`` is not an int (or ``None``).
            ValueError: ``limit`` is negative.
        """
        if limit is None:
            return self
        if type(limit) is not int:
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__}: {limit!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        if limit >= len(self.requests):
            return self
        return Workload(self.name, self.requests[:limit], {**self.params, "limit": limit})

    def scaled(self, speed: float) -> Workload:
        """Arrival times divided by ``speed`` (``speed > 1`` offers load faster).

        Raises:
            TypeError: ``speed`` is not a real number (``bool`` included).
            ValueError: ``speed`` is not finite and > 0.
        """
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise TypeError(f"speed must be a real number, got {type(speed).__name__}: {speed!r}")
        if not 0 < speed < math.inf:  # also rejects NaN
            raise ValueError(f"speed must be a finite number > 0, got {speed!r}")
        if speed == 1.0:
            return self
        reqs = [
            Request(
                r.arrival / speed,
                r.blocks,
                r.block_size,
                r.span_tokens,
                r.input_tokens,
                r.output_tokens,
            )
            for r in self.requests
        ]
        return Workload(self.name, reqs, {**self.params, "speed": speed})


def matched_blocks(blocks: Sequence[int], present: dict[int, Any] | set[int]) -> int:
    """Length of the longest prefix of ``blocks`` whose ids are all in ``present``.

    Uses a binary search, which is exact when ``present`` is *prefix-closed* (every block
    present has all its ancestors present). Chained ids make that true of every cache the
    simulator keeps: a block is inserted after its ancestors and evicted before them.
    """
    n = len(blocks)
    if n == 0 or blocks[0] not in present:
        return 0
    if blocks[n - 1] in present:
        return n
    lo, hi = 1, n - 1  # the answer m has blocks[m - 1] present and blocks[m] absent
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks[mid - 1] in present:
            lo = mid
        else:
            hi = mid - 1
    return lo


def ideal_hit_tokens(requests: Sequence[Request]) -> int:
    """Hit tokens of one unbounded cache that sees every request in arrival order.

    This is the ceiling of any routing policy: a block can only hit if some earlier
    request brought it.
    """
    seen: set[int] = set()
    total = 0
    for r in requests:
        total += r.hit_tokens(matched_blocks(r.blocks, seen))
        seen.update(r.blocks)
    return total
