"""``round_robin``: each healthy worker in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from cacheroute.policies.base import (
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    healthy_indices,
)
from cacheroute.worker import Worker

__all__ = ["RoundRobinPolicy"]


class RoundRobinPolicy(LoadBalancingPolicy):
    """Cycle through the healthy workers, ignoring load and text.

    Fair over the current healthy set: over ``k * n`` calls with a fixed set of ``n``
    healthy workers, each is chosen exactly ``k`` times. When the healthy set changes,
    the cycle continues over the new set from the shared counter.

    Thread-safe without a lock: ``next()`` on an ``itertools.count`` is atomic in CPython.
    ``select_worker`` is O(n) for the health scan.
    """

    name = "round_robin"
    description = "each healthy worker in turn; ignores load and prefixes"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)
        healthy = healthy_indices(workers)
        if not healthy:
            return None
        chosen = healthy[next(self._counter) % len(healthy)]
        workers[chosen].increment_processed()
        return chosen
