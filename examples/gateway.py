"""An OpenAI-compatible streaming gateway that routes with cacheroute (Starlette + httpx).

It proxies ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming SSE and
plain JSON) to a pool of engines (SGLang, vLLM, or ``fake_engine.py``), choosing the engine
for each request with any registered cacheroute policy:

* **One lease per request**, taken with :func:`cacheroute.acquire` before the upstream
  request and released after the last streamed byte, when the client disconnects
  mid-stream, when the engine fails, and on timeouts. Load therefore always means
  "requests in flight right now", which is what the policies balance on.
* **Routing text.** Completions route on the prompt (text or token ids); chat requests
  route on the whole conversation (tools, then every message in order), so turn ``k+1``
  of a conversation extends turn ``k`` and lands where its KV cache is.
* **Health.** An engine is marked unhealthy when it refuses connections, after
  ``max_failures`` consecutive failed requests, or when a health check fails; it is used
  again as soon as a health check passes.
* **Clear errors, never hangs.** No healthy engine: 503. Engine failure or bad gateway
  status before the response started: 502 (after retrying other engines when the request
  cannot have reached the engine), timeout: 504, all with an OpenAI-style JSON error body.
  A failure after streaming started ends the stream with a ``data: {"error": ...}`` event
  instead of ``data: [DONE]``.
* ``GET /stats``: per-engine health, load, processed and outcome counters.

Run it::

    python examples/gateway.py --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002

Tests build it with :func:`create_app`; ``app.state.gateway`` is the :class:`Gateway`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cacheroute import (
    BasicWorker,
    Lease,
    LoadBalancingPolicy,
    NoHealthyWorkerError,
    acquire,
    available_policies,
    make_policy,
)
from cacheroute.worker import Worker

__all__ = [
    "DEFAULT_POLICY",
    "FALLBACK_POLICY",
    "Gateway",
    "build_parser",
    "chat_routing_text",
    "create_app",
    "default_policy_name",
    "main",
    "routing_text",
]

log = logging.getLogger("cacheroute.gateway")

DEFAULT_POLICY = "cache_aware"
FALLBACK_POLICY = "shortest_queue"
"""Used when ``cache_aware`` is not registered (least load: safe for any traffic)."""

# Headers that describe one hop, not the message; never forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)

RoutingText = str | list[int] | None


# --------------------------------------------------------------------------- routing text


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text, image_url, input_audio, ...
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:  # an image (URL or data URL) is part of the prefix too
                out.append(json.dumps(part, sort_keys=True, separators=(",", ":")))
        return "".join(out)
    return json.dumps(content, sort_keys=True, separators=(",", ":"))


def chat_routing_text(body: Mapping[str, Any]) -> str:
    """The text a chat request routes on: tools, then every message in order.

    Engines put the tools and the messages, in order, through the chat template, so the
    cached prefix of turn ``k+1`` is turn ``k``. Routing on the first message only would
    send every conversation with the same system prompt to the same engine.
    """
    parts = []
    tools = body.get("tools")
    if tools:
        parts.append("<|tools|>\n" + json.dumps(tools, sort_keys=True, separators=(",", ":")))
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        text = _content_text(message.get("content"))
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"], sort_keys=True, separators=(",", ":"))
        parts.append(f"<|{message.get('role', '')}|>\n{text}")
    return "\n".join(parts)


def routing_text(path: str, body: Mapping[str, Any]) -> RoutingText:
    """What the policy routes on for a request to ``path`` with JSON ``body``.

    Completions: the prompt, as text or token ids (a batch of prompts is joined, since
    the batch goes to one engine). Chat: :func:`chat_routing_text`. ``None`` when there
    is nothing to route on (the engine will reject such a request anyway).
    """
    if path.endswith("/chat/completions"):
        return chat_routing_text(body) or None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt or None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt) or None
        if all(type(t) is int and t >= 0 for t in prompt):
            return list(prompt)
        if all(isinstance(p, list) for p in prompt):
            ids = [t for p in prompt for t in p]
            if all(type(t) is int and t >= 0 for t in ids):
                return ids or None
    return None


# --------------------------------------------------------------------------- the gateway


def default_policy_name() -> str:
    """``cache_aware`` when it is registered, else ``shortest_queue``."""
    return DEFAULT_POLICY if DEFAULT_POLICY in available_policies() else FALLBACK_POLICY


def _error(status: int, kind: str, message: str) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


def _sse_error(status: int, kind: str, message: str) -> bytes:
    payload = {"error": {"message": message, "type": kind, "code": status}}
    return f"data: {json.dumps(payload)}\n\n".encode()


def _last_event_end(buf: bytes) -> int:
    """End of the last complete SSE event in ``buf`` (0 if none)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class _DeadlineExceeded(Exception):
    pass


@dataclass
class WorkerStats:
    """What the gateway counts per engine (on its event loop, so no locks)."""

    routed: int = 0
    completed: int = 0
    failed: int = 0
    client_disconnects: int = 0
    consecutive_failures: int = 0
    health_checks_failed: int = 0


class Gateway:
    """The engines, the policy, the upstream client and the counters behind the app.

    Args:
        worker_urls: engine base URLs (``http://host:port``), all serving the same model.
        policy: a policy name (``None``: :func:`default_policy_name`) or a policy object
            (the caller then owns it and closes it).
        policy_config: keyword config for :func:`cacheroute.make_policy`.
        connect_timeout: seconds to open a connection to an engine.
        read_timeout: longest silence allowed from an engine, time to first token included.
        request_timeout: longest a whole request may take, streaming included. Checked
            between chunks, so a stalled stream ends after at most ``read_timeout`` more.
        health_check_interval: seconds between ``GET /health`` rounds (0: no checks).
        health_check_timeout: seconds before one health check counts as failed.
        max_failures: consecutive failed requests that mark an engine unhealthy.
        max_retries: extra engines to try when a request could not reach its engine.
        max_connections: upstream connection pool size.
        transport: an httpx transport, for tests.
    """

    def __init__(
        self,
        worker_urls: Sequence[str],
        policy: str | LoadBalancingPolicy | None = None,
        *,
        policy_config: Mapping[str, Any] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        request_timeout: float = 600.0,
        health_check_interval: float = 5.0,
        health_check_timeout: float = 2.0,
        max_failures: int = 3,
        max_retries: int = 2,
        max_connections: int = 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = list(dict.fromkeys(u.rstrip("/") for u in worker_urls))
        if not urls:
            raise ValueError("at least one worker URL is needed")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"worker URL must start with http:// or https://, got {url!r}")
        if max_failures < 1 or max_retries < 0:
            raise ValueError("max_failures must be >= 1 and max_retries >= 0")
        self.workers = [BasicWorker(url) for url in urls]
        self._by_url = {w.url: w for w in self.workers}
        self.worker_stats = {url: WorkerStats() for url in urls}
        if isinstance(policy, LoadBalancingPolicy):
            if policy_config:
                raise ValueError("policy_config is only for a policy given by name")
            self.policy, self._owns_policy = policy, False
        else:
            self.policy = make_policy(policy or default_policy_name(), **(policy_config or {}))
            self._owns_policy = True
        # Policies with per-worker state (cache_aware's tree tenants) learn the pool here.
        self.policy.sync_workers(self.workers)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.request_timeout = request_timeout
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self.max_failures = max_failures
        self.max_retries = max_retries
        self.max_connections = max_connections
        self._transport = transport
        self.counters = dict.fromkeys(
            (
                "requests",
                "completed",
                "client_disconnects",
                "upstream_errors",
                "timeouts",
                "no_healthy_worker",
                "retries",
                "bad_requests",
            ),
            0,
        )
        self._client: httpx.AsyncClient | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._last_recheck = float("-inf")

    # -- lifecycle ----------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Open the upstream client, check health once, run the health loop, clean up."""
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=64)
        timeout = httpx.Timeout(
            connect=self.connect_timeout,
            read=min(self.read_timeout, self.request_timeout),
            write=self.connect_timeout,
            pool=self.connect_timeout,
        )
        async with httpx.AsyncClient(
            timeout=timeout, limits=limits, transport=self._transport
        ) as client:
            self._client = client
            await self.check_health()  # so engines that are down never get a request
            task = (
                asyncio.create_task(self._health_loop()) if self.health_check_interval > 0 else None
            )
            try:
                yield
            finally:
                if task is not None:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                if self._owns_policy:
                    self.policy.close()
                self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway is not running (use it inside the app lifespan)")
        return self._client

    # -- health -------------------------------------------------------------------------

    def _set_health(self, worker: BasicWorker, healthy: bool, why: str) -> None:
        if healthy != worker.is_healthy():
            log.warning("engine %s is %s (%s)", worker.url, "back" if healthy else "down", why)
            worker.set_healthy(healthy)
        if healthy:
            self.worker_stats[worker.url].consecutive_failures = 0

    async def check_health(self) -> None:
        """One round of ``GET /health`` on every engine, concurrently."""

        async def check(worker: BasicWorker) -> None:
            try:
                r = await self.client.get(worker.url + "/health", timeout=self.health_check_timeout)
                ok, why = r.status_code == 200, f"health check: HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                ok, why = False, f"health check: {type(exc).__name__}"
            if not ok:
                self.worker_stats[worker.url].health_checks_failed += 1
            self._set_health(worker, ok, why)

        await asyncio.gather(*(check(w) for w in self.workers))

    async def recheck_health(self) -> None:
        """An extra health round when no engine is healthy, at most once a second.

        Engines that were down at startup (or restarted) are then used as soon as a
        request needs them, not one ``health_check_interval`` later. Concurrent callers
        share one round, so an outage does not turn into a storm of health checks.
        """
        loop = asyncio.get_running_loop()
        if self._recheck is None or self._recheck.done():
            if loop.time() - self._last_recheck < 1.0:
                return
            self._last_recheck = loop.time()
            self._recheck = asyncio.create_task(self.check_health())
        await asyncio.shield(self._recheck)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_check_interval)
            try:
                await self.check_health()
            except Exception:  # keep checking whatever happens; the loop is our recovery path
                log.exception("health check round failed")

    def record(self, worker: Worker, outcome: str, detail: str = "") -> None:
        """Count one request's outcome; failures may mark the engine unhealthy."""
        stats = self.worker_stats[worker.url]
        if outcome == "completed":
            stats.completed += 1
            stats.consecutive_failures = 0
            self.counters["completed"] += 1
        elif outcome == "rejected":  # the engine answered 4xx: it is alive and well
            stats.consecutive_failures = 0
            self.counters["bad_requests"] += 1
        elif outcome == "client_disconnect":
            stats.client_disconnects += 1  # not the engine's fault
            self.counters["client_disconnects"] += 1
        else:
            stats.failed += 1
            stats.consecutive_failures += 1
            self.counters["timeouts" if outcome == "timeout" else "upstream_errors"] += 1
            if stats.consecutive_failures >= self.max_failures:
                self._set_health(
                    self._by_url[worker.url],
                    False,
                    f"{stats.consecutive_failures} failed requests, last: {detail}",
                )

    def stats(self) -> dict[str, Any]:
        """Policy, per-engine health/load/processed/outcomes, and gateway counters."""
        return {
            "policy": self.policy.name,
            "workers": [
                {
                    "url": w.url,
                    "healthy": w.is_healthy(),
                    "load": w.load(),
                    "processed": w.processed(),
                    **asdict(self.worker_stats[w.url]),
                }
                for w in self.workers
            ],
            "requests": dict(self.counters),
        }

    # -- proxying -----------------------------------------------------------------------

    async def proxy(self, request: Request) -> Response:
        """Route one completions or chat request to an engine and relay its response."""
        self.counters["requests"] += 1
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.counters["bad_requests"] += 1
            return _error(400, "invalid_request_error", "request body must be a JSON object")
        text = routing_text(request.url.path, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["accept-encoding"] = "identity"  # relay bytes as they are
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        deadline = asyncio.get_running_loop().time() + self.request_timeout

        for attempt in range(self.max_retries + 1):
            try:
                lease = acquire(self.policy, self.workers, text)
            except NoHealthyWorkerError:
                await self.recheck_health()
                try:
                    lease = acquire(self.policy, self.workers, text)
                except NoHealthyWorkerError as exc:
                    self.counters["no_healthy_worker"] += 1
                    return _error(503, "no_healthy_worker", str(exc))
            self.worker_stats[lease.worker.url].routed += 1
            try:
                upstream = await self.client.send(
                    self.client.build_request(
                        "POST", lease.worker.url + path, content=raw, headers=headers
                    ),
                    stream=True,
                )
            except httpx.TransportError as exc:
                # Nothing has reached the client yet, so another engine may still serve it.
                lease.release(success=False)
                retry = self._send_failed(lease.worker, exc)
                if retry and attempt < self.max_retries:
                    self.counters["retries"] += 1
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    return _error(504, "upstream_timeout", f"engine {lease.worker.url}: {exc!r}")
                return _error(502, "upstream_error", f"engine {lease.worker.url}: {exc!r}")
            except BaseException:
                lease.release(success=False)
                raise
            break
        else:  # pragma: no cover - the loop always returns or breaks
            raise AssertionError

        # From here the lease and the open upstream response belong to one owner at a time.
        try:
            if upstream.status_code >= 400:
                return await self._relay_error(lease, upstream, deadline)
            if not body.get("stream"):
                return await self._relay_whole(lease, upstream, deadline)
        except BaseException:
            lease.release(success=False)
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            raise
        return _LeasedStream(self, lease, upstream, deadline)

    def _send_failed(self, worker: Worker, exc: httpx.TransportError) -> bool:
        """Record a failure to get response headers; return whether to try another engine."""
        if isinstance(exc, httpx.PoolTimeout):  # our pool is full: not the engine's fault
            self.counters["timeouts"] += 1
            return False
        if isinstance(exc, httpx.ConnectError):  # nobody listening: down for sure
            self._set_health(self._by_url[worker.url], False, f"connect failed: {exc!r}")
        self.record(worker, "timeout" if isinstance(exc, httpx.TimeoutException) else "error",
                    repr(exc))  # fmt: skip
        # A read timeout may mean the engine is working on it: do not run it twice.
        return not isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout))

    async def _read_all(self, upstream: httpx.Response, deadline: float) -> bytes:
        loop = asyncio.get_running_loop()
        chunks = []
        async for chunk in upstream.aiter_raw():
            chunks.append(chunk)
            if loop.time() > deadline:
                raise _DeadlineExceeded
        return b"".join(chunks)

    async def _relay_error(
        self, lease: Lease, upstream: httpx.Response, deadline: float
    ) -> Response:
        """An engine answered 4xx/5xx: 4xx is passed through, 5xx becomes a 502."""
        status, worker = upstream.status_code, lease.worker
        try:
            content = await self._read_all(upstream, deadline)
        except (httpx.HTTPError, _DeadlineExceeded):
            content = b""
        finally:
            await upstream.aclose()
        if status < 500:  # the request's fault, not the engine's
            lease.release(success=True)
            self.record(worker, "rejected")
            return Response(content, status, headers=_response_headers(upstream, worker))
        lease.release(success=False)
        detail = content[:200].decode(errors="replace")
        self.record(worker, "error", f"HTTP {status}")
        return _error(502, "upstream_error", f"engine {worker.url} returned {status}: {detail}")

    async def _relay_whole(
        self, lease: Lease, upstream: httpx.Response, deadline: float
    ) -> Response:
        worker = lease.worker
        try:
            content = await self._read_all(upstream, deadline)
        except (httpx.TimeoutException, _DeadlineExceeded) as exc:
            lease.release(success=False)
            self.record(worker, "timeout", repr(exc))
            return _error(504, "upstream_timeout", f"engine {worker.url} timed out")
        except httpx.TransportError as exc:
            lease.release(success=False)
            self.record(worker, "error", repr(exc))
            return _error(502, "upstream_error", f"engine {worker.url} failed: {exc!r}")
        finally:
            await upstream.aclose()
        lease.release(success=True)
        self.record(worker, "completed")
        return Response(content, upstream.status_code, headers=_response_headers(upstream, worker))


def _response_headers(upstream: httpx.Response, worker: Worker) -> dict[str, str]:
    # date and server are set by our own server; forwarding them would duplicate them.
    headers = {
        k: v
        for k, v in upstream.headers.items()
        if k.lower() not in _HOP_BY_HOP and k.lower() not in ("date", "server")
    }
    headers["x-cacheroute-worker"] = worker.url
    return headers


class _LeasedStream(StreamingResponse):
    """Relays an engine's stream to the client and owns the request's lease until it ends.

    The lease is released in :meth:`__call__`'s ``finally``, which runs however the
    response ends: the last byte sent, the engine failing, a timeout, or the client going
    away (Starlette then cancels the relay, or the server raises on send).
    """

    def __init__(
        self, gateway: Gateway, lease: Lease, upstream: httpx.Response, deadline: float
    ) -> None:
        self._gateway = gateway
        self._lease = lease
        self._upstream = upstream
        self._outcome = "client_disconnect"  # unless the relay ends by itself
        self._detail = ""
        sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        self._relay_gen = self._relay(deadline, sse)
        headers = _response_headers(upstream, lease.worker)
        headers.setdefault("cache-control", "no-cache")
        super().__init__(self._relay_gen, status_code=upstream.status_code, headers=headers)

    async def _relay(self, deadline: float, sse: bool) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        url = self._lease.worker.url
        pending = b""
        try:
            async for chunk in self._upstream.aiter_raw():
                if sse:  # forward whole events only, so an error event never lands mid-line
                    pending += chunk
                    end = _last_event_end(pending)
                    if end:
                        yield pending[:end]
                        pending = pending[end:]
                elif chunk:
                    yield chunk
                if loop.time() > deadline:
                    raise _DeadlineExceeded
            if pending:
                yield pending
            self._outcome = "completed"
        except (httpx.TimeoutException, _DeadlineExceeded) as exc:
            self._outcome, self._detail = "timeout", repr(exc)
            yield _sse_error(504, "upstream_timeout", f"engine {url} timed out mid-stream")
        except httpx.TransportError as exc:
            self._outcome, self._detail = "error", repr(exc)
            yield _sse_error(502, "upstream_error", f"engine {url} failed mid-stream: {exc!r}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Release first and synchronously: nothing below can stop the load coming back.
            self._lease.release(success=self._outcome == "completed")
            self._gateway.record(self._lease.worker, self._outcome, self._detail)
            # Closing the upstream connection is how the engine learns to stop generating.
            with anyio.CancelScope(shield=True):
                await self._relay_gen.aclose()
                await self._upstream.aclose()


# --------------------------------------------------------------------------- the app


def create_app(
    worker_urls: Sequence[str],
    policy: str | LoadBalancingPolicy | None = None,
    **options: Any,
) -> Starlette:
    """Build the gateway's ASGI app. ``options`` are :class:`Gateway`'s keyword arguments.

    ``app.state.gateway`` is the :class:`Gateway` (its ``workers``, ``policy``, ``stats()``).
    """
    gateway = Gateway(worker_urls, policy, **options)

    async def proxy(request: Request) -> Response:
        return await gateway.proxy(request)

    async def stats(request: Request) -> Response:
        return JSONResponse(gateway.stats())

    async def health(request: Request) -> Response:
        up = sum(w.is_healthy() for w in gateway.workers)
        return JSONResponse(
            {"status": "ok" if up else "no healthy engine", "healthy_workers": up},
            status_code=200 if up else 503,
        )

    async def models(request: Request) -> Response:
        # Any healthy engine can answer: they all serve the same model.
        for worker in gateway.workers:
            if worker.is_healthy():
                try:
                    r = await gateway.client.get(worker.url + "/v1/models")
                except httpx.HTTPError:
                    continue
                return Response(r.content, r.status_code, media_type="application/json")
        return _error(503, "no_healthy_worker", "no healthy engine to list models")

    app = Starlette(
        routes=[
            Route("/v1/completions", proxy, methods=["POST"]),
            Route("/v1/chat/completions", proxy, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app


def _policy_arg(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, null
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of :func:`main`."""
    p = argparse.ArgumentParser(
        description="OpenAI-compatible streaming gateway routed by cacheroute."
    )
    p.add_argument("--worker", action="append", required=True, metavar="URL",
                   help="engine base URL; repeat for each engine")  # fmt: skip
    p.add_argument("--policy", default=None,
                   help=f"routing policy (default: {DEFAULT_POLICY} when available, else "
                        f"{FALLBACK_POLICY}); see `cacheroute policies`")  # fmt: skip
    p.add_argument("--policy-arg", action="append", type=_policy_arg, default=[],
                   metavar="KEY=VALUE", help="policy config, e.g. cache_threshold=0.5")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--read-timeout", type=float, default=120.0,
                   help="longest silence from an engine, first token included")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="longest a whole request may take")  # fmt: skip
    p.add_argument("--health-check-interval", type=float, default=5.0, help="0 disables")
    p.add_argument("--health-check-timeout", type=float, default=2.0)
    p.add_argument("--max-failures", type=int, default=3,
                   help="consecutive failed requests that mark an engine unhealthy")  # fmt: skip
    p.add_argument("--max-retries", type=int, default=2,
                   help="engines to try next when a request could not reach one")  # fmt: skip
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run the gateway (see ``--help``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    app = create_app(
        args.worker,
        args.policy,
        policy_config=dict(args.policy_arg),
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        request_timeout=args.request_timeout,
        health_check_interval=args.health_check_interval,
        health_check_timeout=args.health_check_timeout,
        max_failures=args.max_failures,
        max_retries=args.max_retries,
    )
    gateway: Gateway = app.state.gateway
    log.info("routing with %r over %s", gateway.policy.name, [w.url for w in gateway.workers])
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
