"""Reading settings from `CLAWHUB_*` environment variables, with defaults and clear errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used."""


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = env_str(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env_str(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def parse_size(text: str) -> int:
    """Parse `64MiB`, `512k`, `1048576` into bytes (never negative)."""
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits):]
    if not digits or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 64MiB, 512KiB or 1048576")
    number = float(digits)
    # float() takes "inf", "nan" and "1e999" (inf); none is a size.
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a size such as 64MiB, 512KiB or 1048576")
    if number < 0:
        raise ValueError(f"{text!r} is negative; a size is 0 or more bytes")
    return int(number * _UNITS[unit])


def format_size(size: int) -> str:
    """`size` bytes the way parse_size reads them, in the largest unit that divides it: `2040MiB`, `4KiB`."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def env_size(name: str, default: str, *, maximum: int | None = None, why: str = "") -> int:
    """A size from `name`; above `maximum` is a SettingsError naming the variable, the bound and `why`."""
    raw = env_str(name, default)
    try:
        value = parse_size(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={raw!r} is too large: at most {format_size(maximum)}"
                            + (f" ({why})" if why else ""))
    return value


def env_list(name: str, default: str = "") -> tuple[str, ...]:
    return tuple(item.strip() for item in env_str(name, default).split(",") if item.strip())


def env_executor_addresses(default: tuple[str, ...]) -> tuple[str, ...]:
    """`CLAWHUB_EXECUTOR_ADDRESSES`: comma-separated executors, or `none` for no static executor at all (every
    executor registers itself: services/executor/registration.py). An empty value is unset, so `none` is how a
    registration-only setup says it, rather than keeping the single-host default."""
    addresses = env_list("CLAWHUB_EXECUTOR_ADDRESSES", ",".join(default))
    return () if addresses == ("none",) else addresses


def data_dir() -> Path:
    """Root of the embedded storage (sqlite files, blobs, caches): `CLAWHUB_DATA_DIR`, default ./.clawhub."""
    return Path(env_str("CLAWHUB_DATA_DIR", ".clawhub")).expanduser()
