"""``cacheroute simulate``: options, errors naming the option, JSON, policy specs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cacheroute.cli import main
from cacheroute.sim import PolicySpec, parse_policy_list
from cacheroute.sim.report import plot_results

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--workload", "shared_prefix", "--limit", "64", "--workers", "2", "--progress", "off"]


def test_simulate_prints_one_column_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *SMALL, "--policies", "round_robin,cache_aware:least_load"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    assert "round_robin" in header and "cache_aware:least_load" in header
    for row in (
        "cache hit rate",
        "ideal hit rate",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "E2E p50",
        "E2E p99",
        "throughput",
        "max/mean",
        "load-balancing",
    ):
        assert row in out


def test_simulate_json_has_results_and_config(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    assert (
        main(
            [
                "simulate",
                *SMALL,
                "--policies",
                "random,shortest_queue",
                "--seed",
                "4",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    doc = json.loads(path.read_text())
    assert doc["config"]["seed"] == 4 and doc["config"]["workers"] == 2
    assert doc["config"]["engine"]["cache_tokens"] == 450_000
    assert [r["policy"] for r in doc["results"]] == ["random", "shortest_queue"]
    assert all(r["requests"] == 64 for r in doc["results"])


def test_simulate_trace_with_detected_format(capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(FIXTURES / "mooncake_sample.jsonl")
    assert (
        main(["simulate", "--trace", trace, "--policies", "cache_aware", "--progress", "off"]) == 0
    )
    assert "workload mooncake: 20 requests" in capsys.readouterr().out
    trace = str(FIXTURES / "claude_code_sample.jsonl.gz")
    assert (
        main(
            [
                "simulate",
                "--trace",
                trace,
                "--format",
                "claude_code",
                "--policies",
                "random",
                "--concurrency",
                "2",
                "--speed",
                "3",
                "--progress",
                "off",
            ]
        )
        == 0
    )
    assert "workload claude_code: 10 requests" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "argument --workers: must be >= 1"),
        (["--workers", "two"], "argument --workers: expected an integer"),
        (["--speed", "-1"], "argument --speed: must be a finite number > 0"),
        (["--limit", "0"], "argument --limit: must be >= 1"),
        (["--cache-tokens", "lots"], "argument --cache-tokens"),
        (["--workload", "nope"], "argument --workload: invalid choice"),
        (["--format", "csv"], "argument --format: invalid choice"),
        (["--policies", "nope"], "argument --policies: unknown policy 'nope'"),
        (["--policies", "round_robin:fast"], "argument --policies: "),
        (["--policies", "cache_aware:sideways"], "unknown mode 'sideways'"),
        (["--policies", "cache_aware[cache_threshold=2]"], "cache_threshold"),
        (["--policies", "cache_aware[colour=red]"], "unknown config key"),
        (["--trace", "/nonexistent/trace.jsonl"], "argument --trace: no such file"),
        (["--trace", "x.jsonl", "--workload", "chat"], "--workload and --trace"),
        (["--format", "mooncake"], "--format needs --trace"),
    ],
)
def test_bad_options_name_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_malformed_trace_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}\noops\n'
    )
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(path), "--format", "mooncake"])
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes `import matplotlib` raise ImportError, as where it is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        main(["simulate", *SMALL, "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert "(the 'plot' extra), which is not installed: pip install matplotlib" in err


def test_plotting_no_results_is_refused_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    with pytest.raises(ValueError, match="results must be"):
        plot_results(path, [], "t")
    assert not path.exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    assert (
        main(["simulate", *SMALL, "--policies", "round_robin,cache_aware", "--plot", str(path)])
        == 0
    )
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_policy_specs() -> None:
    s = PolicySpec.parse("cache_aware:least_load")
    assert s.name == "cache_aware" and dict(s.config) == {"imbalance_mode": "least_load"}
    s = PolicySpec.parse("cache_aware[imbalance_mode=least_load,cache_threshold=0.3]")
    assert dict(s.config) == {"imbalance_mode": "least_load", "cache_threshold": 0.3}
    s = PolicySpec.parse("cache_aware[max_tree_size_per_worker=none,balance_abs_threshold=8]")
    assert dict(s.config) == {"max_tree_size_per_worker": None, "balance_abs_threshold": 8}
    specs = parse_policy_list(
        "round_robin, cache_aware[cache_threshold=0.3,imbalance_mode=locality]"
    )
    assert [x.name for x in specs] == ["round_robin", "cache_aware"]
    with pytest.raises(ValueError, match="given twice"):
        parse_policy_list("random,random")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        PolicySpec.parse("cache_aware[oops]")
    # Policies that take a seed get it; the others do not mind.
    assert PolicySpec.parse("random").build(seed=3) is not None
    assert PolicySpec.parse("round_robin").build(seed=3, on_decision=print) is not None


def test_version_and_policies_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert main(["policies"]) == 0
    assert "cache_aware" in capsys.readouterr().out


def test_speed_on_a_workload_all_at_one_instant_says_it_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["simulate", *SMALL, "--policies", "round_robin"]
    assert main([*argv, "--speed", "2"]) == 0
    fast = capsys.readouterr()
    assert "note: --speed 2 changes nothing: all 64 requests of shared_prefix arrive at" in (
        fast.err
    )
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert "note:" not in plain.err
    # The results are indeed the same (but for the wall time and the title).
    strip = [line for line in plain.out.splitlines()[1:] if "wall time" not in line]
    assert [line for line in fast.out.splitlines()[1:] if "wall time" not in line] == strip
    chat = ["simulate", "--workload", "chat", "--limit", "32", "--policies", "round_robin"]
    assert main([*chat, "--speed", "2", "--progress", "off"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "cache_aware:least_load[imbalance_mode=locality]",  # NAME:MODE sets the key too
        "work_aware[stall_weight=0.5,stall_weight=2]",
    ],
)
def test_a_spec_refuses_a_key_given_twice(text: str) -> None:
    with pytest.raises(ValueError, match="given twice"):
        PolicySpec.parse(text)


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_empty_output_path_is_an_error_not_ignored(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--workload", "shared_prefix", "--limit", "16", "--workers", "2", "--progress", "off"]
    with pytest.raises(SystemExit) as info:
        main(["simulate", *small, "--policies", "round_robin", option, ""])
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
