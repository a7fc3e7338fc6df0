"""Regenerate every result table in docs/simulator.md by running its command.

    python benchmarks/simulator_tables.py            # rewrite the tables in place
    python benchmarks/simulator_tables.py --check    # exit 1 if a table is stale
    python benchmarks/simulator_tables.py --only shared_prefix   # blocks whose command has it

A table is a marked block of the doc::

    <!-- table: cacheroute simulate --workload shared_prefix -->
    ```bash
    cacheroute simulate --workload shared_prefix
    ```

    ```text
    (the command's output)
    ```
    <!-- /table -->

The marker's command is run from the repository root (so trace paths such as
``../shared/traces/...`` resolve as the doc says) with ``python -m cacheroute`` and
``--progress off``, and the block between the markers is rewritten: the command, then its
output. Arguments after `` ; also: `` in the marker are passed too but not shown (the
default run also rewrites the plot and JSON in docs/img/; the plot is re-saved with 256
colours). ``--check`` writes nothing and compares without the ``sim wall time`` row, the
one number that depends on the machine.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "simulator.md"

BLOCK = re.compile(
    r"^<!-- table: (?P<command>[^;\n]+?)(?: ; also: (?P<also>[^\n]*?))? -->\n"
    r"(?P<body>.*?)"
    r"^<!-- /table -->$",
    re.M | re.S,
)

Runner = Callable[[list[str]], str]


def run_command(argv: list[str]) -> str:
    """Run ``cacheroute ARGV`` from the repository root; its stdout (stderr on failure)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cacheroute", *argv, "--progress", "off"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cacheroute {shlex.join(argv)} failed:\n{proc.stderr}")
    return proc.stdout


def shrink_png(path: Path) -> None:
    """Re-save a plot as a 256-colour PNG (a quarter of the size; a plot has a dozen
    colours) when Pillow, which matplotlib requires, is importable."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib brings Pillow
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def render(command: str, output: str) -> str:
    """The body of one block: the command as a bash block, then its output."""
    return f"```bash\n{command}\n```\n\n```text\n{output.rstrip()}\n```\n"


def _comparable(body: str) -> str:
    return "\n".join(line for line in body.splitlines() if not line.startswith("sim wall time"))


def update(
    text: str,
    run: Runner = run_command,
    only: str | None = None,
    log: Callable[[str], None] = print,
    hidden: bool = True,
) -> tuple[str, list[str]]:
    """``text`` with every marked block regenerated; also the commands whose block changed
    (ignoring the wall-time row). ``hidden=False`` leaves out the ``; also:`` arguments
    (which write files, not the table)."""
    stale: list[str] = []

    def replace(m: re.Match[str]) -> str:
        command = m.group("command").strip()
        if only is not None and only not in command:
            return m.group(0)
        words = shlex.split(command)
        if words[:2] != ["cacheroute", "simulate"]:
            raise ValueError(f"not a cacheroute simulate command: {command!r}")
        log(f"running: {command}")
        also = shlex.split(m.group("also") or "") if hidden else []
        body = render(command, run(words[1:] + also))
        if "--plot" in also:
            shrink_png(ROOT / also[also.index("--plot") + 1])
        if _comparable(body) != _comparable(m.group("body")):
            stale.append(command)
        head = m.group(0).split("\n", 1)[0]
        return f"{head}\n{body}<!-- /table -->"

    return BLOCK.sub(replace, text), stale


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--doc", type=Path, default=DOC, help="the Markdown file (default: %(default)s)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    parser.add_argument("--only", metavar="TEXT", help="only the blocks whose command has TEXT")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    if not BLOCK.search(text):
        print(f"{args.doc}: no <!-- table: ... --> block", file=sys.stderr)
        return 1
    new, stale = update(
        text,
        only=args.only,
        log=lambda s: print(s, file=sys.stderr),
        hidden=not args.check,  # a check writes nothing, not even the plot
    )
    if args.check:
        for command in stale:
            print(f"stale: {command}", file=sys.stderr)
        return 1 if stale else 0
    if new != text:
        args.doc.write_text(new, encoding="utf-8")
    print(f"{args.doc}: {len(stale)} table(s) changed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
