"""``power_of_two``: the less loaded of two random healthy workers."""

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
from cacheroute.policies.random import _checked_seed
from cacheroute.worker import Worker

__all__ = ["PowerOfTwoPolicy"]


class PowerOfTwoPolicy(LoadBalancingPolicy):
    """Sample two distinct healthy workers and take the less loaded one.

    Nearly as balanced as least load, but needs no global view that is exactly current,
    so many gateway replicas with stale loads do not all pile onto the same worker.
    Ties between the two go to the one with fewer processed requests, then the lower
    index. With one healthy worker it is chosen directly. Hence the unique most loaded
    worker is never chosen when two or more are healthy.

    Args:
        seed: makes the sampling reproducible.

    Thread-safe; ``select_worker`` is O(n).
    """

    name = "power_of_two"
    description = "the less loaded of two distinct random healthy workers"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = _random.Random(_checked_seed(seed))
        self._lock = threading.Lock()

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)
        healthy = healthy_indices(workers)
        if len(healthy) <= 1:
            if not healthy:
                return None
            workers[healthy[0]].increment_processed()
            return healthy[0]
        with self._lock:
            a, b = self._rng.sample(healthy, 2)
        wa, wb = workers[a], workers[b]
        ka = (wa.load(), wa.processed(), a)
        kb = (wb.load(), wb.processed(), b)
        chosen = a if ka <= kb else b
        workers[chosen].increment_processed()
        return chosen
