"""Argument checks whose errors name the parameter, so bad input is caught at construction."""

from __future__ import annotations

import math
import numbers


def positive_float(name: str, value: object, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or v <= 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def fraction(name: str, value: object, *, inclusive_one: bool = True) -> float:
    v = positive_float(name, value)
    if v > 1 or (v == 1 and not inclusive_one):
        raise ValueError(f"{name} must be in (0, 1{']' if inclusive_one else ')'}, got {value!r}")
    return v


def greater_than_one(name: str, value: object) -> float:
    v = positive_float(name, value)
    if v <= 1:
        raise ValueError(f"{name} must be > 1, got {value!r}")
    return v


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value
