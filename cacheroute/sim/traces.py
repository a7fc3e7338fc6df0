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
import io
import json
import math
import os
import zlib
from collections.abc import Iterator
from typing import Any, TextIO

from cacheroute._validation import check_int, fail
from cacheroute.sim.request import MAX_BLOCKS, MAX_TOKENS, Request, Workload

__all__ = [
    "FORMATS",
    "MAX_CONCURRENCY",
    "MAX_LINE_CHARS",
    "TraceFormatError",
    "detect_format",
    "load_claude_code",
    "load_mooncake",
    "load_trace",
    "open_trace",
]

FORMATS = ("mooncake", "claude_code")
"""The trace formats :func:`load_trace` reads."""

MAX_LINE_CHARS = 2**26
"""The longest trace line read (64M characters; a real line is at most a few hundred
thousand): a longer one, or a file with no line ends (``/dev/zero``), is a
:class:`TraceFormatError`, not a ``MemoryError``."""

MAX_CONCURRENCY = 2**20
"""The largest ``concurrency`` of :func:`load_claude_code` (far more sessions at once
than any trace holds; a larger value is a ``ValueError``, not an allocation)."""


class TraceFormatError(ValueError):
    """A trace line is not valid; the message starts with ``path:line:``."""


def _check_path(path: object) -> str | os.PathLike[str]:
    """``path`` if it is a ``str`` or ``os.PathLike`` of a ``str``.

    An ``int`` would be opened as a file descriptor (and closed: ``load_mooncake(1)``
    once closed the process's stdout), ``bytes`` paths are not supported.
    """
    if isinstance(path, str) or (
        isinstance(path, os.PathLike) and isinstance(os.fspath(path), str)
    ):
        return path
    raise fail("path", "a str or os.PathLike", path, TypeError)


class _OwnedGzipFile(gzip.GzipFile):
    """A ``GzipFile`` over a file object it also closes."""

    def __init__(self, raw: io.BufferedReader) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_trace(path: str | os.PathLike[str]) -> TextIO:
    """Open a trace file for reading text, gunzipping it when its content is gzip.

    The file is opened once and its first bytes are peeked, so a pipe (``/dev/stdin``)
    works, plain or gzipped.

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike`` (a file descriptor, bytes).
        OSError: the file cannot be opened.
    """
    _check_path(path)
    raw = open(path, "rb")  # noqa: SIM115 (returned, wrapped)
    try:
        if raw.peek(2)[:2] == b"\x1f\x8b":
            return io.TextIOWrapper(_OwnedGzipFile(raw), encoding="utf-8")
        return io.TextIOWrapper(raw, encoding="utf-8")
    except BaseException:
        raw.close()
        raise


def _records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    lineno = 0
    text = open_trace(path)  # OSError (no such file, a directory, ...) as it is
    try:
        with text:
            limit = MAX_LINE_CHARS
            read = text.readline
            while line := read(limit + 1):
                lineno += 1
                if len(line) > limit and line[-1] != "\n":
                    raise TraceFormatError(
                        f"{path}:{lineno}: line longer than {limit:,} characters"
                    )
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except RecursionError:
                    raise TraceFormatError(
                        f"{path}:{lineno}: not valid JSON (nested too deeply)"
                    ) from None
                except json.JSONDecodeError as exc:
                    raise TraceFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                except ValueError as exc:  # e.g. an integer of more than 4,300 digits
                    raise TraceFormatError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                if not isinstance(rec, dict):
                    raise TraceFormatError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, rec
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        corrupt = isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile))
        what = "corrupt or truncated gzip data" if corrupt else "read error"
        where = f"{path}:{lineno + 1}" if lineno or corrupt else f"{path}"
        raise TraceFormatError(f"{where}: cannot read the trace: {what} ({exc})") from None


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of the trace at ``path`` (one of :data:`FORMATS`), from its first record.

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike``.
        TraceFormatError: the first record is not valid JSON (naming the line), or the
            file cannot be read.
        ValueError: the first record matches no known format, or the file is empty.
        OSError: the file cannot be opened (``FileNotFoundError`` included).
    """
    _check_path(path)
    for _, rec in _records(path):
        if "hash_ids" in rec:
            return "mooncake"
        if "hash_id_ranges" in rec:
            return "claude_code"
        break
    raise ValueError(f"cannot detect the format of {path}; pass --format {{{','.join(FORMATS)}}}")


def _get(
    rec: dict[str, Any],
    key: str,
    kind: type,
    where: str,
    minimum: float = 0,
    maximum: int = MAX_TOKENS,
) -> Any:
    """Field ``key`` of ``rec``: an ``int`` in [minimum, maximum], a finite ``float`` >=
    ``minimum`` (an int too large for a float is refused), or a value of type ``kind``."""
    if key not in rec:
        raise TraceFormatError(f"{where}: missing field {key!r}")
    value = rec[key]
    if kind is float:  # JSON true/false are not numbers; JSON NaN/Infinity are not finite
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond the float range
                ok = False
        ok = ok and minimum <= value < math.inf
        what = f"a finite number >= {minimum:g}"
    elif kind is int:
        ok = type(value) is int and minimum <= value <= maximum
        what = f"an int in [{minimum:g}, {maximum}]"
    else:
        ok = type(value) is kind
        what = f"a {kind.__name__}"
    if not ok:
        raise TraceFormatError(f"{where}: field {key!r} must be {what}, got {rec[key]!r:.80}")
    return value


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
        path: the JSON-lines file, plain or gzipped (a ``str`` or ``os.PathLike``).
        block_size: tokens per ``hash_ids`` entry (512 in the published traces).
        limit: read at most this many requests (``None``: all).

    An ``output_length`` of 0 is simulated as 1: prefill always yields the first token.
    Token counts may be at most :data:`~cacheroute.sim.request.MAX_TOKENS`.

    Raises:
        TraceFormatError: a malformed line (the message names the file and the line), or
            a file that cannot be read (corrupt gzip data: naming the first unread line).
        TypeError: ``path`` not a ``str``/``os.PathLike``; ``block_size`` or ``limit``
            not an int (``limit`` may be ``None``).
        ValueError: ``block_size`` outside [1, ``MAX_TOKENS``] or ``limit`` below 0.
        OSError: the file cannot be opened (``FileNotFoundError`` included).
    """
    _check_path(path)
    check_int("block_size", block_size, minimum=1, maximum=MAX_TOKENS)
    check_int("limit", limit, minimum=0, none_ok=True)
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
        if limit is not None and len(reqs) >= limit:
            break  # the lines after the limit are not read (a cut-off tail included)
    params = {"path": str(path), "format": "mooncake", "block_size": block_size}
    return Workload("mooncake", reqs, params)


def _coarse_keys(ranges: list[list[int]], total: int, coarsen: int) -> list[int]:
    """The ids of every ``coarsen``-th block of the runs ``ranges`` (``total`` blocks in
    all), plus the last block when ``total`` is not a multiple: computed per run, never
    expanding the runs themselves."""
    keys: list[int] = []
    pos = 0  # position of the run's first block among all blocks
    for first, last in ranges:
        skip = (coarsen - 1 - pos) % coarsen  # the run's first key is at first + skip
        keys.extend(range(first + skip, last + 1, coarsen))
        pos += last - first + 1
    if total % coarsen:
        keys.append(ranges[-1][1])
    return keys


def load_claude_code(
    path: str | os.PathLike[str],
    *,
    concurrency: int = 32,
    coarsen: int = 8,
    limit: int | None = None,
) -> Workload:
    """Load a Claude-Code (kv-cache-tester) trace and compose its sessions on a timeline.

    Args:
        path: the JSON-lines file, plain or gzipped (a ``str`` or ``os.PathLike``).
        concurrency: sessions running at once (at most :data:`MAX_CONCURRENCY`).
            Session k (in order of first appearance) starts when a slot frees: when the
            session before it in that slot ended (its last request's ``t`` plus its
            ``api_time``, if given).
        coarsen: merge this many consecutive blocks into one (1: keep the trace's own
            blocks; at most :data:`~cacheroute.sim.request.MAX_BLOCKS`). See the module
            docstring.
        limit: keep at most this many requests (the earliest on the timeline; ``None``:
            all).

    An ``output_length`` of 0 is simulated as 1 (prefill always yields the first
    token); an ``api_time`` that is missing or ``null`` counts as 0. Token counts may be
    at most :data:`~cacheroute.sim.request.MAX_TOKENS`, and a request at most
    :data:`~cacheroute.sim.request.MAX_BLOCKS` blocks after coarsening; both are checked
    from the line's numbers before anything is allocated for it.

    Raises:
        TraceFormatError: a malformed line (the message names the file and the line), or
            a file that cannot be read (corrupt gzip data: naming the first unread line).
        TypeError: ``path`` not a ``str``/``os.PathLike``; ``concurrency``, ``coarsen``
            or ``limit`` not an int (``limit`` may be ``None``).
        ValueError: ``concurrency`` outside [1, ``MAX_CONCURRENCY``], ``coarsen`` outside
            [1, ``MAX_BLOCKS``], ``limit`` below 0.
        OSError: the file cannot be opened (``FileNotFoundError`` included).
    """
    _check_path(path)
    check_int("concurrency", concurrency, minimum=1, maximum=MAX_CONCURRENCY)
    check_int("coarsen", coarsen, minimum=1, maximum=MAX_BLOCKS)
    check_int("limit", limit, minimum=0, none_ok=True)
    ids = _Renumber()
    # session -> [(t, line, blocks, block size, span, input tokens, output tokens)]
    sessions: dict[str, list[tuple[float, int, tuple[int, ...], int, int, int, int]]] = {}
    ends: dict[str, float] = {}
    for lineno, rec in _records(path):
        where = f"{path}:{lineno}"
        session = _get(rec, "session", str, where)
        t = _get(rec, "t", float, where)
        n_in = _get(rec, "input_length", int, where, 1)
        n_out = _get(rec, "output_length", int, where)
        bs = _get(rec, "block_size", int, where, 1)
        ranges = rec.get("hash_id_ranges")
        if not isinstance(ranges, list):
            raise TraceFormatError(f"{where}: field 'hash_id_ranges' must be a list")
        total = 0
        for item in ranges:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(type(v) is int and v >= 0 for v in item)
                or item[0] > item[1]
            ):
                raise TraceFormatError(
                    f"{where}: 'hash_id_ranges' entries must be [first, last] ints with "
                    f"0 <= first <= last, got {item!r:.80}"
                )
            total += item[1] - item[0] + 1
        span = total * bs
        if span > n_in:  # checked before any block id is generated
            raise TraceFormatError(
                f"{where}: {total} blocks of {bs} tokens exceed input_length {n_in}"
            )
        if bs * coarsen > MAX_TOKENS:
            raise TraceFormatError(
                f"{where}: block_size {bs} x coarsen {coarsen} exceeds {MAX_TOKENS} tokens"
            )
        units = -(-total // coarsen)
        if units > MAX_BLOCKS:
            raise TraceFormatError(
                f"{where}: {total} blocks make {units} blocks after coarsen={coarsen}, "
                f"more than {MAX_BLOCKS}; raise coarsen"
            )
        keys = _coarse_keys(ranges, total, coarsen) if total else []
        blocks = tuple(ids[b] for b in keys)
        api = 0.0 if rec.get("api_time") is None else _get(rec, "api_time", float, where)
        item_ = (t, lineno, blocks, bs * coarsen, span, n_in, max(n_out, 1))
        sessions.setdefault(session, []).append(item_)
        ends[session] = max(ends.get(session, 0.0), t + api)
    slots = [0.0] * min(concurrency, len(sessions))
    reqs: list[Request] = []
    for session, items in sessions.items():
        start = heapq.heappop(slots)
        for t, lineno, blocks, block, span, n_in, n_out in items:
            arrival = start + t
            if not arrival < math.inf:
                raise TraceFormatError(
                    f"{path}:{lineno}: session {session!r:.40} starts at {start:g} s on the "
                    f"timeline, so its t={t:g} puts this request beyond the float range"
                )
            reqs.append(Request(arrival, blocks, block, span, n_in, n_out))
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
    """Load ``path`` in format ``fmt`` (one of :data:`FORMATS`) with the loader's options.

    Raises:
        TypeError: ``path`` is not a ``str``/``os.PathLike``, ``fmt`` is not a ``str``,
            or an option the loader does not take.
        ValueError: an unknown ``fmt``; otherwise as the loader.
    """
    _check_path(path)
    if not isinstance(fmt, str):
        raise fail("fmt", f"one of {', '.join(map(repr, FORMATS))}", fmt, TypeError)
    if fmt == "mooncake":
        return load_mooncake(path, limit=limit, **options)
    if fmt == "claude_code":
        return load_claude_code(path, limit=limit, **options)
    raise ValueError(f"unknown trace format {fmt!r}; formats: {', '.join(FORMATS)}")
