"""A module of this repository as it was at a git revision: the baselines of
``bench_tree.py --baseline-rev`` and ``bench_policy.py --baseline-rev``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_at(rev: str, path: str, name: str, root: str | None = None) -> ModuleType:
    """``path`` (relative to the repository at ``root``, default this one) at git revision
    ``rev``, imported as module ``name`` against today's package.

    Raises:
        subprocess.CalledProcessError: ``rev`` or ``path`` is unknown to git.
    """
    src = subprocess.run(
        ["git", "-C", root or ROOT, "show", f"{rev}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    file = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(file, "w", encoding="utf-8") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
