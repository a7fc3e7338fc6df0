"""benchmarks/prefix_variants.py: shared_prefix at a steady rate, through chat_variants'
table (whose cells, means over the seeds, tests/test_chat_variants.py checks)."""

from __future__ import annotations

from types import ModuleType

import pytest
from conftest import benchmark_script

from cacheroute.sim.workloads import shared_prefix


def _script() -> ModuleType:
    return benchmark_script("prefix_variants")


def test_every_variant_arrives_at_a_steady_rate() -> None:
    """Prefix-heavy traffic as a stream (llm-d's benchmark), not shared_prefix's burst."""
    for name, kwargs in _script().VARIANTS.items():
        w = shared_prefix(seed=0, **kwargs)
        arrivals = [r.arrival for r in w.requests]
        assert arrivals == sorted(arrivals) and arrivals[-1] > 10.0, name
        assert kwargs["request_rate"] > 0, name


def test_the_table_has_a_row_per_variant_and_marks_the_best(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--policies", "round_robin,random", "--variants", "sglang", "--seeds", "0"]
    assert _script().main([*args, "--workers", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prefix-heavy variants, 4 workers")
    rows = [ln for ln in out.splitlines() if ln.startswith("sglang ")]
    assert len(rows) == 1 and rows[0].count("*") == 2


def test_an_unknown_variant_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _script().main(["--variants", "sys0"])  # a chat variant, not one of these
    assert e.value.code == 2 and "--variants" in capsys.readouterr().err
