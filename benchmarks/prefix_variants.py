"""Robustness: policies on prefix-heavy traffic, shared_prefix at a steady rate.

``cacheroute.sim.workloads.shared_prefix`` with a request rate is the shape of llm-d's
prefix-cache benchmark: many groups of requests, each group one long shared prompt (a
system prompt, few-shot examples, a document) plus a question of its own, single-turn,
arriving as a Poisson process. Unlike chat, nothing is a conversation's own history:
every request is a continuation of a prefix other requests share, and with long replies
the end-to-end tail is decode time, set by how evenly decode batches are spread. Each
cell is the mean TTFT p99 and E2E p99 over the seeds, at 8 workers.

    python benchmarks/prefix_variants.py                                  # ours vs peers
    python benchmarks/prefix_variants.py --policies work_aware --variants llmd150 --seeds 0
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat_variants

from cacheroute.sim.workloads import shared_prefix

_LLMD150: dict[str, Any] = {
    "groups": 150,
    "prompts_per_group": 20,
    "system_tokens": 6000,
    "question_tokens": 1200,
    "output_tokens": 1000,
}
"""llm-d's benchmark: 150 groups, 6,000-token prompts, 1,200-token questions, 1,000 out."""

VARIANTS: dict[str, dict[str, Any]] = {
    "llmd150": {**_LLMD150, "request_rate": 16.0},
    "llmd150r8": {**_LLMD150, "request_rate": 8.0},
    "g32": {
        "groups": 32,
        "prompts_per_group": 94,
        "system_tokens": 8000,
        "question_tokens": 500,
        "output_tokens": 300,
        "request_rate": 20.0,
    },
    "g8": {  # a few very long shared prompts: where a second holder is decided
        "groups": 8,
        "prompts_per_group": 375,
        "system_tokens": 16000,
        "question_tokens": 200,
        "output_tokens": 200,
        "request_rate": 30.0,
    },
    "sglang": {"request_rate": 16.0},  # SGLang's generated-shared-prefix defaults, at a rate
}
"""Keyword arguments of ``shared_prefix`` per variant."""

POLICIES = (
    "work_aware,work_aware[shared_prefix_decode_weight=0.5],"
    "work_aware[shared_prefix_decode_weight=1],cache_aware,dynamo,llmd_scorers,preble"
)


def main(argv: list[str] | None = None) -> int:
    return chat_variants.main(
        argv,
        name="prefix-heavy",
        make=shared_prefix,
        variants=VARIANTS,
        policies=POLICIES,
        doc=__doc__,
    )


if __name__ == "__main__":
    raise SystemExit(main())
