"""``shortest_queue``: the healthy worker with the fewest requests in flight."""

from __future__ import annotations

from collections.abc import Sequence

from cacheroute.policies.base import (
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    least_loaded_index,
)
from cacheroute.worker import Worker

__all__ = ["ShortestQueuePolicy"]


class ShortestQueuePolicy(LoadBalancingPolicy):
    """Least load; ties by fewest processed, then lowest index.

    The processed tie-break spreads a burst that arrives while every load is equal (or
    stale) instead of sending it all to worker 0. Stateless and thread-safe;
    ``select_worker`` is one O(n) pass.
    """

    name = "shortest_queue"
    description = "least in-flight load; ties by fewest processed, then index"

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)
        chosen = least_loaded_index(workers)
        if chosen is not None:
            workers[chosen].increment_processed()
        return chosen
