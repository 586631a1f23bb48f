"""Value checks shared by every stage: each names the parameter, shows the value and says what
is allowed, so a bad value is refused before any work with one :class:`ConfigError`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.errors import ConfigError

__all__ = [
    "check_choice",
    "check_int",
    "check_number",
    "check_seed",
    "check_seeds",
    "counted",
]


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound may be open-ended)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"`{name}` must be a whole number, got {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ConfigError(f"`{name}` must be {_range(low, high)}, got {v}")
    return v


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the bounds (``*_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"`{name}` must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    bad = bad or (low is not None and (v < low or (low_open and v == low)))
    bad = bad or (high is not None and (v > high or (high_open and v == high)))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        allowed = " and ".join(part for part in (lo, hi) if part) or "finite"
        raise ConfigError(f"`{name}` must be a finite number {allowed}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ConfigError(f"`{name}` must be one of {', '.join(options)}; got {value!r}")
    return str(value)


def check_seed(name: str, value: Any) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1 (what NumPy and torch both take)."""
    return check_int(name, value, low=0, high=2**32 - 1)


def check_seeds(name: str, values: Sequence[Any]) -> list[int]:
    """Split seeds: at least one, each a :func:`check_seed`."""
    if not values:
        raise ConfigError(f"`{name}` needs at least one seed")
    seeds = [check_seed(name, v) for v in values]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(
            f"`{name}` lists seed {', '.join(map(str, twice))} more than once: each seed draws "
            "one split, and a repeated one would count the same split twice in the mean ± std"
        )
    return seeds


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    if low is not None:
        return f"at least {low}"
    return f"at most {high}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 pixel"``, ``"2 pixels"``: a count and its noun, for messages."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
