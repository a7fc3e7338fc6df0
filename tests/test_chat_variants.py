"""benchmarks/chat_variants.py: each cell is the mean over the seeds of the simulator's own
figures, and bad arguments are refused naming the option."""

from __future__ import annotations

import statistics
from types import ModuleType

import pytest
from conftest import benchmark_script

from cacheroute.sim import simulate, summarize
from cacheroute.sim.workloads import chat


def _script() -> ModuleType:
    return benchmark_script("chat_variants")


def test_a_cell_is_the_mean_over_seeds_of_the_simulated_tails() -> None:
    cv = _script()
    ttft, e2e = cv.run("round_robin", chat, cv.VARIANTS["sys2k"], [0, 1], 4)
    runs = [
        summarize(simulate(chat(seed=s, system_tokens=2048), "round_robin", workers=4))
        for s in (0, 1)
    ]
    assert ttft == statistics.mean(r.ttft_p99 for r in runs)
    assert e2e == statistics.mean(r.e2e_p99 for r in runs)
    assert runs[0].ttft_p99 != runs[1].ttft_p99  # the seeds differ


def test_the_table_has_a_row_per_variant_and_marks_the_best(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--policies", "round_robin,random", "--variants", "sys0", "--seeds", "0"]
    assert _script().main([*args, "--workers", "4"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sys0 ")]
    assert len(rows) == 1 and rows[0].count("*") == 2


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--variants", "nope"], "--variants"),
        (["--seeds", "x"], "--seeds"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_arguments_are_refused(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _script().main(args)
    assert e.value.code == 2 and option in capsys.readouterr().err
