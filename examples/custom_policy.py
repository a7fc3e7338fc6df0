"""Write your own routing policy, register it, and serve traffic with it through the gateway.

``rendezvous_prefix`` hashes the first 256 characters (or token ids) of a request with each
worker's URL and prefers the worker with the highest score (rendezvous hashing): requests
that share a prefix meet on the same engine, and adding or losing an engine only moves the
prefixes that engine owned. A bound on load keeps one hot prefix from swamping its engine:
a worker is skipped while its load exceeds ``load_factor`` times the average (plus one),
and the next worker in that request's hash order is tried.

Run it in place of ``gateway.py`` (same flags; the policy defaults to this one)::

    python examples/custom_policy.py --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence

from cacheroute import LoadBalancingPolicy, register_policy
from cacheroute.policies import RequestText, check_request_text, least_loaded_index
from cacheroute.worker import Worker

__all__ = ["RendezvousPrefixPolicy"]


class RendezvousPrefixPolicy(LoadBalancingPolicy):
    """Rendezvous hashing on the request's first ``prefix_units``, with bounded load.

    Stateless apart from its config, hence thread-safe. ``select_worker`` is
    O(n log n) in the number of workers (one hash per worker, then a sort).
    """

    name = "rendezvous_prefix"
    description = "rendezvous hash of the first 256 units, skipping overloaded workers"
    needs_request_text = True  # tells gateways to build the routing text

    def __init__(self, prefix_units: int = 256, load_factor: float = 1.25) -> None:
        if type(prefix_units) is not int or prefix_units < 1:
            raise ValueError(f"prefix_units must be an int >= 1, got {prefix_units!r}")
        if not isinstance(load_factor, (int, float)) or not load_factor >= 1.0:
            raise ValueError(f"load_factor must be a number >= 1.0, got {load_factor!r}")
        self.prefix_units = prefix_units
        self.load_factor = float(load_factor)

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)  # the base contract: TypeError on bad input
        healthy = [i for i, w in enumerate(workers) if w.is_healthy()]
        if not healthy:
            return None  # the contract: None exactly when no worker is healthy
        if not request_text:
            return least_loaded_index(workers)  # nothing to hash: balance load instead
        head = request_text[: self.prefix_units]
        key = head.encode() if isinstance(head, str) else repr(list(head)).encode()
        average = sum(workers[i].load() for i in healthy) / len(healthy)
        bound = self.load_factor * (average + 1)

        def score(i: int) -> bytes:
            return hashlib.blake2b(key + workers[i].url.encode(), digest_size=8).digest()

        ranked = sorted(healthy, key=score, reverse=True)
        for i in ranked:
            if workers[i].load() <= bound:
                return i
        return ranked[0]  # unreachable in practice: someone is always at or below average

    def __repr__(self) -> str:
        return (
            f"RendezvousPrefixPolicy(prefix_units={self.prefix_units}, "
            f"load_factor={self.load_factor})"
        )


# Registering makes the policy available by name: make_policy("rendezvous_prefix", ...),
# the gateway's --policy flag, and `cacheroute policies` in this process.
register_policy(RendezvousPrefixPolicy.name, RendezvousPrefixPolicy)


def main(argv: Sequence[str] | None = None) -> None:
    """The example gateway, with ``--policy rendezvous_prefix`` unless another is given."""
    import gateway  # examples/gateway.py: this script's directory is on sys.path

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--policy" or a.startswith("--policy=") for a in args):
        args += ["--policy", RendezvousPrefixPolicy.name]
    gateway.main(args)


if __name__ == "__main__":
    main()
