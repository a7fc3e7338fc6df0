"""benchmarks/compare_policies.py: its tables are the ones docs/policies/work_aware.md shows,
and re-rendering saved results gives them back exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from conftest import benchmark_script


def _script() -> ModuleType:
    return benchmark_script("compare_policies")


def test_markdown_from_a_run_and_from_its_json_are_the_same_tables(tmp_path: Path) -> None:
    cp = _script()
    saved, first, again = tmp_path / "r.json", tmp_path / "a.md", tmp_path / "b.md"
    args = ["--cells", "default/8w,default/4w,bursty/8w", "--limit", "60"]
    args += ["--policies", "work_aware,round_robin", "--json", str(saved)]
    assert cp.main([*args, "--markdown", str(first)]) == 0
    assert cp.main(["--from-json", str(saved), "--markdown", str(again)]) == 0
    text = first.read_text()
    assert again.read_text() == text
    # one table per workload, one column per config, every policy a row
    assert text.count("| policy | ") == 2
    assert "| policy | 8 workers | 4 workers |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| `") or ln.startswith("| **`")]
    assert len(rows) == 4 and sum("**`work_aware`**" in r for r in rows) == 2
    cell = re.compile(
        r"^(\*\*)?[\d,.e+]+(\*\*)? / (\*\*)?[\d,.e+]+(\*\*)? / (\*\*)?[\d,.e+]+(\*\*)? / \d+\.\d%$"
    )
    for r in rows:
        for c in r.strip("| ").split(" | ")[1:]:
            assert cell.match(c), c


def test_seeds_report_the_mean_of_the_runs_of_each_seed(tmp_path: Path) -> None:
    cp = _script()
    args = ["--cells", "default/8w", "--limit", "80", "--policies", "work_aware,round_robin"]
    cells = {}
    for seeds in ("0", "1", "0,1"):
        out = tmp_path / f"s{seeds.replace(',', '_')}.json"
        assert cp.main([*args, "--seeds", seeds, "--json", str(out)]) == 0
        cells[seeds] = json.loads(out.read_text())["cells"]["default/8w"]
    assert cells["0"] != cells["1"]  # the seed changes the workload
    for k, name in enumerate(("work_aware", "round_robin")):
        assert cells["0,1"][k]["policy"] == name and cells["0,1"][k]["seeds"] == [0, 1]
        for key in cp.HEADLINE:
            mean = (cells["0"][k][key] + cells["1"][k][key]) / 2
            assert cells["0,1"][k][key] == pytest.approx(mean, rel=1e-12)


@pytest.mark.parametrize("seeds", ["", "a", "1,1", "-1", "0,,1"])
def test_bad_seeds_are_refused_naming_the_option(
    seeds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _script().main(["--cells", "default/8w", "--seeds", seeds])
    assert e.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_claude_code_options_reach_the_trace_loader(tmp_path: Path) -> None:
    cp = _script()
    trace = Path(__file__).parent / "fixtures" / "claude_code_sample.jsonl.gz"
    base = ["--trace", str(trace), "--format", "claude_code", "--cells"]
    base += [f"{trace.name}/4w", "--limit", "60", "--policies", "work_aware"]
    got = {}
    for extra in ([], ["--coarsen", "2", "--concurrency", "3"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert cp.main([*base, *extra, "--json", str(out)]) == 0
        (got[len(extra)],) = json.loads(out.read_text())["cells"][f"{trace.name}/4w"]
    w = cp.load_trace(trace, "claude_code", limit=60, coarsen=2, concurrency=3)
    (direct,) = cp.run_cell(w, 4, 1.0, ["work_aware"])
    assert got[4] != got[0]  # the options change the workload
    for key in ("hit_rate", "ttft_p99", "e2e_p99", "requests", "input_tokens"):
        assert got[4][key] == getattr(direct, key), key


def test_a_bad_claude_code_option_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    trace = Path(__file__).parent / "fixtures" / "claude_code_sample.jsonl.gz"
    args = ["--trace", str(trace), "--format", "claude_code", "--coarsen", "0"]
    with pytest.raises(SystemExit):
        _script().main([*args, "--cells", f"{trace.name}/8w", "--policies", "round_robin"])
    assert "coarsen must be an int in [1, " in capsys.readouterr().err


def test_engine_options_reach_the_simulated_engines(tmp_path: Path) -> None:
    cp = _script()
    args = ["--cells", "default/4w", "--limit", "120", "--policies", "work_aware"]
    got = {}
    for extra in ([], ["--cache-tokens", "6000", "--max-batch", "3"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert cp.main([*args, *extra, "--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        (got[len(extra)],) = doc["cells"]["default/4w"]
        got[f"engine{len(extra)}"] = doc["engine"]
    assert got["engine0"]["cache_tokens"] == cp.EngineConfig().cache_tokens
    assert got["engine4"]["cache_tokens"] == 6000 and got["engine4"]["max_batch"] == 3
    assert got[4] != got[0]  # a smaller engine changes the results
    w = cp.load_workload("default", 120, cp.DEV_TRACES, 0, {})
    engine = cp.EngineConfig(cache_tokens=6000, max_batch=3)
    (direct,) = cp.run_cell(w, 4, 1.0, ["work_aware"], engine=engine)
    for key in ("hit_rate", "ttft_p99", "e2e_p99"):
        assert got[4][key] == getattr(direct, key), key


def test_unbounded_engine_caches_are_spelled_none(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["--cells", "bursty/8w", "--limit", "40", "--policies", "round_robin"]
    assert _script().main([*args, "--cache-tokens", "none", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["engine"]["cache_tokens"] is None


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--cache-tokens", "0", "argument --cache-tokens: must be >= 1, got 0"),
        ("--cache-tokens", "lots", "argument --cache-tokens: expected an integer, got 'lots'"),
        ("--max-batch", "0", "argument --max-batch: must be >= 1, got 0"),
    ],
)
def test_a_bad_engine_option_is_refused_naming_it(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _script().main(["--cells", "default/8w", "--policies", "round_robin", option, value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
