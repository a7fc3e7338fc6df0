"""An OpenAI-compatible streaming gateway that routes with cacheroute (Starlette + aiohttp).

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
* **Bodies untouched.** The request body is forwarded byte for byte (it is parsed only to
  find the routing text), and the engine's answer is relayed as it came. The one exception:
  with a tokenizer, a completions request whose prompt is one text is forwarded with that
  prompt replaced by its token ids.
* **Health.** An engine is marked unhealthy when it refuses connections, after
  ``max_failures`` consecutive failed requests, or when a health check fails; it is used
  again as soon as a health check passes (every ``health_check_interval`` seconds).
* **Clear errors, never hangs.** Bad request body: 400. No healthy engine: 503. Engine
  failure or bad gateway status before the answer started: 502 (after retrying *other*
  engines when the request cannot have reached the engine), timeout: 504, all with an
  OpenAI-style JSON error body. A stream's status is sent only with its first whole event,
  so a failure before it is still a clean JSON error; a failure after it ends the stream
  with a ``data: {"error": ...}`` event of its own instead of ``data: [DONE]``.
* ``GET /stats``: per-engine health, load, processed and outcome counters (and the KV-event
  index's per-engine counters when it follows the engines' events).
* ``GET /metrics``: Prometheus text (:class:`cacheroute.metrics.RouterMetrics` on the
  gateway's own registry): decisions, match ratio, predicted against engine-reported cached
  tokens, worker load and work, tree sizes, KV-event index counters.
* **Tokens** (``--tokenizer fake`` or ``--tokenizer path/to/tokenizer.json``): requests then
  route on token ids. A completions text prompt is tokenized and *forwarded as its ids*, so
  the engine caches exactly the ids the gateway routed on; chat requests route on the ids
  of the templated conversation and are forwarded untouched. See :class:`Tokenizer`.
* **KV events** (``--worker-events PUB[,REPLAY]`` per ``--worker``): a
  :class:`cacheroute.events.KVEventIndex` follows what each engine reports it caches, and
  prefix-aware policies match token-id requests on those reports (``--index-mode``).

Run it::

    python examples/gateway.py --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002

Tests build it with :func:`create_app`; ``app.state.gateway`` is the :class:`Gateway`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from cacheroute import (
    DEFAULT_POLICY,
    BasicWorker,
    Lease,
    LoadBalancingPolicy,
    NoHealthyWorkerError,
    acquire,
    make_policy,
)
from cacheroute.policies.registry import policy_class
from cacheroute.worker import Worker

try:  # the metrics extra (prometheus_client); /metrics says how to get it when missing
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from cacheroute.metrics import RouterMetrics
except ImportError:  # pragma: no cover - exercised only without the extra
    RouterMetrics = None  # type: ignore[assignment,misc]

__all__ = [
    "BadRequest",
    "FakeTokenizer",
    "Gateway",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_parser",
    "chat_routing_text",
    "create_app",
    "load_tokenizer",
    "main",
    "parse_request",
    "parse_worker_events",
    "routing_text",
]

log = logging.getLogger("cacheroute.gateway")


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
_HOP_BY_HOP_BYTES = frozenset(h.encode() for h in _HOP_BY_HOP)
_NOT_RELAYED = _HOP_BY_HOP | {"date", "server"}  # our own server sets date and server

TOKEN_ID_LIMIT = 2**32
"""Token ids must be integers in ``[0, 2**32)``: what the routing tree holds (4 bytes a
token); every tokenizer's vocabulary is far smaller."""

RoutingText = str | list[int] | None


# --------------------------------------------------------------------------- routing text


class BadRequest(ValueError):
    """A request body the gateway refuses (400), naming the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


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


def _token_ids(ids: Sequence[Any], where: str) -> list[int] | None:
    """``ids`` as token ids, ``None`` if they are not all ints; :class:`BadRequest` if any
    int is out of range."""
    if not all(type(t) is int for t in ids):
        return None
    for i, t in enumerate(ids):
        if not 0 <= t < TOKEN_ID_LIMIT:
            raise BadRequest(
                f"token ids must be integers in [0, 2**32); {where}[{i}] is {t}", "prompt"
            )
    return list(ids)


def routing_text(path: str, body: Mapping[str, Any]) -> RoutingText:
    """What the policy routes on for a request to ``path`` with JSON ``body``.

    Completions: the prompt, as text or token ids (a batch of prompts is joined, since
    the batch goes to one engine). Chat: :func:`chat_routing_text`. ``None`` when there
    is nothing to route on (the engine will reject such a request anyway).

    Raises:
        BadRequest: token ids out of ``[0, 2**32)``.
    """
    if path.endswith("/chat/completions"):
        return chat_routing_text(body) or None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt or None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt) or None
        if all(isinstance(p, list) for p in prompt):  # a batch of token-id prompts
            ids: list[int] = []
            for k, p in enumerate(prompt):
                part = _token_ids(p, f"prompt[{k}]")
                if part is None:
                    return None
                ids += part
            return ids or None
        return _token_ids(prompt, "prompt")
    return None


def parse_request(
    path: str, raw: bytes, *, route: bool = True
) -> tuple[dict[str, Any], RoutingText]:
    """The JSON body of a request and its routing text (``None`` unless ``route``).

    Token ids are checked whether or not ``route`` is set, so every policy refuses the same
    bodies.

    Raises:
        BadRequest: the body is not a JSON object, is nested too deeply to parse, or holds
            out-of-range token ids.
    """
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, an int of more than 4,300 digits
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        if route:
            return body, routing_text(path, body)
        if not path.endswith("/chat/completions"):
            routing_text(path, {"prompt": body.get("prompt")})  # the token-id check only
    except RecursionError:  # JSON that parses but is too deep to walk again
        raise BadRequest("request body is nested too deeply") from None
    return body, None


# --------------------------------------------------------------------------- tokenizers


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be loaded (package or file missing, unreadable file)."""


class Tokenizer(Protocol):
    """What the gateway needs of a tokenizer: the ids of a text and of a chat request.

    ``chat_ids`` must reproduce the ids the engine computes for the conversation (its chat
    template, then its tokenizer): only then do the engine's KV events match the request.
    """

    name: str

    def encode(self, text: str) -> list[int]:
        """The token ids of a completions prompt, as the engine would tokenize it."""
        ...

    def chat_ids(self, body: Mapping[str, Any]) -> list[int]:
        """The token ids of a chat request's templated conversation."""
        ...


_FAKE_ENGINE = "_cacheroute_gateway_fake_engine"


def _fake_engine() -> ModuleType:
    """``examples/fake_engine.py`` (next to this file), imported once."""
    module = sys.modules.get(_FAKE_ENGINE)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            _FAKE_ENGINE, Path(__file__).with_name("fake_engine.py")
        )
        if spec is None or spec.loader is None:  # pragma: no cover - file missing
            raise TokenizerError(
                "--tokenizer fake needs examples/fake_engine.py next to gateway.py"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[_FAKE_ENGINE] = module
        spec.loader.exec_module(module)
    return module


class FakeTokenizer:
    """``fake_engine.py``'s own tokenizer and chat template: the gateway's ids are exactly
    the fake engine's (``fake_engine.token_ids`` of ``fake_engine.chat_prompt``)."""

    name = "fake"

    def __init__(self) -> None:
        engine = _fake_engine()
        self._ids: Callable[[str], list[int]] = engine.token_ids
        self._template: Callable[[Sequence[Any]], str] = engine.chat_prompt

    def encode(self, text: str) -> list[int]:
        return self._ids(text)

    def chat_ids(self, body: Mapping[str, Any]) -> list[int]:
        return self._ids(self._template(body.get("messages") or []))


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json``, through the ``tokenizers`` package.

    Nothing is ever downloaded: the file is read from disk. Completions prompts are encoded
    with the tokenizer's special tokens (``add_special_tokens=True``, as vLLM and SGLang do
    for completions); the ids are forwarded, so the engine uses exactly them.

    A ``tokenizer.json`` holds no chat template (that lives in ``tokenizer_config.json``,
    as Jinja). Chat requests are routed on the ids of the fake engine's plain template
    (``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``, see
    ``fake_engine.chat_prompt``), which a real engine does not use: their ids match an
    engine's KV events only if the engine runs the same template; otherwise chat
    affinity comes from the routed history (and, in hybrid mode, the claims).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise TokenizerError(
                f"--tokenizer {path} needs the 'tokenizers' package, which is not installed: "
                "pip install tokenizers (or pip install -e '.[examples]')"
            ) from None
        file = Path(path)
        if not file.is_file():
            raise TokenizerError(f"--tokenizer {path}: no such file (give a local tokenizer.json)")
        try:
            self._tokenizer = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a plain Exception
            raise TokenizerError(f"--tokenizer {path}: not a tokenizer.json: {exc}") from None
        self.name = str(file)
        self._template: Callable[[Sequence[Any]], str] = _fake_engine().chat_prompt

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text).ids
        return ids

    def chat_ids(self, body: Mapping[str, Any]) -> list[int]:
        return self.encode(self._template(body.get("messages") or []))


def load_tokenizer(spec: str | None) -> Tokenizer | None:
    """``None`` (no tokenizer: route on text), ``"fake"`` (:class:`FakeTokenizer`), or the
    path of a local ``tokenizer.json`` (:class:`HFTokenizer`).

    Raises:
        TokenizerError: the ``tokenizers`` package or the file is missing, or the file is
            not a tokenizer.
    """
    if spec is None:
        return None
    if spec == "fake":
        return FakeTokenizer()
    return HFTokenizer(spec)


# --------------------------------------------------------------------------- the gateway


def _error_body(status: int, kind: str, message: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": status}
    return json.dumps({"error": error}).encode()


def _error(status: int, kind: str, message: str, param: str | None = None) -> Response:
    """An OpenAI-style error response (``code`` is the HTTP status, as vLLM does)."""
    return Response(
        _error_body(status, kind, message, param), status, media_type="application/json"
    )


def _sse_error(status: int, kind: str, message: str) -> bytes:
    return b"data: " + _error_body(status, kind, message) + b"\n\n"


_USAGE_MARK = b'"prompt_tokens"'


def _header_usage(headers: Mapping[str, str]) -> tuple[int, int] | None:
    """(prompt, cached) tokens from ``x-prompt-tokens`` / ``x-cached-tokens`` (the fake
    engine sends them), or ``None``."""
    p, c = headers.get("x-prompt-tokens", ""), headers.get("x-cached-tokens", "")
    return (int(p), int(c)) if p.isdigit() and c.isdigit() else None


def _usage_of(obj: Any) -> tuple[int, int] | None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    p = usage.get("prompt_tokens")
    c = details.get("cached_tokens") if isinstance(details, dict) else None
    if type(p) is int and type(c) is int and 0 <= c <= p:
        return p, c
    return None


def _body_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, cached) tokens from ``usage.prompt_tokens`` and
    ``usage.prompt_tokens_details.cached_tokens`` of a JSON answer or of whole SSE events
    (the last event that has them), or ``None``. Cheap when absent: one substring search."""
    if _USAGE_MARK not in data:
        return None
    if data.lstrip()[:1] == b"{":
        candidates = [data]
    else:
        candidates = [
            line[5:]
            for line in data.splitlines()
            if line.startswith(b"data:") and _USAGE_MARK in line
        ]
    found = None
    for candidate in candidates:
        try:
            found = _usage_of(json.loads(candidate)) or found
        except ValueError:
            continue
    return found


def _last_event_end(buf: bytes) -> int:
    """End of the last complete SSE event in ``buf`` (0 if none)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class _DeadlineExceeded(Exception):
    pass


class _Retry(Exception):
    """The engine failed before a byte reached the client: try another (or answer this)."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


_TIMEOUTS = (asyncio.TimeoutError, _DeadlineExceeded)  # aiohttp's timeouts subclass the first
_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, _DeadlineExceeded)


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` if the client left before sending all of it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class _ClientWatch:
    """Waits for the client to disconnect and then calls ``on_gone`` (once).

    One small task per streaming request: it is how a stream notices a client that left
    while the engine is silent (during prefill, or between tokens).
    """

    __slots__ = ("_task", "gone", "on_gone")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.on_gone: Callable[[], None] | None = None
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        message: Message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
        self.gone = True
        if self.on_gone is not None:
            self.on_gone()

    def stop(self) -> None:
        self._task.cancel()


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

    It is also the ASGI app of the proxied routes (``await gateway(scope, receive, send)``).

    Args:
        worker_urls: engine base URLs (``http://host:port``), all serving the same model.
        policy: a policy name (``None``: ``cacheroute.DEFAULT_POLICY``) or a policy object
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
        keepalive_timeout: seconds an idle upstream connection is kept for reuse; keep it
            below the engines' own keep-alive timeout (uvicorn's default is 5 s).
        tokenizer: ``None`` (route on text), ``"fake"``, a ``tokenizer.json`` path, or a
            :class:`Tokenizer`: requests then route on token ids (see :class:`Tokenizer`).
        kv_events: ``{worker url: (PUB endpoint, replay endpoint or None)}`` of the engines
            that publish KV events (an endpoint string alone: no replay). The gateway then
            builds a :class:`cacheroute.events.KVEventIndex`, subscribes to each in its
            lifespan, and passes ``index=`` to the policy, which must be prefix-aware
            (given by name). Workers without an entry fall back to the routed history.
        index_mode: ``"precise"`` or ``"hybrid"`` (the policy's default when ``None``).
        kv_block_size: the engines' KV block size (each ``BlockStored`` carries its own).
        kv_topic: the engines' ZMQ topic.
        metrics: serve ``GET /metrics`` (needs ``prometheus_client``, the metrics extra).
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
        keepalive_timeout: float = 4.0,
        tokenizer: Tokenizer | str | None = None,
        kv_events: Mapping[str, str | tuple[str, str | None]] | None = None,
        index_mode: str | None = None,
        kv_block_size: int = 16,
        kv_topic: str = "",
        metrics: bool = True,
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
        self.tokenizer: Tokenizer | None = (
            load_tokenizer(tokenizer)
            if tokenizer is None or isinstance(tokenizer, str)
            else tokenizer
        )
        self._feeds = self._check_feeds(kv_events or {})
        self.index: Any = None
        """The :class:`cacheroute.events.KVEventIndex` (``None`` without ``kv_events``)."""
        if isinstance(policy, LoadBalancingPolicy):
            if policy_config:
                raise ValueError("policy_config is only for a policy given by name")
            if self._feeds:
                raise ValueError(
                    "kv_events needs a policy given by name (the gateway passes it index=); "
                    "for a policy object, build the KVEventIndex and pass it yourself"
                )
            self.policy, self._owns_policy = policy, False
        else:
            name = policy or DEFAULT_POLICY
            config = dict(policy_config or {})
            if self._feeds:
                if "index" not in inspect.signature(policy_class(name)).parameters:
                    raise ValueError(
                        f"policy {name!r} does not read a KV-event index; KV events need a "
                        "prefix-aware policy (e.g. cache_aware)"
                    )
                from cacheroute.events import KVEventIndex

                self.index = KVEventIndex(block_size=kv_block_size)
                config["index"] = self.index
                if index_mode is not None:
                    config["index_mode"] = index_mode
            elif index_mode is not None:
                raise ValueError("index_mode needs kv_events (the engines' event endpoints)")
            try:
                self.policy = make_policy(name, **config)
            except BaseException:
                if self.index is not None:
                    self.index.close()
                raise
            self._owns_policy = True
        self.kv_topic = kv_topic
        # Policies with per-worker state (cache_aware's tree tenants) learn the pool here.
        self.policy.sync_workers(self.workers)
        self._route = bool(getattr(self.policy, "needs_request_text", True))
        self.metrics: Any = None
        """The :class:`cacheroute.metrics.RouterMetrics` behind ``/metrics`` (``None`` when
        disabled or ``prometheus_client`` is missing)."""
        if metrics and RouterMetrics is not None:
            self.metrics = RouterMetrics(CollectorRegistry(), policy=self.policy.name)
            self.metrics.track_workers(self.workers)
            self.metrics.track_policy(self.policy)
            if self.index is not None:
                self.metrics.track_index(self.index)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.request_timeout = request_timeout
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self.max_failures = max_failures
        self.max_retries = max_retries
        self.max_connections = max_connections
        self.keepalive_timeout = keepalive_timeout
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
        self._session: aiohttp.ClientSession | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._last_recheck = float("-inf")

    def _check_feeds(
        self, kv_events: Mapping[str, str | tuple[str, str | None]]
    ) -> dict[str, tuple[str, str | None]]:
        feeds: dict[str, tuple[str, str | None]] = {}
        for raw_url, feed in kv_events.items():
            url = raw_url.rstrip("/")
            if url not in self._by_url:
                raise ValueError(f"kv_events names {raw_url!r}, which is not a worker")
            endpoint, replay = (feed, None) if isinstance(feed, str) else feed
            for addr in (endpoint, replay):
                if addr is not None and "://" not in addr:
                    raise ValueError(f"KV-event endpoint must look like tcp://host:port: {addr!r}")
            feeds[url] = (endpoint, replay)
        return feeds

    def _subscribe(self) -> None:
        """Follow every engine's KV events (background threads of the index)."""
        for url, (endpoint, replay) in self._feeds.items():
            self.index.subscribe(url, endpoint, replay=replay, topic=self.kv_topic)
            log.info("following KV events of %s at %s (replay: %s)", url, endpoint, replay)

    # -- lifecycle ----------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Open the upstream client, check health once, run the health loop, clean up."""
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, keepalive_timeout=self.keepalive_timeout
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.connect_timeout,
            sock_read=min(self.read_timeout, self.request_timeout),
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,  # relay bytes as they are
            # Send the client's headers only: none of aiohttp's own defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        async with session:
            self._session = session
            task: asyncio.Task[None] | None = None
            try:
                if self.index is not None:
                    self._subscribe()
                await self.check_health()  # so engines that are down never get a request
                if self.health_check_interval > 0:
                    task = asyncio.create_task(self._health_loop())
                yield
            finally:
                if task is not None:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                if self._owns_policy:
                    self.policy.close()
                if self.index is not None:
                    # Stops and joins the subscriber threads (each within one 50 ms poll).
                    await asyncio.to_thread(self.index.close)
                self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the gateway is not running (use it inside the app lifespan)")
        return self._session

    # -- health -------------------------------------------------------------------------

    def _set_health(self, worker: BasicWorker, healthy: bool, why: str) -> None:
        if healthy != worker.is_healthy():
            log.warning("engine %s is %s (%s)", worker.url, "back" if healthy else "down", why)
            worker.set_healthy(healthy)
        if healthy:
            self.worker_stats[worker.url].consecutive_failures = 0

    async def check_health(self) -> None:
        """One round of ``GET /health`` on every engine, concurrently."""
        timeout = aiohttp.ClientTimeout(total=self.health_check_timeout)

        async def check(worker: BasicWorker) -> None:
            try:
                async with self.session.get(worker.url + "/health", timeout=timeout) as r:
                    await r.read()
                    ok, why = r.status == 200, f"health check: HTTP {r.status}"
            except _UPSTREAM_ERRORS as exc:
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
        """Policy, per-engine health/load/processed/outcomes, gateway counters, and (with KV
        events) the index's counters per engine."""
        out = {
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
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.name
        if self.index is not None:
            out["kv_events"] = {url: asdict(ws) for url, ws in self.index.stats().items()}
        return out

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of :attr:`metrics` (read at call time)."""
        out: bytes = generate_latest(self.metrics.registry)
        return out

    def _record_usage(self, worker: Worker, usage: tuple[int, int] | None) -> None:
        if usage is not None and self.metrics is not None:
            self.metrics.record_engine_usage(worker.url, usage[0], usage[1])

    # -- tokens -------------------------------------------------------------------------

    def tokenize(
        self, path: str, body: dict[str, Any], raw: bytes, text: RoutingText
    ) -> tuple[bytes, RoutingText]:
        """With a tokenizer: the body to forward and the token ids to route on.

        Chat: routed on :meth:`Tokenizer.chat_ids`, forwarded as it came. Completions with
        one text prompt: routed on its ids and forwarded with ``prompt`` replaced by them
        (the rest of the body as parsed). Anything else (token ids already, a batch of
        prompts) is left as it is.

        Raises:
            BadRequest: the tokenizer failed on the text.
        """
        tokenizer = self.tokenizer
        if tokenizer is None or text is None:
            return raw, text
        try:
            if path.endswith("/chat/completions"):
                return raw, tokenizer.chat_ids(body) or None
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return raw, text
            ids = tokenizer.encode(prompt)
        except Exception as exc:  # e.g. a lone surrogate the tokenizer refuses
            raise BadRequest(f"the prompt could not be tokenized: {exc}", "prompt") from None
        forwarded = json.dumps({**body, "prompt": ids}, separators=(",", ":")).encode()
        return forwarded, ids or None

    # -- proxying -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of ``/v1/completions`` and ``/v1/chat/completions``."""
        response = await self.proxy(scope, receive)
        await response(scope, receive, send)

    async def proxy(self, scope: Scope, receive: Receive) -> Response | _LeasedStream:
        """Route one completions or chat request to an engine; the response relays it."""
        self.counters["requests"] += 1
        raw = await _read_body(receive)
        if raw is None:  # the client left before its request was complete
            self.counters["client_disconnects"] += 1
            return Response(status_code=499)
        path = scope["path"]
        try:
            body, text = parse_request(path, raw, route=self._route)
            raw, text = self.tokenize(path, body, raw, text)
        except BadRequest as exc:
            self.counters["bad_requests"] += 1
            return _error(400, "invalid_request_error", exc.message, exc.param)
        query = scope.get("query_string", b"")
        if query:
            path += "?" + query.decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in _HOP_BY_HOP_BYTES
        ]
        headers.append(("accept-encoding", "identity"))  # relay bytes as they are
        stream = bool(body.get("stream"))
        deadline = asyncio.get_running_loop().time() + self.request_timeout

        # A stream notices a client that leaves at once, even while the engine is silent.
        watch = _ClientWatch(receive) if stream else None
        response: Response | _LeasedStream | None = None
        tried: list[Worker] = []  # engines that failed this request, in order
        try:
            while True:
                sent = await self._send(path, raw, headers, text, tried, response)
                if isinstance(sent, Response):
                    return sent
                lease, upstream = sent
                if watch is not None:
                    watch.on_gone = upstream.close  # the relay then stops at once
                    if watch.gone:
                        upstream.close()
                # From here the lease and the open upstream response have one owner at a time.
                try:
                    if upstream.status >= 400:
                        response = await self._relay_error(lease, upstream, deadline)
                        return response
                    ctype = upstream.headers.get("content-type", "")
                    if watch is None or not ctype.startswith("text/event-stream"):
                        # Not a stream (whatever was asked for): relayed whole.
                        response = await self._relay_whole(lease, upstream, deadline)
                        return response
                    response = await self._start_stream(lease, upstream, deadline, watch)
                    return response
                except _Retry as retry:  # cut before anything reached the client
                    response = retry.response
                    tried.append(lease.worker)
                    if len(tried) > self.max_retries or (watch is not None and watch.gone):
                        return response
                except BaseException:
                    lease.release(success=False)
                    upstream.close()
                    raise
        finally:
            if watch is not None and not isinstance(response, _LeasedStream):
                watch.stop()  # no stream to watch over: the stream owns the watch otherwise

    async def _send(
        self,
        path: str,
        raw: bytes,
        headers: list[tuple[str, str]],
        text: RoutingText,
        tried: list[Worker],
        error: Response | None,
    ) -> tuple[Lease, aiohttp.ClientResponse] | Response:
        """Take a lease and send the request; (lease, response with headers) or an error.

        A request that cannot have reached its engine (or whose engine failed before a
        byte reached the client: ``error`` is then that failure) is retried on the engines
        not in ``tried`` (the policy chooses among those only), ``max_retries`` times at
        most in all; with no engine left, the last error stands.
        """
        while True:
            candidates = [w for w in self.workers if w not in tried] if tried else self.workers
            try:
                lease = acquire(self.policy, candidates, text)
            except NoHealthyWorkerError as exc:
                if error is not None:  # no other engine to try
                    return error
                await self.recheck_health()
                try:
                    lease = acquire(self.policy, candidates, text)
                except NoHealthyWorkerError:
                    self.counters["no_healthy_worker"] += 1
                    return _error(503, "no_healthy_worker", str(exc))
            if error is not None:
                self.counters["retries"] += 1
            if self.metrics is not None and lease.decision is not None:
                self.metrics.observe(lease.decision)
            worker = lease.worker
            self.worker_stats[worker.url].routed += 1
            try:
                upstream = await self.session.request(
                    "POST", worker.url + path, data=raw, headers=headers
                )
            except _UPSTREAM_ERRORS as exc:
                # Nothing has reached the client yet, so another engine may still serve it.
                lease.release(success=False)
                timeout = isinstance(exc, asyncio.TimeoutError)
                status, kind = (504, "upstream_timeout") if timeout else (502, "upstream_error")
                error = _error(status, kind, f"engine {worker.url}: {exc!r}")
                tried.append(worker)
                if not self._send_failed(worker, exc) or len(tried) > self.max_retries:
                    return error
                continue
            except BaseException:
                lease.release(success=False)
                raise
            return lease, upstream

    def _send_failed(self, worker: Worker, exc: BaseException) -> bool:
        """Record a failure to get response headers; return whether to try another engine."""
        if isinstance(exc, aiohttp.ClientConnectorError):  # nobody listening: down for sure
            self._set_health(self._by_url[worker.url], False, f"connect failed: {exc!r}")
        timeout = isinstance(exc, asyncio.TimeoutError)
        self.record(worker, "timeout" if timeout else "error", repr(exc))
        # A read timeout may mean the engine is working on it: do not run it twice.
        return not timeout or isinstance(exc, aiohttp.ConnectionTimeoutError)

    async def _read(self, upstream: aiohttp.ClientResponse, deadline: float) -> bytes:
        """The next bytes of the engine's answer (``b""`` at its end)."""
        chunk = await upstream.content.readany()
        if chunk and asyncio.get_running_loop().time() > deadline:
            raise _DeadlineExceeded
        return chunk

    async def _first_bytes(
        self, lease: Lease, upstream: aiohttp.ClientResponse, deadline: float
    ) -> bytes:
        """The first bytes of a successful answer, streamed or whole.

        **The first upstream byte arrives here and nowhere else** (for a stream, it is the
        time to first token): whatever must happen at that moment goes in this method.
        The lease learns that prefill is over, so its work on the engine moves from
        pending prefill to decode (what work-aware policies read).
        """
        chunk = await self._read(upstream, deadline)
        if chunk:
            lease.first_token()
        return chunk

    async def _relay_error(
        self, lease: Lease, upstream: aiohttp.ClientResponse, deadline: float
    ) -> Response:
        """An engine answered 4xx/5xx: 4xx is passed through, 5xx becomes a 502."""
        status, worker = upstream.status, lease.worker
        chunks = []
        try:
            while chunk := await self._read(upstream, deadline):
                chunks.append(chunk)
        except _UPSTREAM_ERRORS:
            pass
        finally:
            upstream.close()
        content = b"".join(chunks)
        if status < 500:  # the request's fault, not the engine's
            lease.release(success=True)
            self.record(worker, "rejected")
            return Response(content, status, headers=_response_headers(upstream, worker))
        lease.release(success=False)
        detail = content[:200].decode(errors="replace")
        self.record(worker, "error", f"HTTP {status}")
        return _error(502, "upstream_error", f"engine {worker.url} returned {status}: {detail}")

    def _failed(self, lease: Lease, exc: BaseException, what: str) -> Response:
        """Release and count a failure before anything reached the client.

        A timeout is a 504 JSON error (the engine may still be working: not retried).
        Any other failure raises :class:`_Retry` with a 502 JSON error: the engine is gone
        or broke the answer, nothing reached the client, so another engine may serve it.
        """
        worker = lease.worker
        lease.release(success=False)
        if isinstance(exc, _TIMEOUTS):
            self.record(worker, "timeout", repr(exc))
            return _error(504, "upstream_timeout", f"engine {worker.url} timed out {what}")
        self.record(worker, "error", repr(exc))
        raise _Retry(_error(502, "upstream_error", f"engine {worker.url} failed {what}: {exc!r}"))

    async def _relay_whole(
        self, lease: Lease, upstream: aiohttp.ClientResponse, deadline: float
    ) -> Response:
        """Read the whole answer, then relay it; a cut answer is a clean 502 (or 504)."""
        try:
            chunks = [await self._first_bytes(lease, upstream, deadline)]
            while chunks[-1]:
                chunks.append(await self._read(upstream, deadline))
        except _UPSTREAM_ERRORS as exc:
            upstream.close()
            return self._failed(lease, exc, "before its answer was complete")
        upstream.release()  # read to the end: the connection goes back to the pool
        lease.release(success=True)
        self.record(lease.worker, "completed")
        content = b"".join(chunks)
        if self.metrics is not None:
            usage = _header_usage(upstream.headers) or _body_usage(content)
            self._record_usage(lease.worker, usage)
        headers = _response_headers(upstream, lease.worker)
        return Response(content, upstream.status, headers=headers)

    async def _start_stream(
        self,
        lease: Lease,
        upstream: aiohttp.ClientResponse,
        deadline: float,
        watch: _ClientWatch,
    ) -> Response | _LeasedStream:
        """Read up to the first whole SSE event; only then is the stream's 200 committed."""
        try:
            head = await self._first_bytes(lease, upstream, deadline)
            while head and not _last_event_end(head):
                chunk = await self._read(upstream, deadline)
                if not chunk:
                    break
                head += chunk
        except _UPSTREAM_ERRORS as exc:
            upstream.close()
            if watch.gone:
                lease.release(success=False)
                self.record(lease.worker, "client_disconnect")
                return Response(status_code=499)
            return self._failed(lease, exc, "before its first event")
        return _LeasedStream(self, lease, upstream, head, deadline, watch)


def _response_headers(upstream: aiohttp.ClientResponse, worker: Worker) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_RELAYED}
    headers["x-cacheroute-worker"] = worker.url
    return headers


class _LeasedStream:
    """Relays an engine's SSE stream to the client and owns the request's lease until it ends.

    An ASGI response of its own (no task group per stream). The lease is released in
    :meth:`__call__`'s ``finally``, which runs however the response ends: the last byte
    relayed, the engine failing, a timeout, the client going away (the watch then closes
    the upstream response, which ends the relay at once), or the task being cancelled.
    Only whole events are forwarded, so an error event never lands mid-line.
    """

    def __init__(
        self,
        gateway: Gateway,
        lease: Lease,
        upstream: aiohttp.ClientResponse,
        head: bytes,
        deadline: float,
        watch: _ClientWatch,
    ) -> None:
        self._gateway = gateway
        self._lease = lease
        self._upstream = upstream
        self._head = head
        self._deadline = deadline
        self._watch = watch
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.items()
            if k.lower() not in _NOT_RELAYED
        ]
        if not any(k == b"cache-control" for k, _ in headers):
            headers.append((b"cache-control", b"no-cache"))
        headers.append((b"x-cacheroute-worker", lease.worker.url.encode("latin-1")))
        self.status_code = upstream.status
        self.raw_headers = headers
        # What the engine reports it had cached: its headers, else the stream's usage event.
        self._usage = _header_usage(upstream.headers) if gateway.metrics is not None else None
        self._scan = gateway.metrics is not None and self._usage is None

    def _scan_usage(self, events: bytes) -> None:
        usage = _body_usage(events)
        if usage is not None:
            self._usage = usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway, lease, upstream, watch = self._gateway, self._lease, self._upstream, self._watch
        outcome, detail, tail = "client_disconnect", "", b""
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            pending = self._head
            try:
                while True:
                    end = _last_event_end(pending)
                    if end and self._scan:
                        self._scan_usage(pending[:end])
                    if end == len(pending):
                        await send({"type": "http.response.body", "body": pending,
                                    "more_body": True})  # fmt: skip
                        pending = b""
                    elif end:
                        await send({"type": "http.response.body", "body": pending[:end],
                                    "more_body": True})  # fmt: skip
                        pending = pending[end:]
                    chunk = await gateway._read(upstream, self._deadline)
                    if not chunk:
                        break
                    pending += chunk
                outcome, tail = "completed", pending  # an unterminated last event, as sent
            except _TIMEOUTS as exc:
                if not watch.gone:
                    outcome, detail = "timeout", repr(exc)
                    url = lease.worker.url
                    tail = _sse_error(504, "upstream_timeout", f"engine {url} timed out mid-stream")
            except aiohttp.ClientError as exc:
                if not watch.gone:
                    outcome, detail = "error", repr(exc)
                    tail = _sse_error(
                        502, "upstream_error",
                        f"engine {lease.worker.url} failed mid-stream: {exc!r}",
                    )  # fmt: skip
        finally:
            # Release first and synchronously: nothing below can stop the load coming back.
            watch.stop()
            lease.release(success=outcome == "completed")
            gateway.record(lease.worker, outcome, detail)
            # The engine's report holds however the stream ended (a client that leaves
            # right after [DONE] included): its prefill was served from what it had cached.
            gateway._record_usage(lease.worker, self._usage)
            # Closing the upstream connection is how the engine learns to stop generating;
            # a stream read to its end goes back to the pool.
            if outcome == "completed":
                upstream.release()
            else:
                upstream.close()
        if outcome != "client_disconnect":
            await send({"type": "http.response.body", "body": tail, "more_body": False})


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
                    async with gateway.session.get(worker.url + "/v1/models") as r:
                        content, status = await r.read(), r.status
                except _UPSTREAM_ERRORS:
                    continue
                return Response(content, status, media_type="application/json")
        return _error(503, "no_healthy_worker", "no healthy engine to list models")

    async def metrics(request: Request) -> Response:
        if gateway.metrics is None:
            why = (
                "metrics are disabled" if RouterMetrics is not None
                else "metrics need prometheus_client: pip install prometheus_client"
            )  # fmt: skip
            return Response(why + "\n", 404, media_type="text/plain")
        # Read off the event loop: tree sizes and index counters take their own locks.
        text = await asyncio.to_thread(gateway.metrics_text)
        return Response(text, 200, headers={"content-type": CONTENT_TYPE_LATEST})

    app = Starlette(
        routes=[
            Route("/v1/completions", gateway, methods=["POST"]),
            Route("/v1/chat/completions", gateway, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
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


def parse_worker_events(
    workers: Sequence[str], events: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """``--worker-events`` values, matched to ``--worker`` values by position.

    Each value is ``PUB``, ``PUB,REPLAY`` (ZMQ addresses, e.g.
    ``tcp://10.0.0.1:5557,tcp://10.0.0.1:5558``) or ``none`` (that engine publishes
    nothing). Give one per ``--worker``, in the same order, or none at all.

    >>> parse_worker_events(["http://a", "http://b"], ["tcp://a:5557,tcp://a:5558", "none"])
    {'http://a': ('tcp://a:5557', 'tcp://a:5558')}

    Raises:
        ValueError: not one value per worker, or a malformed value.
    """
    if not events:
        return {}
    if len(events) != len(workers):
        raise ValueError(
            f"give one --worker-events per --worker, in the same order (or 'none'): "
            f"got {len(events)} for {len(workers)} workers"
        )
    out: dict[str, tuple[str, str | None]] = {}
    for url, value in zip(workers, events, strict=True):
        if value.strip().lower() == "none":
            continue
        parts = [part.strip() for part in value.split(",")]
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"--worker-events must be PUB[,REPLAY] or none, got {value!r}")
        out[url.rstrip("/")] = (parts[0], parts[1] if len(parts) == 2 else None)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of :func:`main`."""
    p = argparse.ArgumentParser(
        description="OpenAI-compatible streaming gateway routed by cacheroute."
    )
    p.add_argument("--worker", action="append", required=True, metavar="URL",
                   help="engine base URL; repeat for each engine")  # fmt: skip
    p.add_argument("--policy", default=None,
                   help=f"routing policy (default: {DEFAULT_POLICY})")  # fmt: skip
    p.add_argument("--policy-arg", action="append", type=_policy_arg, default=[],
                   metavar="KEY=VALUE", help="policy config, e.g. cache_threshold=0.5")  # fmt: skip
    p.add_argument("--tokenizer", metavar="fake|PATH",
                   help="route on token ids: 'fake' (fake_engine.py's tokenizer) or a local "
                        "tokenizer.json (needs the tokenizers package); completions text "
                        "prompts are then forwarded as ids")  # fmt: skip
    p.add_argument("--worker-events", action="append", default=[], metavar="PUB[,REPLAY]",
                   help="the KV-event ZMQ endpoints of each --worker, in the same order "
                        "('none' for an engine without events): precise mode")  # fmt: skip
    p.add_argument("--index-mode", choices=("precise", "hybrid"), default=None,
                   help="how the engines' reports combine with the routed history "
                        "(default: the policy's, hybrid)")  # fmt: skip
    p.add_argument("--kv-block-size", type=int, default=16,
                   help="the engines' KV block size in tokens")  # fmt: skip
    p.add_argument("--kv-events-topic", default="", help="the engines' KV-event topic")
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
    p.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                   help="event loop (auto: uvloop when installed)")  # fmt: skip
    p.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                   help="HTTP parser of the server (auto: httptools when installed)")  # fmt: skip
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run the gateway (see ``--help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        kv_events = parse_worker_events(args.worker, args.worker_events)
        tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, TokenizerError) as exc:
        parser.error(str(exc))
    if args.index_mode is not None and not kv_events:
        parser.error("--index-mode needs --worker-events (the engines' KV-event endpoints)")
    if kv_events and tokenizer is None:
        log.warning(
            "KV events without --tokenizer: only requests that send token ids are matched on "
            "the engines' reports; text requests use the routed history"
        )
    try:
        app = create_app(
            args.worker,
            args.policy,
            policy_config=dict(args.policy_arg),
            tokenizer=tokenizer,
            kv_events=kv_events,
            index_mode=args.index_mode,
            kv_block_size=args.kv_block_size,
            kv_topic=args.kv_events_topic,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
            request_timeout=args.request_timeout,
            health_check_interval=args.health_check_interval,
            health_check_timeout=args.health_check_timeout,
            max_failures=args.max_failures,
            max_retries=args.max_retries,
        )
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    gateway: Gateway = app.state.gateway
    log.info("routing with %r over %s", gateway.policy.name, [w.url for w in gateway.workers])
    if gateway.tokenizer is not None:
        log.info("routing on token ids (tokenizer: %s)", gateway.tokenizer.name)
    if gateway.index is not None:
        mode = getattr(gateway.policy, "config", None)
        log.info("precise mode (%s) over KV events of %s", getattr(mode, "index_mode", "?"),
                 sorted(kv_events))  # fmt: skip
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        loop=args.loop,
        http=args.http,
        access_log=False,  # a line per request costs more CPU than the routing
    )


if __name__ == "__main__":
    main()
