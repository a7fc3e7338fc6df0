"""Policy specs: a registered policy name plus its configuration, as written on the CLI.

Grammar (one spec; ``--policies`` takes a comma-separated list of them)::

    NAME                       make_policy(NAME)
    NAME:MODE                  shorthand for NAME[<mode key>=MODE]; for cache_aware the mode
                               key is imbalance_mode, so cache_aware:least_load
    NAME[KEY=VALUE,...]        make_policy(NAME, KEY=VALUE, ...); VALUE is read as an int,
                               a float, true/false, none, or else a string
    NAME:MODE[KEY=VALUE,...]   both

Examples: ``round_robin``, ``cache_aware:least_load``,
``cache_aware[imbalance_mode=least_load,cache_threshold=0.3]``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from cacheroute import DEFAULT_POLICY
from cacheroute._validation import check_str, fail
from cacheroute.policies import (
    LoadBalancingPolicy,
    available_policies,
    make_policy,
    policy_class,
)

__all__ = [
    "MODE_KEYS",
    "PluginError",
    "PolicySpec",
    "default_specs",
    "load_plugin",
    "parse_policy_list",
]

MODE_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cache_aware": ("imbalance_mode", ("locality", "least_load")),
}
"""Policies with a ``NAME:MODE`` shorthand: name -> (config key, its modes). The default
comparison runs each of these policies once per mode."""

_SPEC = re.compile(r"^([A-Za-z_][\w.-]*)(?::([\w.-]+))?(?:\[(.*)\])?$")


def _accepted_keys(name: str) -> frozenset[str] | None:
    """The keyword arguments the policy registered as ``name`` accepts (``None``: any).

    Mirrors :func:`make_policy`: the names of the constructor's positional-or-keyword
    and keyword-only parameters; ``None`` when it takes ``**kwargs``. An unknown name
    gives an empty set (``make_policy`` then raises its own ``ValueError``).
    """
    cls = _registered_class(name)
    if cls is None:
        return frozenset()
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _registered_class(name: str) -> type[LoadBalancingPolicy] | None:
    try:
        return policy_class(name)
    except ValueError:
        return None


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class PolicySpec:
    """A policy to simulate: registry ``name``, ``config`` for :func:`make_policy`, a ``label``.

    Build it with :meth:`parse`. :meth:`build` makes a fresh policy object each call.
    """

    name: str
    config: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        check_str("name", self.name)
        if type(self.config) is not tuple or not all(
            type(kv) is tuple and len(kv) == 2 and type(kv[0]) is str for kv in self.config
        ):
            raise fail("config", "a tuple of (str, value) pairs", self.config, TypeError)
        check_str("label", self.label, empty_ok=True)

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """Parse one spec (see the module docstring).

        Raises:
            ValueError: bad syntax, an unknown policy name, or a mode of a policy without a
                mode shorthand / an unknown mode. The message names the spec.
            TypeError: ``text`` is not a str.
        """
        check_str("text", text, empty_ok=True)
        text = text.strip()
        m = _SPEC.match(text)
        if not m:
            raise ValueError(
                f"bad policy spec {text!r}: expected NAME, NAME:MODE or NAME[KEY=VALUE,...]"
            )
        name, mode, body = m.group(1), m.group(2), m.group(3)
        known = available_policies()
        if name not in known:
            raise ValueError(
                f"unknown policy {name!r} in spec {text!r}; available: {', '.join(known)}"
            )
        config: dict[str, Any] = {}
        if mode is not None:
            if name not in MODE_KEYS:
                raise ValueError(
                    f"policy spec {text!r}: {name!r} has no NAME:MODE shorthand "
                    f"(use {name}[KEY=VALUE])"
                )
            key, modes = MODE_KEYS[name]
            if mode not in modes:
                raise ValueError(
                    f"policy spec {text!r}: unknown mode {mode!r}; modes: {', '.join(modes)}"
                )
            config[key] = mode
        if body:
            for item in body.split(","):
                key, sep, raw = item.partition("=")
                key = key.strip()
                if not sep or not key.isidentifier():
                    raise ValueError(f"policy spec {text!r}: expected KEY=VALUE, got {item!r}")
                if key in config:  # (NAME:MODE sets its key too) else the last silently wins
                    raise ValueError(f"policy spec {text!r}: key {key!r} given twice")
                config[key] = _value(raw.strip())
        return cls(name, tuple(config.items()), text)

    def build(self, seed: int | None = None, **extra: Any) -> LoadBalancingPolicy:
        """A fresh policy object. ``seed`` and ``extra`` keys (e.g. ``on_decision``) are
        passed only when the policy accepts them and the spec does not set them.

        Which keys a policy accepts is read from its constructor's signature (the same
        rule :func:`make_policy` applies); the spec's own ``config`` is always passed, so
        a key the policy does not accept there is still the registry's ``TypeError``.
        """
        config = dict(self.config)
        accepted = _accepted_keys(self.name)
        optional = {} if seed is None else {"seed": seed}
        optional.update(extra)
        for key, value in optional.items():
            if key not in config and (accepted is None or key in accepted):
                config[key] = value
        return make_policy(self.name, **config)

    def __str__(self) -> str:
        return self.label or self.name


def default_specs() -> list[PolicySpec]:
    """Every registered policy, once per mode for the policies in :data:`MODE_KEYS`; the
    default policy (:data:`cacheroute.DEFAULT_POLICY`) first, the others by name."""
    specs: list[PolicySpec] = []
    for name in sorted(available_policies(), key=lambda n: (n != DEFAULT_POLICY, n)):
        if name in MODE_KEYS:
            specs.extend(PolicySpec.parse(f"{name}:{mode}") for mode in MODE_KEYS[name][1])
        else:
            specs.append(PolicySpec.parse(name))
    return specs


def parse_policy_list(text: str) -> list[PolicySpec]:
    """Parse a comma-separated list of specs (commas inside ``[...]`` do not split).

    Raises:
        ValueError: a bad spec (see :meth:`PolicySpec.parse`), no spec, or one twice.
        TypeError: ``text`` is not a str.
    """
    check_str("text", text, empty_ok=True)
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    specs = [PolicySpec.parse(p) for p in parts if p.strip()]
    if not specs:
        raise ValueError("no policy given")
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"policy spec(s) given twice: {', '.join(dupes)}")
    return specs


class PluginError(Exception):
    """A plugin could not be imported; the message starts with the plugin as given."""


def _is_path(plugin: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return plugin.endswith(".py") or any(sep in plugin for sep in seps)


def _where(plugin: str, exc: BaseException, origin: str | None) -> str:
    """``plugin[:line]: Type: message``, the line being the plugin's own line that raised."""
    if (
        isinstance(exc, SyntaxError)
        and exc.filename
        and origin
        and os.path.abspath(exc.filename) == origin
    ):
        return f"{plugin}:{exc.lineno}: SyntaxError: {exc.msg}"
    line = ""
    if origin is not None:
        for frame in traceback.extract_tb(exc.__traceback__):
            if os.path.abspath(frame.filename) == origin:
                line = f":{frame.lineno}"  # the last (innermost) frame of the plugin
    text = str(exc).strip().splitlines()
    return f"{plugin}{line}: {type(exc).__name__}: {text[0] if text else ''}".rstrip()


def load_plugin(plugin: str) -> ModuleType:
    """Import a module that registers policies (with :func:`cacheroute.register_policy`).

    ``plugin`` is a dotted module name (imported with ``importlib.import_module``,
    from ``sys.path``) or the path of a ``.py`` file (anything ending in ``.py`` or
    containing a path separator), imported by file under a module name unique to its
    absolute path (``cacheroute_plugin_<stem>_<hash>``), so two ``policies.py`` in
    different folders do not collide. Importing the same plugin again returns the module
    already imported (it does not register its policies twice).

    Raises:
        TypeError: ``plugin`` is not a str.
        PluginError: no such file or module, or importing it raised (a syntax error, an
            exception, ``SystemExit``); the message starts with ``plugin`` and, when the
            error is on a line of the plugin, that line: ``"my.py:3: ValueError: ..."``.
    """
    check_str("plugin", plugin, empty_ok=True)
    if _is_path(plugin):
        path = os.path.abspath(plugin)
        if not os.path.exists(path):
            raise PluginError(f"{plugin}: no such file")
        if not os.path.isfile(path):
            raise PluginError(f"{plugin}: is not a file")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        name = f"cacheroute_plugin_{stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"{plugin}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            del sys.modules[name]
            raise PluginError(_where(plugin, exc, path)) from exc
        return module
    if not plugin or not all(part.isidentifier() for part in plugin.split(".")):
        raise PluginError(f"{plugin or repr(plugin)}: not a module name or a .py path")
    try:
        found = importlib.util.find_spec(plugin)
    except ModuleNotFoundError as exc:  # a parent package is missing
        raise PluginError(f"{plugin}: no module named {exc.name!r}") from None
    except (Exception, SystemExit) as exc:  # a parent package failed to import
        raise PluginError(_where(plugin, exc, None)) from exc
    if found is None:
        raise PluginError(f"{plugin}: no module named {plugin!r}")
    origin = os.path.abspath(found.origin) if found.origin else None
    try:
        return importlib.import_module(plugin)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(plugin, None)
        raise PluginError(_where(plugin, exc, origin)) from exc
