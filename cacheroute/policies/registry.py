"""Policies by name: :func:`make_policy`, :func:`register_policy`, :func:`available_policies`."""

from __future__ import annotations

import inspect
import threading
from typing import Any

from cacheroute._validation import check_bool, check_str
from cacheroute.policies.base import LoadBalancingPolicy

__all__ = [
    "available_policies",
    "make_policy",
    "policy_class",
    "policy_descriptions",
    "register_policy",
]

_registry: dict[str, type[LoadBalancingPolicy]] = {}
_lock = threading.Lock()


def register_policy(
    name: str, cls: type[LoadBalancingPolicy], *, replace: bool = False
) -> type[LoadBalancingPolicy]:
    """Make ``cls`` available as ``make_policy(name, ...)``.

    Args:
        name: the registry name (non-empty, no whitespace).
        cls: a subclass of :class:`LoadBalancingPolicy`.
        replace: a ``bool``: allow replacing an existing registration (otherwise
            ``ValueError``).

    Returns ``cls``, so it can be used as ``register_policy("x", X)`` after the class.
    """
    check_str("name", name)
    if any(c.isspace() for c in name):
        raise ValueError(f"policy name must be a non-empty str without whitespace, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, LoadBalancingPolicy)):
        raise TypeError(f"cls must be a subclass of LoadBalancingPolicy, got {cls!r}")
    check_bool("replace", replace)
    with _lock:
        if name in _registry and _registry[name] is not cls and not replace:
            raise ValueError(
                f"a policy named {name!r} is already registered ({_registry[name].__name__}); "
                "pass replace=True to replace it"
            )
        _registry[name] = cls
    return cls


def available_policies() -> list[str]:
    """The registered policy names, sorted."""
    with _lock:
        return sorted(_registry)


def policy_class(name: str) -> type[LoadBalancingPolicy]:
    """The class registered as ``name`` (e.g. to inspect its parameters). O(1).

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: ``name`` is not registered (the message lists the known names).
    """
    check_str("name", name)
    with _lock:
        cls = _registry.get(name)
        known = sorted(_registry)
    if cls is None:
        raise ValueError(
            f"unknown policy {name!r}: name must be one of the available policies: "
            f"{', '.join(known)}"
        )
    return cls


def policy_descriptions() -> dict[str, str]:
    """``{name: one-line description}`` for every registered policy, sorted by name."""
    with _lock:
        return {name: _registry[name].description for name in sorted(_registry)}


def make_policy(name: str, **config: Any) -> LoadBalancingPolicy:
    """Build the policy registered as ``name`` with keyword ``config``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names), or a
            config value is out of range (raised by the policy, naming the key).
        TypeError: a config key the policy does not accept (the message names it and lists
            the accepted keys), or a config value of the wrong type.
    """
    cls = policy_class(name)
    signature = inspect.signature(cls)
    accepted = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not takes_any:
        unknown = sorted(set(config) - set(accepted))
        if unknown:
            raise TypeError(
                f"policy {name!r} got unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"accepted keys: {', '.join(accepted) or '(none)'}"
            )
    return cls(**config)
