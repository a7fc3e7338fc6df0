"""``random``: a uniformly random healthy worker."""

from __future__ import annotations

import random as _random
import threading
from collections.abc import Sequence

from cacheroute.policies.base import (
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    healthy_indices,
)
from cacheroute.worker import Worker

__all__ = ["RandomPolicy"]


def _checked_seed(seed: int | None) -> int | None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return seed


class RandomPolicy(LoadBalancingPolicy):
    """Choose a healthy worker uniformly at random.

    Args:
        seed: makes the sequence of choices reproducible (per policy object).

    Thread-safe; ``select_worker`` is O(n).
    """

    name = "random"
    description = "a uniformly random healthy worker; seed= makes it reproducible"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = _random.Random(_checked_seed(seed))
        self._lock = threading.Lock()

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)
        healthy = healthy_indices(workers)
        if not healthy:
            return None
        with self._lock:  # one shared generator: keep seeded runs reproducible per thread order
            chosen = healthy[self._rng.randrange(len(healthy))]
        workers[chosen].increment_processed()
        return chosen
