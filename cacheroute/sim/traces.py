"""Trace loaders: Mooncake and Claude-Code (kv-cache-tester) JSON-lines files.

Both take any path, gzip-compressed or plain (detected from the content, not the name),
so users can point them at their own traces of the same format. A line that is not
valid raises :class:`TraceFormatError` naming the file and the line number.

Block ids are renumbered densely in order of first appearance (equal ids stay equal,
chaining is kept); small ids keep the router's token tree in its compact encoding.

* **Mooncake** (kvcache-ai/Mooncake, FAST'25 traces), one request a line::

      {"timestamp": ms, "input_length": tokens, "output_length": tokens,
       "hash_ids": [chained id per 512-token block; the last, partial block has its own]}

* **Claude-Code** (callanjfox/kv-cache-tester, flattened to one request a line)::

      {"session": str, "t": seconds since the session started, "input_length",
       "output_length", "block_size": 64, "hash_id_ranges": [[first, last], ...], ...}

  ``hash_id_ranges`` are inclusive runs of chained ids of full blocks; tokens past the
  last full block have no id. Sessions have no absolute time: :func:`load_claude_code`
  composes them onto one timeline, ``concurrency`` sessions at a time (each session
  starts when an earlier one ends, in file order). Optionally ``coarsen`` merges that
  many consecutive blocks into one (a merged block is keyed by the id of its last
  block, which chaining makes unique): the cache is then exact at that coarser
  granularity and the simulation is that many times faster; a shared prefix loses at
  most ``coarsen - 1`` blocks at its end.
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
import os
from collections.abc import Iterator
from typing import Any, TextIO

from cacheroute.sim.request import Request, Workload

__all__ = [
    "FORMATS",
    "TraceFormatError",
    "load_claude_code",
    "load_mooncake",
    "load_trace",
    "open_trace",
]

FORMATS = ("mooncake", "claude_code")
"""The trace formats :func:`load_trace` reads."""


class TraceFormatError(ValueError):
    """A trace line is not valid; the message starts with ``path:line:``."""


def open_trace(path: str | os.PathLike[str]) -> TextIO:
    """Open a trace file for reading text, gunzipping it when its content is gzip."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    with open_trace(path) as text:
        for lineno, line in enumerate(text, 1):
            if line.strip():
                yield lineno, line


def _records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        for lineno, line in _lines(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise TraceFormatError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise TraceFormatError(f"{path}: cannot read the trace ({exc})") from None


def _get(rec: dict[str, Any], key: str, kind: type, where: str, minimum: float = 0) -> Any:
    if key not in rec:
        raise TraceFormatError(f"{where}: missing field {key!r}")
    value = rec[key]
    if kind is float:  # JSON true/false are not numbers; JSON NaN/Infinity are not finite
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        ok = ok and minimum <= value < math.inf
        what = f"a finite number >= {minimum}"
    elif kind is int:
        ok = type(value) is int and value >= minimum
        what = f"an int >= {minimum}"
    else:
        ok = type(value) is kind
        what = f"a {kind.__name__}"
    if not ok:
        raise TraceFormatError(f"{where}: field {key!r} must be {what}, got {value!r}")
    return value


def _check_option(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """A loader option: ``TypeError`` unless an int (or ``None`` when ``optional``),
    ``ValueError`` below ``minimum``; the message names the option and the value."""
    if value is None and optional:
        return
    if type(value) is not int:
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


class _Renumber(dict[int, int]):
    def __missing__(self, key: int) -> int:
        value = self[key] = len(self)
        return value


def _check_ids(ids: object, where: str, key: str) -> list[int]:
    if not isinstance(ids, list) or not all(type(b) is int and b >= 0 for b in ids):
        raise TraceFormatError(f"{where}: field {key!r} must be a list of ints >= 0")
    return ids


def load_mooncake(
    path: str | os.PathLike[str], *, block_size: int = 512, limit: int | None = None
) -> Workload:
    """Load a Mooncake trace (see the module docstring).

    Args:
        path: the JSON-lines file, plain or gzipped.
        block_size: tokens per ``hash_ids`` entry (512 in the published traces).
        limit: read at most this many requests (``None``: all).

    An ``output_length`` of 0 is simulated as 1: prefill always yields the first token.

    Raises:
        TraceFormatError: a malformed line (the message names the file and the line).
        TypeError: ``block_size`` or ``limit`` not an int (``limit`` may be ``None``).
        ValueError: ``block_size`` below 1 or ``limit`` below 0.
    """
    _check_option("block_size", block_size, 1)
    _check_option("limit", limit, 0, optional=True)
    ids = _Renumber()
    reqs: list[Request] = []
    for lineno, rec in _records(path):
        if limit is not None and len(reqs) >= limit:
            break
        where = f"{path}:{lineno}"
        ts = _get(rec, "timestamp", float, where)
        n_in = _get(rec, "input_length", int, where, 1)
        n_out = _get(rec, "output_length", int, where)
        hashes = _check_ids(rec.get("hash_ids"), where, "hash_ids")
        n = len(hashes)
        if n == 0 or n_in <= (n - 1) * block_size:
            raise TraceFormatError(
                f"{where}: input_length {n_in} does not fit {n} hash_ids of {block_size} tokens"
            )
        span = min(n_in, n * block_size)
        blocks = tuple(ids[b] for b in hashes)
        reqs.append(Request(ts / 1000.0, blocks, block_size, span, n_in, max(n_out, 1)))
    params = {"path": str(path), "format": "mooncake", "block_size": block_size}
    return Workload("mooncake", reqs, params)


def load_claude_code(
    path: str | os.PathLike[str],
    *,
    concurrency: int = 32,
    coarsen: int = 8,
    limit: int | None = None,
) -> Workload:
    """Load a Claude-Code (kv-cache-tester) trace and compose its sessions on a timeline.

    Args:
        path: the JSON-lines file, plain or gzipped.
        concurrency: sessions running at once. Session k (in order of first appearance)
            starts when a slot frees: when the session before it in that slot ended
            (its last request's ``t`` plus its ``api_time``, if given).
        coarsen: merge this many consecutive blocks into one (1: keep the trace's own
            blocks). See the module docstring.
        limit: keep at most this many requests (the earliest on the timeline; ``None``:
            all).

    An ``output_length`` of 0 is simulated as 1 (prefill always yields the first
    token); an ``api_time`` that is missing or ``null`` counts as 0.

    Raises:
        TraceFormatError: a malformed line (the message names the file and the line).
        TypeError: ``concurrency``, ``coarsen`` or ``limit`` not an int (``limit`` may be
            ``None``).
        ValueError: ``concurrency`` or ``coarsen`` below 1, ``limit`` below 0.
    """
    _check_option("concurrency", concurrency, 1)
    _check_option("coarsen", coarsen, 1)
    _check_option("limit", limit, 0, optional=True)
    ids = _Renumber()
    sessions: dict[str, list[tuple[float, Request]]] = {}
    ends: dict[str, float] = {}
    for lineno, rec in _records(path):
        where = f"{path}:{lineno}"
        session = _get(rec, "session", str, where)
        t = float(_get(rec, "t", float, where))
        n_in = _get(rec, "input_length", int, where, 1)
        n_out = _get(rec, "output_length", int, where)
        bs = _get(rec, "block_size", int, where, 1)
        ranges = rec.get("hash_id_ranges")
        if not isinstance(ranges, list):
            raise TraceFormatError(f"{where}: field 'hash_id_ranges' must be a list")
        raw: list[int] = []
        for item in ranges:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(type(v) is int and v >= 0 for v in item)
                or item[0] > item[1]
            ):
                raise TraceFormatError(
                    f"{where}: 'hash_id_ranges' entries must be [first, last] ints with "
                    f"0 <= first <= last, got {item!r}"
                )
            raw.extend(range(item[0], item[1] + 1))
        span = len(raw) * bs
        if span > n_in:
            raise TraceFormatError(
                f"{where}: {len(raw)} blocks of {bs} tokens exceed input_length {n_in}"
            )
        keys = raw[coarsen - 1 :: coarsen]
        if len(raw) % coarsen:
            keys.append(raw[-1])
        blocks = tuple(ids[b] for b in keys)
        api = 0.0 if rec.get("api_time") is None else float(_get(rec, "api_time", float, where))
        req = Request(0.0, blocks, bs * coarsen, span, n_in, max(n_out, 1))
        sessions.setdefault(session, []).append((t, req))
        ends[session] = max(ends.get(session, 0.0), t + api)
    slots = [0.0] * concurrency
    reqs: list[Request] = []
    for session, items in sessions.items():
        start = heapq.heappop(slots)
        for t, r in items:
            reqs.append(
                Request(
                    start + t,
                    r.blocks,
                    r.block_size,
                    r.span_tokens,
                    r.input_tokens,
                    r.output_tokens,
                )
            )
        heapq.heappush(slots, start + ends[session])
    reqs.sort(key=lambda r: r.arrival)
    if limit is not None:
        reqs = reqs[:limit]
    params = {
        "path": str(path),
        "format": "claude_code",
        "concurrency": concurrency,
        "coarsen": coarsen,
        "sessions": len(sessions),
    }
    return Workload("claude_code", reqs, params)


def load_trace(
    path: str | os.PathLike[str], fmt: str, *, limit: int | None = None, **options: Any
) -> Workload:
    """Load ``path`` in format ``fmt`` (one of :data:`FORMATS`) with the loader's options."""
    if fmt == "mooncake":
        return load_mooncake(path, limit=limit, **options)
    if fmt == "claude_code":
        return load_claude_code(path, limit=limit, **options)
    raise ValueError(f"unknown trace format {fmt!r}; formats: {', '.join(FORMATS)}")
