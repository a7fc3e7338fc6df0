"""The KV-event wire format: both event shapes, SGLang's variants, bad payloads."""

from __future__ import annotations

import msgpack
import pytest

from cacheroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    WireFormatError,
    decode_batch,
    encode_batch,
)

STORED = BlockStored(
    [11, b"\x01" * 32],
    None,
    list(range(8)),
    4,
    lora_id=3,
    medium="GPU",
    lora_name="adapter",
    extra_keys=[["adapter", "salt"], ["adapter"]],
    group_idx=0,
    kv_cache_spec_kind="full_attention",
)
EVENTS = [STORED, BlockRemoved([11], "CPU", 0), AllBlocksCleared()]


@pytest.mark.parametrize("shape", ["map", "array"])
def test_round_trip_both_shapes(shape: str) -> None:
    batch = decode_batch(encode_batch(EVENTS, shape=shape, ts=12.5, dp_rank=1))  # type: ignore[arg-type]
    assert batch == KVEventBatch(12.5, EVENTS, 1)


def test_map_shape_is_tagged_maps_in_a_positional_batch() -> None:
    raw = msgpack.unpackb(encode_batch([STORED], shape="map", ts=1.0))
    assert raw[0] == 1.0 and raw[2] is None
    ev = raw[1][0]
    assert ev["type"] == "BlockStored" and ev["token_ids"] == list(range(8))


def test_array_shape_is_tag_first_positional() -> None:
    raw = msgpack.unpackb(encode_batch([BlockStored([5], 4, [1, 2], 2)], shape="array", ts=1.0))
    assert raw[1][0] == ["BlockStored", [5], 4, [1, 2], 2, None, None, None]


def test_decodes_a_vllm_0_26_message() -> None:
    # The shape vLLM v0.26 publishes (batch positional, events tagged maps), as reported
    # in volcano-sh/kthena#1535.
    ev = {
        "type": "BlockStored",
        "block_hashes": [15760518052499183552],
        "parent_block_hash": None,
        "token_ids": [151644, 872, 198, 9064, 374, 279, 6722, 315] * 2,
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        "kv_cache_spec_sliding_window": None,
    }
    batch = decode_batch(msgpack.packb([1789095808.8, [ev], 0]))
    (e,) = batch.events
    assert isinstance(e, BlockStored)
    assert e.block_hashes == [15760518052499183552] and e.block_size == 16
    assert e.group_idx == 0 and e.extra_keys == [None]
    assert batch.data_parallel_rank == 0


def test_decodes_old_positional_vllm_and_a_map_envelope() -> None:
    old = ["BlockStored", [1, 2], None, [9] * 4, 2, None]  # vLLM 0.9: no medium
    removed = ["BlockRemoved", [1]]
    batch = decode_batch(msgpack.packb({"ts": 3, "events": [old, removed, ["AllBlocksCleared"]]}))
    assert batch.events == [
        BlockStored([1, 2], None, [9] * 4, 2),
        BlockRemoved([1]),
        AllBlocksCleared(),
    ]
    assert batch.ts == 3.0 and batch.data_parallel_rank is None


def test_sglang_metadata_salt_and_bigram_tokens() -> None:
    salted = ["BlockStored", [7], None, [1, 2], 2, None, "GPU", {"cache_salt": "tenant-a"}]
    bigram = {
        "type": "BlockStored",
        "block_hashes": [8],
        "parent_block_hash": 7,
        "token_ids": [[3, 4], [4, 5]],
        "block_size": 2,
        "cache_salt": "x",
        "session_id": "ignored",
    }
    a, b = decode_batch(msgpack.packb([0.0, [salted, bigram]])).events
    assert isinstance(a, BlockStored) and a.cache_salt == "tenant-a" and a.lora_name is None
    assert isinstance(b, BlockStored) and b.token_ids == [3, 4] and b.cache_salt == "x"
    # and our encoder writes SGLang's positional salt
    c = BlockStored([7], None, [1, 2], 2, medium="GPU", cache_salt="s")
    assert decode_batch(encode_batch([c], shape="array")).events == [c]
    assert decode_batch(encode_batch([c], shape="map")).events == [c]


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb("hello"),
        msgpack.packb([1.0]),
        msgpack.packb(["ts", []]),
        msgpack.packb([1.0, {}]),
        msgpack.packb([1.0, [], "rank"]),
    ],
)
def test_bad_batches_raise(payload: bytes) -> None:
    with pytest.raises(WireFormatError):
        decode_batch(payload)


def test_bad_events_become_none_and_the_rest_survives() -> None:
    good = ["BlockRemoved", [1]]
    bad = [
        ["Unknown", 1],
        [],
        {"block_hashes": [1]},
        ["BlockStored", ["x"], None, [1], 1, None],
        ["BlockStored", [1], None, [1], 0, None],
        ["BlockStored", [1], None, "tokens", 1, None],
        {"type": "BlockStored", "block_hashes": [1]},
        ["BlockRemoved", [1], 5],
        42,
    ]
    batch = decode_batch(msgpack.packb([0.0, [*bad, good]]))
    assert batch.events == [None] * len(bad) + [BlockRemoved([1])]


_MAP = {
    "type": "BlockStored",
    "block_hashes": [1],
    "parent_block_hash": None,
    "token_ids": [1, 2],
    "block_size": 2,
    "lora_id": None,
    "medium": "GPU",
    "lora_name": None,
}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("block_hashes", [1.5]),
        ("parent_block_hash", "p"),
        ("token_ids", "t"),
        ("block_size", True),
        ("lora_id", "3"),
        ("medium", 1),
        ("lora_name", 2),
        ("extra_keys", "k"),
        ("group_idx", "0"),
        ("kv_cache_spec_kind", 1),
        ("cache_salt", 1),
        ("metadata", {"cache_salt": 1}),
    ],
)
def test_a_map_field_of_a_wrong_type_makes_a_bad_event(name: str, value: object) -> None:
    batch = decode_batch(msgpack.packb([0.0, [{**_MAP, name: value}, _MAP]]))
    assert batch.events == [None, BlockStored([1], None, [1, 2], 2, medium="GPU")]


def test_a_map_metadata_salt_and_map_keys_other_than_str() -> None:
    ev = {**_MAP, "metadata": {"cache_salt": "s"}, 7: "an int key"}
    (e,) = decode_batch(msgpack.packb([0.0, [ev]])).events
    assert e == BlockStored([1], None, [1, 2], 2, medium="GPU", cache_salt="s")


def test_encoder_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="shape must be one of 'map', 'array', got 'json'"):
        encode_batch([], shape="json")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dp_rank must be an int or None, got True"):
        encode_batch([], dp_rank=True)
    with pytest.raises(TypeError, match="events items must be"):
        encode_batch(["BlockStored"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="events must be a list or tuple"):
        encode_batch("BlockStored")  # type: ignore[arg-type]
    with pytest.raises(WireFormatError, match="payload must be bytes"):
        decode_batch("x")  # type: ignore[arg-type]


def test_importing_the_package_loads_no_optional_dependency() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cacheroute, cacheroute.events; "
        "print(sorted(m for m in ('zmq', 'msgpack', 'msgspec') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_array_shape_with_a_cache_salt_keeps_every_other_field() -> None:
    e = BlockStored(
        [7],
        None,
        [1, 2],
        2,
        extra_keys=[None],
        group_idx=1,
        kv_cache_spec_kind="full_attention",
        cache_salt="s",
    )
    assert decode_batch(encode_batch([e], shape="array")).events == [e]
    both = BlockStored([7], None, [1, 2], 2, lora_name="a", cache_salt="s")
    with pytest.raises(ValueError, match=r"lora_name=.a.*cache_salt=.s."):  # both at index 7
        encode_batch([both], shape="array")


def test_malformed_bigram_tokens_make_a_bad_event_not_a_lost_batch() -> None:
    bad = ["BlockStored", [8], None, [[3, 4], {"x": 1}], 2]
    batch = decode_batch(msgpack.packb([0.0, [bad, ["BlockRemoved", [1]]]]))
    assert batch.events == [None, BlockRemoved([1])]
