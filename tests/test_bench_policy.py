"""benchmarks/bench_policy.py: its floor row times the prefix machinery with a constant
choice, and the policies it times decide as they do outside it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT, benchmark_script

from cacheroute import BasicWorker, make_policy
from cacheroute.policies import registry


def _script() -> ModuleType:
    return benchmark_script("bench_policy")


@pytest.fixture(autouse=True)
def _registry_restored() -> Iterator[None]:
    """The script registers ``floor`` and ``NAME@REV``: other tests list the registry."""
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


def test_the_floor_takes_the_first_eligible_worker_and_records_its_prompt() -> None:
    floor = _script().FloorPolicy()
    ws = [BasicWorker("http://a", healthy=False), BasicWorker("http://b"), BasicWorker("http://c")]
    d = floor.decide(ws, "system prompt, then a question")
    assert d is not None and d.index == 1
    assert ws[1].processed() == 1
    # the tree's match and insert are part of what it times: the prompt is recorded
    again = floor.decide(ws, "system prompt, then another question")
    assert again is not None and again.cached_tokens > 0


def test_the_floor_rows_come_first_and_are_summed_up() -> None:
    # A fresh process, as users run it: each timed run starts with gc.collect(), which in
    # a test worker's heap (hypothesis, Ray, every module imported so far) costs ~0.15 s.
    script = ROOT / "benchmarks" / "bench_policy.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--floor", "--policies", "round_robin"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("floor", "round"))]
    assert rows[0] == "floor" and "round_robin" in rows
    assert "floor: worst single-thread ratio at 64 workers" in out
    # The last line: round_robin's ratio minus the floor's, case by case, one thread.
    ratios: dict[str, dict[tuple[str, ...], float]] = {"floor": {}, "round_robin": {}}
    for line in out.splitlines():
        f = line.split()
        if f and f[0] in ratios and len(f) == 12 and f[4] == "1":
            ratios[f[0]][tuple(f[1:4])] = float(f[11])
    above = [r - ratios["floor"][case] for case, r in ratios["round_robin"].items()]
    assert len(above) == 8
    line = next(x for x in out.splitlines() if x.startswith("round_robin: above the floor"))
    for n in ("8", "64"):
        diffs = [
            r - ratios["floor"][case] for case, r in ratios["round_robin"].items() if case[2] == n
        ]
        low, high = line.split(f"{n} workers ")[1].split(",")[0].split(" to ")
        assert float(low) == pytest.approx(min(diffs), abs=0.011)
        assert float(high) == pytest.approx(max(diffs), abs=0.011)


def test_a_baseline_revision_is_loaded_from_git_and_decides_like_its_source(
    tmp_path: Path,
) -> None:
    """``--baseline-rev`` registers the policy's module as it was at a revision: here a
    repository made by the test, holding today's round_robin module."""
    import cacheroute.policies.round_robin as rr

    policies = tmp_path / "cacheroute" / "policies"
    policies.mkdir(parents=True)
    (policies / "round_robin.py").write_text(Path(rr.__file__).read_text())
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], check=True)

    name = _script().load_baseline("round_robin", "HEAD", root=str(tmp_path))
    assert name == "round_robin@HEAD"
    base, ours = make_policy(name), make_policy("round_robin")
    assert type(base) is not type(ours) and type(base).__module__ == "baseline_round_robin"
    ws = [BasicWorker(f"http://w{i}") for i in range(3)]
    assert [base.select_worker(ws) for _ in range(5)] == [ours.select_worker(ws) for _ in range(5)]
    with pytest.raises(subprocess.CalledProcessError):
        _script().load_baseline("round_robin", "no-such-rev", root=str(tmp_path))
