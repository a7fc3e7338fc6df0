"""``cacheroute simulate --plugin``: run a policy registered by the user's own module."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheroute.cli import main
from cacheroute.policies import available_policies, registry

SMALL = ["--workload", "shared_prefix", "--limit", "48", "--workers", "3", "--progress", "off"]

PLUGIN = '''
from cacheroute import LoadBalancingPolicy, register_policy
from cacheroute.policies import check_request_text, least_loaded_index


class FirstHealthy(LoadBalancingPolicy):
    """The least loaded healthy worker (ties: the first)."""

    name = "{name}"
    description = "test plugin policy"

    def __init__(self, seed=None, bias=0):
        self.seed = seed
        self.bias = bias

    def select_worker(self, workers, request_text=None):
        check_request_text(request_text)
        return least_loaded_index(workers)


register_policy("{name}", FirstHealthy)
'''


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    """Plugins register policies and modules process-wide: undo that after each test."""
    saved = dict(registry._registry)
    modules = set(sys.modules)
    yield
    registry._registry.clear()
    registry._registry.update(saved)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def _plugin(path: Path, name: str = "plugin_first") -> Path:
    path.write_text(textwrap.dedent(PLUGIN.format(name=name)))
    return path


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["simulate", *SMALL, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_a_plugin_file_makes_its_policy_runnable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = _plugin(tmp_path / "my_policies.py")
    out = tmp_path / "out.json"
    argv = ["--plugin", str(plugin), "--policies", "plugin_first[bias=2],round_robin"]
    assert main(["simulate", *SMALL, *argv, "--json", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert "plugin_first[bias=2]" in header and "round_robin" in header
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["results"]] == ["plugin_first[bias=2]", "round_robin"]
    assert doc["config"]["plugins"] == [str(plugin)]
    assert all(r["requests"] == 48 for r in doc["results"])


def test_without_the_plugin_the_policy_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown policy 'plugin_first'" in _error(["--policies", "plugin_first"], capsys)


def test_plugins_by_module_name_repeatable_and_in_the_default_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = tmp_path / "site" / "acme_routing"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _plugin(pkg / "policies.py", "acme_first")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    other = _plugin(tmp_path / "other.py", "other_first")
    argv = ["--plugin", "acme_routing.policies", "--plugin", str(other), "--plugin", str(other)]
    assert main(["simulate", *SMALL, *argv]) == 0  # the same file twice is imported once
    header = capsys.readouterr().out.splitlines()[1]
    assert "acme_first" in header and "other_first" in header  # every registered policy
    assert {"acme_first", "other_first"} <= set(available_policies())


def test_a_file_plugin_gets_a_unique_module_name(tmp_path: Path) -> None:
    from cacheroute.sim.specs import load_plugin

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = load_plugin(str(_plugin(tmp_path / "a" / "policies.py", "first_a")))
    two = load_plugin(str(_plugin(tmp_path / "b" / "policies.py", "first_b")))
    assert one is not two and one.__name__ != two.__name__
    assert sys.modules[one.__name__] is one and "policies" in one.__name__
    assert load_plugin(str(tmp_path / "a" / "policies.py")) is one  # cached


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def broken(:\n", r"bad.py:1: SyntaxError: "),
        ("import json\n\nraise RuntimeError('no GPU here')\n", r"bad.py:3: RuntimeError: no GPU"),
        ("import no_such_module_xyz\n", r"bad.py:1: ModuleNotFoundError: No module named"),
        (
            "from cacheroute import register_policy\nregister_policy('round_robin', int)\n",
            "bad.py:2: TypeError",
        ),
        ("import sys\nsys.exit(3)\n", r"bad.py:2: SystemExit: 3"),
    ],
)
def test_a_plugin_that_fails_to_import_is_one_error_line_naming_it(
    tmp_path: Path, source: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    line = _error(["--plugin", str(path)], capsys)
    assert f"argument --plugin: {path}" in line
    assert message in line
    # a failed import leaves no module behind
    assert not [m for m in sys.modules if m.startswith("cacheroute_plugin_bad")]


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("{tmp}/missing.py", "no such file"),
        ("{tmp}", "is not a file"),
        ("no_such_package_xyz.policies", "no module named 'no_such_package_xyz'"),
        ("not a module", "not a module name or a .py path"),
        ("", "not a module name or a .py path"),
    ],
)
def test_a_plugin_that_cannot_be_found_is_one_error_line_naming_it(
    tmp_path: Path, plugin: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = plugin.format(tmp=tmp_path)
    line = _error(["--plugin", plugin], capsys)
    assert f"argument --plugin: {plugin}" in line and message in line


def test_a_plugin_policy_whose_constructor_raises_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fragile.py"
    path.write_text(
        textwrap.dedent(PLUGIN.format(name="fragile_first")).replace(
            "self.seed = seed", "raise RuntimeError('needs a GPU')"
        )
    )
    line = _error(["--plugin", str(path), "--policies", "fragile_first"], capsys)
    assert "argument --policies: fragile_first: RuntimeError: needs a GPU" in line
