"""Cluster simulator: real cacheroute policies routing workloads over modelled engines.

>>> from cacheroute.sim import shared_prefix, simulate, summarize
>>> result = simulate(shared_prefix(groups=4, prompts_per_group=4), "cache_aware", workers=2)
>>> summarize(result).requests
16

Modules: :mod:`~cacheroute.sim.engine` (the engine model and its constants),
:mod:`~cacheroute.sim.simulator` (the event loop), :mod:`~cacheroute.sim.workloads`
(generators), :mod:`~cacheroute.sim.traces` (Mooncake and Claude-Code loaders),
:mod:`~cacheroute.sim.metrics` and :mod:`~cacheroute.sim.report` (results),
:mod:`~cacheroute.sim.specs` (policy specs such as ``cache_aware:least_load``).
See ``docs/simulator.md``.
"""

from cacheroute.sim.engine import Engine, EngineConfig, KVEvent
from cacheroute.sim.metrics import DEFAULT_SLO_TTFT_S, Summary, summarize
from cacheroute.sim.request import Request, Workload, ideal_hit_tokens
from cacheroute.sim.simulator import RunResult, compare, simulate
from cacheroute.sim.specs import PolicySpec, default_specs, parse_policy_list
from cacheroute.sim.traces import TraceFormatError, load_claude_code, load_mooncake, load_trace
from cacheroute.sim.workloads import WORKLOADS, bursty, chat, default_workload, shared_prefix

__all__ = [
    "DEFAULT_SLO_TTFT_S",
    "WORKLOADS",
    "Engine",
    "EngineConfig",
    "KVEvent",
    "PolicySpec",
    "Request",
    "RunResult",
    "Summary",
    "TraceFormatError",
    "Workload",
    "bursty",
    "chat",
    "compare",
    "default_specs",
    "default_workload",
    "ideal_hit_tokens",
    "load_claude_code",
    "load_mooncake",
    "load_trace",
    "parse_policy_list",
    "shared_prefix",
    "simulate",
    "summarize",
]
