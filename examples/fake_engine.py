"""A small OpenAI-compatible engine stand-in with a real prefix cache (no GPU, no model).

It behaves like an SGLang or vLLM replica where it matters for routing:

* **Tokens.** :func:`token_ids` is the engine's tokenizer: a text is cut into 4-character
  pieces and each piece becomes a deterministic id (the same in every process, so a gateway
  that imports it, ``examples/gateway.py --tokenizer fake``, computes exactly the engine's
  ids). Token-id prompts are used as they are. Chat requests go through
  :func:`chat_prompt`, a minimal chat template, first.
* **Prefix cache.** Token ids are grouped into blocks of 16, and each block is keyed by a
  hash chained over every block before it (the vLLM automatic-prefix-cache scheme). A
  prompt's cached tokens are its leading blocks already in the cache. The cache is an LRU of
  at most ``cache_blocks`` blocks.
* **KV events** (off by default). With ``--kv-events-endpoint`` the engine publishes every
  change of its cache in vLLM's wire format through
  :class:`cacheroute.events.KVEventPublisher`: ``BlockStored`` (hashes, parent hash, token
  ids, block size) when a prefill caches new blocks, ``BlockRemoved`` when the LRU evicts
  them, ``AllBlocksCleared`` on ``POST /reset_prefix_cache``. With
  ``--kv-events-replay-endpoint`` it answers replay requests from its last 10,000 batches.
  Sequence numbers start at 0 in every process, so a restart shows as the sequence going
  down. ``GET /kv_events`` says where it publishes. ``--kv-events-drop-seq N`` (a test
  knob) keeps batch ``N`` off the PUB socket but in the replay buffer, as a message lost on
  the wire.
* **Time to first token** grows with the *uncached* part of the prompt: prefill costs
  ``prefill_ms_per_token`` per uncached token and prefills run one at a time (one compute
  stream), so cache misses also delay the requests queued behind them.
* **Decoding** streams ``max_tokens`` tokens, one every ``decode_ms_per_token``; decodes of
  different requests run concurrently (continuous batching).

Every response says which engine served it and how much of the prompt was cached: the
``x-engine-id``, ``x-prompt-tokens`` and ``x-cached-tokens`` headers, and
``usage.prompt_tokens_details.cached_tokens`` in the body (in the last stream chunk when the
request sets ``stream_options.include_usage``). ``GET /stats`` returns the engine's totals.

Run one::

    python examples/fake_engine.py --port 8001 --name engine-1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from cacheroute.events import KVEvent, KVEventPublisher

__all__ = [
    "BLOCK_TOKENS",
    "VOCAB_SIZE",
    "EngineConfig",
    "PrefixCache",
    "chat_prompt",
    "create_app",
    "main",
    "token_ids",
    "tokenize",
]

CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16
VOCAB_SIZE = 1 << 20
"""Ids of :func:`token_ids` are below this (and so below 0x110000, the KV-event index's
limit; real vocabularies are smaller still)."""
_WORDS = ("the", "cache", "router", "sends", "each", "prefix", "home", "and", "tokens", "flow")


def token_ids(text: str) -> list[int]:
    """The fake engine's tokenizer: one id per 4-character piece of ``text``.

    Deterministic across processes and Python versions (CRC-32 of the piece's UTF-8, below
    :data:`VOCAB_SIZE`), so a gateway that imports this function routes on exactly the ids
    the engine caches and reports in its KV events. Two pieces may share an id, as two
    strings may share a hash: harmless for a stand-in.

    >>> token_ids("abcdabcdxy")
    [183569, 183569, 403609]
    """
    mask = VOCAB_SIZE - 1
    crc = zlib.crc32
    return [
        crc(text[i : i + CHARS_PER_TOKEN].encode("utf-8", "surrogatepass")) & mask
        for i in range(0, len(text), CHARS_PER_TOKEN)
    ]


def tokenize(prompt: str | Sequence[int]) -> list[int]:
    """The tokens of a prompt: :func:`token_ids` of a text, or the ids of a token-id prompt."""
    if isinstance(prompt, str):
        return token_ids(prompt)
    return list(prompt)


class PrefixCache:
    """An LRU-bounded prefix cache of token blocks keyed by chained hashes.

    A block's key covers it and every block before it, and eviction takes the least
    recently used block first; a prompt's head is always touched after its tail, so a
    block is never evicted before a block that extends it (what the cache holds of a chain
    is always a prefix of it, as in vLLM, whose freed blocks are evicted tail first).

    Not thread-safe: the engine only touches it from its event loop.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    @staticmethod
    def block_keys(tokens: Sequence[int]) -> list[int]:
        """One key per *full* block; each key covers the block and everything before it."""
        keys: list[int] = []
        key = 0
        for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            key = hash((key, tuple(tokens[start : start + BLOCK_TOKENS])))
            keys.append(key)
        return keys

    def match(self, keys: Sequence[int]) -> int:
        """The number of leading blocks of ``keys`` that are cached."""
        n = 0
        for key in keys:
            if key not in self._blocks:
                break
            n += 1
        return n

    def insert(self, keys: Sequence[int]) -> tuple[int, list[int]]:
        """Cache (or refresh) every block of a prompt that was just prefilled.

        Returns ``(already, evicted)``: how many leading blocks of ``keys`` were cached
        before (the new blocks are ``keys[already:]``), and the keys evicted to make room,
        in eviction order (possibly some of this prompt's own tail, if it is longer than
        the cache).
        """
        already = self.match(keys)
        # Touch the last block first so a prompt's head is the most recently used:
        # eviction then drops tails before the shared prefixes everything depends on.
        for key in reversed(keys):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        evicted = []
        while len(self._blocks) > self.capacity_blocks:
            evicted.append(self._blocks.popitem(last=False)[0])
        return already, evicted

    def clear(self) -> int:
        """Drop every block (``/reset_prefix_cache``); returns how many were held."""
        n = len(self._blocks)
        self._blocks.clear()
        return n


@dataclass
class EngineConfig:
    """Timing and cache settings of one fake engine."""

    name: str = "engine"
    prefill_ms_per_token: float = 0.5
    """Prefill cost per uncached prompt token (2,000 uncached tokens: 1 s)."""
    decode_ms_per_token: float = 20.0
    """Time between streamed tokens."""
    base_latency_ms: float = 2.0
    """Fixed scheduling overhead per request."""
    default_max_tokens: int = 16
    cache_blocks: int = 1024
    """Prefix-cache capacity in blocks of 16 tokens (1024 blocks: 16,384 tokens, so a
    handful of long system prompts fill it, as they fill a real engine's KV cache)."""
    kv_events_endpoint: str | None = None
    """ZMQ PUB address to publish KV events on (``tcp://127.0.0.1:5557``; port ``*``: any
    free port, see ``GET /kv_events``); ``None``: no events."""
    kv_events_replay_endpoint: str | None = None
    """ZMQ ROUTER address answering replay requests; ``None``: no replay."""
    kv_events_topic: str = ""
    kv_events_drop_seq: frozenset[int] = field(default_factory=frozenset)
    """Sequence numbers of batches kept off the PUB socket (still replayable): a test knob
    that loses a message on the wire on purpose."""


class _Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.cache = PrefixCache(config.cache_blocks)
        self.prefill_lock = asyncio.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.running = 0
        self.batches_published = 0
        self.batches_dropped = 0
        self.publisher: KVEventPublisher | None = None
        if config.kv_events_endpoint is not None:
            from cacheroute.events import KVEventPublisher

            self.publisher = KVEventPublisher(
                config.kv_events_endpoint,
                config.kv_events_replay_endpoint,
                topic=config.kv_events_topic,
            )

    def lookup(self, prompt: str | Sequence[int]) -> tuple[list[int], list[int], int]:
        """(tokens, block keys, cached tokens) of a prompt."""
        tokens = tokenize(prompt)
        keys = PrefixCache.block_keys(tokens)
        cached = min(self.cache.match(keys) * BLOCK_TOKENS, len(tokens))
        return tokens, keys, cached

    async def prefill(self, tokens: list[int], keys: list[int], cached: int) -> None:
        cfg = self.config
        await asyncio.sleep(cfg.base_latency_ms / 1000)
        async with self.prefill_lock:
            await asyncio.sleep((len(tokens) - cached) * cfg.prefill_ms_per_token / 1000)
            already, evicted = self.cache.insert(keys)
            self._publish_changes(tokens, keys, already, evicted)

    def _publish_changes(
        self, tokens: list[int], keys: list[int], already: int, evicted: list[int]
    ) -> None:
        """One batch per cache change, as vLLM publishes one per scheduler step."""
        if self.publisher is None:
            return
        from cacheroute.events import BlockRemoved, BlockStored

        events: list[KVEvent] = []
        if already < len(keys):  # blocks already cached were stored (and published) before
            events.append(
                BlockStored(
                    block_hashes=keys[already:],
                    parent_block_hash=keys[already - 1] if already else None,
                    token_ids=tokens[already * BLOCK_TOKENS : len(keys) * BLOCK_TOKENS],
                    block_size=BLOCK_TOKENS,
                    medium="GPU",
                )
            )
        if evicted:
            events.append(BlockRemoved(evicted, medium="GPU"))
        self.publish(events)

    def publish(self, events: Iterable[KVEvent]) -> None:
        events = list(events)
        if self.publisher is None or not events:
            return
        drop = self.publisher.next_seq in self.config.kv_events_drop_seq
        self.publisher.publish(events, send=not drop)
        self.batches_published += 1
        self.batches_dropped += drop

    def reset_prefix_cache(self) -> int:
        from cacheroute.events import AllBlocksCleared

        n = self.cache.clear()
        self.publish([AllBlocksCleared()])
        return n

    def kv_events(self) -> dict[str, Any]:
        pub = self.publisher
        return {
            "enabled": pub is not None,
            "endpoint": pub.endpoint if pub else None,
            "replay_endpoint": pub.replay_endpoint if pub else None,
            "topic": self.config.kv_events_topic,
            "block_size": BLOCK_TOKENS,
            "next_seq": pub.next_seq if pub else None,
            "batches_published": self.batches_published,
            "batches_dropped": self.batches_dropped,
        }

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()

    def stats(self) -> dict[str, Any]:
        return {
            "engine": self.config.name,
            "requests": self.requests,
            "running": self.running,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_hit_rate": self.cached_tokens / self.prompt_tokens
            if self.prompt_tokens
            else 0.0,
            "cache_blocks": len(self.cache),
        }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}},
        status_code=status,
    )


def chat_prompt(messages: Sequence[Any]) -> str:
    r"""A minimal chat template: every message in order, then the assistant's turn.

    Each message is ``<|{role}|>\n{content}\n`` (text content parts joined, other parts
    left out), and the prompt ends with ``<|assistant|>\n``. Tools and tool calls are not
    part of it.

    >>> chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    '<|system|>\nS\n<|user|>\nQ\n<|assistant|>\n'
    """
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        role = m.get("role", "user") if isinstance(m, dict) else "user"
        parts.append(f"<|{role}|>\n{content or ''}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def create_app(config: EngineConfig | None = None) -> Starlette:
    """Build the engine's ASGI app; ``app.state.engine`` holds its cache and counters.

    With ``config.kv_events_endpoint`` the publisher's sockets are bound here (a port in use
    fails at once) and closed when the app shuts down.
    """
    engine = _Engine(config or EngineConfig())
    cfg = engine.config

    async def completions(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _error(400, "'messages' must be a non-empty list")
            prompt: str | list[int] = chat_prompt(messages)
        else:
            raw = body.get("prompt")
            if isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
                prompt = raw
            elif isinstance(raw, list) and all(isinstance(p, str) for p in raw):
                prompt = "\n".join(raw)
            elif isinstance(raw, str):
                prompt = raw
            else:
                return _error(400, "'prompt' must be a string, strings, or token ids")
        max_tokens = body.get("max_tokens") or cfg.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "'max_tokens' must be a positive integer")
        model = str(body.get("model") or "fake-model")

        tokens, keys, cached = engine.lookup(prompt)
        prompt_tokens = len(tokens)
        engine.requests += 1
        engine.prompt_tokens += prompt_tokens
        engine.cached_tokens += cached
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        headers = {
            "x-engine-id": cfg.name,
            "x-prompt-tokens": str(prompt_tokens),
            "x-cached-tokens": str(cached),
        }
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        words = [_WORDS[(len(keys) + i) % len(_WORDS)] + " " for i in range(max_tokens)]

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish}

        if not body.get("stream"):
            engine.running += 1
            try:
                await engine.prefill(tokens, keys, cached)
                await asyncio.sleep(max_tokens * cfg.decode_ms_per_token / 1000)
            finally:
                engine.running -= 1
            text = "".join(words)
            result = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            result["finish_reason"] = "length"
            return JSONResponse(
                {"id": rid, "object": obj, "created": created, "model": model,
                 "choices": [result], "usage": usage},
                headers=headers,
            )  # fmt: skip

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: dict[str, Any]) -> bytes:
            base = {"id": rid, "object": chunk_obj, "created": created, "model": model}
            return f"data: {json.dumps(base | payload)}\n\n".encode()

        async def stream() -> AsyncIterator[bytes]:
            # Headers go out at once (as real engines do); the first token follows prefill.
            # A client that disconnects cancels this generator, which stops the "decode".
            engine.running += 1
            try:
                await engine.prefill(tokens, keys, cached)
                for i, word in enumerate(words):
                    if i:
                        await asyncio.sleep(cfg.decode_ms_per_token / 1000)
                    yield event({"choices": [choice(word, None, first=i == 0)]})
                yield event({"choices": [choice(None if chat else "", "length")]})
                if include_usage:
                    yield event({"choices": [], "usage": usage})
                yield b"data: [DONE]\n\n"
            finally:
                engine.running -= 1

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "engine": cfg.name})

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "owned_by": cfg.name}],
            }
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def reset_prefix_cache(request: Request) -> Response:
        # vLLM's endpoint of the same name (POST, 200 when done): every block is dropped,
        # and an AllBlocksCleared event says so.
        return JSONResponse({"status": "ok", "blocks_cleared": engine.reset_prefix_cache()})

    async def kv_events(request: Request) -> Response:
        return JSONResponse(engine.kv_events())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.close()

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
            Route("/kv_events", kv_events, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.engine = engine
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Run one fake engine: ``python examples/fake_engine.py --port 8001 --name engine-1``."""
    d = EngineConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--fd", type=int, help="serve on this inherited listening socket instead")
    p.add_argument("--name", default=None, help="engine id reported in responses")
    p.add_argument("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token)
    p.add_argument("--decode-ms-per-token", type=float, default=d.decode_ms_per_token)
    p.add_argument("--base-latency-ms", type=float, default=d.base_latency_ms)
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--cache-blocks", type=int, default=d.cache_blocks)
    p.add_argument(
        "--kv-events-endpoint",
        metavar="ADDR",
        help="publish KV events (vLLM wire format) on this ZMQ PUB address, e.g. "
        "tcp://127.0.0.1:5557 (port *: any free port); off by default",
    )
    p.add_argument(
        "--kv-events-replay-endpoint",
        metavar="ADDR",
        help="answer replay requests on this ZMQ ROUTER address",
    )
    p.add_argument("--kv-events-topic", default="", help="topic frame of every message")
    p.add_argument(
        "--kv-events-drop-seq",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="test knob: keep batch N off the PUB socket (still replayable)",
    )
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    if a.kv_events_replay_endpoint and not a.kv_events_endpoint:
        p.error("--kv-events-replay-endpoint needs --kv-events-endpoint")
    config = EngineConfig(
        name=a.name or f"engine-{a.port}",
        prefill_ms_per_token=a.prefill_ms_per_token,
        decode_ms_per_token=a.decode_ms_per_token,
        base_latency_ms=a.base_latency_ms,
        default_max_tokens=a.default_max_tokens,
        cache_blocks=a.cache_blocks,
        kv_events_endpoint=a.kv_events_endpoint,
        kv_events_replay_endpoint=a.kv_events_replay_endpoint,
        kv_events_topic=a.kv_events_topic,
        kv_events_drop_seq=frozenset(a.kv_events_drop_seq),
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host=a.host, port=a.port, log_level=a.log_level)
    )
    if a.fd is None:
        server.run()
    else:
        sock = socket.socket(fileno=a.fd)  # family and type are read from the fd
        with suppress(KeyboardInterrupt):
            server.run(sockets=[sock])


if __name__ == "__main__":
    main()
