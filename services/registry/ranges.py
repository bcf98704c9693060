"""npm-style version ranges over SemVer 2.0: `^1.2.3`, `~1.2`, `>=1.0.0 <2.0.0`, `1.x`, `1.2 - 2.0`, `a || b`.

Semantics follow node-semver: a range is a union (`||`) of comparator sets (space-separated, all must hold);
x-ranges and partial versions widen (`1.x` = `>=1.0.0 <2.0.0-0`), caret allows changes that do not modify
the left-most non-zero part, tilde allows patch changes. A prerelease version satisfies a comparator set only
if one of its comparators names the same major.minor.patch with a prerelease (`>=1.2.3-rc.1` admits
`1.2.3-rc.2` but not `1.2.4-rc.1`), so prereleases are opt-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from services.runtime.names import SEMVER_RE, semver_key

# ASCII only (see services/runtime/names.py): `[0-9]`, not the digit class, and `re.ASCII` for the space class,
# which would otherwise match the digits and spaces of every script (`^1.0.` + an Arabic-Indic one read as 1.0.1).
_XR = r"(?:[xX*]|0|[1-9][0-9]*)"
_PARTIAL = re.compile(
    rf"v?({_XR})(?:\.({_XR})(?:\.({_XR})(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?)?)?", re.ASCII)
_COMPARATOR = re.compile(r"(<=|>=|<|>|=|\^|~>?|)\s*(.+)", re.ASCII)
_HYPHEN = re.compile(r"(\S+)\s+-\s+(\S+)", re.ASCII)
_SPACED_OPERATOR = re.compile(r"(<=|>=|<|>|=|\^|~>?)\s+", re.ASCII)
MAX_RANGE_LENGTH = 256


class RangeError(ValueError):
    """A version range that cannot be parsed; the message says what is wrong."""


Version = tuple[int, int, int, str]  # major, minor, patch, prerelease ("" for none)


@dataclass(frozen=True)
class Comparator:
    op: str  # one of <, <=, >, >=, =
    version: Version

    def key(self) -> tuple[object, ...]:
        return _key(self.version)

    def test(self, key: tuple[object, ...]) -> bool:
        own = _key(self.version)
        if self.op == "=":
            return key == own
        if self.op == ">":
            return key > own
        if self.op == ">=":
            return key >= own
        if self.op == "<":
            return key < own
        return key <= own


def _key(v: Version) -> tuple[object, ...]:
    return semver_key(f"{v[0]}.{v[1]}.{v[2]}" + (f"-{v[3]}" if v[3] else ""))


def _is_x(part: str | None) -> bool:
    return part is None or part in ("x", "X", "*")


def _expand(op: str, text: str) -> list[Comparator]:
    """One primitive (operator + partial version) as plain comparators."""
    match = _PARTIAL.fullmatch(text)
    if not match:
        raise RangeError(f"{text!r} is not a version or partial version such as 1, 1.2, 1.2.3 or 1.x")
    major_s, minor_s, patch_s, pre = match[1], match[2], match[3], match[4] or ""
    if _is_x(major_s):
        return [] if op in ("", "=", ">=", "<=", "^", "~", "~>") else [Comparator("<", (0, 0, 0, "0"))]
    major = int(major_s)
    if _is_x(minor_s):
        lo, hi = (major, 0, 0, ""), (major + 1, 0, 0, "0")
        return _widen(op, lo, hi)
    minor = int(minor_s)
    if _is_x(patch_s):
        lo = (major, minor, 0, "")
        if op == "^" and major == 0:
            hi = (0, minor + 1, 0, "0")
        elif op == "^":
            hi = (major + 1, 0, 0, "0")
        else:
            hi = (major, minor + 1, 0, "0")
        return _widen("" if op in ("^", "~", "~>") else op, lo, hi)
    patch = int(patch_s)
    exact = (major, minor, patch, pre)
    if op in ("~", "~>"):
        return [Comparator(">=", exact), Comparator("<", (major, minor + 1, 0, "0"))]
    if op == "^":
        if major > 0:
            hi = (major + 1, 0, 0, "0")
        elif minor > 0:
            hi = (0, minor + 1, 0, "0")
        else:
            hi = (0, 0, patch + 1, "0")
        return [Comparator(">=", exact), Comparator("<", hi)]
    return [Comparator(op or "=", exact)]


def _widen(op: str, lo: Version, hi: Version) -> list[Comparator]:
    """A partial version with an operator: `1.2` = [1.2.0, 1.3.0-0); `>1.2` = >=1.3.0-0; `<=1.2` = <1.3.0-0."""
    if op in ("", "="):
        return [Comparator(">=", lo), Comparator("<", hi)]
    if op == ">":
        return [Comparator(">=", hi)]
    if op == ">=":
        return [Comparator(">=", lo)]
    if op == "<":
        return [Comparator("<", lo if lo[3] else (lo[0], lo[1], lo[2], "0"))]
    return [Comparator("<", hi)]  # <=


def _hyphen(left: str, right: str) -> list[Comparator]:
    # `1.2.3 - 2.3` means >=1.2.3 <2.4.0-0; `1.2.3 - 2.3.4` means >=1.2.3 <=2.3.4.
    return _expand(">=", left) + _expand("<=", right)


@dataclass(frozen=True)
class Range:
    """A parsed range: a union of comparator sets."""

    text: str
    sets: tuple[tuple[Comparator, ...], ...]
    # version → allowed: resolution asks the same questions many times over. Not part of equality or hash.
    _memo: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, version: str) -> bool:
        answer = self._memo.get(version)
        if answer is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            answer = self._memo[version] = self._check(version)
        return answer

    def _check(self, version: str) -> bool:
        match = SEMVER_RE.fullmatch(version)
        if not match:
            return False
        pre = match[4] or ""
        key = semver_key(version)
        triple = (int(match[1]), int(match[2]), int(match[3]))
        for comparators in self.sets:
            if not all(c.test(key) for c in comparators):
                continue
            if pre and not any(c.version[3] and c.version[:3] == triple for c in comparators):
                continue  # prereleases are opt-in per major.minor.patch
            return True
        return False

    def best(self, versions: list[str]) -> str | None:
        """The highest of `versions` this range allows."""
        allowed = [v for v in versions if self.allows(v)]
        return max(allowed, key=semver_key) if allowed else None

    def __str__(self) -> str:
        return self.text


_MEMO_LIMIT = 4096


@lru_cache(maxsize=4096)
def parse_range(text: str) -> Range:
    """Parse an npm-style range; raises RangeError with a message naming the bad part."""
    if len(text) > MAX_RANGE_LENGTH:
        raise RangeError(f"a version range is at most {MAX_RANGE_LENGTH} characters")
    if not text.isascii():
        # Before any stripping or splitting: str.strip() and str.split() also take the spaces of every script.
        raise RangeError(f"{text[:80]!r} is not a version range: a range is written in ASCII, such as ^1.2.3")
    stripped = text.strip()
    if not stripped:
        raise RangeError("a version range is required, such as ^1.2.3")
    sets: list[tuple[Comparator, ...]] = []
    for alternative in stripped.split("||"):
        alternative = alternative.strip()
        if not alternative:
            raise RangeError(f"{text!r} has an empty alternative around `||`")
        hyphen = _HYPHEN.fullmatch(alternative)
        if hyphen:
            sets.append(tuple(_hyphen(hyphen[1], hyphen[2])))
            continue
        # Allow `>= 1.2.3` (operator separated from its version by spaces).
        tokens = _SPACED_OPERATOR.sub(r"\1", alternative).split()
        comparators: list[Comparator] = []
        for token in tokens:
            match = _COMPARATOR.fullmatch(token)
            if not match:
                raise RangeError(f"{token!r} in {text!r} is not a comparator such as >=1.2.3")
            try:
                comparators += _expand(match[1], match[2])
            except RangeError as exc:
                raise RangeError(f"{text!r}: {exc}") from None
        sets.append(tuple(comparators))
    return Range(text=stripped, sets=tuple(sets))


def range_problem(text: str) -> str | None:
    """Why `text` is not a valid range, or None."""
    try:
        parse_range(text)
    except RangeError as exc:
        return str(exc)
    return None
