"""Load a running gateway with 24 shared-prefix "applications" and report what routing did.

Start three fake engines and the gateway first (see examples/README.md), then run
``python examples/load.py``. It prints the gateway's policy, wall time, the engines' cache hit
rate, time to first token, and requests per engine.
"""

import asyncio
import random
import time

import httpx

GATEWAY, ENGINES = "http://127.0.0.1:8000", [f"http://127.0.0.1:{p}" for p in (8001, 8002, 8003)]
rng = random.Random(0)
# 24 "applications", each with its own 6,000-character system prompt (~1,500 tokens):
# together more than one engine's prefix cache holds, less than all three hold.
systems = ["".join(rng.choice("abcdefghij ") for _ in range(6000)) for _ in range(24)]


async def ask(client, i):
    body = {
        "model": "fake-model",
        "stream": True,
        "max_tokens": 8,
        "messages": [
            {"role": "system", "content": rng.choice(systems)},
            {"role": "user", "content": f"question {i}"},
        ],
    }
    t0 = time.perf_counter()
    async with client.stream("POST", GATEWAY + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                return time.perf_counter() - t0  # time to first token


async def main():
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        sem = asyncio.Semaphore(16)  # 16 users at a time

        async def one(i):
            async with sem:
                return await ask(client, i)

        ttft = sorted(await asyncio.gather(*(one(i) for i in range(300))))
        policy = (await client.get(GATEWAY + "/stats")).json()["policy"]
        engines = [(await client.get(url + "/stats")).json() for url in ENGINES]
    hit = sum(e["cached_tokens"] for e in engines) / sum(e["prompt_tokens"] for e in engines)
    print(
        f"{policy}: {time.perf_counter() - t0:.1f} s, cache hit rate {hit:.0%}, "
        f"TTFT p50 {ttft[150] * 1000:.0f} ms, p90 {ttft[270] * 1000:.0f} ms, "
        f"requests per engine {[e['requests'] for e in engines]}"
    )


asyncio.run(main())
