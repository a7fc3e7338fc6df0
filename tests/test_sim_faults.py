"""Reliability faults of the simulator, one regression test each.

The CLI answers bad input with one ``error:`` line naming the file and line (or the
option) and exit status 2, never a traceback; the Python API raises ``TypeError`` /
``ValueError`` / :class:`TraceFormatError` naming the parameter, never ``OverflowError``,
``MemoryError``, ``RecursionError`` or ``zlib.error``, and never touches a file
descriptor it was handed by mistake.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import CLAUDE, MOONCAKE

from cacheroute.cli import main
from cacheroute.sim import (
    EngineConfig,
    Request,
    TraceFormatError,
    Workload,
    bursty,
    chat,
    load_claude_code,
    load_mooncake,
    load_trace,
    shared_prefix,
    simulate,
)

GOOD_MOONCAKE = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
GOOD_CC = {
    "session": "s",
    "t": 0.0,
    "input_length": 200,
    "output_length": 5,
    "block_size": 64,
    "hash_id_ranges": [[0, 2]],
}
HUGE = "1" + "0" * 400  # 10**400 written as a JSON number


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``cacheroute simulate ARGV``: exit 2, no traceback, exactly one ``error:`` line
    (after argparse's usage); return that line."""
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--progress", "off", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def _corrupt_gzip(records: int = 20_000) -> bytes:
    """A gzip file whose deflate stream is broken in the middle (zlib.error on reading)."""
    text = "".join(json.dumps({**GOOD_MOONCAKE, "timestamp": i}) + "\n" for i in range(records))
    blob = gzip.compress(text.encode(), mtime=0)
    for offset in range(len(blob) // 2, len(blob) // 2 + 4000):
        bad = bytearray(blob)
        bad[offset : offset + 8] = b"\xff" * 8
        try:
            with gzip.open(io.BytesIO(bytes(bad)), "rt") as f:
                for _ in f:
                    pass
        except zlib.error:
            return bytes(bad)
        except Exception:
            continue
    raise AssertionError("no corruption offset gives zlib.error")  # pragma: no cover


# ----------------------------------------------------------------------- CLI faults


def test_cli_deeply_nested_trace_line_is_an_error_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "deep.jsonl", [json.dumps(GOOD_MOONCAKE), "[" * 100_000])
    line = _cli_error(["--trace", str(path), "--format", "mooncake"], capsys)
    assert f"{path}:2: not valid JSON" in line and "nested too deeply" in line
    # Detecting the format reads the first line: the same error, not a RecursionError.
    path = _write(tmp_path / "deep1.jsonl", ["[" * 100_000 + "]" * 100_000])
    assert f"{path}:1: not valid JSON" in _cli_error(["--trace", str(path)], capsys)


def test_cli_gzip_corrupted_mid_file_is_an_error_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(_corrupt_gzip())
    line = _cli_error(["--trace", str(path), "--format", "mooncake"], capsys)
    assert f"argument --trace: {path}:" in line and "corrupt" in line
    with pytest.raises(TraceFormatError, match=rf"^{path}:\d+: cannot read"):
        load_mooncake(path)


def test_cli_timestamp_too_large_for_a_float_is_an_error_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = json.dumps(GOOD_MOONCAKE).replace('"timestamp": 0', f'"timestamp": {HUGE}')
    path = _write(tmp_path / "ts.jsonl", [json.dumps(GOOD_MOONCAKE), rec])
    line = _cli_error(["--trace", str(path), "--format", "mooncake"], capsys)
    assert f"{path}:2: field 'timestamp' must be" in line


def test_cli_claude_code_huge_hash_id_range_is_checked_before_expanding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "cc.jsonl", [json.dumps({**GOOD_CC, "hash_id_ranges": [[0, 10**12]]})])
    line = _cli_error(["--trace", str(path), "--format", "claude_code"], capsys)
    assert f"{path}:1: " in line and "exceed input_length 200" in line


def test_cli_empty_policies_is_an_error_not_every_policy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for value in ("", " ", ","):
        line = _cli_error(["--limit", "8", "--policies", value], capsys)
        assert "argument --policies: no policy given" in line


# ----------------------------------------------------------------- Python API faults


def test_load_mooncake_int_path_is_a_type_error_and_stdout_stays_open() -> None:
    code = (
        "from cacheroute import sim\n"
        "try:\n"
        "    sim.load_mooncake(1)\n"
        "except TypeError as exc:\n"
        "    print('TypeError:', exc)\n"
        "print('stdout still open')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "TypeError: path must be a str or os.PathLike, got 1 (int)" in out.stdout
    assert "stdout still open" in out.stdout


def test_trace_loaders_refuse_file_descriptors_and_other_non_paths() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        for load in (load_mooncake, load_claude_code):
            with pytest.raises(TypeError, match=r"^path must be a str or os.PathLike, got \d+"):
                load(r)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^path must be a str or os\.PathLike"):
            load_trace(r, "mooncake")  # type: ignore[arg-type]
        os.fstat(r)  # still open: nobody closed our descriptor
    finally:
        os.close(r)
    for bad in (True, b"trace.jsonl", None, 2.5):
        with pytest.raises(TypeError, match=r"^path must be a str or os\.PathLike"):
            load_mooncake(bad)  # type: ignore[arg-type]


def test_load_claude_code_huge_concurrency_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^concurrency must be an int in \[1, "):
        load_claude_code(CLAUDE, concurrency=2**100)
    # The largest accepted value does not allocate a slot per session it could run.
    assert len(load_claude_code(CLAUDE, concurrency=2**20)) == 10


# ------------------------------------------- more of the same kind: the CLI's options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # 1e-320 > 0, but every arrival / 1e-320 is infinite: the error is --speed's.
        (["--workload", "chat", "--speed", "1e-320"], "argument --speed: speed must be large"),
        # Policies and engines turn the cache size into a float: 10**400 is no size.
        (["--cache-tokens", HUGE], "argument --cache-tokens: must be <= "),
        # Ten billion engines would be built one by one before the first request.
        (["--workers", "10000000000"], "argument --workers: must be <= "),
        (["--concurrency", HUGE, "--trace", str(CLAUDE)], "argument --concurrency: must be <="),
        (["--coarsen", HUGE, "--trace", str(CLAUDE)], "argument --coarsen: must be <= "),
    ],
)
def test_cli_out_of_range_options_name_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _cli_error(["--limit", "20", "--policies", "round_robin", *argv], capsys)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({**GOOD_MOONCAKE, "input_length": 10**400}, "field 'input_length' must be an int in"),
        ({**GOOD_MOONCAKE, "output_length": 10**400}, "field 'output_length' must be an int in"),
        ({**GOOD_MOONCAKE, "output_length": 10**5000}, "not valid JSON"),  # > 4,300 digits
    ],
)
def test_cli_huge_numbers_in_a_mooncake_line_name_file_and_line(
    tmp_path: Path, record: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else None
    if old is not None:
        sys.set_int_max_str_digits(0)  # to write the record; the loader reads with defaults
    try:
        text = json.dumps(record)
    finally:
        if old is not None:
            sys.set_int_max_str_digits(old)
    path = _write(tmp_path / "m.jsonl", [json.dumps(GOOD_MOONCAKE), text])
    line = _cli_error(["--trace", str(path), "--format", "mooncake"], capsys)
    if "not valid JSON" in message and old is None:  # Python without the digit limit
        message = "field 'output_length' must be an int in"
    assert f"{path}:2: {message}" in line


# --------------------------------------------- more of the same kind: the Python API


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"t": 10**400}, r":1: field 't' must be a finite number"),
        ({"api_time": 10**400}, r":1: field 'api_time' must be a finite number"),
        ({"block_size": 10**400}, r":1: field 'block_size' must be an int in"),
        ({"input_length": 10**400}, r":1: field 'input_length' must be an int in"),
    ],
)
def test_claude_code_huge_numbers_are_format_errors(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path / "cc.jsonl", [json.dumps({**GOOD_CC, **change})])
    with pytest.raises(TraceFormatError, match=message):
        load_claude_code(path)


def test_claude_code_timeline_beyond_the_float_range_names_the_line(tmp_path: Path) -> None:
    # Each session lasts 1e308 s; the second one, in the same slot, would start at 1e308
    # and its request at t=1e308 would arrive at infinity.
    lines = [
        json.dumps({**GOOD_CC, "session": "a", "t": 1e308}),
        json.dumps({**GOOD_CC, "session": "b", "t": 1e308}),
    ]
    path = _write(tmp_path / "cc.jsonl", lines)
    with pytest.raises(TraceFormatError, match=rf"^{path}:2: session 'b' starts at 1e\+308"):
        load_claude_code(path, concurrency=1)
    assert len(load_claude_code(path, concurrency=2)) == 2


def test_claude_code_block_count_is_bounded_before_allocating(tmp_path: Path) -> None:
    # 2**30 blocks of 1 token fit an input_length of 2**30, but would be 2**30 ids.
    rec = {**GOOD_CC, "block_size": 1, "input_length": 2**30, "hash_id_ranges": [[0, 2**30 - 1]]}
    path = _write(tmp_path / "cc.jsonl", [json.dumps(rec)])
    with pytest.raises(TraceFormatError, match=r":1: 1073741824 blocks make 1073741824 blocks"):
        load_claude_code(path, coarsen=1)
    (r,) = load_claude_code(path, coarsen=2**20).requests  # 1,024 blocks: fine
    assert len(r.blocks) == 1024 and r.span_tokens == 2**30


def test_loader_options_too_large_are_value_errors_naming_them() -> None:
    with pytest.raises(ValueError, match=r"^block_size must be an int in \[1, "):
        load_mooncake(MOONCAKE, block_size=10**400)
    with pytest.raises(ValueError, match=r"^coarsen must be an int in \[1, "):
        load_claude_code(CLAUDE, coarsen=10**400)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"arrival": 10**400}, ValueError, r"^arrival must be a real number that fits a float"),
        ({"input_tokens": 10**400}, ValueError, r"^input_tokens must be an int in \[0, "),
        ({"output_tokens": 2**41}, ValueError, r"^output_tokens must be an int in \[1, "),
        ({"block_size": 2**41}, ValueError, r"^block_size must be an int in \[1, "),
        ({"blocks": (1, True)}, TypeError, r"^blocks must be a tuple of ints, got True \(bool\)"),
        ({"blocks": (1, -1)}, ValueError, r"^blocks must be a tuple of ints in \[0, 2\*\*64"),
        ({"blocks": (1, 2**64)}, ValueError, r"^blocks must be a tuple of ints in \[0, 2\*\*64"),
        ({"blocks": (1, "2")}, TypeError, r"^blocks must be a tuple of ints, got '2' \(str\)"),
    ],
)
def test_request_refuses_sizes_and_ids_the_simulator_cannot_run(
    kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    fields: dict[str, Any] = {
        "arrival": 0.0,
        "blocks": (1, 2),
        "block_size": 16,
        "span_tokens": 32,
        "input_tokens": 32,
        "output_tokens": 1,
    }
    with pytest.raises(exc, match=message):
        Request(**{**fields, **kwargs})


def test_workload_checks_its_fields() -> None:
    with pytest.raises(TypeError, match=r"^requests\[1\] must be a Request, got 3 \(int\)"):
        Workload("w", [Request(0.0, (), 1, 0, 1, 1), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^requests must be a list of Request, got 'ab' \(str\)"):
        Workload("w", "ab")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^name must be a str, got 5 \(int\)"):
        Workload(5, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^params must be a dict, got"):
        Workload("w", [], [("a", 1)])  # type: ignore[arg-type]


def test_engine_cache_tokens_too_large_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^cache_tokens must be an int in \[1, \d+\] or None"):
        EngineConfig(cache_tokens=10**400)


def test_simulate_workers_too_large_is_a_value_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match=r"^workers must be an int in \[1, \d+\], got 10{12}"):
        simulate(shared_prefix(groups=1, prompts_per_group=1), "round_robin", workers=10**12)


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (shared_prefix, {"system_tokens": 10**400}, r"^system_tokens must be an int in \[0, "),
        (shared_prefix, {"groups": 10**12}, r"^groups x prompts_per_group must be at most"),
        (shared_prefix, {"system_tokens": 2**30, "block_size": 1}, r"blocks per prompt"),
        (chat, {"users": 10**6, "rounds": 10**6}, r"^users x rounds must be at most"),
        (chat, {"request_rate": 1e-320}, r"^request_rate must be large enough"),
        (bursty, {"interval_s": 1e308}, r"^interval_s must be small enough"),
        (bursty, {"input_tokens": 2**30, "block_size": 1}, r"blocks per prompt"),
    ],
)
def test_generators_refuse_sizes_they_cannot_build(
    make: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_write_json_refuses_a_file_descriptor(tmp_path: Path) -> None:
    from cacheroute.sim.report import write_json

    r, w = os.pipe()
    try:
        with pytest.raises(TypeError, match=r"^path must be a str or os\.PathLike, got \d+"):
            write_json(w, {"a": 1})  # type: ignore[arg-type]
        os.fstat(w)  # still open
    finally:
        os.close(r)
        os.close(w)
    write_json(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enabled": "no"}, r"^enabled must be a bool or None, got 'no' \(str\)"),
        ({"enabled": 0}, r"^enabled must be a bool or None, got 0 \(int\)"),
        ({"fancy": None}, r"^fancy must be a bool, got None"),
        ({"label": 3}, r"^label must be a str, got 3 \(int\)"),
    ],
)
def test_progress_bar_refuses_truthy_stand_ins_for_bools(
    kwargs: dict[str, Any], message: str
) -> None:
    from cacheroute.sim.progress import ProgressBar

    with pytest.raises(TypeError, match=message):
        ProgressBar(1, **kwargs)


def test_summarize_refuses_what_is_not_a_run_result() -> None:
    from cacheroute.sim import summarize

    with pytest.raises(TypeError, match=r"^result must be a RunResult, got 5 \(int\)"):
        summarize(5)  # type: ignore[arg-type]


# ------------------------------------------------ traces that are not regular files


def _simulate_subprocess(argv: list[str], stdin: bytes | None = None) -> Any:
    def limit_memory() -> None:  # a runaway read fails fast instead of swapping
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    return subprocess.run(
        [sys.executable, "-m", "cacheroute", "simulate", "--progress", "off", *argv],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        preexec_fn=limit_memory,
    )


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_cli_reads_a_trace_from_a_pipe(gz: bool) -> None:
    data = MOONCAKE.read_bytes()
    out = _simulate_subprocess(
        ["--trace", "/dev/stdin", "--format", "mooncake", "--policies", "round_robin"],
        gzip.compress(data) if gz else data,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert b"workload mooncake: 20 requests" in out.stdout


def test_cli_needs_format_for_a_trace_that_can_be_read_only_once() -> None:
    out = _simulate_subprocess(["--trace", "/dev/stdin"], MOONCAKE.read_bytes())
    assert out.returncode == 2
    err = out.stderr.decode()
    assert "Traceback" not in err
    assert "argument --trace: /dev/stdin is not a regular file" in err and "--format" in err


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_cli_a_line_without_end_is_an_error_not_a_memory_error() -> None:
    out = _simulate_subprocess(["--trace", "/dev/zero", "--format", "mooncake"])
    assert out.returncode == 2, out.stderr.decode()[-500:]
    err = out.stderr.decode()
    assert "Traceback" not in err and "/dev/zero:1: line longer than" in err


def test_a_line_longer_than_the_limit_names_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cacheroute.sim import traces

    monkeypatch.setattr(traces, "MAX_LINE_CHARS", 200)
    short = json.dumps(GOOD_MOONCAKE)
    long = json.dumps({**GOOD_MOONCAKE, "pad": "x" * 300})
    path = _write(tmp_path / "m.jsonl", [short, short.ljust(200)[:200], long])
    with pytest.raises(TraceFormatError, match=rf"^{path}:3: line longer than 200 characters"):
        load_mooncake(path)
