"""``cacheroute simulate``: argument wiring and the command itself."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import replace
from typing import Any

from cacheroute.sim.engine import EngineConfig
from cacheroute.sim.metrics import DEFAULT_SLO_TTFT_S, summarize
from cacheroute.sim.precise import INDEX_MODES
from cacheroute.sim.report import (
    format_table,
    plot_results,
    require_matplotlib,
    to_json,
    write_json,
)
from cacheroute.sim.request import MAX_BLOCKS, MAX_TOKENS, Workload, ideal_hit_tokens
from cacheroute.sim.simulator import MAX_ROUTERS, MAX_WORKERS, compare
from cacheroute.sim.specs import (
    MODE_KEYS,
    PluginError,
    default_specs,
    load_plugin,
    parse_policy_list,
)
from cacheroute.sim.traces import (
    FORMATS,
    MAX_CONCURRENCY,
    TraceFormatError,
    detect_format,
    load_trace,
)
from cacheroute.sim.workloads import WORKLOADS

__all__ = ["add_engine_options", "add_simulate_parser", "run_simulate"]

_EPILOG = f"""\
policy specs (--policies, comma-separated):
  NAME                      a registered policy (see `cacheroute policies`)
  NAME:MODE                 a mode shorthand: {
    ", ".join(f"{n}:{m}" for n, (_, modes) in MODE_KEYS.items() for m in modes)
}
  NAME[KEY=VALUE,...]       make_policy(NAME, KEY=VALUE, ...), e.g.
                            cache_aware[imbalance_mode=least_load,cache_threshold=0.3]
default: every registered policy, once per mode.

plugins (--plugin, repeatable): a module that registers policies with
  cacheroute.register_policy(NAME, CLASS), imported before --policies is read:
  a dotted module name on sys.path (my_company.routing) or a .py file (./my_policy.py).

examples:
  cacheroute simulate
  cacheroute simulate --workload shared_prefix --policies round_robin,cache_aware:locality
  cacheroute simulate --trace conversation_trace.jsonl.gz --format mooncake --json out.json
  cacheroute simulate --trace claude_code_traces.jsonl.gz --format claude_code --limit 5000
  cacheroute simulate --plugin ./my_policy.py --policies my_policy,cache_aware
  cacheroute simulate --routers 4 --kv-event-delay 0.05
  zcat trace.jsonl.gz | cacheroute simulate --trace /dev/stdin --format mooncake
"""


def _int_type(minimum: int, maximum: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r:.60}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:,}, got {text:.60}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r:.60}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text:.60}")
    return value


def _cache_tokens(text: str) -> int | None:
    if text.lower() in ("none", "unbounded", "inf"):
        return None
    value: int = _int_type(1, MAX_TOKENS)(text)
    return value


def add_engine_options(parser: Any) -> None:
    """Add ``--cache-tokens`` and ``--max-batch`` (the modelled engine's KV capacity and
    running requests; ``args.cache_tokens``, ``args.max_batch``) to an
    ``argparse.ArgumentParser`` or argument group, as ``cacheroute simulate`` has
    them: for scripts that run the simulator with the same options. O(1).

    >>> p = argparse.ArgumentParser()
    >>> add_engine_options(p)
    >>> a = p.parse_args(["--cache-tokens", "none", "--max-batch", "64"])
    >>> a.cache_tokens is None, a.max_batch
    (True, 64)
    """
    parser.add_argument(
        "--cache-tokens",
        type=_cache_tokens,
        default=EngineConfig.cache_tokens,
        metavar="N",
        help=f"KV-cache tokens per engine, or 'none' (default {EngineConfig.cache_tokens})",
    )
    parser.add_argument(
        "--max-batch",
        type=_int_type(1, MAX_TOKENS),
        default=EngineConfig.max_batch,
        metavar="N",
        help=f"running requests per engine (default {EngineConfig.max_batch})",
    )


def add_simulate_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an ``add_subparsers()`` object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="compare policies on a simulated cluster (generated workload or trace)",
        description=(
            "Replay a workload through real cacheroute policies driving modelled engines "
            "(prefix KV cache + continuous batching; defaults model Llama-3.1-8B bf16 on "
            "one H100) and compare cache hit rate, TTFT, latency, throughput and balance."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("workload")
    src.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="generated workload (default: 'default', multi-turn chat); not with --trace",
    )
    src.add_argument("--trace", metavar="PATH", help="replay a trace file (.jsonl, gz or plain)")
    src.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="trace format (default: detected from the first line)",
    )
    src.add_argument(
        "--concurrency",
        type=_int_type(1, MAX_CONCURRENCY),
        default=None,
        help="claude_code traces: sessions running at once (default 32)",
    )
    src.add_argument(
        "--coarsen",
        type=_int_type(1, MAX_BLOCKS),
        default=None,
        help="claude_code traces: merge this many 64-token blocks into one (default 8)",
    )
    src.add_argument("--limit", type=_int_type(1), default=None, help="use the first N requests")
    src.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        help="scale the arrival rate (2 = twice as fast; default 1); a note says so when "
        "every request arrives at once (shared_prefix), where it changes nothing",
    )
    src.add_argument("--seed", type=_int_type(0), default=0, help="seed (default 0)")
    cl = p.add_argument_group("cluster")
    cl.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (a dotted name or a .py path) to register policies before "
        "--policies is read; repeatable",
    )
    cl.add_argument(
        "--policies",
        default=None,
        metavar="SPECS",
        help="comma-separated policy specs (see below; default: all)",
    )
    cl.add_argument(
        "--workers", type=_int_type(1, MAX_WORKERS), default=8, help="engines (default 8)"
    )
    cl.add_argument(
        "--routers",
        type=_int_type(1, MAX_ROUTERS),
        default=1,
        metavar="R",
        help="gateway replicas, each its own policy object, requests spread round robin "
        "(as behind a load balancer); all share the engines (default 1)",
    )
    cl.add_argument(
        "--kv-event-delay",
        type=_nonnegative_float,
        default=None,
        metavar="SECONDS",
        help="engines emit KV events (blocks stored/removed), delivered to every router "
        "replica this long after (to policies with an on_kv_event method, and to the "
        "--index); default: none (0 with --index precise/hybrid)",
    )
    cl.add_argument(
        "--index",
        choices=INDEX_MODES,
        default="approximate",
        help="what prefix policies match on: their routed history (approximate, default), "
        "the engines' KV events (precise), or events plus claims of what was just routed "
        "(hybrid); needs the 'events' extra",
    )
    add_engine_options(cl)
    out = p.add_argument_group("output")
    out.add_argument(
        "--slo-ttft",
        type=_positive_float,
        default=DEFAULT_SLO_TTFT_S,
        metavar="SECONDS",
        help=f"TTFT objective of the SLO and goodput rows (default {DEFAULT_SLO_TTFT_S:g}: "
        "about a cold 38k-token prefill on the default engine)",
    )
    out.add_argument("--json", metavar="PATH", help="write all results and the config as JSON")
    out.add_argument(
        "--plot",
        metavar="PATH",
        help="draw TTFT distributions and load over time (needs the 'plot' extra)",
    )
    out.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    p.set_defaults(func=run_simulate, _parser=p)
    return p


class _OptionError(ValueError):
    """An option that does not apply; the message is the whole error."""


def _claude_code_only(args: argparse.Namespace, why: str) -> None:
    given = [f"--{key}" for key in ("concurrency", "coarsen") if getattr(args, key) is not None]
    if given:
        raise _OptionError(f"{' and '.join(given)} only apply to claude_code traces, but {why}")


def _check_output_path(option: str, path: str) -> str | None:
    """An error for ``option`` if ``path`` cannot be written (checked before the run)."""
    if not path:
        return f"argument {option}: expected a file path, got an empty one"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"argument {option}: {path} is a directory"
    if not os.path.isdir(parent):
        return f"argument {option}: directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"argument {option}: directory {parent} is not writable"
    return None


def _read_once(path: str) -> bool:
    """Whether ``path`` exists and is not a regular file (a pipe, a terminal, a socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # the loader reports it
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _load(args: argparse.Namespace) -> Workload:
    if args.trace is None:
        _claude_code_only(args, "no --trace is given")
        workload = WORKLOADS[args.workload or "default"](args.seed)
        workload = workload.limited(args.limit)
    else:
        if args.format is None and _read_once(args.trace):
            raise _OptionError(
                f"argument --trace: {args.trace} is not a regular file (a pipe can be read "
                f"only once, and detecting the format reads it): give --format "
                f"{{{','.join(FORMATS)}}}"
            )
        fmt = args.format or detect_format(args.trace)
        options: dict[str, Any] = {}
        if fmt == "claude_code":
            for key in ("concurrency", "coarsen"):
                if getattr(args, key) is not None:
                    options[key] = getattr(args, key)
        else:
            _claude_code_only(args, f"the trace format is {fmt}")
        workload = load_trace(args.trace, fmt, limit=args.limit, **options)
    return workload


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``cacheroute simulate`` with parsed ``args``; returns the exit status."""
    parser: argparse.ArgumentParser = args._parser
    if args.trace is not None and args.workload is not None:
        parser.error("--workload and --trace are exclusive: give one")
    if args.format is not None and args.trace is None:
        parser.error("--format needs --trace")
    for plugin in args.plugin:
        try:
            load_plugin(plugin)
        except PluginError as exc:
            parser.error(f"argument --plugin: {exc}")
    try:
        specs = default_specs() if args.policies is None else parse_policy_list(args.policies)
    except (ValueError, TypeError) as exc:
        parser.error(f"argument --policies: {exc}")
    for spec in specs:  # validate config keys and values before any long run
        try:
            spec.build(seed=args.seed).close()
        except (ValueError, TypeError) as exc:
            parser.error(f"argument --policies: {exc}")
        except Exception as exc:  # a plugin's constructor may raise anything
            parser.error(f"argument --policies: {spec}: {type(exc).__name__}: {exc}")
    if args.plot:
        try:
            require_matplotlib()
        except RuntimeError as exc:
            parser.error(str(exc))
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path is not None and _check_output_path(option, path)
        if problem:
            parser.error(problem)
    engine = replace(EngineConfig(), cache_tokens=args.cache_tokens, max_batch=args.max_batch)
    try:
        workload = _load(args)
    except _OptionError as exc:
        parser.error(str(exc))
    except FileNotFoundError as exc:
        parser.error(f"argument --trace: no such file: {exc.filename}")
    except (TraceFormatError, ValueError) as exc:
        parser.error(f"argument --trace: {exc}")
    except OSError as exc:  # a directory, no permission, ...
        parser.error(f"argument --trace: cannot read {exc.filename}: {exc.strerror}")
    if not workload.requests:
        parser.error("the workload has no requests")
    reqs = workload.requests
    if args.speed != 1.0 and reqs[0].arrival == reqs[-1].arrival:
        # Scaling arrivals that are all equal changes no time the metrics look at.
        print(
            f"note: --speed {args.speed:g} changes nothing: all {len(reqs):,} requests of "
            f"{workload.name} arrive at t={reqs[0].arrival:g} s",
            file=sys.stderr,
        )
    try:
        workload = workload.scaled(args.speed)
    except ValueError as exc:
        parser.error(f"argument --speed: {exc}")

    show = {"auto": None, "on": True, "off": False}[args.progress]
    results = compare(
        workload,
        specs,
        workers=args.workers,
        engine=engine,
        seed=args.seed,
        timeline_points=2000 if args.plot else 0,
        show_progress=show,
        routers=args.routers,
        kv_event_delay_s=args.kv_event_delay,
        index=args.index,
    )
    ideal = ideal_hit_tokens(workload.requests)
    summaries = [summarize(r, ideal, slo_ttft_s=args.slo_ttft) for r in results]
    cache = "unbounded" if engine.cache_tokens is None else f"{engine.cache_tokens:,}"
    title = (
        f"workload {workload.name}: {len(workload):,} requests, {args.workers} workers, "
        + (f"{args.routers} routers, " if args.routers > 1 else "")
        + (f"{args.index} index, " if args.index != "approximate" else "")
        + f"KV cache {cache} tokens/worker, seed {args.seed}"
        + (f", speed x{args.speed:g}" if args.speed != 1.0 else "")
    )
    print(format_table(summaries, title))
    if args.json:
        config = {
            "workload": workload.name,
            "workload_params": workload.params,
            "requests": len(workload),
            "workers": args.workers,
            "routers": args.routers,
            "kv_event_delay_s": args.kv_event_delay,
            "index": args.index,
            "seed": args.seed,
            "speed": args.speed,
            "slo_ttft_s": args.slo_ttft,
            "limit": args.limit,
            "plugins": list(args.plugin),
            "policies": [
                {"label": s.label, "name": s.name, "config": dict(s.config)} for s in specs
            ],
            "engine": engine.to_dict(),
        }
        write_json(args.json, to_json(summaries, config))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_results(args.plot, results, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
