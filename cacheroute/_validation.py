"""Argument checks shared by every public callable: one place, one message format.

Every message reads ``"<param> must be <what>, got <value> (<type>)"``, so a user sees
which argument was wrong, what was expected and what arrived. Nothing is clamped or
coerced: a check either returns the value (ints and bools exactly as given, reals as
``float``) or raises ``TypeError`` (wrong type) / ``ValueError`` (right type, bad value).
``bool`` is never accepted where a number is expected, nor a number where a ``bool`` is.

>>> check_int("max_size", 10, minimum=1)
10
>>> check_int("max_size", True, minimum=1)
Traceback (most recent call last):
...
TypeError: max_size must be an int, got True (bool)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_real",
    "check_sequence",
    "check_str",
    "describe",
    "fail",
]

T = TypeVar("T")


def describe(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, followed by its type name.

    >>> describe("x" * 100)[-12:]
    "xx...' (str)"
    >>> describe(3.5)
    '3.5 (float)'
    """
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    if len(text) > limit:
        text = text[: limit - 4] + "...'" if text[:1] in "'\"" else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def fail(param: str, what: str, value: object, exc: type[Exception] = ValueError) -> Exception:
    """Build the one-format exception (the caller raises it: ``raise fail(...)``)."""
    return exc(f"{param} must be {what}, got {describe(value)}")


def check_int(
    param: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    none_ok: bool = False,
) -> Any:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``.

    ``None`` is accepted (and returned) only with ``none_ok``.
    """
    if value is None and none_ok:
        return None
    what = "an int" + (" or None" if none_ok else "")
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise fail(param, what, value, TypeError)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(param, _range("an int", minimum, maximum, none_ok), value)
    return value


def check_real(
    param: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    finite: bool = True,
    none_ok: bool = False,
) -> Any:
    """``float(value)`` if it is an ``int`` or ``float`` (not a ``bool``) in range.

    NaN is always refused; infinities unless ``finite=False``. ``min_open`` makes the
    lower bound exclusive.
    """
    if value is None and none_ok:
        return None
    what = "a real number" + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(param, what, value, TypeError)
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        raise fail(param, "a real number that fits a float", value) from None
    if math.isnan(x) or (finite and math.isinf(x)):
        raise fail(param, "a finite real number" if finite else "a real number", value)
    low_bad = minimum is not None and (x <= minimum if min_open else x < minimum)
    if low_bad or (maximum is not None and x > maximum):
        lo = "" if minimum is None else ("> " if min_open else ">= ") + f"{minimum:g}"
        hi = "" if maximum is None else f"<= {maximum:g}"
        raise fail(param, f"a real number {' and '.join(p for p in (lo, hi) if p)}", value)
    return x


def _range(what: str, minimum: int | None, maximum: int | None, none_ok: bool) -> str:
    if minimum is not None and maximum is not None:
        what += f" in [{minimum}, {maximum}]"
    elif minimum is not None:
        what += f" >= {minimum}"
    elif maximum is not None:
        what += f" <= {maximum}"
    return what + (" or None" if none_ok else "")


def check_bool(param: str, value: object) -> bool:
    """``value`` if it is exactly ``True`` or ``False`` (``1``, ``"false"`` are refused)."""
    if value is True or value is False:
        return value
    raise fail(param, "a bool", value, TypeError)


def check_str(param: str, value: object, *, empty_ok: bool = False, none_ok: bool = False) -> Any:
    """``value`` if it is a ``str`` (non-empty unless ``empty_ok``)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, str):
        raise fail(param, "a str" + (" or None" if none_ok else ""), value, TypeError)
    if not value and not empty_ok:
        raise fail(param, "a non-empty str", value)
    return value


def check_callable(param: str, value: object, *, none_ok: bool = False) -> Any:
    """``value`` if it is callable (or ``None`` with ``none_ok``)."""
    if (value is None and none_ok) or callable(value):
        return value
    raise fail(param, "callable" + (" or None" if none_ok else ""), value, TypeError)


def check_choice(param: str, value: object, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices`` (compared with ``==`` and same type)."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return c
    listed = ", ".join(map(repr, choices))
    exc = ValueError if isinstance(value, str) else TypeError
    raise fail(param, f"one of {listed}", value, exc)


def check_sequence(
    param: str,
    value: object,
    *,
    item: Callable[[str, object], object] | None = None,
) -> Sequence[Any]:
    """``value`` if it is a ``list``, ``tuple`` or other non-text ``Sequence``.

    ``str``, ``bytes``, ``dict``, sets and generators are refused (a ``str`` is a sequence
    of characters, never a list of items). With ``item``, it is called as
    ``item(f"{param}[{i}]", element)`` on every element.
    """
    if (
        type(value) is not list
        and type(value) is not tuple
        and (
            isinstance(value, (str, bytes, bytearray, memoryview))
            or not isinstance(value, Sequence)
        )
    ):
        raise fail(param, "a list or tuple", value, TypeError)
    seq: Sequence[Any] = value
    if item is not None:
        for i, v in enumerate(seq):
            item(f"{param}[{i}]", v)
    return seq


def settle_config(
    config_cls: type[T], config: object, given: dict[str, object], **extra: object
) -> T:
    """A policy's settings from ``config=`` or from keyword settings, never both.

    ``given`` holds the constructor's keyword settings (fields of the dataclass
    ``config_cls``); ``extra`` fields (such as ``on_decision``) may accompany ``config``
    and replace its values when not ``None``. A ``given`` value counts as passed unless it
    is its field's default (the same object, or an equal value of the same type).
    """
    if config is None:
        return config_cls(**given, **extra)
    if not isinstance(config, config_cls):
        raise fail("config", f"a {config_cls.__name__} or None", config, TypeError)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    clash = sorted(
        k
        for k, v in given.items()
        if not (v is defaults[k] or (type(v) is type(defaults[k]) and v == defaults[k]))
    )
    if clash:
        raise TypeError(
            "pass either config= or keyword settings, not both: got config= and "
            + ", ".join(f"{k}={given[k]!r}" for k in clash)
        )
    extra = {k: v for k, v in extra.items() if v is not None}
    return dataclasses.replace(config, **extra) if extra else config  # type: ignore[type-var]
