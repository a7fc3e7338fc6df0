"""``PairPolicy``: any two policies as one prefill/decode pair selector."""

from __future__ import annotations

from collections.abc import Sequence

from cacheroute.policies.base import (
    Decision,
    LoadBalancingPolicy,
    RequestText,
    _check_all_workers,
    _renamed,
)
from cacheroute.worker import Worker, WorkerType

__all__ = ["PairPolicy"]


class PairPolicy(LoadBalancingPolicy):
    """Route the prefill leg with one policy and the decode leg with another.

    This is how current gateways configure disaggregated serving (e.g. cache-aware
    prefill, least-load decode)::

        pair = PairPolicy(make_policy("cache_aware"), make_policy("shortest_queue"))
        i, j = pair.select_worker_pair(prefill_workers, decode_workers, prompt)

    :meth:`select_worker` (a single list) uses the prefill policy.

    The decode leg is decided first, and deciding changes state (the decode worker is
    counted as processed; a prefix policy remembers the prompt for it). So the prefill
    policy is first asked, with :meth:`~LoadBalancingPolicy.can_decide`, whether it would
    accept the request and find a worker, which changes nothing: a request it refuses
    (bad token ids, workers of several models) or cannot place (no prefill worker healthy,
    or all removed) leaves both legs untouched. When no decode worker is eligible the
    prefill policy decides nothing either. So no prefix is remembered for a request that
    is not served, with one exception, a race: a prefill worker found eligible by that
    check may turn unhealthy (or be removed) before the prefill decision a moment later.
    ``None`` is returned then and no load is taken, but the decode leg stays counted as
    if the request had been routed and failed. Closing that would need one lock across
    two independent policies (or an undo of a tree insert), which neither policy has.
    """

    name = "pair"
    description = "a prefill policy and a decode policy combined"

    def __init__(self, prefill: LoadBalancingPolicy, decode: LoadBalancingPolicy) -> None:
        for param, value in (("prefill", prefill), ("decode", decode)):
            if not isinstance(value, LoadBalancingPolicy):
                raise TypeError(f"{param} must be a LoadBalancingPolicy, got {value!r}")
        self.prefill = prefill
        self.decode = decode

    @property
    def needs_request_text(self) -> bool:  # type: ignore[override]
        return self.prefill.needs_request_text or self.decode.needs_request_text

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        """The prefill policy's choice of one worker of ``workers``."""
        return self.prefill.select_worker(workers, request_text)

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        """The prefill policy's decision (its expected cached tokens included)."""
        return self.prefill.decide(workers, request_text)

    def can_decide(self, workers: Sequence[Worker], request_text: RequestText = None) -> bool:
        """The prefill policy's :meth:`~LoadBalancingPolicy.can_decide` (as :meth:`decide`
        is its decision)."""
        return self.prefill.can_decide(workers, request_text)

    def decide_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[Decision, Decision] | None:
        """The decode policy's decision, then the prefill policy's (what
        :func:`cacheroute.acquire_pair` calls); ``None`` if either finds no eligible worker.

        The prefill policy is asked first whether it can decide (see the class doc), so a
        request it refuses or cannot place changes neither leg.

        Complexity: both policies' decisions, plus the prefill policy's ``can_decide``
        (O(n) worker reads, O(m) to validate m token ids).
        """
        try:
            if not self.prefill.can_decide(prefill_workers, request_text):
                return None
        except TypeError as exc:
            raise _renamed(exc, "prefill_workers") from None
        try:
            decode = self.decode.decide(decode_workers, request_text)
        except TypeError as exc:
            raise _renamed(exc, "decode_workers") from None
        if decode is None:
            return None
        try:
            prefill = self.prefill.decide(prefill_workers, request_text)
        except TypeError as exc:
            raise _renamed(exc, "prefill_workers") from None
        if prefill is None:  # lost its last worker since can_decide: the race above
            return None
        return prefill, Decision(
            decode.index,
            decode.url,
            decode.reason,
            decode.request_units,
            0,
            decode.prompt_tokens,
            0,
            decode.cost,
        )

    def select_worker_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[int, int] | None:
        """:meth:`decide_pair`'s two indices."""
        pair = self.decide_pair(prefill_workers, decode_workers, request_text)
        return None if pair is None else (pair[0].index, pair[1].index)

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        self.prefill.on_request_complete(worker_url, success)
        self.decode.on_request_complete(worker_url, success)

    def on_worker_added(self, worker: Worker) -> None:
        self.prefill.on_worker_added(worker)
        self.decode.on_worker_added(worker)

    def on_worker_removed(self, worker: Worker) -> None:
        self.prefill.on_worker_removed(worker)
        self.decode.on_worker_removed(worker)

    def sync_workers(self, workers: Sequence[Worker]) -> None:
        # Each leg only ever sees its own kind of worker.
        _check_all_workers(workers)
        self.prefill.sync_workers([w for w in workers if w.worker_type is not WorkerType.DECODE])
        self.decode.sync_workers([w for w in workers if w.worker_type is not WorkerType.PREFILL])

    def close(self) -> None:
        self.prefill.close()
        self.decode.close()

    def __repr__(self) -> str:
        return f"PairPolicy(prefill={self.prefill!r}, decode={self.decode!r})"
