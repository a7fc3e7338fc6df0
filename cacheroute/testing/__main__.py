"""``python -m cacheroute.testing [name ...]``: check registered policies by name."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - manual use
    """Run :func:`~cacheroute.testing.check_policy` on each named (default: every) policy."""
    from cacheroute.policies import available_policies
    from cacheroute.testing import check_policy

    names = list(argv if argv is not None else sys.argv[1:]) or available_policies()
    for name in names:
        check_policy(name, max_examples=50)
        print(f"{name}: ok")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
