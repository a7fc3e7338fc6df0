import subprocess
import sys

import pytest

from cacheroute import DEFAULT_POLICY, __version__, available_policies
from cacheroute.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cacheroute {__version__}"


def test_policies_lists_every_registered_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    # the default first, marked; then the others by name
    assert names[0] == DEFAULT_POLICY and lines[0].endswith("(default)")
    assert names[1:] == [n for n in available_policies() if n != DEFAULT_POLICY]
    assert not any(line.endswith("(default)") for line in lines[1:])
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every one described


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: cacheroute" in capsys.readouterr().out


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cacheroute", "policies"], capture_output=True, text=True, check=True
    )
    assert "shortest_queue" in out.stdout
