"""A Ray Serve request router that routes with any cacheroute policy (the ``ray`` extra).

Give a deployment of engine replicas this router, and each request goes to the replica the
policy picks (for a prefix policy: the one whose KV cache holds the prompt's prefix)::

    from ray import serve
    from cacheroute.integrations.ray_serve import request_router_config

    @serve.deployment(num_replicas=4, request_router_config=request_router_config("cache_aware"))
    class Engine:
        async def generate(self, prompt: str, max_tokens: int = 256) -> dict: ...

**The prompt.** The router reads the prompt from the handle call's arguments: the ``prompt``
keyword, else the first positional argument (a string, token ids, an OpenAI-style body, or
an object with a ``prompt``/``messages`` attribute; see
:func:`~cacheroute.integrations.ray_serve_state.prompt_from_call`). Through Ray's HTTP proxy
a deployment receives only the ASGI scope (the body is streamed later), so the router of the
deployment the proxy calls never sees a prompt: put an ingress deployment in front that
parses the body and calls the engine deployment's handle with ``prompt=`` (see
``docs/ray_serve.md`` and ``examples/ray_serve_app.py``).

**Replicas are workers.** Every replica is a :class:`~cacheroute.BasicWorker` whose URL is
the replica's full id (``SERVE_REPLICA::app#deployment#id``). Ray's replica updates sync the
policy's pool (:meth:`~cacheroute.policies.base.LoadBalancingPolicy.sync_workers`), a replica
that dies is removed at once, and load is held with leases from the routing decision to
the request's completion (how Ray's calls are paired:
:mod:`cacheroute.integrations.ray_serve_state`). Ray's own limits stay in force: the router
ranks the chosen replica first and the others second, so a replica at
``max_ongoing_requests`` is passed over for the least-queued of the rest.

**State.** Ray pickles this module by value into every process that holds a handle to the
deployment; the state lives in :mod:`cacheroute.integrations.ray_serve_state`, imported
normally. Each handle-holding process (each ingress replica) has its own router, hence its
own prefix tree and load counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

try:
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cacheroute.integrations.ray_serve needs Ray Serve (the 'ray' extra): "
        "pip install 'ray[serve]'"
    ) from exc

from cacheroute._validation import check_bool, check_int, check_real, check_str
from cacheroute.integrations.ray_serve_state import (
    KV_EVENTS_STAT,
    RouterCore,
    default_policy,
    kv_events_routing_stats,
    prompt_from_body,
    prompt_from_call,
)

__all__ = [
    "KV_EVENTS_STAT",
    "CacheRouteRequestRouter",
    "RouterCore",
    "default_policy",
    "kv_events_routing_stats",
    "prompt_from_body",
    "prompt_from_call",
    "request_router_config",
]

_log = logging.getLogger("cacheroute.integrations.ray_serve")


class CacheRouteRequestRouter(RequestRouter):
    """Routes a deployment's requests with a cacheroute policy.

    Configure it with :func:`request_router_config`, or directly with
    ``RequestRouterConfig(request_router_class=CacheRouteRequestRouter,
    request_router_kwargs={...})``; the keyword arguments (JSON values) are:

    * ``policy``: a registered policy name (default:
      :func:`~cacheroute.integrations.ray_serve_state.default_policy`);
    * ``policy_config``: keyword arguments of :func:`cacheroute.make_policy`;
    * ``model_id``: the replicas' model (default ``"default"``);
    * ``prompt_kwarg``, ``prompt_arg``: where the prompt is in the handle call
      (default: keyword ``prompt``, else positional argument 0; ``prompt_arg: null``
      for keywords only);
    * ``metrics``: report to the process's
      :func:`~cacheroute.integrations.ray_serve_state.process_metrics` (the ``metrics``
      extra), served by whatever serves ``prometheus_client.REGISTRY`` in that process;
    * ``kv_events``: precise mode, keyword arguments of
      :class:`~cacheroute.events.KVEventIndex` (e.g. ``{"block_size": 16}``; default
      ``None``). The router follows the KV events of every replica whose routing stats
      advertise its engine's feed (:func:`kv_events_routing_stats`), so all routers of
      the deployment (one per handle-holding process) see what every engine caches.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        """Build the policy from the deployment's ``request_router_kwargs`` (called by Ray
        once, after construction)."""
        self._cacheroute_config(**kwargs)

    def _cacheroute_config(
        self,
        policy: str | None = None,
        policy_config: dict[str, Any] | None = None,
        model_id: str = "default",
        prompt_kwarg: str = "prompt",
        prompt_arg: int | None = 0,
        metrics: bool = False,
        kv_events: Mapping[str, Any] | None = None,
    ) -> None:
        _check_settings(policy, model_id, prompt_kwarg, prompt_arg, metrics)
        dep = self._deployment_id
        name = f"{dep.app_name}#{dep.name}" if dep.app_name else dep.name
        self._core = RouterCore.from_config(
            name=name,
            policy=policy,
            policy_config=policy_config,
            model_id=model_id,
            metrics=metrics,
            kv_events=kv_events,
        )
        self._prompt_kwarg = prompt_kwarg
        self._prompt_arg = prompt_arg
        self._keys: dict[ReplicaID, str] = {}
        self._watched: dict[str, asyncio.Future[Any]] = {}
        _log.info("cacheroute router for %s: %r", name, self._core.policy)

    @property
    def core(self) -> RouterCore:
        """The router's :class:`~cacheroute.integrations.ray_serve_state.RouterCore`."""
        core: RouterCore | None = getattr(self, "_core", None)
        if core is None:  # Ray did not call initialize_state: the defaults
            self._cacheroute_config()
            core = self._core
        return core

    def _key(self, replica_id: ReplicaID) -> str:
        key = self._keys.get(replica_id)
        if key is None:
            key = self._keys[replica_id] = replica_id.to_full_id_str()
        return key

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray's replica set changed: the policy's pool follows."""
        super().update_replicas(replicas)
        core = self.core
        keys = [self._key(r.replica_id) for r in replicas]
        live = {r.replica_id for r in replicas}
        self._keys = {rid: key for rid, key in self._keys.items() if rid in live}
        feeds = None
        if core.index is not None:  # routing stats come with the replica updates
            feeds = {
                key: r.routing_stats[KV_EVENTS_STAT]
                for key, r in zip(keys, replicas, strict=True)
                if KV_EVENTS_STAT in (r.routing_stats or {})
            }
        core.sync(keys, feeds)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """A replica died: it is removed from the pool now."""
        super().on_replica_actor_died(replica_id)
        self.core.remove(self._key(replica_id))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The policy's choice first, the other candidates second (see the class doc)."""
        core = self.core
        by_key = {self._key(r.replica_id): r for r in candidate_replicas}
        if pending_request is None:
            ranks = core.choose(None, list(by_key))  # nothing to hold load for
        else:
            request_id = pending_request.metadata.internal_request_id
            prompt = prompt_from_call(
                pending_request.args, pending_request.kwargs, self._prompt_kwarg, self._prompt_arg
            )
            future = pending_request.future
            ranks = core.choose(
                request_id, list(by_key), prompt, lambda: not pending_request.future.done()
            )
            self._watch(request_id, future)
        return [[by_key[k] for k in rank] for rank in ranks]

    def _watch(self, request_id: str, future: asyncio.Future[Any]) -> None:
        """Give the lease back if the request is cancelled while it waits for a replica
        (one callback per future: Ray gives a retried request a new one)."""
        if self._watched.get(request_id) is future:
            return
        self._watched[request_id] = future
        core, watched = self.core, self._watched

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                core.cancelled(request_id)
                if watched.get(request_id) is fut:
                    del watched[request_id]

        future.add_done_callback(done)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        """A replica accepted the request: its lease is confirmed there."""
        self.core.routed(pending_request.metadata.internal_request_id, self._key(replica_id))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """An attempt finished on a replica: the lease is given back (once)."""
        core = self.core
        core.completed(internal_request_id, self._key(replica_id))
        if not core.has(internal_request_id):
            self._watched.pop(internal_request_id, None)


def _check_settings(
    policy: object, model_id: object, prompt_kwarg: object, prompt_arg: object, metrics: object
) -> None:
    """The router's settings are JSON values of the right types (``request_router_config``
    checks them in the process that builds the application; the router again, for
    ``request_router_kwargs`` written by hand or in a Serve config file)."""
    check_str("policy", policy, empty_ok=True, none_ok=True)
    check_str("model_id", model_id)
    check_str("prompt_kwarg", prompt_kwarg, empty_ok=True)
    check_int("prompt_arg", prompt_arg, minimum=0, none_ok=True)
    check_bool("metrics", metrics)


def request_router_config(
    policy: str | None = None,
    *,
    model_id: str = "default",
    prompt_kwarg: str = "prompt",
    prompt_arg: int | None = 0,
    metrics: bool = False,
    kv_events: Mapping[str, Any] | None = None,
    routing_stats_period_s: float | None = None,
    **policy_config: Any,
) -> RequestRouterConfig:
    """A ``RequestRouterConfig`` for a deployment routed by :class:`CacheRouteRequestRouter`.

    Args:
        policy: a registered policy name; ``None`` (default) for
            :func:`~cacheroute.integrations.ray_serve_state.default_policy`.
        model_id: the replicas' model.
        prompt_kwarg: the handle call's keyword holding the prompt.
        prompt_arg: its positional argument used when the keyword is absent (``None``:
            keyword only).
        metrics: report to the handle process's
            :func:`~cacheroute.integrations.ray_serve_state.process_metrics`.
        kv_events: ``None``, or keyword arguments of
            :class:`~cacheroute.events.KVEventIndex` (JSON values, e.g.
            ``{"block_size": 16}``): precise mode (see :class:`CacheRouteRequestRouter`).
        routing_stats_period_s: how often Ray polls each replica's
            ``record_routing_stats`` (Ray's ``request_routing_stats_period_s``; its default
            when ``None``): how soon a new replica's feed is followed.
        **policy_config: the policy's settings (JSON values), e.g. ``cache_threshold=0.5``.

    Raises:
        ValueError, TypeError: the policy name or its settings, or one of the arguments
            above, are wrong (checked here, in the process that builds the application,
            not later in every replica).
    """
    _check_settings(policy, model_id, prompt_kwarg, prompt_arg, metrics)
    check_real(
        "routing_stats_period_s", routing_stats_period_s, minimum=0.0, min_open=True, none_ok=True
    )
    # Built and dropped here, to fail fast on a bad name, setting or index setting.
    RouterCore.from_config(policy=policy, policy_config=policy_config, kv_events=kv_events).close()
    kwargs: dict[str, Any] = {
        "policy": policy,
        "policy_config": policy_config,
        "model_id": model_id,
        "prompt_kwarg": prompt_kwarg,
        "prompt_arg": prompt_arg,
        "metrics": metrics,
        "kv_events": None if kv_events is None else dict(kv_events),
    }
    # One mapping of Any values: Ray 2.60 annotates the constructor's **kwargs as dicts.
    config: dict[str, Any] = {
        "request_router_class": CacheRouteRequestRouter,
        "request_router_kwargs": kwargs,
    }
    if routing_stats_period_s is not None:
        config["request_routing_stats_period_s"] = routing_stats_period_s
    return RequestRouterConfig(**config)
