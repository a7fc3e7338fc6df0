"""What the simulator replays: :class:`Request` and :class:`Workload`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cacheroute._validation import check_int, check_real, check_sequence, check_str, fail

__all__ = [
    "MAX_BLOCKS",
    "MAX_TOKENS",
    "Request",
    "Workload",
    "ideal_hit_tokens",
    "matched_blocks",
]

MAX_TOKENS = 2**40
"""The largest token count the simulator takes (a prompt, an output, a block, a cache):
about 1.1e12, far beyond any model's context, and small enough that every simulated
time (token counts times the engine's per-token costs) stays a finite float."""

MAX_BLOCKS = 2**20
"""The most blocks one request may have when a loader or generator has to *make* its
block ids (a Claude-Code ``hash_id_ranges`` run, a generated prompt): 1,048,576, which
at 64 tokens a block is 67M tokens; more would be an allocation, not a workload."""

_MAX_ID = 2**64 - 1  # the router's token ids are unsigned 64-bit


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
        check_int("block_size", self.block_size, minimum=1, maximum=MAX_TOKENS)
        for name in ("span_tokens", "input_tokens"):
            check_int(name, getattr(self, name), minimum=0, maximum=MAX_TOKENS)
        check_int("output_tokens", self.output_tokens, minimum=1, maximum=MAX_TOKENS)
        blocks = self.blocks
        if not isinstance(blocks, tuple):
            raise fail("blocks", "a tuple of ints", blocks, TypeError)
        if blocks:
            if any(t is not int for t in set(map(type, blocks))):  # C speed; bool is refused
                bad = next(b for b in blocks if type(b) is not int)
                raise fail("blocks", "a tuple of ints", bad, TypeError)
            if min(blocks) < 0 or max(blocks) > _MAX_ID:
                bad = next(b for b in blocks if not 0 <= b <= _MAX_ID)
                raise fail("blocks", "a tuple of ints in [0, 2**64 - 1]", bad)
        arrival = check_real("arrival", self.arrival, minimum=0.0)
        if type(self.arrival) is not float:
            object.__setattr__(self, "arrival", arrival)  # an int arrival, as a float
        n = len(blocks)
        bs = self.block_size
        if not (n - 1) * bs < self.span_tokens <= n * bs and not (n == 0 == self.span_tokens):
            raise ValueError(
                f"span_tokens={self.span_tokens} does not fit {n} blocks of {bs} tokens"
            )
        if self.input_tokens < self.span_tokens:
            raise ValueError(
                f"input_tokens={self.input_tokens} is less than span_tokens={self.span_tokens}"
            )

    def hit_tokens(self, matched: int) -> int:
        """Tokens covered by the first ``matched`` blocks."""
        if type(matched) is not int or matched < 0:
            check_int("matched", matched, minimum=0)
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
        check_str("name", self.name)
        requests = self.requests
        if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, (list, tuple)):
            raise fail("requests", "a list of Request", requests, TypeError)
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                raise fail(f"requests[{i}]", "a Request", r, TypeError)
        if not isinstance(self.params, dict):
            raise fail("params", "a dict", self.params, TypeError)
        self.requests = sorted(requests, key=lambda r: r.arrival)

    def __len__(self) -> int:
        return len(self.requests)

    def limited(self, limit: int | None) -> Workload:
        """The first ``limit`` requests by arrival (all when ``limit`` is ``None``).

        Raises:
            TypeError: ``limit`` is not an int (or ``None``).
            ValueError: ``limit`` is negative.
        """
        check_int("limit", limit, minimum=0, none_ok=True)
        if limit is None or limit >= len(self.requests):
            return self
        return Workload(self.name, self.requests[:limit], {**self.params, "limit": limit})

    def scaled(self, speed: float) -> Workload:
        """Arrival times divided by ``speed`` (``speed > 1`` offers load faster).

        Raises:
            TypeError: ``speed`` is not a real number (``bool`` included).
            ValueError: ``speed`` is not finite and > 0, or so small that the last
                arrival would be beyond the float range.
        """
        speed = check_real("speed", speed, minimum=0.0, min_open=True)
        if speed == 1.0:
            return self
        last = self.requests[-1].arrival if self.requests else 0.0
        if not last / speed < math.inf:
            raise fail("speed", f"large enough to keep the last arrival ({last:g} s) finite", speed)
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

    Raises:
        TypeError: ``blocks`` is not a list or tuple, or ``present`` not a dict or set.
    """
    if type(blocks) is not list and type(blocks) is not tuple:
        check_sequence("blocks", blocks)
    if not isinstance(present, (dict, set, frozenset)):
        raise fail("present", "a dict or set of block ids", present, TypeError)
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


def _check_request(param: str, value: object) -> None:
    if not isinstance(value, Request):
        raise fail(param, "a Request", value, TypeError)


def ideal_hit_tokens(requests: Sequence[Request]) -> int:
    """Hit tokens of one unbounded cache that sees every request in arrival order.

    This is the ceiling of any routing policy: a block can only hit if some earlier
    request brought it.

    Raises:
        TypeError: ``requests`` is not a list or tuple of :class:`Request`.
    """
    check_sequence("requests", requests, item=_check_request)
    seen: set[int] = set()
    total = 0
    for r in requests:
        total += r.hit_tokens(matched_blocks(r.blocks, seen))
        seen.update(r.blocks)
    return total
