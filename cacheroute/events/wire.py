"""The KV-event wire format of vLLM and SGLang: event types, a decoder and an encoder.

An engine publishes each *batch* of KV-cache events as one ZMQ multipart message
``[topic, seq, payload]``: ``seq`` is an 8-byte big-endian batch counter and ``payload`` is
msgpack. The payload is the batch ``[ts, events, data_parallel_rank]`` (a positional array;
a map ``{"ts", "events", "data_parallel_rank"}`` is accepted too), and each event is either

* a tagged **array**, tag first: ``["BlockStored", block_hashes, parent_block_hash,
  token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx, ...]``
  (vLLM before PR #42892, SGLang before PR #37482), or
* a tagged **map**: ``{"type": "BlockStored", "block_hashes": ..., ...}`` (vLLM since
  PR #42892, v0.26; SGLang since #37482).

:func:`decode_batch` reads every shape (also mixed in one batch) into the dataclasses
below; :func:`encode_batch` writes either shape, so tests, fake engines and users can
publish messages a real subscriber (ours or a peer's) reads. Fields that a version does not
send decode to their defaults; unknown fields are ignored. SGLang's positional ``metadata``
element (``{"cache_salt": ...}``) and its EAGLE bigram ``token_ids`` (``[[t0, t1], [t1,
t2], ...]``) are understood. Needs the ``events`` extra (``msgpack``), imported on first use.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from cacheroute._validation import check_choice, check_int, check_real, check_sequence

__all__ = [
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventBatch",
    "WireFormatError",
    "decode_batch",
    "encode_batch",
]

BlockHash = int | bytes
"""A block hash as engines publish it: an ``int`` (vLLM, SGLang) or ``bytes`` (vLLM)."""


class WireFormatError(ValueError):
    """A payload that is not a KV-event batch (bad msgpack, wrong structure or types)."""


@dataclass(frozen=True)
class BlockStored:
    """Blocks entered the engine's cache: ``len(block_hashes)`` full blocks whose tokens
    are ``token_ids`` (``block_size`` per block), the first one chained to
    ``parent_block_hash`` (``None``: the blocks start a sequence).

    ``extra_keys`` has one entry per block (vLLM): what besides the tokens went into that
    block's hash (LoRA name, multimodal ``(identifier, offset)`` pairs, the cache salt on a
    sequence's first block, prompt-embedding hashes). ``cache_salt`` is SGLang's
    ``metadata["cache_salt"]``. ``group_idx`` and ``kv_cache_spec_kind`` identify the KV
    cache group of hybrid models.
    """

    block_hashes: Sequence[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Sequence[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    cache_salt: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks left the engine's cache (on ``medium``; ``None`` is the GPU)."""

    block_hashes: Sequence[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (a reset, e.g. ``/reset_prefix_cache``)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
"""One KV-cache event."""


@dataclass(frozen=True)
class KVEventBatch:
    """One published message: its events, in order, with the engine's timestamp and rank."""

    ts: float
    events: list[KVEvent | None] = field(default_factory=list)
    """Decoded events; an event that could not be read is ``None`` (and counted by the
    index as a bad event) so one malformed event does not lose its batch."""
    data_parallel_rank: int | None = None


# --------------------------------------------------------------------------- msgpack


_MSGPACK: Any = None  # the module, once imported


def _msgpack() -> Any:
    global _MSGPACK
    try:
        _MSGPACK = importlib.import_module("msgpack")
        return _MSGPACK
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "cacheroute.events needs msgpack (the 'events' extra): pip install msgpack"
        ) from exc


# An event is read into a plain tuple (``_read_event``), which the index consumes directly
# (no dataclass built per event on its hot path) and ``decode_batch`` turns into the
# dataclasses: one reader, so both see the same validation.
#
#   stored:  (STORED, block_hashes, parent_block_hash, token_ids, block_size, lora_id,
#             medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, cache_salt)
#   removed: (REMOVED, block_hashes, medium, group_idx)
#   cleared: (CLEARED,)
STORED, REMOVED, CLEARED = 0, 1, 2

RawEvent = tuple[Any, ...]

# Positional (array_like) BlockStored, after the tag: block_hashes, parent_block_hash,
# token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
# kv_cache_spec_kind, kv_cache_spec_sliding_window. vLLM appended fields over time (PR
# #16750, #19737 medium, #27577 lora_name, #33304 extra_keys, #37688 group_idx, #40984
# spec kind); SGLang's index 7 is a metadata dict instead of lora_name. BlockRemoved:
# block_hashes, medium, group_idx.
_PAD: list[None] = [None] * 11
_HASH_TYPES = frozenset((int, bytes))  # msgpack ints are in [-2**63, 2**64) already
_LACKS = "BlockStored lacks block_hashes, token_ids or block_size"
# The fields every vLLM map BlockStored carries (msgspec omits only defaulted trailing
# ones), read in one C call; with "type" they are a map's 8 keys when nothing else is set.
_MAP_FIELDS = itemgetter(
    "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"
)


def _tokens(raw: object) -> list[int]:
    if type(raw) is not list:
        raise WireFormatError(f"token_ids must be an array, got {type(raw).__name__}")
    if raw and type(raw[0]) is list:  # SGLang EAGLE bigrams: [[t0, t1], [t1, t2], ...]
        try:
            return [p[0] for p in raw]
        except (LookupError, TypeError) as exc:  # (a map pair: KeyError)
            raise WireFormatError("token_ids: malformed bigram pairs") from exc
    return raw


def _bad_type(name: str, what: str, v: object) -> WireFormatError:
    return WireFormatError(f"{name} must be {what}, got {type(v).__name__}")


def _hashes(raw: object) -> list[BlockHash]:
    if type(raw) is list:
        if len(raw) == 1:  # a decode step's one block
            t = type(raw[0])
            if t is int or t is bytes:
                return raw
        elif _HASH_TYPES.issuperset(map(type, raw)):  # one C-level pass over the types
            return raw
    raise WireFormatError("block_hashes must be an array of ints or bins")


def _removed(hashes: object, medium: object, group: object) -> RawEvent:
    hashes = _hashes(hashes)
    if medium is not None and type(medium) is not str:
        raise _bad_type("medium", "a str or nil", medium)
    if group is not None and type(group) is not int:
        raise _bad_type("group_idx", "an int or nil", group)
    return (REMOVED, hashes, medium, group)


def _other_map(raw: dict[Any, Any], tag: object) -> RawEvent:
    if tag == "BlockRemoved":
        if "block_hashes" not in raw:
            raise WireFormatError("BlockRemoved lacks block_hashes")
        return _removed(raw["block_hashes"], raw.get("medium"), raw.get("group_idx"))
    if type(tag) is not str:
        raise WireFormatError("event map has no str 'type' tag")
    if tag == "AllBlocksCleared":
        return (CLEARED,)
    raise WireFormatError(f"unknown event tag {tag!r}")


def _other_array(raw: list[Any], n: int, tag: object) -> RawEvent:
    if tag == "BlockRemoved":
        if n < 2:
            raise WireFormatError("BlockRemoved lacks block_hashes")
        return _removed(raw[1], raw[2] if n > 2 else None, raw[3] if n > 3 else None)
    if type(tag) is not str:
        raise WireFormatError("event array does not start with a str tag")
    if tag == "AllBlocksCleared":
        return (CLEARED,)
    raise WireFormatError(f"unknown event tag {tag!r}")


def _read_event(raw: object) -> RawEvent:
    """One event, tagged array or tagged map, to its tuple (see above). BlockStored, the
    hot one, is read and checked in this one frame, fewest steps first: a decode step's
    event is most of what an engine sends."""
    if type(raw) is dict:
        tag = raw.get("type")
        if tag != "BlockStored":
            return _other_map(raw, tag)
        try:
            hashes, parent, toks, bs, lora_id, medium, name = _MAP_FIELDS(raw)
            rest = len(raw) > 8  # keys besides "type" and those seven
        except KeyError:  # an engine that omits some: each field or its default
            g = raw.get
            hashes = g("block_hashes", _LACKS)
            toks = g("token_ids", _LACKS)
            bs = g("block_size", _LACKS)
            if hashes is _LACKS or toks is _LACKS or bs is _LACKS:
                raise WireFormatError(_LACKS) from None
            parent = g("parent_block_hash")
            lora_id = g("lora_id")
            medium = g("medium")
            name = g("lora_name")
            rest = True
        if rest:
            g = raw.get
            extra = g("extra_keys")
            group = g("group_idx")
            kind = g("kv_cache_spec_kind")
            salt = g("cache_salt")
            if salt is None and type(meta := g("metadata")) is dict:
                salt = meta.get("cache_salt")
        else:
            extra = group = kind = salt = None
    elif type(raw) is list:
        n = len(raw)
        tag = raw[0] if n else None
        if tag != "BlockStored":
            return _other_array(raw, n, tag)
        if n < 5:
            raise WireFormatError(_LACKS)
        r = raw if n >= 11 else raw + _PAD[n:]
        _, hashes, parent, toks, bs, lora_id, medium, name, extra, group, kind = r[:11]
        salt = None
        rest = True
        if type(name) is dict:  # SGLang's metadata in lora_name's place
            salt = name.get("cache_salt")
            name = None
    else:
        raise WireFormatError(f"event must be an array or a map, got {type(raw).__name__}")
    if type(hashes) is list and len(hashes) == 1:  # a decode step's one block
        t = type(hashes[0])
        if t is not int and t is not bytes:
            raise WireFormatError("block_hashes must be an array of ints or bins")
    else:
        hashes = _hashes(hashes)
    if parent is not None and type(parent) is not int and type(parent) is not bytes:
        raise WireFormatError("parent_block_hash must be an int, a bin or nil")
    if type(bs) is not int or bs < 1:
        raise WireFormatError(f"block_size must be a positive int, got {bs!r}")
    if type(toks) is not list or (toks and type(toks[0]) is list):
        toks = _tokens(toks)
    if lora_id is not None and type(lora_id) is not int:
        raise _bad_type("lora_id", "an int or nil", lora_id)
    if medium is not None and type(medium) is not str:
        raise _bad_type("medium", "a str or nil", medium)
    if name is not None and type(name) is not str:
        raise _bad_type("lora_name", "a str or nil", name)
    if rest:  # (else the fields below are all nil)
        if extra is not None and type(extra) is not list:
            raise WireFormatError("extra_keys must be an array or nil")
        if group is not None and type(group) is not int:
            raise _bad_type("group_idx", "an int or nil", group)
        if kind is not None and type(kind) is not str:
            raise _bad_type("kv_cache_spec_kind", "a str or nil", kind)
        if salt is not None and type(salt) is not str:
            raise _bad_type("cache_salt", "a str or nil", salt)
    return (STORED, hashes, parent, toks, bs, lora_id, medium, name, extra, group, kind, salt)


def _read_events(raw: list[Any]) -> list[RawEvent | None]:
    out: list[RawEvent | None] = []
    for ev in raw:
        try:
            out.append(_read_event(ev))
        except WireFormatError:
            out.append(None)
    return out


def _to_dataclass(e: RawEvent | None) -> KVEvent | None:
    if e is None:
        return None
    if e[0] == STORED:
        return BlockStored(*e[1:])
    if e[0] == REMOVED:
        return BlockRemoved(*e[1:])
    return AllBlocksCleared()


def _decode_raw(payload: bytes) -> tuple[int | float, list[Any], int | None]:
    """The batch envelope of a bytes-like ``payload``, checked: ``(ts, raw events,
    data_parallel_rank)``; the events are left as msgpack gave them (read them with
    ``_read_event``)."""
    mp = _MSGPACK or _msgpack()
    try:  # without keywords first: Cython's keyword parsing costs each call
        raw = mp.unpackb(payload)  # (raw=False: the default)
    except Exception:  # msgpack raises several unrelated types
        try:  # map keys other than str and bytes too (strict_map_key rejects them)
            raw = mp.unpackb(payload, strict_map_key=False)
        except Exception as exc:
            raise WireFormatError(f"payload is not msgpack: {exc}") from None
    if type(raw) is list:
        if len(raw) == 3:  # what engines send
            ts, events, rank = raw
        elif len(raw) < 2:
            raise WireFormatError("batch array must hold at least [ts, events]")
        else:
            ts, events = raw[0], raw[1]
            rank = raw[2] if len(raw) > 2 else None
    elif type(raw) is dict:
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    else:
        raise WireFormatError(f"batch must be an array or a map, got {type(raw).__name__}")
    if type(ts) is not float and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
        raise WireFormatError(f"batch ts must be a number, got {type(ts).__name__}")
    if type(events) is not list:
        raise WireFormatError(f"batch events must be an array, got {type(events).__name__}")
    if rank is not None and type(rank) is not int:
        raise WireFormatError(f"data_parallel_rank must be an int or nil, got {rank!r}")
    return ts, events, rank


def decode_batch(payload: bytes) -> KVEventBatch:
    """Read one payload (the last frame of a published message) into a :class:`KVEventBatch`.

    Accepts every shape described in the module notes. An unreadable *event* becomes
    ``None`` in ``events``; an unreadable *batch* raises.

    Raises:
        WireFormatError: not msgpack, or not a batch.
    """
    if type(payload) is not bytes and not isinstance(payload, (bytearray, memoryview)):
        raise WireFormatError(f"payload must be bytes, got {type(payload).__name__}")
    ts, events, rank = _decode_raw(payload)
    return KVEventBatch(float(ts), [_to_dataclass(e) for e in _read_events(events)], rank)


# --------------------------------------------------------------------------- encoder


def _stored_fields(e: BlockStored) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [
        ("block_hashes", list(e.block_hashes)),
        ("parent_block_hash", e.parent_block_hash),
        ("token_ids", list(e.token_ids)),
        ("block_size", e.block_size),
        ("lora_id", e.lora_id),
        ("medium", e.medium),
        ("lora_name", e.lora_name),
    ]
    # Optional trailing fields, omitted at their default as msgspec's omit_defaults does.
    opt = [
        ("extra_keys", None if e.extra_keys is None else list(e.extra_keys)),
        ("group_idx", e.group_idx),
        ("kv_cache_spec_kind", e.kv_cache_spec_kind),
    ]
    while opt and opt[-1][1] is None:
        opt.pop()
    return fields + opt


def _encode_event(e: object, shape: str) -> Any:
    if isinstance(e, BlockStored):
        tag, fields = "BlockStored", _stored_fields(e)
        if e.cache_salt is not None:
            if shape == "array":  # SGLang's positional form: metadata at index 7
                if e.lora_name is not None:
                    raise ValueError(
                        "events items: shape='array' cannot carry both lora_name and "
                        f"cache_salt (both at index 7), got lora_name={e.lora_name!r}, "
                        f"cache_salt={e.cache_salt!r}"
                    )
                fields = [*fields[:6], ("metadata", {"cache_salt": e.cache_salt}), *fields[7:]]
            else:
                fields.append(("cache_salt", e.cache_salt))
    elif isinstance(e, BlockRemoved):
        tag = "BlockRemoved"
        fields = [("block_hashes", list(e.block_hashes)), ("medium", e.medium)]
        if e.group_idx is not None:
            fields.append(("group_idx", e.group_idx))
    elif isinstance(e, AllBlocksCleared):
        tag, fields = "AllBlocksCleared", []
    else:
        raise TypeError(
            f"events items must be BlockStored, BlockRemoved or AllBlocksCleared, "
            f"got {type(e).__name__}"
        )
    if shape == "array":
        return [tag, *(v for _, v in fields)]
    return {"type": tag, **dict(fields)}


def encode_batch(
    events: Sequence[KVEvent],
    *,
    shape: Literal["map", "array"] = "map",
    ts: float | None = None,
    dp_rank: int | None = None,
) -> bytes:
    """Encode ``events`` as one batch payload, the way an engine publishes it.

    ``shape="map"``: events as tagged maps (vLLM >= 0.26, PR #42892); ``"array"``: tagged
    positional arrays (older vLLM and SGLang). The batch itself is the positional
    ``[ts, events, data_parallel_rank]`` in both. ``ts`` defaults to ``time.time()``.

    Raises:
        TypeError, ValueError: a wrong argument, or an event that is not a ``KVEvent``;
            ValueError: with ``shape="array"``, a ``BlockStored`` with both ``lora_name``
            and ``cache_salt`` (SGLang's form has one place, index 7, for either).

    >>> from cacheroute.events import BlockStored, decode_batch, encode_batch
    >>> p = encode_batch([BlockStored([7], None, [1, 2], 2)], shape="array")
    >>> decode_batch(p).events[0].token_ids
    [1, 2]
    """
    check_sequence("events", events)
    shape = check_choice("shape", shape, ("map", "array"))
    ts = time.time() if ts is None else check_real("ts", ts)
    dp_rank = check_int("dp_rank", dp_rank, minimum=0, none_ok=True)
    body = [ts, [_encode_event(e, shape) for e in events], dp_rank]
    out: bytes = _msgpack().packb(body, use_bin_type=True)
    return out
