"""Robustness: policies on variants of the built-in chat workload, means over seeds.

The development traces and built-in workloads are what the defaults were chosen on; a
rule that wins only there is tuned to them. These variants change one thing each about
the built-in chat (``cacheroute.sim.workloads.chat``), the things production chat
traffic varies in: the arrival rate, the number of users, the length of the shared system
prompt (none to 8,192 tokens: agents with long tool definitions), the length of turns.
Two more take an agent's shape instead (``agent6k``, ``agent2k``): a long tool prompt,
long tool results as the turns, short replies (tool calls), more rounds. Each cell is the
mean TTFT p99 and E2E p99 over the seeds, at 8 workers.

    python benchmarks/chat_variants.py                                    # ours vs peers
    python benchmarks/chat_variants.py --policies work_aware --variants sys8k --seeds 0,1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402

from cacheroute.sim import Workload, parse_policy_list, simulate, summarize  # noqa: E402
from cacheroute.sim.workloads import chat  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "rate24": {"request_rate": 24.0},
    "users256": {"users": 256, "rounds": 3},
    "sys0": {"system_tokens": 0},
    "sys2k": {"system_tokens": 2048},
    "sys4k": {"system_tokens": 4096},
    "sys8k": {"system_tokens": 8192, "rounds": 4},
    "long_turns": {"question_tokens": 512, "answer_tokens": 512, "rounds": 6},
    "agent6k": {
        "system_tokens": 6144,
        "question_tokens": 512,
        "answer_tokens": 32,
        "rounds": 8,
        "request_rate": 32.0,
    },
    "agent2k": {
        "system_tokens": 2048,
        "question_tokens": 1024,
        "answer_tokens": 64,
        "rounds": 12,
        "request_rate": 24.0,
    },
}
"""Keyword arguments of ``chat`` per variant (``base``: its defaults)."""


def run(
    policy: str,
    make: Callable[..., Workload],
    kwargs: dict[str, Any],
    seeds: list[int],
    workers: int,
) -> tuple[float, float]:
    """Mean TTFT p99 and E2E p99 of ``policy`` on ``make(seed=s, **kwargs)`` over ``seeds``."""
    ttft, e2e = [], []
    for seed in seeds:
        s = summarize(simulate(make(seed=seed, **kwargs), policy, workers=workers))
        ttft.append(s.ttft_p99)
        e2e.append(s.e2e_p99)
    return statistics.mean(ttft), statistics.mean(e2e)


def main(
    argv: list[str] | None = None,
    *,
    name: str = "chat",
    make: Callable[..., Workload] = chat,
    variants: dict[str, dict[str, Any]] = VARIANTS,
    policies: str = "work_aware,preble,dynamo,cache_aware:least_load",
    doc: str | None = __doc__,
) -> int:
    """The command line: a table of ``policies`` on each of ``variants`` of ``make``."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--policies", default=policies)
    ap.add_argument("--variants", default=",".join(variants), help="comma-separated names")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args(argv)
    peers.register_all()
    labels = [spec.label for spec in parse_policy_list(args.policies)]
    chosen = args.variants.split(",")
    for v in chosen:
        if v not in variants:
            ap.error(f"unknown variant {v!r} in --variants; known: {', '.join(variants)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    print(
        f"{name} variants, {args.workers} workers, means over seeds {args.seeds}: "
        "TTFT p99 / E2E p99 (s), the best of each marked *"
    )
    width = max(len(p) for p in labels)
    print(f"{'variant':10} " + " ".join(f"{p:>{max(width, 15)}}" for p in labels))
    for v in chosen:
        cells = [run(p, make, variants[v], seeds, args.workers) for p in labels]
        bt = min(t for t, _ in cells)
        be = min(e for _, e in cells)
        parts = []
        for t, e in cells:
            text = f"{t:.4f}{'*' if t == bt else ' '}/{e:.3f}{'*' if e == be else ' '}"
            parts.append(f"{text:>{max(width, 15)}}")
        print(f"{v:10} " + " ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
