"""The ``cacheroute`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cacheroute import DEFAULT_POLICY
from cacheroute._validation import check_sequence, check_str
from cacheroute._version import __version__
from cacheroute.policies import policy_descriptions
from cacheroute.sim.cli import add_simulate_parser

__all__ = ["build_parser", "main"]


def _cmd_policies(args: argparse.Namespace) -> int:
    """List the registered policies, the default first (marked), the others by name."""
    descriptions = policy_descriptions()
    names = sorted(descriptions, key=lambda n: (n != DEFAULT_POLICY, n))
    width = max(map(len, names), default=0)
    for name in names:
        mark = "  (default)" if name == DEFAULT_POLICY else ""
        print(f"{name:<{width}}  {descriptions[name]}{mark}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cacheroute`` command."""
    parser = argparse.ArgumentParser(
        prog="cacheroute",
        description="Cache-aware, load-aware routing policies for LLM serving gateways.",
    )
    parser.add_argument("--version", action="version", version=f"cacheroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("policies", help="list the registered policies")
    p.set_defaults(func=_cmd_policies)
    add_simulate_parser(sub)
    return parser


def _check_arg(param: str, value: object) -> None:
    """``value`` must be a ``str`` (an element of ``argv``)."""
    check_str(param, value, empty_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cacheroute`` console script; returns the exit status.

    Raises:
        TypeError: ``argv`` is not ``None`` or a list or tuple of ``str``.
    """
    if argv is not None:
        check_sequence("argv", argv, item=_check_arg)
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result: int = func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
