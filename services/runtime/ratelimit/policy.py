"""Who gets how many calls: limits per method class and role, per-key overrides, read from `CLAWHUB_RATE_*`.

A limit is `RATE/BURST`: a bucket of BURST tokens refilled at RATE tokens per second; a call takes one token.
`off` (or `unlimited`) means no bucket at all. The settings, their defaults and the syntax are documented in
docs/ratelimits.md; every `CLAWHUB_RATE_*` variable that is not one of them is an error, so a typo is not
silently ignored.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from services.runtime.errors import did_you_mean
from services.runtime.settings import SettingsError

# Method classes: what a bucket counts. `write` is every mutating call (publish, deploy, rollback, yank, tag,
# admin calls); `stream` counts the opening of a long-lived response stream (watches, downloads).
CLASSES = ("invoke", "read", "write", "stream")
# Roles of principals, plus `service`: the platform's own services calling each other, keyed by calling service.
ROLES = ("viewer", "invoker", "publisher", "operator", "admin", "anonymous", "service")
# An override naming this class applies to every class of its key.
ANY_CLASS = "*"
# The most a principal key or a skill adds to a bucket key: a flood of long names costs bounded memory.
MAX_KEY_CHARS = 256

# The settings (each in README's configuration table), spelled out so a search finds them.
LIMITS = "CLAWHUB_RATE_LIMITS"
CLASS_VARIABLES = {"invoke": "CLAWHUB_RATE_INVOKE", "read": "CLAWHUB_RATE_READ", "write": "CLAWHUB_RATE_WRITE",
                   "stream": "CLAWHUB_RATE_STREAM"}
OVERRIDES = "CLAWHUB_RATE_OVERRIDES"
BACKEND = "CLAWHUB_RATE_BACKEND"
MAX_KEYS = "CLAWHUB_RATE_MAX_KEYS"
REDIS_URL = "CLAWHUB_RATE_REDIS_URL"
REDIS_PREFIX = "CLAWHUB_RATE_REDIS_PREFIX"
REDIS_DOWN_VARIABLE = "CLAWHUB_RATE_REDIS_DOWN"
REDIS_TIMEOUT = "CLAWHUB_RATE_REDIS_TIMEOUT"
REDIS_RETRY = "CLAWHUB_RATE_REDIS_RETRY"
# What every rate-limit variable starts with; any other variable so named is a typo.
PREFIX = LIMITS.removesuffix("LIMITS")
BACKENDS = ("local", "redis")
REDIS_DOWN = ("open", "closed")


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket's shape: `rate` tokens per second, at most `burst` tokens."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate {self.rate} must be a positive number of calls per second")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise ValueError(f"burst {self.burst} must be at least 1 (a bucket must hold one call)")

    def __str__(self) -> str:
        """The setting's syntax, `RATE/BURST`: what ErrorInfo's `limit` says."""
        return f"{_number(self.rate)}/{_number(self.burst)}"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def parse_limit(text: str) -> Limit | None:
    """`RATE/BURST` (`100/200`, `0.5/5`) as a Limit; `off` or `unlimited` as None (no limit).
    Raises ValueError with a one-line explanation."""
    raw = text.strip()
    if raw.lower() in ("off", "unlimited"):
        return None
    rate_text, slash, burst_text = raw.partition("/")
    try:
        if not slash:
            raise ValueError
        rate, burst = float(rate_text), float(burst_text)
    except ValueError:
        raise ValueError(f"{text!r} is not RATE/BURST (calls per second / bucket size, such as 100/200) "
                         "or off") from None
    return Limit(rate, burst)


# Defaults far above what a person or the test suite does: a limit is there to stop a flood, not a user.
DEFAULT_CLASS_LIMITS: Mapping[str, Limit] = {
    "invoke": Limit(2000, 4000),
    "read": Limit(2000, 4000),
    "write": Limit(200, 1000),
    "stream": Limit(200, 1000),
}
# The platform's own services carry every user's traffic between them: ten times more.
DEFAULT_SERVICE_LIMITS: Mapping[str, Limit] = {
    "invoke": Limit(20000, 40000),
    "read": Limit(20000, 40000),
    "write": Limit(2000, 10000),
    "stream": Limit(2000, 10000),
}


@dataclass(frozen=True)
class RateLimitSettings:
    """Rate limits and where their buckets live. Every field is documented in docs/ratelimits.md."""

    enabled: bool = True
    """CLAWHUB_RATE_LIMITS: `on` (default) or `off` (no interceptor at all)."""
    class_limits: Mapping[str, Limit | None] = field(default_factory=lambda: dict(DEFAULT_CLASS_LIMITS))
    """CLAWHUB_RATE_<CLASS> (INVOKE, READ, WRITE, STREAM): every role's limit but `service`'s."""
    role_limits: Mapping[tuple[str, str], Limit | None] = field(
        default_factory=lambda: {("service", c): limit for c, limit in DEFAULT_SERVICE_LIMITS.items()})
    """CLAWHUB_RATE_<CLASS>_<ROLE>: one role's limit, keyed (role, class)."""
    overrides: Mapping[tuple[str, str], Limit | None] = field(default_factory=dict)
    """CLAWHUB_RATE_OVERRIDES: `KEY@CLASS=RATE/BURST,…`, keyed (principal key, class or `*`)."""
    backend: str = "local"
    """CLAWHUB_RATE_BACKEND: `local` (buckets in this process) or `redis` (shared by every replica)."""
    max_keys: int = 100_000
    """CLAWHUB_RATE_MAX_KEYS: buckets the local backend keeps (least recently used go first)."""
    redis_url: str = ""
    """CLAWHUB_RATE_REDIS_URL: `redis://[:password@]host:port/db` (or rediss://, unix://); needed for redis."""
    redis_prefix: str = "clawhub:ratelimit:"
    """CLAWHUB_RATE_REDIS_PREFIX: prefix of every key the buckets use in Redis."""
    redis_down: str = "open"
    """CLAWHUB_RATE_REDIS_DOWN: while Redis is unreachable, `open` (limit with this process's own buckets) or
    `closed` (refuse every limited call with UNAVAILABLE)."""
    redis_timeout: float = 0.25
    """CLAWHUB_RATE_REDIS_TIMEOUT: seconds a call waits for Redis (connect or answer) before it counts as down."""
    redis_retry: float = 1.0
    """CLAWHUB_RATE_REDIS_RETRY: seconds between attempts to reach Redis again while it is down."""
    _table: dict[tuple[str, str], Limit | None] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        # The resolved table, so a call costs a few dict lookups: (role, class) → limit.
        table = self._table
        for role in ROLES:
            for cls in CLASSES:
                if (role, cls) in self.role_limits:
                    table[role, cls] = self.role_limits[role, cls]
                elif role == "service":
                    table[role, cls] = DEFAULT_SERVICE_LIMITS[cls]
                else:
                    table[role, cls] = self.class_limits.get(cls, DEFAULT_CLASS_LIMITS[cls])

    def limit_for(self, principal: str, role: str, method_class: str) -> Limit | None:
        """The limit of `principal` (acting as `role`) for `method_class`: its override for the class, else its
        override for every class, else the role's limit, else the class's. None: not limited. A class the
        policy does not know is limited as `write` (the strictest)."""
        if self.overrides:
            for key in ((principal, method_class), (principal, ANY_CLASS)):
                if key in self.overrides:
                    return self.overrides[key]
        cls = method_class if method_class in CLASSES else "write"
        try:
            return self._table[role, cls]
        except KeyError:  # a role the policy does not know: the class's limit
            return self.class_limits.get(cls, DEFAULT_CLASS_LIMITS[cls])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RateLimitSettings:
        """The settings from `CLAWHUB_RATE_*` variables (of `environ`, default os.environ); a value that cannot
        be used, or a `CLAWHUB_RATE_*` variable that is not a setting, is a SettingsError of one line."""
        env = os.environ if environ is None else environ
        d = cls()
        names = _setting_names()
        unknown = sorted(name for name in env if name.startswith(PREFIX) and name not in names)
        if unknown:
            name = unknown[0]
            suggestions = difflib.get_close_matches(name, names, 2, 0.9)
            raise SettingsError(f"{name} is not a rate-limit setting{did_you_mean(suggestions)}; "
                                "see docs/ratelimits.md")
        backend = _choice(env, BACKEND, d.backend, BACKENDS)
        redis_url = _get(env, REDIS_URL) or d.redis_url
        if backend == "redis":
            _check_redis_url(redis_url)
        return cls(
            enabled=_switch(env, LIMITS, d.enabled),
            class_limits={c: _limit(env, CLASS_VARIABLES[c], d.class_limits[c]) for c in CLASSES},
            role_limits={**d.role_limits,
                         **{(r, c): _limit(env, f"{CLASS_VARIABLES[c]}_{r.upper()}", None)
                            for r in ROLES for c in CLASSES if _get(env, f"{CLASS_VARIABLES[c]}_{r.upper()}")}},
            overrides=parse_overrides(_get(env, OVERRIDES)),
            backend=backend,
            max_keys=int(_number_setting(env, MAX_KEYS, d.max_keys, integer=True, minimum=1)),
            redis_url=redis_url,
            redis_prefix=_get(env, REDIS_PREFIX) or d.redis_prefix,
            redis_down=_choice(env, REDIS_DOWN_VARIABLE, d.redis_down, REDIS_DOWN),
            redis_timeout=_number_setting(env, REDIS_TIMEOUT, d.redis_timeout, minimum=0.001),
            redis_retry=_number_setting(env, REDIS_RETRY, d.redis_retry, minimum=0.001),
        )


def _setting_names() -> list[str]:
    names = [LIMITS, OVERRIDES, BACKEND, MAX_KEYS, REDIS_URL, REDIS_PREFIX, REDIS_DOWN_VARIABLE, REDIS_TIMEOUT,
             REDIS_RETRY, *CLASS_VARIABLES.values()]
    names += [f"{CLASS_VARIABLES[c]}_{r.upper()}" for c in CLASSES for r in ROLES]
    return names


def _get(env: Mapping[str, str], name: str) -> str:
    """The variable's value, stripped; empty when unset or blank (which means: the default)."""
    return env.get(name, "").strip()


def _limit(env: Mapping[str, str], name: str, default: Limit | None) -> Limit | None:
    raw = _get(env, name)
    if not raw:
        return default
    try:
        return parse_limit(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (_get(env, name) or ("on" if default else "off")).lower()
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise SettingsError(f"{name}={raw!r} must be on or off")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (_get(env, name) or default).lower()
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _number_setting(env: Mapping[str, str], name: str, default: float, *, minimum: float,
                    integer: bool = False) -> float:
    raw = _get(env, name)
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise SettingsError(f"{name}={raw} must be at least {minimum:g}")
    return value


def _check_redis_url(url: str) -> None:
    if not url:
        raise SettingsError(f"{BACKEND}=redis needs {REDIS_URL} (such as redis://127.0.0.1:6379/0)")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        # Never echo the URL: it may hold a password.
        raise SettingsError(f"{REDIS_URL} must start with redis://, rediss:// or unix://")


def parse_overrides(text: str) -> dict[tuple[str, str], Limit | None]:
    """`KEY@CLASS=RATE/BURST` entries separated by commas (`key:ck_7f3a@invoke=50/100, peer:ipv4:10.0.0.7@*=off`).
    KEY is a principal key as buckets name it (it may itself contain `@`: the last `@` separates the class);
    CLASS is one of CLASSES or `*` (every class)."""
    overrides: dict[tuple[str, str], Limit | None] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        target, eq, limit_text = entry.rpartition("=")
        key, at, method_class = target.rpartition("@")
        if not (eq and at and key.strip()):
            raise SettingsError(f"{OVERRIDES}: {entry!r} is not KEY@CLASS=RATE/BURST "
                                "(such as key:ck_7f3a@invoke=50/100)")
        method_class = method_class.strip().lower()
        if method_class not in (*CLASSES, ANY_CLASS):
            raise SettingsError(f"{OVERRIDES}: {entry!r}: class {method_class!r} must be one of "
                                f"{', '.join(CLASSES)} or *")
        try:
            overrides[key.strip()[:MAX_KEY_CHARS], method_class] = parse_limit(limit_text)
        except ValueError as exc:
            raise SettingsError(f"{OVERRIDES}: {entry!r}: {exc}") from None
    return overrides
