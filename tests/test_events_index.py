"""KVEventIndex fed with apply() (cacheroute/events/index.py and its block store,
cacheroute/events/_blocks.py): what each event does, namespaces, sequence rules, bounds,
staleness, bad input, thread-safety."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventIndex,
    encode_batch,
)

W1, W2 = "http://w1:8000", "http://w2:8000"
BS = 4


class Feed:
    """Feeds an index as one engine's publisher would: consecutive sequence numbers."""

    def __init__(self, index: KVEventIndex, url: str, shape: str = "map") -> None:
        self.index, self.url, self.shape, self.seq = index, url, shape, 0

    def __call__(self, *events: KVEvent, **kw: object) -> bool:
        ok = self.index.apply(self.url, self.seq, encode_batch(events, shape=self.shape), **kw)  # type: ignore[arg-type]
        self.seq += 1
        return ok


def toks(*blocks: int) -> list[int]:
    """Block ``b`` is the tokens ``[b*10, b*10+1, b*10+2, b*10+3]``."""
    return [b * 10 + i for b in blocks for i in range(BS)]


def stored(
    hashes: Sequence[int], parent: int | None, blocks: Sequence[int], **kw: object
) -> BlockStored:
    return BlockStored(list(hashes), parent, toks(*blocks), BS, **kw)  # type: ignore[arg-type]


@pytest.fixture
def index() -> KVEventIndex:
    return KVEventIndex(block_size=BS)


@pytest.mark.parametrize("shape", ["map", "array"])
def test_stored_blocks_match_in_whole_blocks(index: KVEventIndex, shape: str) -> None:
    feed = Feed(index, W1, shape)
    assert feed(stored([1, 2, 3], None, [1, 2, 3]))
    assert index.match(toks(1, 2, 3)) == {W1: 12}
    assert index.match([*toks(1, 2), 99]) == {W1: 8}
    assert index.match(toks(1, 2)[:-1]) == {W1: 4}  # the partial second block does not count
    assert index.match(toks(2, 3)) == {}
    assert index.match([]) == {}


def test_children_chain_to_their_parent_and_branch(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1, 2], None, [1, 2]))
    feed(stored([3], 2, [3]))  # appends to the chain (decode filling a block)
    feed(stored([4, 5], 1, [4, 5]))  # branches after block 1
    assert index.match(toks(1, 2, 3)) == {W1: 12}
    assert index.match(toks(1, 4, 5)) == {W1: 12}
    assert index.match(toks(1, 2, 5)) == {W1: 8}


def test_two_workers_are_kept_apart(index: KVEventIndex) -> None:
    Feed(index, W1)(stored([1, 2], None, [1, 2]))
    Feed(index, W2)(stored([1], None, [1]))
    assert index.match(toks(1, 2)) == {W1: 8, W2: 4}


def test_block_removed_drops_the_block_and_its_descendants_only(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1, 2, 3], None, [1, 2, 3]))
    feed(stored([4], 1, [4]))
    Feed(index, W2)(stored([1, 2, 3], None, [1, 2, 3]))
    feed(BlockRemoved([2]))
    assert index.match(toks(1, 2, 3)) == {W1: 4, W2: 12}  # W1 keeps block 1, W2 unaffected
    assert index.match(toks(1, 4)) == {W1: 8, W2: 4}  # the other branch stays
    feed(BlockRemoved([1, 4, 99]))
    assert index.match(toks(1, 4)) == {W2: 4}
    s = index.stats()[W1]
    assert (s.blocks_removed, s.unknown_removals) == (3, 1)
    assert s.blocks == 1  # block 3: unreachable now, dropped when its own removal comes


def test_a_block_on_two_media_stays_until_both_drop_it(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1], None, [1], medium="GPU"))
    feed(stored([1], None, [1], medium="CPU"))  # offloaded copy
    feed(BlockRemoved([1], medium="GPU"))
    assert index.match(toks(1)) == {W1: 4}
    feed(BlockRemoved([1], medium="CPU"))
    assert index.match(toks(1)) == {}


def test_all_blocks_cleared_clears_that_worker_only(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1, 2], None, [1, 2]))
    feed(stored([7], None, [7], lora_name="a"))
    Feed(index, W2)(stored([1], None, [1]))
    feed(AllBlocksCleared())
    assert index.match(toks(1, 2)) == {W2: 4}
    assert index.match(toks(7), lora_name="a") == {}
    assert index.stats()[W1].blocks == 0 and index.stats()[W1].clears == 1
    feed(stored([1], None, [1]))  # and it fills again
    assert index.match(toks(1)) == {W1: 4, W2: 4}


def test_sequence_going_down_is_a_restart_and_resets_the_view(index: KVEventIndex) -> None:
    index.apply(W1, 0, encode_batch([stored([1], None, [1])]))
    index.apply(W1, 1, encode_batch([stored([2], 1, [2])]))
    assert index.match(toks(1, 2)) == {W1: 8}
    assert index.apply(W1, 0, encode_batch([stored([5], None, [5])]))  # new publisher
    assert index.match(toks(1, 2)) == {}
    assert index.match(toks(5)) == {W1: 4}
    s = index.stats()[W1]
    assert (s.resets, s.last_seq) == (1, 0)


def test_a_restart_after_a_single_batch_resets_the_view(index: KVEventIndex) -> None:
    # The first process published one batch (seq 0); the restarted one starts at 0 again:
    # the same seq with other bytes (engines stamp each batch with its time) is a restart.
    assert index.apply(W1, 0, encode_batch([stored([1], None, [1])], ts=1.0))
    assert index.apply(W1, 0, encode_batch([stored([5], None, [5])], ts=2.0))
    assert index.match(toks(1)) == {}
    assert index.match(toks(5)) == {W1: 4}
    assert index.apply(W1, 1, encode_batch([stored([6], 5, [6])], ts=3.0))
    assert index.match(toks(5, 6)) == {W1: 8}
    s = index.stats()[W1]
    assert (s.resets, s.duplicates, s.last_seq, s.gaps) == (1, 0, 1, 0)


def test_a_redelivered_batch_is_a_duplicate_even_when_it_fails(index: KVEventIndex) -> None:
    first = encode_batch([stored([1], None, [1])], ts=1.0)
    assert index.apply(W1, 0, first)
    assert not index.apply(W1, 0, bytearray(first))  # the same bytes: skipped
    assert not index.apply(W1, 1, b"\xc1")  # a bad message still takes its seq
    assert not index.apply(W1, 1, b"\xc1")  # and its redelivery is a duplicate
    assert index.match(toks(1)) == {W1: 4}
    s = index.stats()[W1]
    assert (s.duplicates, s.resets, s.bad_messages) == (2, 0, 1)


def test_duplicates_are_skipped_and_gaps_counted(index: KVEventIndex) -> None:
    first = encode_batch([stored([1], None, [1])])
    assert index.apply(W1, 0, first)
    assert not index.apply(W1, 0, first)  # redelivered: the same seq and the same bytes
    assert index.match(toks(1)) == {W1: 4}
    index.apply(W1, 5, encode_batch([]))
    s = index.stats()[W1]
    assert (s.duplicates, s.gaps, s.lost_batches, s.batches) == (1, 1, 4, 2)


def test_lora_namespaces_are_kept_apart(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1], None, [1]))
    feed(stored([2], None, [1], lora_id=7, lora_name="sql", extra_keys=[["sql"]]))
    feed(stored([3], 2, [2], lora_id=7, lora_name="sql", extra_keys=[["sql"]]))
    feed(stored([4], None, [1], lora_id=9))  # an old engine: lora_id only
    assert index.match(toks(1, 2)) == {W1: 4}  # base model
    assert index.match(toks(1, 2), lora_name="sql") == {W1: 8}
    assert index.match(toks(1, 2), lora_id=7) == {W1: 8}  # id learnt as an alias of "sql"
    assert index.match(toks(1, 2), lora_id=9) == {W1: 4}
    assert index.match(toks(1, 2), lora_name="other") == {}


def test_cache_salt_namespaces_vllm_and_sglang(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    # vLLM: the salt is in the first block's extra keys (after the LoRA name, if any)
    feed(stored([1, 2], None, [1, 2], extra_keys=[["tenant-a"], None]))
    # SGLang: metadata cache_salt
    Feed(index, W2, "array")(stored([1, 2], None, [1, 2], cache_salt="tenant-a"))
    Feed(index, "http://w3")(stored([1, 2], None, [1, 2]))
    assert index.match(toks(1, 2), extra_keys=["tenant-a"]) == {W1: 8, W2: 8}
    assert index.match(toks(1, 2), extra_keys=["tenant-b"]) == {}
    assert index.match(toks(1, 2)) == {"http://w3": 8}


def test_multimodal_blocks_stop_the_chain(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    mm = [None, [["img-hash", 0]], None]
    feed(stored([1, 2, 3], None, [1, 2, 3], extra_keys=mm))
    feed(stored([4], 3, [4]))  # child of an unindexed block: orphan
    # the image's placeholder tokens say nothing about the image: only block 1 is usable
    assert index.match(toks(1, 2, 3)) == {W1: 4}
    s = index.stats()[W1]
    assert (s.unindexed_blocks, s.orphan_blocks) == (2, 1)
    # an image in the first block is part of the namespace: only that image matches
    feed(stored([5], None, [5], extra_keys=[[["img-x", 2]]]))
    assert index.match(toks(5)) == {}
    assert index.match(toks(5), extra_keys=[("img-x", 2)]) == {W1: 4}


def test_other_kv_groups_and_dp_ranks_are_ignored(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([9], None, [9], group_idx=0, kv_cache_spec_kind="sliding_window"))
    feed(stored([1], None, [1], group_idx=1, kv_cache_spec_kind="full_attention"))
    feed(stored([2], None, [2], group_idx=0, kv_cache_spec_kind="sliding_window"))
    feed(BlockRemoved([1], group_idx=0))  # the sliding-window group's eviction
    assert index.match(toks(1)) == {W1: 4}
    assert index.match(toks(9)) == index.match(toks(2)) == {}
    assert index.stats()[W1].ignored_events == 3
    ok = index.apply(W2, 0, encode_batch([stored([1], None, [1])], dp_rank=1), dp_rank=0)
    assert not ok and index.stats()[W2].ignored_batches == 1 and index.match(toks(1)) == {W1: 4}


def test_orphans_and_bad_events_are_counted_not_applied(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([2], 1, [2]))  # parent never seen
    feed(BlockStored([3, 4], None, toks(3), BS))  # 2 hashes, 1 block of tokens
    feed(BlockStored([5], None, [2**32] * BS, BS))  # an id the index cannot hold
    feed(BlockStored([6], None, [0x110000] * BS, BS))  # above Unicode's range: held
    assert index.match(toks(2)) == index.match(toks(3)) == {}
    assert index.match([0x110000] * BS) == {W1: BS}
    s = index.stats()[W1]
    assert (s.orphan_blocks, s.bad_events, s.blocks) == (1, 2, 1)


def test_bad_messages_are_counted_logged_and_skipped(
    index: KVEventIndex, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cacheroute.events"):
        assert not index.apply(W1, 0, b"\xc1garbage")
        assert not index.apply(W1, 1, b"")
    assert index.apply(W1, 2, encode_batch([stored([1], None, [1])]))
    s = index.stats()[W1]
    assert (s.bad_messages, s.gaps, s.batches) == (2, 0, 1)
    assert "skipped message seq=0" in caplog.text
    assert index.match(toks(1)) == {W1: 4}


def test_per_worker_block_cap(index: KVEventIndex) -> None:
    index = KVEventIndex(block_size=BS, max_blocks_per_worker=10)
    feed = Feed(index, W1)
    for b in range(30):
        feed(stored([b + 1], None, [b + 1]))
    s = index.stats()[W1]
    assert s.blocks <= 10 and s.blocks_evicted == 30 - s.blocks
    assert index.match(toks(30)) == {W1: 4}  # the newest stay
    assert index.match(toks(1)) == {}  # the oldest went, from the tree too


def test_staleness_of_an_apply_feed_follows_the_clock() -> None:
    now = [100.0]
    index = KVEventIndex(block_size=BS, stale_after=5.0, clock=lambda: now[0])
    assert index.is_stale(W1)  # unknown
    Feed(index, W1)(stored([1], None, [1]))
    assert not index.is_stale(W1) and index.stale_urls() == []
    now[0] += 6
    assert index.is_stale(W1) and index.stale_urls() == [W1]
    assert index.match(toks(1)) == {W1: 4}  # the last view is still returned...
    assert index.match(toks(1), include_stale=False) == {}  # ...unless asked not to
    index.touch(W1)
    assert not index.is_stale(W1)


def test_forget_drops_a_worker(index: KVEventIndex) -> None:
    Feed(index, W1)(stored([1], None, [1]))
    index.forget(W1)
    assert index.match(toks(1)) == {} and index.urls() == []


def test_arguments_are_checked(index: KVEventIndex) -> None:
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        KVEventIndex(block_size=0)
    with pytest.raises(TypeError, match="seq must be an int, got '1'"):
        index.apply(W1, "1", b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="payload must be bytes"):
        index.apply(W1, 1, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token_ids must be a sequence of int token ids"):
        index.match("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lora_id must be an int or None"):
        index.match([1], lora_id="a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="extra_keys must be a list or tuple, or None"):
        index.match([1], extra_keys="salt")  # type: ignore[arg-type]
    assert index.match([1, -5, 2**40]) == {}  # ids no engine stores: no error


# --------------------------------------------------------------------- model check


def _model_match(held: dict[str, set[tuple[int, ...]]], query: list[int]) -> dict[str, int]:
    out = {}
    for w, prefixes in held.items():
        best = max((len(p) for p in prefixes if tuple(query[: len(p)]) == p), default=0)
        if best:
            out[w] = best
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_agree_with_a_brute_force_model(seed: int) -> None:
    """Store/remove/clear at random; the index answers what its documented rules say: a
    store makes the worker hold every block prefix of the stored path, a removal drops the
    block's prefix and everything extending it, a clear drops everything. Hashes are a
    function of the prefix, as in an engine."""
    rng = random.Random(seed)
    index = KVEventIndex(block_size=2)
    feeds = {w: Feed(index, w) for w in ("a", "b", "c")}
    hash_of: dict[tuple[int, ...], int] = {}
    live: dict[str, dict[int, tuple[int, ...]]] = {w: {} for w in feeds}
    held: dict[str, set[tuple[int, ...]]] = {w: set() for w in feeds}
    for _ in range(400):
        w = rng.choice(list(feeds))
        op = rng.random()
        if op < 0.6:
            parent = rng.choice([None, *live[w]]) if live[w] else None
            base = live[w][parent] if parent is not None else ()
            new = [rng.randint(0, 2) for _ in range(2 * rng.randint(1, 3))]  # tiny vocab
            full = base + tuple(new)
            paths = [full[: len(base) + 2 * (i + 1)] for i in range(len(new) // 2)]
            hashes = [hash_of.setdefault(p, len(hash_of) + 1) for p in paths]
            feeds[w](BlockStored(hashes, parent, new, 2))
            for h, p in zip(hashes, paths, strict=True):
                live[w].setdefault(h, p)
            held[w].update(full[: 2 * j] for j in range(1, len(full) // 2 + 1))
        elif op < 0.95 and live[w]:
            gone = rng.sample(list(live[w]), rng.randint(1, min(3, len(live[w]))))
            feeds[w](BlockRemoved(gone))
            for h in gone:
                p = live[w].pop(h)
                held[w] = {q for q in held[w] if q[: len(p)] != p}
        else:
            feeds[w](AllBlocksCleared())
            live[w].clear()
            held[w].clear()
        for _ in range(3):
            q = [rng.randint(0, 2) for _ in range(rng.randint(0, 12))]
            assert index.match(q) == _model_match(held, q), (seed, q)


# ------------------------------------------------------------------- thread-safety


def test_match_from_many_threads_while_events_apply() -> None:
    index = KVEventIndex(block_size=BS)
    errors: list[BaseException] = []
    stop = threading.Event()
    Feed(index, "base")(stored([1000], None, [100]))

    def writer(w: str) -> None:
        feed = Feed(index, w)
        try:
            for i in range(300):  # hashes follow the tokens, as an engine's do
                feed(stored([1000, 2000 + i % 7], None, [100, i % 7]))
                if i % 3 == 0:
                    feed(BlockRemoved([2000 + i % 7]))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                got = index.match(toks(100, 3))
                assert got.get("base") == 4 and all(v in (4, 8) for v in got.values())
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    for w in ("w0", "w1", "w2"):
        assert index.stats()[w].batches == 400
    # after the streams each writer holds what its last events left: block (100, v) for
    # each v, 8 tokens unless its last store was followed by a removal
    for v in range(7):
        last = max(i for i in range(300) if i % 7 == v)
        want = 8 if last % 3 else 4
        got = index.match(toks(100, v))
        assert got == {"base": 4, "w0": want, "w1": want, "w2": want}, (v, got)


# ------------------------------------------------------------------- decode tails


def _tail_stream(seed: int) -> list[tuple[str, object]]:
    """Decode-heavy streams: chains grow a block at a time (the index keeps such blocks
    in a tail, out of its tree, for a while); branches, re-stores of known paths,
    removals and clears in between, and queries along the stored paths."""
    rng = random.Random(seed)
    hash_of: dict[tuple[int, ...], int] = {}
    tips: dict[str, list[tuple[int, tuple[int, ...]]]] = {w: [] for w in ("a", "b")}
    live: dict[str, dict[int, tuple[int, ...]]] = {w: {} for w in tips}
    ops: list[tuple[str, object]] = []
    for _ in range(300):
        w = rng.choice(list(tips))
        op = rng.random()
        if op < 0.55 and tips[w]:  # decode: one block under a chain's tip
            i = rng.randrange(len(tips[w]))
            h, path = tips[w][i]
            new = [rng.randint(0, 3) for _ in range(2)]
            full = path + tuple(new)
            nh = hash_of.setdefault(full, len(hash_of) + 1)
            ops.append((w, BlockStored([nh], h, new, 2)))
            tips[w][i] = (nh, full)
            live[w][nh] = full
        elif op < 0.7 or not live[w]:  # a prompt: new, or branching from any block
            parent = rng.choice([None, *live[w]]) if live[w] and rng.random() < 0.7 else None
            base = live[w][parent] if parent is not None else ()
            new = [rng.randint(0, 3) for _ in range(2 * rng.randint(1, 3))]
            full = base + tuple(new)
            paths = [full[: len(base) + 2 * (j + 1)] for j in range(len(new) // 2)]
            hashes = [hash_of.setdefault(p, len(hash_of) + 1) for p in paths]
            ops.append((w, BlockStored(hashes, parent, new, 2)))
            for h, p in zip(hashes, paths, strict=True):
                live[w][h] = p
            tips[w].append((hashes[-1], full))
        elif op < 0.9:
            gone = rng.sample(list(live[w]), rng.randint(1, min(2, len(live[w]))))
            ops.append((w, BlockRemoved(gone)))
            for h in gone:
                live[w].pop(h)
            tips[w] = [(h, p) for h, p in tips[w] if h in live[w]]
        elif op < 0.97:  # an offloaded copy: a held block stored again, same path
            h = rng.choice(list(live[w]))
            p = live[w][h]
            up = hash_of[p[:-2]] if len(p) > 2 else None
            ops.append((w, BlockStored([h], up, list(p[-2:]), 2, medium="CPU")))
        else:
            ops.append((w, AllBlocksCleared()))
            live[w].clear()
            tips[w].clear()
        for _ in range(2):
            ws = [p for ls in live.values() for p in ls.values()]
            q = list(rng.choice(ws)) if ws else []
            q = q[: rng.randint(0, len(q))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 4))]
            ops.append(("?", q))
    return ops


@pytest.mark.parametrize("seed", range(8))
def test_decode_tails_answer_as_if_every_block_were_in_the_tree(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cacheroute.events._blocks as blocks_module

    def run() -> list[dict[str, int]]:
        index = KVEventIndex(block_size=2)
        feeds = {w: Feed(index, w) for w in ("a", "b")}
        answers = []
        for who, what in _tail_stream(seed):
            if who == "?":
                answers.append(index.match(what))  # type: ignore[arg-type]
            else:
                feeds[who](what)  # type: ignore[arg-type]
        return answers

    with_tails = run()
    monkeypatch.setattr(blocks_module, "_TAIL_BLOCKS", 0)  # every block into the tree
    monkeypatch.setattr(blocks_module, "_TAIL_SHARE", 1 << 40)
    assert with_tails == run()


def test_a_follow_up_request_matches_into_a_decode_tail(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1, 2], None, [1, 2]))
    for b in range(3, 7):  # decode: one block at a time, kept in the tail
        feed(stored([b], b - 1, [b]))
    assert index._workers[W1].tails  # (the tail is what this test is about)
    assert index.match(toks(1, 2, 3, 4, 5, 6, 7)) == {W1: 24}
    assert index.match([*toks(1, 2, 3, 4), 99]) == {W1: 16}
    assert index.match(toks(1, 3)) == {W1: 4}
    feed(stored([9], 4, [9]))  # a branch from a tail block
    assert index.match(toks(1, 2, 3, 4, 9)) == {W1: 20}
    assert index.match(toks(1, 2, 3, 4, 5, 6)) == {W1: 24}
    feed(BlockRemoved([5]))  # a removal inside the tail drops what extends it
    assert index.match(toks(1, 2, 3, 4, 5, 6)) == {W1: 16}
    assert index.match(toks(1, 2, 3, 4, 9)) == {W1: 20}


# ------------------------------------------------------------------ decode steps


def _step_stream(choices: list[tuple[int, int]]) -> list[tuple[object, ...]]:
    """Messages ``(worker, seq, payload)`` and queries ``("?", tokens)`` from drawn
    choices: mostly decode steps under a chain's last block (what the index's decode-step
    path takes), in both shapes, and around them each case that path leaves to the
    general one: another group, medium, block size or LoRA, extra keys, bad or SGLang
    bigram token ids, a wrong token count, a step from inside a chain, a re-stored or
    orphan block, several events in a batch; prompts, removals, clears and restarts.
    Hashes are a function of the path, as an engine's."""
    hash_of: dict[tuple[int, ...], int] = {}
    live: dict[str, dict[int, tuple[int, ...]]] = {w: {} for w in ("a", "b", "c")}
    tips: dict[str, list[int]] = {w: [] for w in live}
    seqs = dict.fromkeys(live, 0)
    out: list[tuple[object, ...]] = []

    def step(w: str, parent: int, r: int, case: int) -> KVEvent:
        """One block under ``parent``: plain (``case`` < 6), else a case of its own."""
        new = [r % 3, r // 3 % 3]  # one block of 2 tokens, tiny vocabulary
        path = live[w][parent] + tuple(new)
        h = hash_of.setdefault(path, len(hash_of) + 1)
        kw: dict[str, object] = {"medium": "GPU" if r % 2 else None}
        toks: list[object] = list(new)
        bs = 2
        if case == 6:
            kw |= {"group_idx": 0, "kv_cache_spec_kind": "full_attention"}
        elif case == 7:
            kw |= {"group_idx": 1, "kv_cache_spec_kind": "sliding_window"}
        elif case == 8:
            kw["medium"] = "CPU"
        elif case == 9:
            kw["extra_keys"] = [None]
        elif case == 10:
            kw["extra_keys"] = [[["img", 0]]]
        elif case == 11:
            kw |= {"lora_id": 3, "lora_name": "x", "extra_keys": [["x"]]}
        elif case == 12:
            toks, bs = [*new, *new], 4  # another block size
        elif case == 13:
            toks = [new[0], 2**32 + r % 2 * (-(2**32) - 1)]  # an id >= 2**32, or < 0
        elif case == 14:
            toks = [[t, t] for t in new]  # SGLang's EAGLE bigram pairs
        elif case == 15:
            toks = new[:1]  # 1 token for a block of 2
        if case not in (7, 10, 12, 13, 15):  # (roughly what the worker holds: enough here)
            live[w][h] = path
        return BlockStored([h], parent, toks, bs, **kw)  # type: ignore[arg-type]

    for sel, r in choices:
        w = "abc"[r % 3]
        op = sel % 20
        events: list[KVEvent] = []
        if op < 9 and tips[w]:  # a decode step under a chain's last block
            i = r % len(tips[w])
            events.append(step(w, tips[w][i], r, r // 9 % 16))
            h = events[0].block_hashes[0]  # type: ignore[union-attr]
            if h in live[w]:
                tips[w][i] = h
        elif op < 11 and live[w]:  # a step from inside a chain
            events.append(step(w, sorted(live[w])[r % len(live[w])], r, r // 9 % 16))
        elif op == 11 and live[w]:  # a held block stored again
            h = sorted(live[w])[r % len(live[w])]
            path = live[w][h]
            up = hash_of[path[:-2]] if len(path) > 2 else None
            if up is not None and r % 3 == 0:  # its parent's path first, as a new chain
                ups = [hash_of[path[: 2 * (j + 1)]] for j in range(len(path) // 2 - 1)]
                events.append(BlockStored(ups, None, list(path[:-2]), 2))
            medium = ("GPU", "CPU")[r % 2]
            events.append(BlockStored([h], up, list(path[-2:]), 2, medium=medium))
        elif op == 12:  # an orphan
            events.append(BlockStored([10_000 + r], 9_999 + r, [1, 2], 2))
        elif op < 15 or not live[w]:  # a prompt, new or from a held block
            parent = sorted(live[w])[r % len(live[w])] if live[w] and r % 2 else None
            base = live[w][parent] if parent is not None else ()
            new = [(r >> k) % 3 for k in range(2 * (1 + r % 3))]
            paths = [base + tuple(new[: 2 * (j + 1)]) for j in range(len(new) // 2)]
            hashes = [hash_of.setdefault(p, len(hash_of) + 1) for p in paths]
            events.append(BlockStored(hashes, parent, new, 2))
            live[w].update(zip(hashes, paths, strict=True))
            tips[w].append(hashes[-1])
        elif op < 17:
            gone = sorted(live[w])[r % len(live[w]) :][:2]
            events.append(BlockRemoved(gone, (None, "GPU", "CPU")[r % 3]))
            if r % 3 != 2:
                for h in gone:
                    del live[w][h]
                tips[w] = [t for t in tips[w] if t in live[w]]
        elif op == 17:
            events.append(AllBlocksCleared())
            live[w].clear()
            tips[w].clear()
        elif op == 18 and tips[w]:  # several steps in one batch
            for k in range(2 + r % 2):
                events.append(step(w, tips[w][0], r + k, 0))
                tips[w][0] = events[-1].block_hashes[0]  # type: ignore[union-attr]
        else:  # a restart: seq 0 again, another batch
            seqs[w] = 0
            live[w].clear()
            tips[w].clear()
        shape = ("map", "array")[sel // 20 % 2]
        out.append((w, seqs[w], encode_batch(events, shape=shape, ts=float(len(out)))))  # type: ignore[arg-type]
        seqs[w] += 1
        paths = [p for ls in live.values() for p in ls.values()]
        if paths:
            q = list(paths[r % len(paths)])
            out.append(("?", [*q[: len(q) - r % 3], r % 3]))
    return out


def _index_state(index: KVEventIndex) -> object:
    """What the index holds, internals included: every worker's blocks (in order),
    media, chains, tails, epochs, and per namespace the tree's units per worker."""
    workers = {
        w: (
            list(ws.blocks.items()),
            dict(ws.media),
            {c.base: (bytes(c.buf), c.ns, c.tree_end, c.tail, c.epoch) for c in ws.chains.values()},
            sorted(c.base for c in ws.tails),
            (ws.epoch, ws.group, ws.block_size, ws.last_seq, ws.next_chain),
        )
        for w, ws in index._workers.items()
    }
    trees = {ns: t.used_size_per_tenant() for ns, t in index._store.trees.items()}
    tails = {
        ns: {e: {w: sorted(c.base for c in cs) for w, cs in by.items()} for e, by in ends.items()}
        for ns, ends in index._store.tails.items()
    }
    return workers, trees, tails, index.stats()


def _with_and_without_decode_steps(stream: list[tuple[object, ...]], cap: int) -> None:
    """The same answers (``apply``'s and ``match``'s, after every message) and the same
    state with the decode-step path as with the general path alone."""
    import cacheroute.events._blocks as blocks_module

    def run(decode_step: bool) -> tuple[list[object], object]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(blocks_module, "_DECODE_STEP", decode_step)
            index = KVEventIndex(block_size=2, max_blocks_per_worker=cap, clock=lambda: 0.0)
            answers: list[object] = []
            for item in stream:
                if item[0] == "?":
                    answers.append(index.match(item[1]))  # type: ignore[arg-type]
                else:
                    answers.append(index.apply(*item))  # type: ignore[arg-type]
            return answers, _index_state(index)

    assert run(True) == run(False)


@pytest.mark.parametrize("cap", [6, 1000])  # (6: blocks evicted often, decode steps too)
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 39), st.integers(0, 1000)), min_size=1, max_size=120))
def test_the_decode_step_path_stores_what_the_general_path_stores(
    cap: int, choices: list[tuple[int, int]]
) -> None:
    _with_and_without_decode_steps(_step_stream(choices), cap)


@pytest.mark.parametrize("cap", [6, 1000])
@pytest.mark.parametrize("seed", range(25))
def test_the_decode_step_path_on_long_random_streams(cap: int, seed: int) -> None:
    rng = random.Random(seed)
    choices = [(rng.randrange(40), rng.randrange(1001)) for _ in range(150)]
    _with_and_without_decode_steps(_step_stream(choices), cap)


def test_decode_steps_extend_their_chain_in_place(index: KVEventIndex) -> None:
    feed = Feed(index, W1)
    feed(stored([1, 2], None, [1, 2], group_idx=0))  # (the worker follows group 0)
    feed(stored([3], 2, [3], medium="GPU"))  # into the tail
    v026 = {"group_idx": 0, "extra_keys": [None], "kv_cache_spec_kind": "full_attention"}
    feed(stored([4], 3, [4], **v026))  # vLLM 0.26's defaults
    ws = index._workers[W1]
    assert len(ws.chains) == 1 and ws.tails
    feed(stored([5], 4, [5], group_idx=1))  # another group: ignored
    feed(BlockStored([6], 4, [2**32, *toks(6)[1:]], BS))  # an id the index cannot hold
    feed(BlockStored([7], 4, toks(7)[:3], BS))  # a token short
    assert index.match(toks(1, 2, 3, 4, 5)) == {W1: 16}
    s = index.stats()[W1]
    assert (s.blocks, s.blocks_stored, s.ignored_events, s.bad_events) == (4, 4, 1, 2)
    assert len(ws.chains) == 1 and ws.chains[0].buf.tolist() == toks(1, 2, 3, 4)


def test_a_bad_event_changes_neither_the_block_size_nor_the_lora_aliases() -> None:
    index = KVEventIndex(block_size=BS)
    index.apply(W1, 0, encode_batch([BlockStored([1, 2], None, toks(1, 2), BS)]))
    index.apply(W1, 1, encode_batch([BlockStored([3], None, toks(3), BS, lora_id=7)]))
    # An extra_keys entry must be an array or nil: this event is unreadable as a whole,
    # after its block size (2) and its LoRA alias (7 -> "evil") were read.
    bad = {
        "type": "BlockStored",
        "block_hashes": [9],
        "parent_block_hash": None,
        "token_ids": [50, 51],
        "block_size": 2,
        "lora_id": 7,
        "medium": None,
        "lora_name": "evil",
        "extra_keys": [5],
    }
    assert index.apply(W1, 2, msgpack.packb([0.0, [bad], None]))
    assert index.stats()[W1].bad_events == 1
    assert index.block_size(W1) == BS
    assert index.match(toks(1, 2)[:7]) == {W1: 4}  # whole 4-token blocks, as before
    assert index.match(toks(3), lora_id=7) == {W1: 4}  # 7 is no alias of "evil"


def test_a_worker_first_seen_after_another_block_size_matches_whole_blocks() -> None:
    index = KVEventIndex(block_size=16)
    index.apply(W1, 0, encode_batch([BlockStored([1], None, list(range(4)), 4)]))
    index.apply(W2, 0, encode_batch([BlockStored([2, 3], None, list(range(100, 132)), 16)]))
    assert index.match(list(range(100, 120))) == {W2: 16}
    assert index.match(list(range(100, 120)), include_stale=False) == {W2: 16}
    assert (index.block_size(W1), index.block_size(W2), index.block_size("new")) == (4, 16, 16)
