"""Value checks for config sections, each failure a `UserError` naming the key and the allowed range."""

from __future__ import annotations

from common.errors import UserError


def positive(section, name, *keys):
    for k in keys:
        v = getattr(section, k)
        if v <= 0:
            raise UserError(f"{name}.{k}={v} must be >= 1" if isinstance(v, int) else f"{name}.{k}={v} must be > 0")


def at_least(section, name, low, *keys):
    for k in keys:
        v = getattr(section, k)
        if v < low:
            raise UserError(f"{name}.{k}={v} must be >= {low}")


def in_range(section, name, key, low, high, low_open=False, high_open=False):
    v = getattr(section, key)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise UserError(f"{name}.{key}={v} must be in {lb}{low}, {high}{hb}")


def choice(section, name, key, allowed):
    v = getattr(section, key)
    if v not in allowed:
        raise UserError(f"{name}.{key}={v!r} is not one of: {', '.join(allowed)}")
