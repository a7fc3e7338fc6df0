"""The Ray Serve router's state and logic, in a module Ray imports instead of pickling.

Ray Serve pickles the module of a request router *by value* (``cloudpickle``'s
``register_pickle_by_value``) and rebuilds it in every process that holds a handle to the
deployment, so module-level state in :mod:`cacheroute.integrations.ray_serve` would be a
fresh copy per unpickling. This module is imported normally (by reference): there is one
copy per process, and everything here is plain Python that needs no Ray, so it is tested
without a cluster.

* :class:`RouterCore`: one router's replicas-as-workers, policy and request ledger. The Ray
  router class delegates every hook to it.
* :func:`prompt_from_call` and :func:`prompt_from_body`: where the prompt is found.
* :func:`routers` and :func:`snapshot`: the live routers of this process, for an ingress
  deployment's ``/stats`` endpoint or a test.
* :func:`process_metrics`: the process-wide :class:`~cacheroute.metrics.RouterMetrics` that
  routers built with ``metrics=True`` report to.

**The ledger.** Ray tells the router about a request in up to three steps, keyed by its
internal request id: ``choose_replicas`` (possibly several times: after a replica rejected
it, or after backoff), ``on_request_routed`` (a replica accepted it; only when Ray's
rejection protocol is on, the default) and ``on_request_completed`` (once per attempt sent to
a replica, rejected attempts included). A fast request can complete before Ray reports it
routed. The core holds one :class:`~cacheroute.Lease` per request:

1. **choose**: the policy decides and the lease is taken on its choice at once, so the next
   decision (Ray decides the queued requests one after another, before any of them is
   reported routed) sees the load; a burst of one prefix would otherwise all see an idle
   cluster and pile onto one replica.
2. **routed** on replica *r*: the lease stays if it is on *r*; if Ray fell back to another
   replica (the chosen one was full), it moves to *r* (and a prefix policy records the
   prompt for *r* too).
3. **completed** on *r*: the lease is given back and the request forgotten. A completion
   that arrives before the request is reported routed gives the lease back too; if the
   request is still waiting for a replica (a rejected attempt: Ray retries it) it is kept
   and the next ``choose`` takes the lease again; a ``routed`` that comes after the
   request's completion is ignored. A completion from a replica other than the one the
   request was routed to (an earlier rejected attempt) is ignored.
4. A request cancelled while waiting for a replica gives its lease back.

Every lease is given back exactly once (the lease guarantees it), so the replicas' load
returns to 0 when the requests are done. The router never sees the first token, so a lease
counts its prefill work until the request completes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import cacheroute
from cacheroute._validation import check_callable, check_int, check_sequence, check_str, fail
from cacheroute.lease import Lease, _checked_decision, acquire
from cacheroute.policies.base import Decision, LoadBalancingPolicy, RequestText
from cacheroute.policies.prefix import PrefixPolicy, TreeKind
from cacheroute.policies.registry import make_policy
from cacheroute.worker import BasicWorker, Worker

if TYPE_CHECKING:
    from cacheroute.events import KVEventIndex
    from cacheroute.metrics import RouterMetrics

__all__ = [
    "KV_EVENTS_STAT",
    "RouterCore",
    "default_policy",
    "kv_events_routing_stats",
    "process_metrics",
    "prompt_from_body",
    "prompt_from_call",
    "routers",
    "snapshot",
]

_log = logging.getLogger("cacheroute.integrations.ray_serve")


KV_EVENTS_STAT = "cacheroute_kv_events"
"""The key of a replica's routing stats that says where its engine publishes KV events
(see :func:`kv_events_routing_stats`)."""


def kv_events_routing_stats(
    endpoint: str, replay: str | None = None, *, topic: str = ""
) -> dict[str, Any]:
    """What an engine replica's ``record_routing_stats`` returns so that routers in
    precise mode follow its engine's KV events (``kv_events=`` of the router config).

    Args:
        endpoint: the engine's ZMQ PUB address as the routers reach it, e.g.
            ``"tcp://10.0.0.5:5557"`` (the engine binds ``tcp://*:5557``).
        replay: its replay (ROUTER) address, or ``None``.
        topic: its topic.

    Raises:
        TypeError, ValueError: an argument that is not a (non-empty) ``str``.

    >>> kv_events_routing_stats("tcp://10.0.0.5:5557")[KV_EVENTS_STAT]
    {'endpoint': 'tcp://10.0.0.5:5557', 'replay': None, 'topic': ''}
    """
    feed = {
        "endpoint": check_str("endpoint", endpoint),
        "replay": check_str("replay", replay, none_ok=True),
        "topic": check_str("topic", topic, empty_ok=True),
    }
    return {KV_EVENTS_STAT: feed}


def default_policy() -> str:
    """The policy a router uses when none is configured: ``cacheroute.DEFAULT_POLICY`` when
    this version of cacheroute has it, else ``"cache_aware"``."""
    name = getattr(cacheroute, "DEFAULT_POLICY", "cache_aware")
    return name if isinstance(name, str) else "cache_aware"


# --------------------------------------------------------------------------- the prompt


def _messages_text(messages: Sequence[Any]) -> str | None:
    """Chat messages as one text, ``"role: content\\n"`` per message (a conversation's
    earlier turns are a prefix of its later ones)."""
    parts = []
    for m in messages:
        role = m.get("role", "") if isinstance(m, Mapping) else getattr(m, "role", "")
        content = m.get("content", "") if isinstance(m, Mapping) else getattr(m, "content", "")
        if isinstance(content, Sequence) and not isinstance(content, str):
            content = "".join(
                str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content
            )
        parts.append(f"{role}: {content}\n")
    return "".join(parts) if parts else None


def _as_prompt(value: object) -> RequestText:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if value and all(type(v) is int for v in value):
            return list(value)
        return None
    if isinstance(value, Mapping):
        return prompt_from_body(value)
    for attr in ("prompt_token_ids", "prompt", "messages"):
        inner = getattr(value, attr, None)
        if inner is not None:
            if attr == "messages" and isinstance(inner, Sequence):
                return _messages_text(inner)
            return _as_prompt(inner)
    return None


def prompt_from_body(body: Mapping[str, Any]) -> RequestText:
    """The prompt of an OpenAI-style request body: ``prompt_token_ids`` or ``input_ids``
    (token ids), else ``prompt`` (completions: a string, or token ids), else ``messages``
    (chat: rendered as ``"role: content"`` lines). ``None`` when it has none of them.

    >>> prompt_from_body({"messages": [{"role": "user", "content": "hi"}]})
    'user: hi\\n'
    >>> prompt_from_body({"prompt": [1, 2, 3]})
    [1, 2, 3]

    Raises:
        TypeError: ``body`` is not a mapping.
    """
    if not isinstance(body, Mapping):
        raise fail("body", "a mapping", body, TypeError)
    for key in ("prompt_token_ids", "input_ids", "prompt"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, list) and value and isinstance(value[0], str):
                return value[0]  # a batch of prompts: route on the first
            return _as_prompt(value)
    messages = body.get("messages")
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        return _messages_text(messages)
    return None


def prompt_from_call(
    args: Sequence[Any], kwargs: Mapping[str, Any], key: str = "prompt", index: int | None = 0
) -> RequestText:
    """The prompt of a deployment-handle call ``handle.method.remote(*args, **kwargs)``.

    ``kwargs[key]`` if present, else ``args[index]`` (``index=None``: keywords only). The
    value may be a ``str``, a list of token ids, an OpenAI-style body (a mapping, see
    :func:`prompt_from_body`), or an object with a ``prompt_token_ids``, ``prompt`` or
    ``messages`` attribute (Ray Serve LLM's request models). Anything else: ``None`` (the
    policy routes without a prompt: least load).

    >>> prompt_from_call((), {"prompt": "You are a helpful assistant."})
    'You are a helpful assistant.'
    >>> prompt_from_call(({"prompt": "hello"},), {})
    'hello'

    Raises:
        TypeError: ``args`` is not a list or tuple, ``kwargs`` not a mapping, ``key`` not a
            ``str`` or ``index`` not an ``int`` or ``None`` (the prompt itself never raises).
        ValueError: ``index`` is negative.
    """
    check_sequence("args", args)
    if not isinstance(kwargs, Mapping):
        raise fail("kwargs", "a mapping", kwargs, TypeError)
    check_str("key", key, empty_ok=True)
    check_int("index", index, minimum=0, none_ok=True)
    if key in kwargs:
        return _as_prompt(kwargs[key])
    if index is not None and 0 <= index < len(args):
        return _as_prompt(args[index])
    return None


# --------------------------------------------------------------------------- the core


class _Decided(LoadBalancingPolicy):
    """Hands :func:`cacheroute.acquire` a decision already made, for the one worker it is
    given: the lease then holds the decision's work and reports to the real policy."""

    name = "decided"

    def __init__(self, policy: LoadBalancingPolicy, decision: Decision) -> None:
        self.policy = policy
        self.decision = decision
        self.report = True  # whether releasing tells the policy (not for a moved lease)

    def select_worker(self, workers: Sequence[Worker], request_text: RequestText = None) -> int:
        return 0

    def decide(self, workers: Sequence[Worker], request_text: RequestText = None) -> Decision:
        return self.decision

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        if self.report:
            self.policy.on_request_complete(worker_url, success)


class _Request:
    __slots__ = ("decision", "key", "lease", "pending", "prompt", "routed")

    def __init__(
        self, key: str, decision: Decision, prompt: RequestText, pending: Callable[[], bool]
    ) -> None:
        self.key = key  # the replica the policy chose
        self.decision = decision
        self.prompt = prompt
        self.pending = pending  # True while the request waits for a replica
        self.lease: Lease | None = None
        self.routed: str | None = None


class RouterCore:
    """One Ray Serve router's state: replicas as workers, the policy, the request ledger.

    Args:
        policy: the routing policy (any :class:`~cacheroute.policies.LoadBalancingPolicy`).
        model_id: the ``model_id`` of the replicas' workers (one model per deployment).
        name: a name for :func:`snapshot` and logs (the Ray router passes its deployment).
        on_decision: ``None`` or a callable receiving each decision (after the policy's
            own observer, if any). Its exceptions are logged, never raised.
        index: ``None`` or the KV-event index the policy reads (precise mode): the core
            keeps it subscribed to the feeds the replicas advertise (:meth:`sync`) and
            closes it with the core.

    Replicas are identified by a string key (the Ray router uses the replica's full id,
    ``SERVE_REPLICA::app#deployment#id``), which is also the worker's URL. Thread-safe: one
    lock guards the ledger and the membership (the Ray router calls in from one event loop;
    :meth:`stats` may come from any thread).

    See the module documentation for how the ledger pairs Ray's calls.
    """

    def __init__(
        self,
        policy: LoadBalancingPolicy,
        *,
        model_id: str = "default",
        name: str = "",
        on_decision: Callable[[Decision], None] | None = None,
        index: KVEventIndex | None = None,
    ) -> None:
        if not isinstance(policy, LoadBalancingPolicy):
            raise TypeError(f"policy must be a LoadBalancingPolicy, got {type(policy).__name__}")
        self.policy = policy
        """The routing policy."""
        self.model_id = check_str("model_id", model_id)
        """The model of every replica's worker."""
        self.name = check_str("name", name, empty_ok=True)
        """The router's name (its deployment)."""
        self._on_decision = check_callable("on_decision", on_decision, none_ok=True)
        self._observe: Callable[[Decision], None] | None = None  # the metrics' observer
        self._closed = False
        self._lock = threading.RLock()
        self._workers: dict[str, BasicWorker] = {}
        self._requests: dict[str, _Request] = {}
        self._view: tuple[tuple[str, ...], tuple[BasicWorker, ...]] = ((), ())
        self._metrics: RouterMetrics | None = None
        if index is not None and not all(
            callable(getattr(index, m, None))
            for m in ("sync_subscriptions", "forget", "stats", "close")
        ):
            raise fail("index", "None or a KVEventIndex", index, TypeError)
        self.index = index
        """The KV-event index the replicas' feeds go to, or ``None`` (approximate mode)."""
        _register(self)

    @classmethod
    def from_config(
        cls,
        *,
        name: str = "",
        policy: str | None = None,
        policy_config: Mapping[str, Any] | None = None,
        model_id: str = "default",
        metrics: bool = False,
        kv_events: Mapping[str, Any] | None = None,
    ) -> RouterCore:
        """Build a core from a deployment's ``request_router_kwargs`` (JSON values only).

        Args:
            name: the router's name.
            policy: a registered policy name; ``None`` for :func:`default_policy`.
            policy_config: keyword arguments of :func:`cacheroute.make_policy`.
            model_id: the replicas' model.
            metrics: report to :func:`process_metrics` (needs the ``metrics`` extra):
                decisions, the replicas' load and work, the policy's trees.
            kv_events: ``None`` (approximate mode), or keyword arguments of
                :class:`~cacheroute.events.KVEventIndex` (e.g. ``{"block_size": 16}``;
                the ``events`` extra): precise mode. The policy (a prefix policy) gets the
                index; replicas advertise their engines' feeds in their routing stats
                (:func:`kv_events_routing_stats`); prompts must be token ids.

        Raises:
            ValueError, TypeError: as :func:`cacheroute.make_policy` for a bad name or
                config, or as :class:`~cacheroute.events.KVEventIndex` for ``kv_events``.
        """
        if policy_config is not None and not isinstance(policy_config, Mapping):
            raise fail("policy_config", "None or a mapping", policy_config, TypeError)
        config = dict(policy_config or {})
        index = None
        if kv_events is not None:
            if not isinstance(kv_events, Mapping):
                raise fail("kv_events", "None or a mapping", kv_events, TypeError)
            from cacheroute.events import KVEventIndex

            index = KVEventIndex(**kv_events)
            config["index"] = index
        try:
            built = make_policy(policy or default_policy(), **config)
        except BaseException:
            if index is not None:
                index.close()
            raise
        core = cls(built, model_id=model_id, name=name, index=index)
        if metrics:
            core.enable_metrics(process_metrics())
        return core

    def enable_metrics(self, metrics: RouterMetrics) -> None:
        """Report decisions, the replicas' gauges and the policy's trees to ``metrics``.

        The policy label is the policy's name (``name#2``, ... for a second router of the
        same policy in this process); replicas that leave are forgotten by ``metrics``.
        """
        label, n = self.policy.name, 1
        while True:  # another thread's router may take a label between the check and here
            if label not in metrics.tracked_policy_labels():
                try:
                    metrics.track_policy(self.policy, name=label)
                    break
                except ValueError:
                    if label not in metrics.tracked_policy_labels():
                        raise  # refused for another reason
            n += 1
            label = f"{self.policy.name}#{n}"
        ref = weakref.ref(self)

        def workers() -> list[BasicWorker]:
            core = ref()
            return core.workers() if core is not None and not core._closed else []

        metrics.track_workers(workers)
        self._metrics = metrics
        self._observe = metrics.observer(label)

    def close(self) -> None:
        """Stop following KV events (the index's subscriber threads end), release the
        policy's resources, and leave :func:`routers` and the metrics (its replicas' gauges
        and its trees are no longer exported; its label may be reused). Idempotent."""
        with _lock:
            _cores.pop(self, None)
        self._closed = True
        if self._metrics is not None:  # its replicas' gauges and its trees are no longer exported
            self._metrics._state.remove_policy(self.policy)
        if self.index is not None:
            self.index.close()
        self.policy.close()

    # ------------------------------------------------------------------ membership

    def sync(self, keys: Sequence[str], feeds: Mapping[str, Any] | None = None) -> None:
        """Make the replicas exactly ``keys`` (Ray's running replicas): new ones become
        workers, gone ones are dropped and the policy is synced
        (:meth:`~cacheroute.policies.base.LoadBalancingPolicy.sync_workers`: their trees go).

        With an :attr:`index`, ``feeds`` (``{key: feed}``, what replicas advertise under
        :data:`KV_EVENTS_STAT`) are what it follows
        (:meth:`~cacheroute.events.index.KVEventIndex.sync_subscriptions`): a replica without a
        feed is routed on the routed history. A malformed feed is logged, never raised:
        it comes from a replica, and the others still sync."""
        with self._lock:
            old = self._workers
            workers = {k: old.get(k) or BasicWorker(k, self.model_id) for k in keys}
            gone = [w for k, w in old.items() if k not in workers]
            self._workers = workers
            self.policy.sync_workers(list(workers.values()))
        for w in gone:
            w.set_healthy(False)
            if self._metrics is not None:
                self._metrics.forget_worker(w.url)
        if self.index is not None:
            from cacheroute.events.index import _feed  # the index's own check of a feed

            wanted = {}
            for k, f in (feeds or {}).items():
                if k not in workers:
                    continue
                try:
                    _feed(k, f)
                except (TypeError, ValueError) as exc:  # one replica's: the others sync
                    _log.warning(
                        "%s: replica %s advertises a bad KV-event feed: %s", self.name, k, exc
                    )
                    continue
                wanted[k] = f
            try:
                self.index.sync_subscriptions(wanted)
            except ValueError as exc:  # addresses ZMQ refused: the index names them
                _log.warning("%s: KV-event feeds not followed: %s", self.name, exc)

    def remove(self, key: str) -> None:
        """A replica died: never choose it again and drop its tree share now (Ray's next
        replica update confirms it)."""
        with self._lock:
            worker = self._workers.pop(key, None)
            if worker is None:
                return
            worker.set_healthy(False)
            self.policy.on_worker_removed(worker)
        if self.index is not None:
            self.index.forget(key)
        if self._metrics is not None:
            self._metrics.forget_worker(worker.url)

    def workers(self) -> list[BasicWorker]:
        """The current replicas' workers, in Ray's order."""
        with self._lock:
            return list(self._workers.values())

    def worker(self, key: str) -> BasicWorker | None:
        """The worker of replica ``key``, or ``None``."""
        return self._workers.get(key)

    # ------------------------------------------------------------------ requests

    def choose(
        self,
        request_id: str | None,
        candidates: Sequence[str],
        prompt: RequestText = None,
        pending: Callable[[], bool] | None = None,
    ) -> list[list[str]]:
        """Rank the ``candidates`` (replica keys) for one request: ``[[chosen], [the rest]]``,
        or ``[]`` when none is eligible (Ray backs off and asks again).

        The first call for ``request_id`` decides and takes the lease on the choice; later
        calls (Ray retries) reuse the decision, decide again only if the chosen replica is
        no longer a candidate, and take the lease again if it was given back.
        ``pending()`` tells whether the request still waits for a replica (the Ray router
        passes ``not pending_request.future.done()``). ``request_id=None``: rank only,
        holding nothing. Never raises for a bad prompt: it is logged and the request routed
        without one.
        """
        with self._lock:
            workers = self._candidates(candidates)
            if not workers:
                return []
            if request_id is None:
                decision = self._decide(workers, prompt)
                if decision is None:
                    return []
                key = candidates[decision.index]
                rest = [k for k in candidates if k != key]
                return [[key], rest] if rest else [[key]]
            req = self._requests.get(request_id)
            if req is None or req.key not in self._workers or req.key not in candidates:
                decision = self._decide(workers, prompt)
                if decision is None:
                    return []
                key = candidates[decision.index]
                if req is None:
                    req = _Request(key, decision, prompt, pending or _never)
                    req.lease = self._take(key, decision)
                    self._requests[request_id] = req  # once the lease is held
                else:  # the chosen replica went away: a new decision, the lease moves
                    req.key, req.decision = key, decision
                    if req.lease is not None:
                        self._give_back(req.lease, report=False)
                        req.lease = None
            if req.lease is None or req.lease.released:
                req.lease = self._take(req.key, req.decision)
            rest = [k for k in candidates if k != req.key]
        return [[req.key], rest] if rest else [[req.key]]

    def routed(self, request_id: str, key: str) -> None:
        """A replica accepted the request: keep the lease there, or move it there."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return  # completed before Ray reported it routed, or not ours
            req.routed = key
            lease = req.lease
            if lease is not None and not lease.released and lease.worker.url == key:
                return
            if key in self._workers:
                req.lease = self._take(key, req.decision)
                if key != req.key:
                    self._record_prompt(key, req)
            else:
                req.lease = None  # routed to a replica we no longer know: nothing to hold
            if lease is not None:
                self._give_back(lease, report=False)

    def completed(self, request_id: str, key: str) -> None:
        """An attempt of the request on replica ``key`` finished (or was rejected)."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            if req.routed is not None and req.routed != key:
                return  # an earlier, rejected attempt on another replica
            if req.routed is None and req.pending():
                # Rejected before being routed: Ray retries; the next choose re-takes it.
                if req.lease is not None:
                    self._give_back(req.lease, report=False)
                return
            del self._requests[request_id]
            lease = req.lease
        if lease is not None:
            lease.release(success=True)

    def cancelled(self, request_id: str) -> None:
        """The request was cancelled while waiting for a replica: give its lease back."""
        with self._lock:
            req = self._requests.pop(request_id, None)
        if req is not None and req.lease is not None:
            req.lease.release(success=False)

    def has(self, request_id: str) -> bool:
        """Whether the request is in the ledger."""
        return request_id in self._requests

    def in_flight(self) -> int:
        """Requests in the ledger (chosen for, not completed yet)."""
        return len(self._requests)

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot: the router's name, policy, requests in flight, and per
        replica its load, pending prefill and decode tokens, processed count and health;
        plus the URLs the policy no longer chooses (``removed``, prefix policies) and, in
        precise mode, each followed feed's state (``kv_events``)."""
        with self._lock:
            workers = list(self._workers.values())
            in_flight = len(self._requests)
        removed = getattr(self.policy, "removed_urls", None)
        return {
            "name": self.name,
            "policy": self.policy.name,
            "in_flight": in_flight,
            "workers": [
                {
                    "url": w.url,
                    "load": w.load(),
                    "pending_prefill_tokens": w.pending_prefill_tokens(),
                    "decode_tokens": w.decode_tokens(),
                    "processed": w.processed(),
                    "healthy": w.is_healthy(),
                }
                for w in workers
            ],
            "removed": sorted(removed()) if removed is not None else [],
            "kv_events": {}
            if self.index is None
            else {
                url: {"connected": st.connected, "stale": st.stale, "batches": st.batches}
                for url, st in self.index.stats().items()
            },
        }

    # ------------------------------------------------------------------ helpers

    def _candidates(self, keys: Sequence[str]) -> tuple[BasicWorker, ...]:
        ids = tuple(keys)
        view = self._view
        known = self._workers
        if view[0] == ids and all(w is known.get(k) for k, w in zip(ids, view[1], strict=True)):
            return view[1]
        workers = []
        for k in ids:
            w = self._workers.get(k)
            if w is None:  # a candidate Ray knows and we do not (yet): it joins now
                w = self._workers[k] = BasicWorker(k, self.model_id)
                self.policy.on_worker_added(w)
            workers.append(w)
        self._view = (ids, tuple(workers))
        return self._view[1]

    def _decide(self, workers: Sequence[BasicWorker], prompt: RequestText) -> Decision | None:
        try:
            decision = self.policy.decide(workers, prompt)
        except (TypeError, ValueError):
            _log.exception("%s: the prompt could not be routed on; routing without it", self)
            decision = self.policy.decide(workers, None)
        if decision is None:
            return None
        # What acquire() refuses, refused before the decision is observed or obeyed.
        _checked_decision(self.policy, decision, len(workers))
        for observe in (self._observe, self._on_decision):
            if observe is not None:
                try:
                    observe(decision)
                except Exception:
                    _log.exception("%s: on_decision raised; decision kept", self)
        return decision

    def _take(self, key: str, decision: Decision) -> Lease:
        worker = self._workers[key]
        return acquire(_Decided(self.policy, replace(decision, index=0, url=worker.url)), [worker])

    @staticmethod
    def _give_back(lease: Lease, report: bool) -> None:
        policy = lease.policy
        if isinstance(policy, _Decided):
            policy.report = report
        lease.release(success=False)

    def _record_prompt(self, key: str, req: _Request) -> None:
        policy, prompt = self.policy, req.prompt
        if isinstance(policy, PrefixPolicy) and prompt:
            kind: TreeKind = "text" if isinstance(prompt, str) else "tokens"
            tree = policy.tree(self.model_id, kind, create=True)
            if tree is not None:
                tree.insert(prompt, key)

    def __repr__(self) -> str:
        return (
            f"RouterCore(name={self.name!r}, policy={self.policy.name!r}, "
            f"replicas={len(self._workers)}, in_flight={len(self._requests)})"
        )


def _never() -> bool:
    return False


# --------------------------------------------------------------------------- process-wide

_lock = threading.Lock()
_cores: weakref.WeakKeyDictionary[RouterCore, int] = weakref.WeakKeyDictionary()
_metrics: list[RouterMetrics] = []
_created = [0]


def _register(core: RouterCore) -> None:
    with _lock:
        _created[0] += 1
        _cores[core] = _created[0]


def routers(name: str | None = None) -> list[RouterCore]:
    """The live routers of this process (those named ``name``, if given), oldest first."""
    check_str("name", name, none_ok=True)
    with _lock:
        cores = sorted(_cores.items(), key=lambda item: item[1])
    return [c for c, _ in cores if name is None or c.name == name]


def snapshot(name: str | None = None) -> list[dict[str, Any]]:
    """:meth:`RouterCore.stats` of every live router of this process (JSON-able)."""
    return [c.stats() for c in routers(name)]


def process_metrics() -> RouterMetrics:
    """The process-wide :class:`~cacheroute.metrics.RouterMetrics`, on
    ``prometheus_client.REGISTRY`` (created on first use; needs the ``metrics`` extra).

    Serve it from the same process, e.g. an ingress deployment's ``/metrics`` route
    returning ``prometheus_client.generate_latest()``.
    """
    with _lock:
        if not _metrics:
            from cacheroute.metrics import RouterMetrics

            _metrics.append(RouterMetrics())
        return _metrics[0]
