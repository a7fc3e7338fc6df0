"""End to end: our example gateway against the real SGLang router, on the same fake engines.

One command::

    python benchmarks/e2e/compare.py            # full run, ~10 minutes on 2 cores
    python benchmarks/e2e/compare.py --quick    # fewer requests, a noisy look

For every router (``ours`` = ``examples/gateway.py``; ``sglang`` = ``python -m
sglang_router.launch_router`` from ``pip install sglang-router==0.3.2``, skipped with a note
when it is not installed) and policy (``cache_aware``, ``round_robin``) it starts three cold
``examples/fake_engine.py`` engines and the router, drives ``examples/load.py``'s workloads
through it, and stops everything:

* ``shared``: 24 applications with 1,500-token system prompts, 16 users at a time;
* ``multiturn``: 6-turn conversations over 8 shared system prompts, 16 at a time;
* ``kill``: ``shared``, with one engine killed (SIGKILL) after a quarter of the requests and
  restarted on the same port after half; the table says when the restarted engine served
  again;
* ``cpu c=1`` / ``cpu c=32``: fast engines (no prefill or decode time) and short prompts, so
  the router's own CPU per request stands out: router process CPU seconds (``/proc``, the
  process and its children) divided by requests.

Both routers get equal thresholds where they correspond: ours is told
``cache_threshold=0.3 balance_abs_threshold=8 balance_rel_threshold=1.5`` (our cache_aware
defaults, written out) and the SGLang router ``--cache-threshold 0.3
--balance-abs-threshold 8 --balance-rel-threshold 1.5``; everything else is each router's
default. It prints a markdown table. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LOOPBACK = "127.0.0.1"
THRESHOLDS = {"cache_threshold": 0.3, "balance_abs_threshold": 8, "balance_rel_threshold": 1.5}


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_e2e_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


load = _load_example("load")


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


# --------------------------------------------------------------------------- processes


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(1024)
    return sock


def _free_port() -> int:
    with _listen() as s:
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError as exc:
        code = getattr(exc, "code", None)
        return (code if isinstance(code, int) else 0), b""


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:  # fields[11], [12] = utime, stime (after the ')' of the name)
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
        todo.extend(children.get(p, ()))
    return total


class Engine:
    """One fake engine on a socket bound here (so a restart gets the same port)."""

    def __init__(self, name: str, logs: Path, extra: Sequence[str], port: int = 0) -> None:
        self.name, self.extra, self.logs = name, list(extra), logs
        sock = _listen(port)
        self.port = int(sock.getsockname()[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "fake_engine.py"), "--fd", str(sock.fileno()),
             "--name", name, *self.extra],
            pass_fds=(sock.fileno(),), stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        sock.close()
        _wait(lambda: _get(self.url + "/health")[0] == 200, 30, f"{name} to start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def restart(self) -> Engine:
        return Engine(self.name, self.logs, self.extra, port=self.port)


class Router:
    """Our gateway or the SGLang router, as a subprocess."""

    script = EXAMPLES / "gateway.py"  # --gateway-script: another version of ours
    extra_args: ClassVar[list[str]] = []  # --gateway-arg

    def __init__(self, kind: str, policy: str, engines: Sequence[str], logs: Path) -> None:
        self.kind, self.policy = kind, policy
        port = _free_port()
        self.url = f"http://{LOOPBACK}:{port}"
        if kind == "ours":
            cmd = [sys.executable, str(self.script), "--port", str(port),
                   "--policy", policy, "--log-level", "warning"]  # fmt: skip
            for e in engines:
                cmd += ["--worker", e]
            cmd += self.extra_args
            if policy == "cache_aware":
                for k, v in THRESHOLDS.items():
                    cmd += ["--policy-arg", f"{k}={v}"]
        else:
            cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", LOOPBACK,
                   "--port", str(port), "--policy", policy, "--log-level", "warn",
                   "--prometheus-host", LOOPBACK, "--prometheus-port", str(_free_port()),
                   "--worker-urls", *engines]  # fmt: skip
            if policy == "cache_aware":
                for k, v in THRESHOLDS.items():
                    cmd += ["--" + k.replace("_", "-"), str(v)]
        self.cmd = cmd
        self._log = open(logs / f"router-{kind}-{policy}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        n = len(engines)
        if kind == "ours":
            _wait(lambda: _get(self.url + "/health")[0] == 200, 30, "the gateway")
        else:  # the workers register asynchronously: wait until all of them are listed
            _wait(lambda: _get(self.url + "/workers")[1].count(b'"url"') >= n, 60, "sglang")
        time.sleep(0.5)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


# --------------------------------------------------------------------------- scenarios

SLOW = ()  # fake-engine defaults: 0.5 ms prefill per uncached token, 20 ms per decoded token
FAST = ("--prefill-ms-per-token", "0", "--decode-ms-per-token", "0", "--base-latency-ms", "0")


@dataclass
class Row:
    router: str
    policy: str
    scenario: str
    requests: int
    hit: str
    p50: str
    p90: str
    p99: str
    per_engine: str
    errors: str
    cpu_ms: str
    note: str = ""


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _row(router: Router, scenario: str, report: Any, cpu: float, note: str = "") -> Row:
    n = len(report.outcomes)
    errors = sum(report.errors.values())
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.errors.items()))
    return Row(
        router=router.kind,
        policy=router.policy,
        scenario=scenario,
        requests=n,
        hit="-" if report.hit_rate is None else f"{report.hit_rate:.0%}",
        p50=_ms(report.ttft_ms(0.5)),
        p90=_ms(report.ttft_ms(0.9)),
        p99=_ms(report.ttft_ms(0.99)),
        per_engine=" / ".join("?" if x is None else str(x) for x in report.engine_requests),
        errors=f"{errors}" + (f" ({kinds})" if kinds else ""),
        cpu_ms=f"{1000 * cpu / n:.2f}" if n else "-",
        note=note,
    )


def run_one(
    kind: str, policy: str, scenario: str, logs: Path, scale: float, concurrency: int = 16
) -> Row:
    """Cold engines, a fresh router, one workload, everything stopped afterwards."""
    fast = scenario.startswith("cpu")
    engines = [Engine(f"e{i}", logs, FAST if fast else SLOW) for i in range(3)]
    router: Router | None = None
    try:
        router = Router(kind, policy, [e.url for e in engines], logs)
        note = ""
        if fast:
            c = int(scenario.split("=")[1])
            n = max(50, int((300 if c == 1 else 1500) * scale))
            # Warm-up (connections, code paths), not counted.
            asyncio.run(load.run_workload(router.url, [], requests=20, concurrency=c,
                                          max_tokens=16, seed=99, workload="shared"))  # fmt: skip
            cpu0 = router.cpu()
            report = asyncio.run(
                load.run_workload(router.url, [e.url for e in engines], requests=n,
                                  concurrency=c, max_tokens=16, seed=1, workload="shared")
            )  # fmt: skip
            cpu = router.cpu() - cpu0
        else:
            n = max(60, int(300 * scale) // 6 * 6)
            kill = scenario == "kill"
            events: dict[str, float] = {}

            def progress(done: int, elapsed: float) -> None:
                if kill and done == n // 4 and "killed" not in events:
                    engines[1].kill()
                    events["killed"] = elapsed
                if kill and done == n // 2 and "restarted" not in events:
                    engines[1] = engines[1].restart()  # blocks the client loop ~1 s
                    events["restarted"] = elapsed

            cpu0 = router.cpu()
            report = asyncio.run(
                load.run_workload(router.url, [e.url for e in engines], requests=n,
                                  concurrency=concurrency, seed=0,
                                  workload="multiturn" if scenario == "multiturn" else "shared",
                                  on_progress=progress)
            )  # fmt: skip
            cpu = router.cpu() - cpu0
            if kill:
                name, t_up = engines[1].name, events.get("restarted", float("inf"))
                back = [o.started for o in report.outcomes
                        if o.started >= t_up and o.engine in (name, engines[1].url)]  # fmt: skip
                served = len(back)
                note = (
                    f"killed at {events.get('killed', 0):.0f} s, restarted at {t_up:.0f} s; "
                    + (f"served again {min(back) - t_up:.1f} s later ({served} requests)"
                       if back else "not served again before the run ended")
                )  # fmt: skip
                # /stats of the restarted engine only counts since its restart.
                report.engine_requests[1] = None
        return _row(router, scenario, report, cpu, note)
    finally:
        if router is not None:
            router.stop()
        for e in engines:
            e.kill()


def table(rows: Sequence[Row]) -> str:
    head = ("| router | policy | scenario | requests | hit rate | TTFT p50 ms | p90 | p99 "
            "| requests per engine | errors | router CPU ms/request |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.router} | {r.policy} | {r.scenario} | {r.requests} | {r.hit} | {r.p50} "
            f"| {r.p90} | {r.p99} | {r.per_engine} | {r.errors} | {r.cpu_ms} |"
        )
    notes = [f"- {r.router} {r.policy} {r.scenario}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a third of the requests")
    p.add_argument("--routers", default="ours,sglang")
    p.add_argument("--policies", default="cache_aware,round_robin")
    p.add_argument("--scenarios", default="shared,multiturn,kill,cpu c=1,cpu c=32")
    p.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    p.add_argument("--gateway-script", type=Path, default=Router.script,
                   help="our gateway to run (e.g. an older version, for before/after)")  # fmt: skip
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="a flag for our gateway, e.g. --gateway-arg=--loop=asyncio")  # fmt: skip
    a = p.parse_args(argv)
    Router.script = a.gateway_script.resolve()
    Router.extra_args = list(a.gateway_arg)
    routers = [r for r in a.routers.split(",") if r]
    if "sglang" in routers and not sglang_available():
        print("sglang-router is not installed (pip install sglang-router==0.3.2): "
              "skipping the SGLang router\n")  # fmt: skip
        routers.remove("sglang")
    logs = a.logs or Path(tempfile.mkdtemp(prefix="cacheroute-e2e-"))
    logs.mkdir(parents=True, exist_ok=True)
    scale = 1 / 3 if a.quick else 1.0
    rows = []
    for scenario in a.scenarios.split(","):
        for policy in a.policies.split(","):
            if scenario.startswith("cpu") and policy != "cache_aware":
                continue  # the overhead rows: the default policy only
            for kind in routers:
                t = time.perf_counter()
                rows.append(run_one(kind, policy, scenario, logs, scale))
                print(f"  {kind} {policy} {scenario}: {time.perf_counter() - t:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(table(rows))
    if a.logs is None:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
