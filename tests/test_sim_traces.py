"""Trace loaders: the published formats (small fixtures), gz or plain, malformed lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CLAUDE, MOONCAKE

from cacheroute.sim import (
    TraceFormatError,
    load_claude_code,
    load_mooncake,
    load_trace,
    simulate,
)


def _raw(path: Path) -> list[dict[str, Any]]:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(path: Path, records: list[Any], *, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_mooncake_fixture_round_trips() -> None:
    raw = _raw(MOONCAKE)
    w = load_mooncake(MOONCAKE)
    assert len(w) == len(raw) == 20
    for rec, r in zip(raw, w.requests, strict=True):  # already in timestamp order
        assert r.arrival == rec["timestamp"] / 1000
        assert r.input_tokens == r.span_tokens == rec["input_length"]
        assert r.output_tokens == max(1, rec["output_length"])
        assert r.block_size == 512 and len(r.blocks) == len(rec["hash_ids"])
    # Renumbering keeps equality of ids exactly.
    mapping: dict[int, int] = {}
    for rec, r in zip(raw, w.requests, strict=True):
        for a, b in zip(rec["hash_ids"], r.blocks, strict=True):
            assert mapping.setdefault(a, b) == b
    assert len(set(mapping.values())) == len(mapping)


def test_gz_and_plain_give_the_same_workload(tmp_path: Path) -> None:
    gz = tmp_path / "trace.data"  # detected from content, not name
    gz.write_bytes(gzip.compress(MOONCAKE.read_bytes()))
    assert load_mooncake(gz).requests == load_mooncake(MOONCAKE).requests
    plain = _write(tmp_path / "cc.jsonl", _raw(CLAUDE))
    assert load_claude_code(plain).requests == load_claude_code(CLAUDE).requests


def test_claude_code_fixture_round_trips_and_composes_sessions() -> None:
    raw = _raw(CLAUDE)
    w = load_claude_code(CLAUDE, concurrency=1, coarsen=1)
    assert len(w) == len(raw) == 10
    first = [r for r in raw if r["session"] == "trace_0001"]
    end_first = first[-1]["t"] + first[-1]["api_time"]
    arrivals = sorted(r["t"] for r in first) + sorted(
        end_first + r["t"] for r in raw if r["session"] == "trace_0002"
    )
    assert [r.arrival for r in w.requests] == pytest.approx(arrivals)
    for rec, r in zip(raw, w.requests, strict=True):
        n = sum(b - a + 1 for a, b in rec["hash_id_ranges"])
        assert len(r.blocks) == n and r.span_tokens == 64 * n
        assert r.input_tokens == rec["input_length"]
    # Two sessions at once: both start at t=0.
    both = load_claude_code(CLAUDE, concurrency=2, coarsen=1)
    assert sorted(r.arrival for r in both.requests)[:2] == [0.0, 0.0]


def test_claude_code_coarsening_keeps_prefix_sharing() -> None:
    fine = load_claude_code(CLAUDE, concurrency=2, coarsen=1)
    coarse = load_claude_code(CLAUDE, concurrency=2, coarsen=8)
    for f, c in zip(fine.requests, coarse.requests, strict=True):
        assert len(c.blocks) == -(-len(f.blocks) // 8)
        assert c.span_tokens == f.span_tokens and c.block_size == 512
    # Shared prefixes in coarse blocks = shared fine blocks // 8 (chained ids).
    a, b = fine.requests[0], fine.requests[2]
    ca, cb = coarse.requests[0], coarse.requests[2]
    shared = next(
        (i for i, (x, y) in enumerate(zip(a.blocks, b.blocks, strict=False)) if x != y), None
    )
    shared = min(len(a.blocks), len(b.blocks)) if shared is None else shared
    coarse_shared = sum(1 for x, y in zip(ca.blocks, cb.blocks, strict=False) if x == y)
    assert coarse_shared == shared // 8


def test_fixtures_simulate() -> None:
    for w in (load_mooncake(MOONCAKE), load_claude_code(CLAUDE)):
        res = simulate(w, "cache_aware", workers=2)
        assert res.final_loads == [0, 0]


def test_load_trace_dispatch_and_limit() -> None:
    assert len(load_trace(MOONCAKE, "mooncake", limit=5)) == 5
    assert len(load_trace(CLAUDE, "claude_code", limit=3)) == 3
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(MOONCAKE, "csv")


GOOD_MOONCAKE = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
GOOD_CC = {
    "session": "s",
    "t": 0.0,
    "input_length": 200,
    "output_length": 5,
    "block_size": 64,
    "hash_id_ranges": [[0, 2]],
}


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({**GOOD_MOONCAKE, "timestamp": "soon"}, "'timestamp'"),
        ({k: v for k, v in GOOD_MOONCAKE.items() if k != "input_length"}, "missing field"),
        ({**GOOD_MOONCAKE, "hash_ids": [1, -2]}, "'hash_ids'"),
        ({**GOOD_MOONCAKE, "input_length": 100}, "does not fit 2 hash_ids"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_mooncake_malformed_line_names_file_and_line(
    tmp_path: Path, bad: Any, match: str, gz: bool
) -> None:
    path = _write(tmp_path / "t.jsonl", [GOOD_MOONCAKE, "", GOOD_MOONCAKE, bad], gz=gz)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_mooncake(path)
    assert str(info.value).startswith(f"{path}:4:")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({**GOOD_CC, "hash_id_ranges": [[3, 1]]}, "first <= last"),
        ({**GOOD_CC, "hash_id_ranges": "0-2"}, "must be a list"),
        ({**GOOD_CC, "input_length": 100}, "exceed input_length"),
        ({**GOOD_CC, "session": 7}, "'session'"),
    ],
)
def test_claude_code_malformed_line_names_file_and_line(
    tmp_path: Path, bad: Any, match: str
) -> None:
    path = _write(tmp_path / "cc.jsonl", [GOOD_CC, bad])
    with pytest.raises(TraceFormatError, match=match) as info:
        load_claude_code(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_mooncake(tmp_path / "nope.jsonl")


def test_claude_code_bad_options() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        load_claude_code(CLAUDE, concurrency=0)
    with pytest.raises(ValueError, match="coarsen"):
        load_claude_code(CLAUDE, coarsen=0)


def test_coarse_keys_equal_the_expanded_slice() -> None:
    """The per-run arithmetic picks exactly the ids the expanded list would."""
    import random

    from cacheroute.sim.traces import _coarse_keys

    rng = random.Random(0)
    for _ in range(500):
        ranges = []
        nxt = 0
        for _ in range(rng.randint(1, 5)):
            nxt += rng.randint(0, 50)
            length = rng.randint(1, 40)
            ranges.append([nxt, nxt + length - 1])
            nxt += length
        raw = [b for a, z in ranges for b in range(a, z + 1)]
        for coarsen in (1, 2, 3, 7, 8, 64):
            expected = raw[coarsen - 1 :: coarsen] + ([raw[-1]] if len(raw) % coarsen else [])
            assert _coarse_keys(ranges, len(raw), coarsen) == expected


def test_mooncake_limit_reads_no_line_past_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    good = {"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}
    path.write_text(json.dumps(good) + "\n" + '{"timestamp": 1, "input_le')  # a cut-off tail
    assert len(load_mooncake(path, limit=1).requests) == 1
    with pytest.raises(TraceFormatError, match=":2: "):
        load_mooncake(path)
