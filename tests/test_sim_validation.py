"""Bad input to the simulator's public API: a clear exception naming the parameter and the
value (``TypeError`` for a wrong type, ``bool`` included; ``ValueError`` for a value out of
range). Nothing is clamped or silently dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import CLAUDE, FIXTURES, MOONCAKE

from cacheroute.cli import main
from cacheroute.policies import LoadBalancingPolicy, registry
from cacheroute.policies.base import RequestText, healthy_indices
from cacheroute.sim import (
    EngineConfig,
    PolicySpec,
    Request,
    bursty,
    chat,
    compare,
    load_claude_code,
    load_mooncake,
    parse_policy_list,
    shared_prefix,
    simulate,
    summarize,
)
from cacheroute.sim.metrics import percentile
from cacheroute.sim.progress import ProgressBar
from cacheroute.worker import Worker


def _small() -> Any:
    return shared_prefix(groups=2, prompts_per_group=2)


# ------------------------------------------------------------------ Workload.scaled


@pytest.mark.parametrize("speed", [0, 0.0, -1.0, -2, math.nan, math.inf, -math.inf])
def test_scaled_rejects_out_of_range_speed_naming_it(speed: float) -> None:
    with pytest.raises(ValueError, match=r"^speed must be a (finite )?real number( > 0)?, got"):
        _small().scaled(speed)


@pytest.mark.parametrize("speed", [True, "2", None, [2.0]])
def test_scaled_rejects_wrong_type_speed_naming_it(speed: Any) -> None:
    with pytest.raises(TypeError, match=r"^speed must be a real number, got") as info:
        _small().scaled(speed)
    assert repr(speed) in str(info.value)


def test_scaled_accepts_int_and_float_speed() -> None:
    w = _small()
    assert w.scaled(1) is w
    assert len(w.scaled(3)) == len(w) == len(w.scaled(0.5))


# ----------------------------------------------------------------- Workload.limited


def test_limited_rejects_negative_limit_instead_of_dropping_requests() -> None:
    w = _small()
    with pytest.raises(ValueError, match=r"^limit must be an int >= 0 or None, got -1 \(int\)"):
        w.limited(-1)


@pytest.mark.parametrize("limit", [1.5, 2.0, True, "3"])
def test_limited_rejects_wrong_type_limit_naming_it(limit: Any) -> None:
    with pytest.raises(TypeError, match=r"limit must be an int or None, got") as info:
        _small().limited(limit)
    assert repr(limit) in str(info.value)


def test_limited_contract() -> None:
    w = _small()
    assert w.limited(None) is w
    assert len(w.limited(0)) == 0
    assert len(w.limited(3)) == 3
    assert w.limited(len(w)) is w
    assert w.limited(len(w) + 10) is w


# ------------------------------------------------------------------- EngineConfig


@pytest.mark.parametrize("field", ["cache_tokens", "max_batch", "max_prefill_tokens"])
@pytest.mark.parametrize("value", [True, False, 1.0, "8"])
def test_engine_counts_reject_wrong_types(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{field} must be an int") as info:
        EngineConfig(**{field: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("field", ["cache_tokens", "max_batch", "max_prefill_tokens"])
@pytest.mark.parametrize("value", [0, -5])
def test_engine_counts_reject_values_below_one(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be an int in \[1, \d+\]"):
        EngineConfig(**{field: value})


TIME_FIELDS = [
    "prefill_overhead_s",
    "prefill_per_token_s",
    "prefill_attention_s",
    "decode_weights_s",
    "decode_per_seq_s",
    "decode_per_context_token_s",
]


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize("value", [True, False, "0.1", None])
def test_engine_time_constants_reject_wrong_types(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{field} must be a real number, got") as info:
        EngineConfig(**{field: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize("value", [-1e-9, math.inf, math.nan])
def test_engine_time_constants_reject_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a (finite )?real number( >= 0)?, got"):
        EngineConfig(**{field: value})


def test_engine_decode_step_must_take_time_and_the_message_names_both_fields() -> None:
    with pytest.raises(ValueError, match=r"decode_weights_s=0.0 and decode_per_seq_s=0"):
        EngineConfig(decode_weights_s=0.0, decode_per_seq_s=0)
    assert EngineConfig(cache_tokens=None, decode_weights_s=0).cache_tokens is None


# ------------------------------------------------------------------------ Request


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", True),
        ("span_tokens", 16.0),
        ("input_tokens", "16"),
        ("output_tokens", 1.0),
    ],
)
def test_request_int_fields_reject_wrong_types(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {
        "arrival": 0.0,
        "blocks": (1,),
        "block_size": 16,
        "span_tokens": 16,
        "input_tokens": 16,
        "output_tokens": 1,
    }
    kwargs[field] = value
    with pytest.raises(TypeError, match=rf"^{field} must be an int, got"):
        Request(**kwargs)


def test_request_rejects_bad_arrival_and_blocks() -> None:
    with pytest.raises(ValueError, match=r"^arrival must be a finite real number, got inf"):
        Request(math.inf, (1,), 16, 16, 16, 1)
    with pytest.raises(ValueError, match=r"^arrival must be a real number >= 0, got -1\.0"):
        Request(-1.0, (1,), 16, 16, 16, 1)
    with pytest.raises(TypeError, match=r"^arrival must be a real number, got True \(bool\)"):
        Request(True, (1,), 16, 16, 16, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^blocks must be a tuple of ints, got \[1\] \(list\)"):
        Request(0.0, [1], 16, 16, 16, 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- workloads


@pytest.mark.parametrize(
    ("make", "kwargs", "exc", "message"),
    [
        (chat, {"request_rate": True}, TypeError, "^request_rate must be a real number"),
        (chat, {"request_rate": 0}, ValueError, r"^request_rate must be a real number > 0, got 0"),
        (chat, {"request_rate": math.inf}, ValueError, "^request_rate must be a finite real"),
        (chat, {"users": 2.0}, TypeError, r"^users must be an int, got 2.0 \(float\)"),
        (chat, {"users": 0}, ValueError, r"^users must be an int in \[1, \d+\], got 0"),
        (chat, {"seed": "x"}, TypeError, r"^seed must be an int, got 'x' \(str\)"),
        (shared_prefix, {"request_rate": False}, TypeError, "^request_rate must be a real"),
        (shared_prefix, {"request_rate": -1.0}, ValueError, "^request_rate must be a real num"),
        (shared_prefix, {"shuffle": 1}, TypeError, r"^shuffle must be a bool, got 1 \(int\)"),
        (shared_prefix, {"groups": True}, TypeError, r"^groups must be an int, got True"),
        (bursty, {"interval_s": True}, TypeError, "^interval_s must be a real number"),
        (bursty, {"interval_s": math.nan}, ValueError, "^interval_s must be a finite real"),
        (bursty, {"seed": 1.5}, TypeError, r"^seed must be an int, got 1.5 \(float\)"),
    ],
)
def test_workload_generators_name_the_bad_parameter(
    make: Any, kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=message):
        make(**kwargs)


# ------------------------------------------------------------------------- traces


@pytest.mark.parametrize("limit", [-1, -100])
def test_trace_loaders_reject_negative_limit(limit: int) -> None:
    with pytest.raises(ValueError, match=rf"^limit must be an int >= 0 or None, got {limit}"):
        load_claude_code(CLAUDE, limit=limit)
    with pytest.raises(ValueError, match=rf"^limit must be an int >= 0 or None, got {limit}"):
        load_mooncake(MOONCAKE, limit=limit)


def test_trace_loaders_reject_wrong_type_options() -> None:
    with pytest.raises(TypeError, match=r"^limit must be an int or None, got 2.0 \(float\)"):
        load_mooncake(MOONCAKE, limit=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^block_size must be an int, got True \(bool\)"):
        load_mooncake(MOONCAKE, block_size=True)
    with pytest.raises(ValueError, match=r"^block_size must be an int in \[1, \d+\], got 0"):
        load_mooncake(MOONCAKE, block_size=0)
    with pytest.raises(TypeError, match=r"^concurrency must be an int, got True \(bool\)"):
        load_claude_code(CLAUDE, concurrency=True)
    with pytest.raises(TypeError, match=r"^coarsen must be an int, got 8.0 \(float\)"):
        load_claude_code(CLAUDE, coarsen=8.0)  # type: ignore[arg-type]
    assert len(load_mooncake(MOONCAKE, limit=0)) == 0


def _line(path: Path, record: dict[str, Any]) -> Path:
    path.write_text(json.dumps(record) + "\n")
    return path


CC = {
    "session": "s",
    "t": 0.0,
    "input_length": 200,
    "output_length": 5,
    "block_size": 64,
    "hash_id_ranges": [[0, 2]],
}


@pytest.mark.parametrize("api_time", [-1.0, "fast", True])
def test_claude_code_bad_api_time_is_a_format_error_not_zero(tmp_path: Path, api_time: Any) -> None:
    from cacheroute.sim import TraceFormatError

    path = _line(tmp_path / "cc.jsonl", {**CC, "api_time": api_time})
    with pytest.raises(TraceFormatError, match=r":1: field 'api_time' must be a finite number"):
        load_claude_code(path)


def test_claude_code_null_or_missing_api_time_counts_as_zero(tmp_path: Path) -> None:
    assert len(load_claude_code(_line(tmp_path / "a.jsonl", {**CC, "api_time": None}))) == 1
    assert len(load_claude_code(_line(tmp_path / "b.jsonl", CC))) == 1


def test_json_booleans_and_infinity_are_not_numbers(tmp_path: Path) -> None:
    from cacheroute.sim import TraceFormatError

    good = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
    path = _line(tmp_path / "m.jsonl", {**good, "timestamp": True})
    with pytest.raises(TraceFormatError, match=r"field 'timestamp' must be a finite number"):
        load_mooncake(path)
    path.write_text(json.dumps(good).replace('"timestamp": 0', '"timestamp": Infinity') + "\n")
    with pytest.raises(TraceFormatError, match=r"field 'timestamp' must be a finite number"):
        load_mooncake(path)
    path = _line(tmp_path / "c.jsonl", {**CC, "t": False})
    with pytest.raises(TraceFormatError, match=r"field 't' must be a finite number"):
        load_claude_code(path)


# ------------------------------------------------------------ simulate and compare


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"workers": True}, TypeError, r"^workers must be an int, got True \(bool\)"),
        ({"workers": 2.0}, TypeError, r"^workers must be an int, got 2.0 \(float\)"),
        ({"workers": 0}, ValueError, r"^workers must be an int in \[1, \d+\], got 0"),
        ({"timeline_points": -1}, ValueError, "^timeline_points must be an int >= 0, got -1"),
        ({"timeline_points": 1.5}, TypeError, "^timeline_points must be an int"),
        ({"seed": None}, TypeError, r"^seed must be an int, got None \(NoneType\)"),
        ({"engine": {"max_batch": 8}}, TypeError, "^engine must be an EngineConfig or None"),
        ({"progress": 5}, TypeError, "^progress must be callable or None"),
    ],
)
def test_simulate_names_the_bad_argument(
    kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=message):
        simulate(_small(), "round_robin", **kwargs)


def test_simulate_rejects_wrong_workload_and_policy_types() -> None:
    with pytest.raises(TypeError, match=r"^workload must be a Workload, got \[\] \(list\)"):
        simulate([], "round_robin")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^policy must be a PolicySpec or a spec str, got 3"):
        simulate(_small(), 3)  # type: ignore[arg-type]


def test_compare_checks_every_argument_before_any_run() -> None:
    specs = parse_policy_list("round_robin,random")
    with pytest.raises(ValueError, match=r"^workers must be an int in \[1, \d+\], got 0"):
        compare(_small(), specs, workers=0)
    with pytest.raises(TypeError, match="policy must be a PolicySpec"):
        compare(_small(), [specs[0], 7])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="show_progress must be a bool or None"):
        compare(_small(), specs, show_progress="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------- metrics, progress


@pytest.mark.parametrize("q", [-1, 100.5, math.nan])
def test_percentile_rejects_q_out_of_range(q: float) -> None:
    with pytest.raises(
        ValueError, match=r"^q must be a (finite )?real number( >= 0 and <= 100)?, got"
    ):
        percentile([1.0, 2.0], q)


def test_percentile_rejects_wrong_type_q() -> None:
    with pytest.raises(TypeError, match=r"^q must be a real number, got '50' \(str\)"):
        percentile([1.0], "50")  # type: ignore[arg-type]
    assert percentile([1.0, 3.0], 0) == 1.0 and percentile([1.0, 3.0], 100) == 3.0


@pytest.mark.parametrize("values", [[2.0, 1.0], [1.0, 3.0, 2.0, 4.0], [0.0, 5.0, 5.0, 4.9]])
def test_percentile_refuses_values_that_are_not_sorted(values: list[float]) -> None:
    # an unsorted list used to give a wrong percentile without a word (e.g. p50 of
    # [1, 3, 2, 4] as 2.5 from the wrong neighbours)
    with pytest.raises(ValueError, match=r"^values must be sorted ascending, got values\[\d+\]"):
        percentile(values, 50)


def test_percentile_of_sorted_values_with_ties() -> None:
    assert percentile([1.0, 2.0, 2.0, 4.0], 50) == 2.0
    assert percentile([0, 0, 0], 99) == 0


def test_summarize_rejects_bad_ideal_hits() -> None:
    res = simulate(_small(), "round_robin", workers=2)
    with pytest.raises(ValueError, match=r"^ideal_hits must be an int >= 0 or None, got -1"):
        summarize(res, -1)
    with pytest.raises(TypeError, match=r"^ideal_hits must be an int or None, got 1.0 \(float\)"):
        summarize(res, 1.0)  # type: ignore[arg-type]


def test_progress_bar_validates_total_and_delay() -> None:
    with pytest.raises(ValueError, match=r"^total must be an int >= 0, got -1 \(int\)"):
        ProgressBar(-1)
    with pytest.raises(TypeError, match=r"^total must be an int, got 1.5 \(float\)"):
        ProgressBar(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^delay must be a real number >= 0, got -1 \(int\)"):
        ProgressBar(1, delay=-1)
    with pytest.raises(TypeError, match=r"^delay must be a real number, got True \(bool\)"):
        ProgressBar(1, delay=True)
    assert ProgressBar(0).total == 0  # an empty run: no clamping to 1


def test_progress_bar_with_zero_total_draws_full(tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    bar = ProgressBar(0, "x", stream=stream, delay=0, enabled=True, fancy=False)
    bar.update(0)
    bar.close()
    assert "100.0%" in stream.getvalue()


# ------------------------------------------------------------------ PolicySpec.build


class _Base(LoadBalancingPolicy):
    def select_worker(self, workers: list[Worker], request_text: RequestText = None) -> int | None:
        healthy = healthy_indices(workers)
        return healthy[0] if healthy else None


class _StrictSeed(_Base):
    """Takes a seed and rejects a non-int one with a TypeError whose text mentions
    'seed' and 'unknown': the old text search mistook it for "not accepted"."""

    name = "strict_seed_test"

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and type(seed) is not int:
            raise TypeError(f"unknown type for 'seed': {type(seed).__name__}")
        self.seed = seed


class _ObserverOnly(_Base):
    name = "observer_only_test"

    def __init__(self, on_decision: Any = None) -> None:
        self.on_decision = on_decision


class _Anything(_Base):
    name = "anything_test"

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def test_policies():  # type: ignore[no-untyped-def]
    saved = dict(registry._registry)
    for cls in (_StrictSeed, _ObserverOnly, _Anything):
        registry.register_policy(cls.name, cls)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.mark.usefixtures("test_policies")
def test_build_does_not_drop_an_accepted_key_whose_value_is_rejected() -> None:
    spec = PolicySpec.parse("strict_seed_test")
    policy = spec.build(seed=7)
    assert isinstance(policy, _StrictSeed) and policy.seed == 7
    with pytest.raises(TypeError, match="unknown type for 'seed'"):
        spec.build(seed=1.5)  # type: ignore[arg-type]


@pytest.mark.usefixtures("test_policies")
def test_build_passes_only_the_optional_keys_a_policy_accepts() -> None:
    observer = print
    built = PolicySpec.parse("observer_only_test").build(seed=3, on_decision=observer)
    assert isinstance(built, _ObserverOnly) and built.on_decision is observer
    anything = PolicySpec.parse("anything_test").build(seed=3, on_decision=observer)
    assert isinstance(anything, _Anything)
    assert anything.kwargs == {"seed": 3, "on_decision": observer}
    # The spec's own value wins over the optional one; a bad spec key is still an error.
    assert PolicySpec.parse("anything_test[seed=5]").build(seed=3).kwargs == {"seed": 5}  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"unknown config key\(s\) 'colour'"):
        PolicySpec.parse("observer_only_test[colour=red]").build(seed=3, on_decision=observer)


def test_parse_rejects_non_str_spec() -> None:
    with pytest.raises(TypeError, match=r"^text must be a str, got 3 \(int\)"):
        PolicySpec.parse(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^text must be a str, got \['random'\] \(list\)"):
        parse_policy_list(["random"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "4"], "--concurrency only apply to claude_code traces"),
        (["--coarsen", "2", "--workload", "chat"], "--coarsen only apply to claude_code"),
        (
            ["--trace", str(MOONCAKE), "--coarsen", "2"],
            "--coarsen only apply to claude_code traces, but the trace format is mooncake",
        ),
        (["--json", "/nonexistent-dir/out.json"], "argument --json: directory"),
        (["--trace", str(FIXTURES)], "argument --trace: cannot read"),
    ],
)
def test_cli_rejects_options_that_would_be_ignored_or_fail_late(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--progress", "off", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_claude_code_options_still_apply(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--trace", str(CLAUDE), "--concurrency", "2", "--coarsen", "1"]
    assert main(["simulate", "--progress", "off", "--policies", "round_robin", *argv]) == 0
    assert "claude_code" in capsys.readouterr().out


def test_percentile_of_values_with_infinities_is_not_nan() -> None:
    inf = math.inf
    assert percentile([1.0, 2.0, inf], 50) == 2.0
    assert percentile([1.0, inf], 0) == 1.0
    assert percentile([1.0, inf], 100) == inf
    assert percentile([1.0, inf, inf, inf], 50) == inf
    assert percentile([-inf, 1.0], 0) == -inf
    assert percentile([1, 3], 50) == 2.0 and percentile([2, 2], 50) == 2.0
