"""Ray Serve recipe: an ingress that reads the prompt, engine replicas routed by cacheroute.

Two deployments:

* ``Engine``: the engine replicas, routed by
  :class:`cacheroute.integrations.ray_serve.CacheRouteRequestRouter`. Here a stand-in with a
  real prefix cache (chained hashes of 16-token blocks, 4 characters a token, LRU) and a
  prefill delay proportional to the uncached tokens, so it runs without a GPU; in production
  its ``generate`` calls the SGLang or vLLM engine the replica owns (an engine object in the
  replica, or the replica's engine server over HTTP). Every answer says which replica served
  it and how many prompt tokens it found cached.
* ``Ingress``: the HTTP entry point. Ray's HTTP proxy hands a deployment only the request's
  ASGI scope (the body is streamed to the replica afterwards), so a router in front of the
  proxy's target never sees the prompt. The ingress parses the OpenAI-style body and calls
  the engines' handle with ``prompt=...``: the router of that handle (in the ingress
  replica's process) reads it. It also serves ``GET /metrics`` (Prometheus, the router's
  metrics) and ``GET /cacheroute/stats`` (the router's replicas, loads and ledger).

**Precise mode** (``--kv-events``): every ``Engine`` publishes its cache's changes for
token-id prompts as vLLM-format KV events (``BlockStored`` / ``BlockRemoved``, through
:class:`cacheroute.events.KVEventPublisher`) and advertises where in its routing stats
(``record_routing_stats``); the routers, built with ``kv_events=``, follow every replica's
feed, so each of them (one per ingress replica, one in any process holding a handle) routes
on what every engine reports, not only on what it routed itself.

Run it (a local Ray with 2 CPUs; the deployments reserve no CPU)::

    pip install -e '.[ray,metrics]'
    python examples/ray_serve_app.py --requests 24

It serves on 127.0.0.1:8000 (``--port``), sends a few prefix groups through HTTP (one user
per group, all at once, a question per round), prints
which replica served each group and its cached tokens, and shuts down (``--serve`` keeps it
up until Ctrl-C)::

    curl -s localhost:8000/v1/completions -d '{"prompt": "You are a helpful assistant. Hi"}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cacheroute.integrations.ray_serve import (
    kv_events_routing_stats,
    prompt_from_body,
    request_router_config,
)
from cacheroute.integrations.ray_serve_state import process_metrics, snapshot

CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16


def block_keys(prompt: str | Sequence[int]) -> tuple[int, list[int]]:
    """``(tokens, one chained key per full 16-token block)`` of a prompt (vLLM's scheme)."""
    if isinstance(prompt, str):
        tokens: list[Any] = [
            prompt[i : i + CHARS_PER_TOKEN] for i in range(0, len(prompt), CHARS_PER_TOKEN)
        ]
    else:
        tokens = list(prompt)
    keys, key = [], 0
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        key = hash((key, tuple(tokens[start : start + BLOCK_TOKENS])))
        keys.append(key)
    return len(tokens), keys


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
class Engine:
    """Stands in for one engine replica: a prefix cache and a prefill delay."""

    def __init__(
        self,
        cache_blocks: int = 4096,
        prefill_s_per_token: float = 0.0002,
        kv_events_host: str | None = None,
    ) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._capacity = cache_blocks
        self._prefill_s = prefill_s_per_token
        self._id = serve.get_replica_context().replica_id.to_full_id_str()
        self._events: Any = None
        if kv_events_host is not None:  # a real engine: vLLM's --kv-events-config
            from cacheroute.events import KVEventPublisher

            addr = f"tcp://{kv_events_host}:*"  # a free port each
            self._events = KVEventPublisher(addr, replay=addr)

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Ray's controller: where this replica's engine publishes KV events."""
        if self._events is None:
            return {}
        return kv_events_routing_stats(self._events.endpoint, self._events.replay_endpoint)

    async def generate(self, prompt: str | list[int], max_tokens: int = 8) -> dict[str, Any]:
        tokens, keys = block_keys(prompt)
        hit = 0
        for key in keys:
            if key not in self._blocks:
                break
            hit += 1
        cached = min(hit * BLOCK_TOKENS, tokens)
        await asyncio.sleep((tokens - cached) * self._prefill_s)  # prefill the uncached part
        new = [k for k in keys if k not in self._blocks]
        for key in reversed(keys):  # the prompt is now cached here (LRU, head kept longest)
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        evicted = []
        while len(self._blocks) > self._capacity:
            evicted.append(self._blocks.popitem(last=False)[0])
        if self._events is not None and not isinstance(prompt, str):
            self._publish(prompt, keys, len(keys) - len(new), evicted)
        return {
            "replica": self._id,
            "text": " ".join(["token"] * max_tokens),
            "usage": {
                "prompt_tokens": tokens,
                "completion_tokens": max_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }

    def _publish(self, tokens: list[int], keys: list[int], hit: int, evicted: list[int]) -> None:
        """The cache change as an engine reports it: the new blocks, chained to the last
        cached one, then the evicted ones."""
        from cacheroute.events import BlockRemoved, BlockStored

        events: list[Any] = []
        if hit < len(keys):
            parent = keys[hit - 1] if hit else None
            body = tokens[hit * BLOCK_TOKENS : len(keys) * BLOCK_TOKENS]
            events.append(BlockStored(keys[hit:], parent, body, BLOCK_TOKENS))
        if evicted:
            events.append(BlockRemoved(evicted))
        if events:
            self._events.publish(events)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:
    """Parses the body, passes the prompt to the engines' handle; /metrics and /stats."""

    def __init__(self, engine: DeploymentHandle, metrics: bool = True) -> None:
        self._engine = engine
        self._metrics = metrics

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
        if request.method == "GET" and path == "/cacheroute/stats":
            return JSONResponse(snapshot())
        if request.method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return JSONResponse({"error": f"no route {request.method} {path}"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        prompt = prompt_from_body(body) if isinstance(body, dict) else None
        if prompt is None:
            return JSONResponse({"error": "no prompt or messages"}, status_code=400)
        answer = await self._engine.generate.remote(
            prompt=prompt, max_tokens=int(body.get("max_tokens", 8))
        )
        if self._metrics:  # what the engine actually had cached, next to the prediction
            usage = answer["usage"]
            process_metrics().record_engine_usage(
                answer["replica"],
                usage["prompt_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"],
            )
        return JSONResponse(answer, headers={"x-cacheroute-replica": answer["replica"]})


def build_app(
    num_replicas: int = 3,
    policy: str | None = None,
    *,
    metrics: bool = True,
    kv_events: bool = False,
    engine_options: dict[str, Any] | None = None,
    **policy_config: Any,
) -> Any:
    """The application: ``Ingress`` in front of ``num_replicas`` ``Engine`` replicas routed
    by cacheroute's ``policy`` (default: cacheroute's default policy); ``kv_events``:
    precise mode (the engines publish on loopback, for this one-machine demo)."""
    router = request_router_config(
        policy,
        metrics=metrics,
        kv_events={"block_size": BLOCK_TOKENS} if kv_events else None,
        routing_stats_period_s=1.0 if kv_events else None,
        **policy_config,
    )
    engine = Engine.options(
        num_replicas=num_replicas, request_router_config=router, **(engine_options or {})
    )
    host = "127.0.0.1" if kv_events else None
    return Ingress.bind(engine.bind(kv_events_host=host), metrics=metrics)


def post(port: int, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """POST a completion to the ingress; the parsed answer."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def demo_prompts(groups: int, per_group: int) -> list[tuple[int, str]]:
    """``per_group`` questions for each of ``groups`` system prompts (about 150 tokens)."""
    out = []
    for g in range(groups):
        system = f"You are assistant #{g}. " + f"Rules of application {g}: be brief. " * 15
        out += [(g, f"{system}\nUser: question {q} for group {g}?") for q in range(per_group)]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--policy", default=None, help="a cacheroute policy name")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--groups", type=int, default=6, help="prefix groups of the demo")
    parser.add_argument("--requests", type=int, default=24, help="demo requests")
    parser.add_argument("--serve", action="store_true", help="keep serving after the demo")
    parser.add_argument(
        "--kv-events", action="store_true", help="precise mode: the engines publish KV events"
    )
    args = parser.parse_args(argv)

    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_app(args.replicas, args.policy, kv_events=args.kv_events)
        serve.run(app, name="cacheroute", route_prefix="/")
        served: dict[int, list[tuple[str, int]]] = defaultdict(list)
        per_group = max(1, args.requests // args.groups)
        start = time.perf_counter()
        prompts = demo_prompts(args.groups, per_group)
        rounds = [prompts[q::per_group] for q in range(per_group)]  # question q of each group

        def ask(job: tuple[int, str]) -> tuple[int, dict[str, Any]]:
            g, prompt = job
            # precise mode routes token ids (a real gateway tokenizes; code points here)
            return g, post(
                args.port, {"prompt": [ord(c) for c in prompt] if args.kv_events else prompt}
            )

        with ThreadPoolExecutor(args.groups) as pool:  # the groups' users, at once
            for jobs in rounds:
                for g, answer in pool.map(ask, jobs):
                    cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
                    served[g].append((answer["replica"].rsplit("#", 1)[-1], cached))
        took = time.perf_counter() - start
        print(f"{args.groups * per_group} requests in {took:.2f} s")
        for g, rows in sorted(served.items()):
            replicas = sorted({r for r, _ in rows})
            print(f"group {g}: replicas {replicas}, cached tokens {[c for _, c in rows]}")
        print(json.dumps(snapshot_over_http(args.port), indent=2))
        if args.serve:
            print(f"serving on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def snapshot_over_http(port: int) -> Any:
    """The ingress's ``/cacheroute/stats``: its router's replicas, loads and ledger."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/cacheroute/stats", timeout=10) as r:
        return json.loads(r.read())


if __name__ == "__main__":
    main()
