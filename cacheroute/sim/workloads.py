"""Generated workloads: no files needed, every number a parameter, deterministic per seed.

* :func:`shared_prefix`: SGLang's generated-shared-prefix benchmark (groups of prompts
  sharing a long system prompt, all sent at once).
* :func:`chat`: multi-turn conversations over a shared system prompt at a request rate.
* :func:`bursty`: bursts of requests that share nothing (prefix routing has nothing to
  gain and must not hurt).
* :func:`default_workload`: the built-in workload of ``cacheroute simulate``.

Block ids are chained (see :class:`cacheroute.sim.request.Request`): each generator
hands out ids so that two prompts get equal ids exactly for the blocks they share.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

from cacheroute._validation import check_bool, check_int, check_real, fail
from cacheroute.sim.request import MAX_BLOCKS, MAX_TOKENS, Request, Workload

__all__ = ["MAX_REQUESTS", "WORKLOADS", "bursty", "chat", "default_workload", "shared_prefix"]


MAX_REQUESTS = 2**24
"""The most requests a generator makes (16.8M; each is a Python object with its ids)."""


def _check(name: str, value: object, minimum: float, *, integer: bool = True) -> None:
    """``TypeError`` for a wrong type (``bool`` is neither an int nor a number here),
    ``ValueError`` for a value below ``minimum`` (token counts: above ``MAX_TOKENS``;
    numbers: not finite)."""
    if integer:
        check_int(name, value, minimum=int(minimum), maximum=MAX_TOKENS)
    else:
        check_real(name, value, minimum=minimum)


def _check_count(names: str, count: int) -> None:
    if count > MAX_REQUESTS:
        raise ValueError(f"{names} must be at most {MAX_REQUESTS:,} requests, got {count:,}")


def _check_blocks(names: str, tokens: int, block_size: int) -> None:
    blocks = -(-tokens // block_size)
    if blocks > MAX_BLOCKS:
        raise ValueError(
            f"{names} make up to {blocks:,} blocks per prompt of block_size={block_size}, "
            f"more than {MAX_BLOCKS:,}; raise block_size"
        )


def _check_end(name: str, value: float, end: float) -> None:
    """The last arrival ``end`` must be finite (a rate too small, an interval too large)."""
    if not end < math.inf:
        what = "large enough" if name == "request_rate" else "small enough"
        raise fail(name, f"{what} to keep every arrival time finite", value)


def _check_seed(seed: object) -> None:
    check_int("seed", seed)


def shared_prefix(
    groups: int = 64,
    prompts_per_group: int = 16,
    system_tokens: int = 2048,
    question_tokens: int = 128,
    output_tokens: int = 256,
    *,
    block_size: int = 16,
    request_rate: float = 0.0,
    shuffle: bool = True,
    seed: int = 0,
) -> Workload:
    """SGLang's generated-shared-prefix benchmark.

    ``groups`` system prompts of ``system_tokens`` each; every group has
    ``prompts_per_group`` prompts, each its group's system prompt plus its own
    ``question_tokens``; every request generates ``output_tokens``. With
    ``request_rate=0`` (the benchmark's setting) all requests arrive at t=0; otherwise
    they arrive as a Poisson process of that rate. ``shuffle`` mixes the groups (the
    order in which they arrive at the router), seeded.

    The ideal hit rate is ``(p - 1) / p * S / (S + Q)`` for p prompts per group: 88% at
    the defaults.
    """
    for name, value in (
        ("groups", groups),
        ("prompts_per_group", prompts_per_group),
        ("system_tokens", system_tokens),
        ("question_tokens", question_tokens),
        ("output_tokens", output_tokens),
        ("block_size", block_size),
    ):
        _check(name, value, 1 if name != "system_tokens" else 0)
    _check("request_rate", request_rate, 0, integer=False)
    check_bool("shuffle", shuffle)
    _check_seed(seed)
    _check_count("groups x prompts_per_group", groups * prompts_per_group)
    _check_blocks("system_tokens + question_tokens", system_tokens + question_tokens, block_size)
    rng = random.Random(seed)
    ids = itertools.count()
    total = system_tokens + question_tokens
    n_blocks = -(-total // block_size)
    shared = system_tokens // block_size  # full blocks holding only system prompt
    prompts: list[tuple[tuple[int, ...], int]] = []
    for _ in range(groups):
        sys_ids = [next(ids) for _ in range(shared)]
        for _ in range(prompts_per_group):
            own = [next(ids) for _ in range(n_blocks - shared)]
            prompts.append((tuple(sys_ids + own), total))
    if shuffle:
        rng.shuffle(prompts)
    t = 0.0
    reqs = []
    for blocks, tokens in prompts:
        if request_rate > 0:
            t += rng.expovariate(request_rate)
            _check_end("request_rate", request_rate, t)
        reqs.append(Request(t, blocks, block_size, tokens, tokens, output_tokens))
    params = {
        "groups": groups,
        "prompts_per_group": prompts_per_group,
        "system_tokens": system_tokens,
        "question_tokens": question_tokens,
        "output_tokens": output_tokens,
        "block_size": block_size,
        "request_rate": request_rate,
        "shuffle": shuffle,
        "seed": seed,
    }
    return Workload("shared_prefix", reqs, params)


def chat(
    users: int = 128,
    rounds: int = 8,
    system_tokens: int = 1024,
    question_tokens: int = 256,
    answer_tokens: int = 256,
    *,
    request_rate: float = 16.0,
    block_size: int = 16,
    seed: int = 0,
) -> Workload:
    """Multi-turn chat: ``users`` conversations of ``rounds`` turns over one system prompt.

    Turn ``r`` of a user sends the system prompt, the user's earlier questions and
    answers, and a new question; question and answer lengths are uniform in
    [50%, 150%] of ``question_tokens`` / ``answer_tokens``. Requests arrive as a Poisson
    process of ``request_rate`` per second, round by round (every user's turn 1 in a
    shuffled order, then every turn 2, ...), so a user's next turn comes about
    ``users / request_rate`` seconds after the previous one.
    """
    for name, value in (
        ("users", users),
        ("rounds", rounds),
        ("question_tokens", question_tokens),
        ("answer_tokens", answer_tokens),
        ("block_size", block_size),
    ):
        _check(name, value, 1)
    _check("system_tokens", system_tokens, 0)
    check_real("request_rate", request_rate, minimum=0.0, min_open=True)
    _check_seed(seed)
    _check_count("users x rounds", users * rounds)
    longest = system_tokens + rounds * (question_tokens * 3 // 2 + answer_tokens * 3 // 2)
    _check_blocks("system_tokens + rounds x (question_tokens + answer_tokens)", longest, block_size)
    rng = random.Random(seed)
    ids = itertools.count()
    sys_full = system_tokens // block_size
    sys_ids = [next(ids) for _ in range(sys_full)]
    history = [list(sys_ids) for _ in range(users)]  # ids of the full blocks so far
    length = [system_tokens] * users  # conversation tokens so far (prompts + answers)
    t = 0.0
    reqs = []
    order = list(range(users))
    for _ in range(rounds):
        rng.shuffle(order)
        for u in order:
            q = rng.randint((question_tokens + 1) // 2, question_tokens * 3 // 2)
            a = rng.randint(max(1, (answer_tokens + 1) // 2), answer_tokens * 3 // 2)
            prompt = length[u] + q
            full = prompt // block_size
            h = history[u]
            while len(h) < full:
                h.append(next(ids))
            blocks = tuple(h[:full])
            if prompt % block_size:
                blocks += (next(ids),)  # the partial last block is this request's own
            t += rng.expovariate(request_rate)
            _check_end("request_rate", request_rate, t)
            reqs.append(Request(t, blocks, block_size, prompt, prompt, a))
            length[u] = prompt + a
    params = {
        "users": users,
        "rounds": rounds,
        "system_tokens": system_tokens,
        "question_tokens": question_tokens,
        "answer_tokens": answer_tokens,
        "request_rate": request_rate,
        "block_size": block_size,
        "seed": seed,
    }
    return Workload("chat", reqs, params)


def bursty(
    bursts: int = 20,
    burst_size: int = 64,
    interval_s: float = 4.0,
    input_tokens: int = 2048,
    output_tokens: int = 128,
    *,
    block_size: int = 16,
    seed: int = 0,
) -> Workload:
    """Bursts of ``burst_size`` requests every ``interval_s`` seconds, sharing no prefix.

    Input and output lengths are uniform in [50%, 150%] of ``input_tokens`` /
    ``output_tokens``; every block id is fresh, so every policy's hit rate is 0.
    """
    for name, value in (
        ("bursts", bursts),
        ("burst_size", burst_size),
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("block_size", block_size),
    ):
        _check(name, value, 1)
    _check("interval_s", interval_s, 0, integer=False)
    _check_seed(seed)
    _check_count("bursts x burst_size", bursts * burst_size)
    _check_blocks("input_tokens", input_tokens * 3 // 2, block_size)
    _check_end("interval_s", interval_s, (bursts - 1) * interval_s)
    rng = random.Random(seed)
    ids = itertools.count()
    reqs = []
    for k in range(bursts):
        for _ in range(burst_size):
            n_in = rng.randint((input_tokens + 1) // 2, input_tokens * 3 // 2)
            n_out = rng.randint((output_tokens + 1) // 2, output_tokens * 3 // 2)
            blocks = tuple(next(ids) for _ in range(-(-n_in // block_size)))
            reqs.append(Request(k * interval_s, blocks, block_size, n_in, n_in, n_out))
    params = {
        "bursts": bursts,
        "burst_size": burst_size,
        "interval_s": interval_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "block_size": block_size,
        "seed": seed,
    }
    return Workload("bursty", reqs, params)


def default_workload(seed: int = 0) -> Workload:
    """The built-in workload of ``cacheroute simulate``: :func:`chat` at its defaults."""
    w = chat(seed=seed)
    return Workload("default (chat)", w.requests, w.params)


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "default": default_workload,
    "shared_prefix": lambda seed: shared_prefix(seed=seed),
    "chat": lambda seed: chat(seed=seed),
    "bursty": lambda seed: bursty(seed=seed),
}
"""The generated workloads by ``--workload`` name, each a function of the seed."""
