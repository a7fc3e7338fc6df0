"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from cacheroute import BasicWorker

FIXTURES = Path(__file__).parent / "fixtures"
MOONCAKE = FIXTURES / "mooncake_sample.jsonl"
CLAUDE = FIXTURES / "claude_code_sample.jsonl.gz"


def build_workers(
    loads: Sequence[int], healthy: Sequence[bool] | None = None, model_id: str = "default"
) -> list[BasicWorker]:
    """Workers ``http://w{i}`` with the given loads and health."""
    workers = []
    for i, load in enumerate(loads):
        w = BasicWorker(f"http://w{i}", model_id=model_id)
        for _ in range(load):
            w.increment_load()
        if healthy is not None:
            w.set_healthy(healthy[i])
        workers.append(w)
    return workers


@pytest.fixture
def make_workers() -> Callable[..., list[BasicWorker]]:
    return build_workers
