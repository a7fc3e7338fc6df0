"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from cacheroute import BasicWorker

ROOT = Path(__file__).resolve().parents[1]
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


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (once per process: registered in
    ``sys.modules``, where its dataclasses look their module up)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
