"""Generic rules for stored configuration values: each builds a check that says what is wrong with a value.

A rule (:data:`Check`) returns ``None`` for a valid value, or the problem (``"expected ..."``) that
:mod:`monai_aeflow.model_config` puts into its one-line error. The tables of which key gets which rule, and
the rules that know about one setting (spatial size, spacing, orientation...), live in
:mod:`monai_aeflow.model_config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

Check = Callable[[Any], "str | None"]
"""A rule: returns what is wrong with a value (``"expected ..."``), or ``None`` when it is fine."""


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "-inf" if lo is None else f"{lo:g}"
    right = "inf" if hi is None else f"{hi:g}"
    return f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"


def _in(v: float, lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> bool:
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite real number (not a bool) in an interval."""

    def check(v: Any) -> str | None:
        if not _is_real(v) or not _in(float(v), lo, hi, lo_open, hi_open):
            return f"expected a number in {_interval(lo, hi, lo_open, hi_open)}"
        return None

    return check


def _integer(lo: int, hi: int) -> Check:
    """An integer (not a bool) in ``[lo, hi]``."""

    def check(v: Any) -> str | None:
        return None if _is_int(v) and lo <= v <= hi else f"expected an integer in [{lo}, {hi}]"

    return check


def _odd(lo: int, hi: int) -> Check:
    """An odd integer in ``[lo, hi]``."""

    def check(v: Any) -> str | None:
        return None if _is_int(v) and lo <= v <= hi and v % 2 else f"expected an odd integer in [{lo}, {hi}]"

    return check


def _one_of(*choices: Any) -> Check:
    """One of the given values (compared with type, so that ``True`` is not ``1``)."""

    def check(v: Any) -> str | None:
        if any(type(v) is type(c) and v == c for c in choices):
            return None
        return "expected one of " + ", ".join(repr(c) for c in choices)

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def _optional(check: Check) -> Check:
    """``None`` or a value that passes ``check``."""

    def wrapped(v: Any) -> str | None:
        problem = None if v is None else check(v)
        return None if problem is None else f"{problem}, or null"

    return wrapped


def _sequence(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str | bytes)


def _int_list(lengths: Sequence[int], lo: int, hi: int) -> Check:
    """A list of ``len in lengths`` integers in ``[lo, hi]``."""
    n = " or ".join(str(k) for k in lengths)

    def check(v: Any) -> str | None:
        if not _sequence(v) or len(v) not in lengths or not all(_is_int(x) and lo <= x <= hi for x in v):
            return f"expected a list of {n} integers in [{lo}, {hi}]"
        return None

    return check


def _anything(v: Any) -> str | None:
    return None


def check_value(name: str, value: Any, lo: float | None = None, lo_open: bool = False, optional: bool = False) -> None:
    """Refuse an option value that is not a finite number (not a bool) of at least ``lo`` (above it when
    ``lo_open``); ``None`` passes when ``optional``.

    Args:
        name: how the user gave it (``"--lr"``, ``"threshold"``): named in the message.
        value: the value.
        lo: the lower bound, or None.
        lo_open: exclude ``lo`` itself.
        optional: accept ``None``.

    Raises:
        AEFlowInputError: ``"<name> <value>: expected a number in [lo, inf)"``.
    """
    from monai_aeflow.errors import AEFlowInputError

    if optional and value is None:
        return
    problem = _number(lo, None, lo_open)(value)
    if problem is not None and lo is None:
        problem = "expected a finite number"
    if problem is not None:
        raise AEFlowInputError(f"{name} {value!r}: {problem}")
