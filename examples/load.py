"""Load any OpenAI-compatible router with shared-prefix or multi-turn chat and report routing.

Start three fake engines and a router first (our gateway, see examples/README.md, or any other
router such as the SGLang router), then::

    python examples/load.py --gateway http://127.0.0.1:8000 \\
        --engines http://127.0.0.1:8001,http://127.0.0.1:8002,http://127.0.0.1:8003

It needs nothing from the router but the OpenAI API. What routing did is read from the
engines: each engine's ``GET /stats`` (``fake_engine.py`` serves it) before and after the run,
or, for engines without one, the ``x-engine-id`` / ``x-cached-tokens`` response headers and
the ``usage.prompt_tokens_details.cached_tokens`` of each answer. It prints wall time, the
engines' prefix-cache hit rate, time to first token, requests per engine and errors.

Workloads (``--workload``):

* ``shared`` (default): 24 "applications", each with its own 6,000-character system prompt
  (~1,500 tokens): together more than one engine's prefix cache holds, less than three hold.
  Each request is one application's system prompt plus a new question.
* ``multiturn``: conversations over 8 shared system prompts; each turn sends the whole
  conversation so far (the assistant's streamed answers included) plus a new question, so
  turn ``k+1`` extends turn ``k``.

``run_workload`` is the same thing as a function (``benchmarks/e2e/compare.py`` uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["Outcome", "Report", "main", "run_workload"]

DEFAULT_ENGINES = "http://127.0.0.1:8001,http://127.0.0.1:8002,http://127.0.0.1:8003"
_LETTERS = "abcdefghij "


@dataclass
class Outcome:
    """One request as the client saw it."""

    started: float  # seconds since the run began
    ttft: float | None = None  # seconds to the first streamed token
    engine: str | None = None  # x-engine-id (or x-cacheroute-worker) header
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None  # None: completed with [DONE]
    text: str = ""


@dataclass
class Report:
    """What one run did, from the client's and the engines' side."""

    label: str
    wall: float
    outcomes: list[Outcome]
    engines: list[str]
    engine_requests: list[int | None]  # per --engines URL, from /stats (None: no /stats)
    hit_rate: float | None
    errors: Counter[str] = field(default_factory=Counter)

    def ttft_ms(self, q: float) -> float | None:
        ts = sorted(o.ttft for o in self.outcomes if o.ttft is not None)
        if not ts:
            return None
        return 1000 * ts[min(len(ts) - 1, int(q * len(ts)))]

    def line(self) -> str:
        def ms(q: float) -> str:
            v = self.ttft_ms(q)
            return "-" if v is None else f"{v:.0f} ms"

        hit = "-" if self.hit_rate is None else f"{self.hit_rate:.0%}"
        per_engine = [("?" if n is None else n) for n in self.engine_requests]
        errors = sum(self.errors.values())
        detail = f" {dict(self.errors)}" if errors else ""
        return (
            f"{self.label}: {len(self.outcomes)} requests in {self.wall:.1f} s, "
            f"cache hit rate {hit}, TTFT p50 {ms(0.5)}, p90 {ms(0.9)}, p99 {ms(0.99)}, "
            f"requests per engine {per_engine}, errors {errors}{detail}"
        )


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(n))


async def _engine_stats(
    session: aiohttp.ClientSession, engines: Sequence[str]
) -> list[dict[str, Any] | None]:
    async def one(url: str) -> dict[str, Any] | None:
        try:
            async with session.get(url + "/stats", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != 200:
                    return None
                data = await r.json()
                return data if isinstance(data, dict) and "prompt_tokens" in data else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    return list(await asyncio.gather(*(one(u) for u in engines)))


async def _chat(
    session: aiohttp.ClientSession,
    gateway: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    t0: float,
    timeout: float,
) -> Outcome:
    body = {
        "model": "fake-model",
        "stream": True,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
        "messages": messages,
    }
    out = Outcome(started=time.perf_counter() - t0)
    sent = time.perf_counter()
    try:
        async with session.post(
            gateway + "/v1/chat/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            out.engine = r.headers.get("x-engine-id") or r.headers.get("x-cacheroute-worker")
            if "x-cached-tokens" in r.headers:
                out.cached_tokens = int(r.headers["x-cached-tokens"])
                out.prompt_tokens = int(r.headers.get("x-prompt-tokens", 0))
            if r.status != 200:
                out.error = f"HTTP {r.status}"
                await r.read()
                return out
            parts = []
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    out.text = "".join(parts)
                    return out
                try:
                    event = json.loads(data)
                except ValueError:
                    out.error = "unparsable event"
                    return out
                if "error" in event:
                    out.error = "stream error event"
                    return out
                usage = event.get("usage")
                if usage and out.cached_tokens is None:
                    details = usage.get("prompt_tokens_details") or {}
                    out.prompt_tokens = usage.get("prompt_tokens")
                    out.cached_tokens = details.get("cached_tokens")
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - sent
                        parts.append(piece)
            out.error = "stream cut (no [DONE])"
    except asyncio.TimeoutError:
        out.error = "client timeout"
    except aiohttp.ClientError as exc:
        out.error = type(exc).__name__
    return out


async def run_workload(
    gateway: str,
    engines: Sequence[str] = (),
    *,
    workload: str = "shared",
    requests: int = 300,
    concurrency: int = 16,
    max_tokens: int = 8,
    seed: int = 0,
    label: str = "",
    timeout: float = 120.0,
    on_progress: Callable[[int, float], None] | None = None,
) -> Report:
    """Send ``requests`` chat requests, ``concurrency`` at a time, and report.

    ``on_progress(done, elapsed)`` is called after each finished request (for fault
    injection). ``multiturn`` runs ``concurrency`` conversations at a time; each has 6
    turns, so ``requests`` should be a multiple of 6.
    """
    if workload not in ("shared", "multiturn"):
        raise ValueError(f"workload must be 'shared' or 'multiturn', got {workload!r}")
    rng = random.Random(seed)
    gateway = gateway.rstrip("/")
    engines = [e.rstrip("/") for e in engines]
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await _engine_stats(session, engines)
        t0 = time.perf_counter()

        def finished(out: Outcome) -> None:
            outcomes.append(out)
            if on_progress is not None:
                on_progress(len(outcomes), time.perf_counter() - t0)

        if workload == "shared":
            systems = [_text(rng, 6000) for _ in range(24)]
            plan = [rng.choice(systems) for _ in range(requests)]
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                messages = [
                    {"role": "system", "content": plan[i]},
                    {"role": "user", "content": f"question {i}"},
                ]
                async with sem:
                    finished(await _chat(session, gateway, messages, max_tokens, t0, timeout))

            await asyncio.gather(*(one(i) for i in range(requests)))
        else:
            turns = 6
            systems = [_text(rng, 2400) for _ in range(8)]
            conversations = [
                (rng.choice(systems), [_text(rng, 400) for _ in range(turns)])
                for _ in range(max(1, requests // turns))
            ]
            queue = list(range(len(conversations)))

            async def user() -> None:
                while queue:
                    system, questions = conversations[queue.pop(0)]
                    messages = [{"role": "system", "content": system}]
                    for q in questions:
                        messages.append({"role": "user", "content": q})
                        out = await _chat(session, gateway, messages, max_tokens, t0, timeout)
                        finished(out)
                        if out.error is not None:
                            break  # a user whose turn failed gives up on the conversation
                        messages.append({"role": "assistant", "content": out.text})

            await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = await _engine_stats(session, engines)

    per_engine: list[int | None] = []
    prompt = cached = 0
    have_stats = bool(engines) and all(s is not None for s in before + after)
    for b, a in zip(before, after, strict=True):
        if b is None or a is None:
            per_engine.append(None)
            continue
        per_engine.append(a["requests"] - b["requests"])
        prompt += a["prompt_tokens"] - b["prompt_tokens"]
        cached += a["cached_tokens"] - b["cached_tokens"]
    if not have_stats:  # engines without /stats: what each answer said about itself
        seen = [o for o in outcomes if o.prompt_tokens and o.cached_tokens is not None]
        prompt = sum(o.prompt_tokens or 0 for o in seen)
        cached = sum(o.cached_tokens or 0 for o in seen)
    errors = Counter(o.error for o in outcomes if o.error is not None)
    return Report(
        label=label or workload,
        wall=wall,
        outcomes=outcomes,
        engines=list(engines),
        engine_requests=per_engine,
        hit_rate=cached / prompt if prompt else None,
        errors=errors,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run one workload against ``--gateway`` and print one summary line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--gateway", default="http://127.0.0.1:8000", metavar="URL",
                   help="the router's base URL (ours, the SGLang router, ...)")  # fmt: skip
    p.add_argument("--engines", default=DEFAULT_ENGINES, metavar="URL,...",
                   help="engine base URLs, read for per-engine counters ('' for none)")  # fmt: skip
    p.add_argument("--workload", choices=("shared", "multiturn"), default="shared")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16, help="users at a time")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name printed before the figures")
    a = p.parse_args(argv)
    engines = [u for u in a.engines.split(",") if u]
    report = asyncio.run(
        run_workload(a.gateway, engines, workload=a.workload, requests=a.requests,
                     concurrency=a.concurrency, max_tokens=a.max_tokens, seed=a.seed,
                     label=a.label)
    )  # fmt: skip
    print(report.line())


if __name__ == "__main__":
    main()
