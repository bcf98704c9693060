"""Version ranges and dependency resolution, including a brute-force oracle on random small graphs."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.registry.ranges import RangeError, parse_range
from services.registry.resolver import Catalog, Release, Requirement, ResolutionError, Resolved, resolve
from services.runtime.names import semver_key

RANGE_CASES = [
    ("^1.2.3", "1.2.3", True), ("^1.2.3", "1.9.0", True), ("^1.2.3", "2.0.0", False), ("^0.2.3", "0.2.9", True),
    ("^0.2.3", "0.3.0", False), ("^0.0.3", "0.0.4", False), ("~1.2", "1.2.9", True), ("~1.2", "1.3.0", False),
    ("~1.2.3", "1.2.2", False), (">=1.0 <2.0", "1.5.0", True), (">=1.0 <2.0", "2.0.0", False),
    ("1.x", "1.9.9", True), ("1.x", "2.0.0", False), ("1.x || >=3", "3.1.0", True), ("1.x || >=3", "2.1.0", False),
    ("*", "0.0.1", True), ("1.2.3 - 2.3", "2.3.9", True), ("1.2.3 - 2.3", "2.4.0", False),
    ("1.2.3 - 2.3.4", "2.3.4", True), ("^1.2.3", "1.3.0-rc.1", False), (">=1.2.3-rc.1", "1.2.3-rc.2", True),
    (">=1.2.3-rc.1", "1.2.4-rc.1", False), ("1.2.3", "1.2.3", True), ("=1.2.3", "1.2.4", False),
    (">1.2", "1.3.0", True), (">1.2", "1.2.9", False), ("<=1.2", "1.2.9", True), ("<1.2", "1.2.0", False),
    ("<1.2", "1.1.9", True), ("^1", "1.9.0", True), ("^1", "2.0.0", False), (">= 1.0.0", "1.0.0", True),
]


@pytest.mark.parametrize(("text", "version", "allowed"), RANGE_CASES)
def test_npm_range_semantics(text: str, version: str, allowed: bool) -> None:
    assert parse_range(text).allows(version) is allowed


@pytest.mark.parametrize("text", ["", "abc", "1.2.3.4", "^", ">=x.y", "1 || ", "x" * 300])
def test_bad_ranges_are_refused(text: str) -> None:
    with pytest.raises(RangeError):
        parse_range(text)


def test_shared_dependencies_unify_on_the_highest_common_version() -> None:
    catalog = {
        "a": [Release("1.0.0", (Requirement("c", "^1.0.0", True),)),
              Release("1.1.0", (Requirement("c", "^2.0.0", True),))],
        "b": [Release("2.0.0", (Requirement("c", "^1.2.0", True),))],
        "c": [Release("1.0.0", digest="d1"), Release("1.5.0", digest="d15"), Release("2.0.0", digest="d2")],
    }
    result = {r.package: r for r in resolve(catalog, [Requirement("a", "^1.0.0", True),
                                                      Requirement("b", "^2.0.0", True)])}
    # a@1.1.0 would need c ^2, which b cannot take: a falls back to 1.0.0, c unifies on 1.5.0.
    assert (result["a"].version, result["c"].version, result["c"].digest) == ("1.0.0", "1.5.0", "d15")
    assert result["c"].required_by == ("a@1.0.0", "b@2.0.0")


def test_non_shared_dependencies_may_resolve_to_several_versions() -> None:
    catalog = {"a": [Release("1.0.0", (Requirement("c", "^2.0.0"),))],
               "b": [Release("1.0.0", (Requirement("c", "^1.0.0"),))],
               "c": [Release("1.0.0"), Release("1.1.0"), Release("2.0.0")]}
    result = resolve(catalog, [Requirement("a", "*", True), Requirement("b", "*", True)])
    copies = sorted((r.version, r.required_by) for r in result if r.package == "c")
    assert copies == [("1.1.0", ("b@1.0.0",)), ("2.0.0", ("a@1.0.0",))]
    assert all(not r.shared for r in result if r.package == "c")


def test_conflicts_explain_the_chain() -> None:
    catalog = {"app": [Release("1.0.0", (Requirement("a", "^1", True), Requirement("b", "^1", True)))],
               "a": [Release("1.0.0", (Requirement("c", "^2.0.0", True),))],
               "b": [Release("1.0.0", (Requirement("c", "~1.4", True),))],
               "c": [Release("1.4.2"), Release("2.0.1")]}
    with pytest.raises(ResolutionError) as caught:
        resolve(catalog, [Requirement("app", "1.0.0", True)])
    message = str(caught.value)
    assert "a@1.0.0 requires c ^2.0.0" in message and "b@1.0.0 requires c ~1.4" in message
    assert "via app → a" in message and "available: 2.0.1, 1.4.2" in message
    assert caught.value.package == "c"


def test_required_by_lists_every_dependent() -> None:
    needs_c = (Requirement("c", "*", True),)
    catalog = {"a": [Release("1.0.0", needs_c)], "b": [Release("1.0.0", needs_c)], "c": [Release("1.0.0")]}
    result = {r.package: r for r in resolve(catalog, [Requirement("a", "*", True), Requirement("b", "*", True),
                                                      Requirement("c", "^1", True)])}
    assert result["c"].required_by == ("(root)", "a@1.0.0", "b@1.0.0")


def test_missing_package_is_explained() -> None:
    with pytest.raises(ResolutionError, match="no version of zz is published"):
        resolve({}, [Requirement("zz", "^1")])


def test_cycles_are_reported_not_looped_on() -> None:
    catalog = {"a": [Release("1.0.0", (Requirement("b", "*"),))], "b": [Release("1.0.0", (Requirement("a", "*"),))]}
    with pytest.raises(ResolutionError, match="cycle: a → b → a") as caught:
        resolve(catalog, [Requirement("a", "*")])
    assert caught.value.cycle == ("a", "b", "a")
    shared = {"a": [Release("1.0.0", (Requirement("a", "*", True),))]}
    with pytest.raises(ResolutionError, match="cycle: a → a"):
        resolve(shared, [Requirement("a", "*", True)])


# --- property test against a brute-force oracle ---------------------------------------------------------

PACKAGES = ["p0", "p1", "p2", "p3"]
VERSIONS = ["0.1.0", "0.2.0", "1.0.0", "1.1.0", "1.2.0-rc.1", "2.0.0"]
RANGES = ["*", "^1.0.0", "^0.1.0", "~1.1", ">=0.2.0 <1.1.0", "1.x || 2.x", "2.0.0", "<1.0.0", ">=1.2.0-rc.1"]


@st.composite
def graphs(draw: st.DrawFn) -> tuple[dict[str, list[Release]], list[Requirement]]:
    catalog: dict[str, list[Release]] = {}
    # Half the graphs are all-shared, where "highest first" is checked exactly.
    flags = st.just(True) if draw(st.booleans()) else st.booleans()
    for index, name in enumerate(PACKAGES):
        versions = draw(st.lists(st.sampled_from(VERSIONS), min_size=0, max_size=3, unique=True))
        releases = []
        for version in versions:
            # Edges only point to later packages: acyclic by construction (cycles have their own test).
            targets = PACKAGES[index + 1:]
            reqs = draw(st.lists(st.builds(Requirement, st.sampled_from(targets), st.sampled_from(RANGES),
                                           flags), max_size=2) if targets else st.just([]))
            releases.append(Release(version, tuple(reqs), digest=f"{name}@{version}"))
        catalog[name] = releases
    roots = draw(st.lists(st.builds(Requirement, st.sampled_from(PACKAGES), st.sampled_from(RANGES), flags),
                          min_size=1, max_size=2))
    return catalog, roots


def _deps(catalog: Catalog, name: str, version: str) -> tuple[Requirement, ...]:
    return next(r.requirements for r in catalog[name] if r.version == version)


def _holds(catalog: Catalog, reqs: Sequence[Requirement], shared: dict[str, str], reached: set[str]) -> bool:
    """Naive check: with `shared` fixed, can every requirement be met (non-shared copies chosen freely)?"""
    for req in reqs:
        if req.shared:
            version = shared.get(req.package)
            if version is None or not parse_range(req.range).allows(version):
                return False
            if req.package not in reached:
                reached.add(req.package)
                if not _holds(catalog, _deps(catalog, req.package, version), shared, reached):
                    return False
        else:
            for release in catalog.get(req.package, ()):
                trial = set(reached)
                if parse_range(req.range).allows(release.version) and _holds(
                        catalog, release.requirements, shared, trial):
                    reached |= trial
                    break
            else:
                return False
    return True


def _oracle(catalog: Catalog, roots: Sequence[Requirement]) -> bool:
    choices = [[None, *(r.version for r in catalog[n])] for n in PACKAGES]
    for assignment in itertools.product(*choices):
        shared = {n: v for n, v in zip(PACKAGES, assignment, strict=True) if v is not None}
        if _holds(catalog, roots, shared, set()):
            return True
    return False


def _valid(catalog: Catalog, roots: Sequence[Requirement], result: list[Resolved]) -> dict[str, str]:
    shared = {r.package: r.version for r in result if r.shared}
    assert len(shared) == len([r for r in result if r.shared]), "a shared package resolved twice"
    assert _holds(catalog, roots, shared, set())
    for copy in (r for r in result if not r.shared):
        assert copy.digest == f"{copy.package}@{copy.version}"
    return shared


EXAMPLES = int(os.environ.get("CLAWHUB_HYPOTHESIS_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_resolver_agrees_with_brute_force(graph: tuple[dict[str, list[Release]], list[Requirement]]) -> None:
    catalog, roots = graph
    try:
        result = resolve(catalog, roots)
    except ResolutionError:
        assert not _oracle(catalog, roots), "the resolver failed where a solution exists"
        return
    shared = _valid(catalog, roots, result)
    if all(q.shared for rs in catalog.values() for r in rs for q in r.requirements) and all(q.shared for q in roots):
        # Highest first: no single package can be raised with everything else kept.
        for name, version in shared.items():
            for release in catalog[name]:
                if semver_key(release.version) > semver_key(version):
                    assert not _holds(catalog, roots, {**shared, name: release.version}, set()), (
                        f"{name} could be {release.version} instead of {version}")


def test_yanked_releases_resolve_only_when_pinned_exactly() -> None:
    catalog: Catalog = {
        "lib": [Release("1.0.0", digest="a"), Release("1.1.0", digest="b", yanked=True)],
        "app": [Release("1.0.0", (Requirement("lib", "^1.0.0", shared=True),)),
                Release("2.0.0", (Requirement("lib", "1.1.0", shared=True),))],
    }

    def versions(*roots: Requirement) -> list[tuple[str, str]]:
        return [(r.package, r.version) for r in resolve(catalog, roots)]

    assert versions(Requirement("lib", "^1.0.0")) == [("lib", "1.0.0")]
    assert versions(Requirement("lib", "=1.1.0")) == [("lib", "1.1.0")]
    assert versions(Requirement("lib", "1.1.0", shared=True)) == [("lib", "1.1.0")]
    with pytest.raises(ResolutionError, match=r"1\.1\.0 \(yanked\)"):
        resolve(catalog, [Requirement("lib", ">=1.1.0")])
    # A shared package decided before the pin arrives is revisited: the pinned yanked release is tried last.
    assert versions(Requirement("lib", "^1.0.0", shared=True), Requirement("app", "=2.0.0")) == [
        ("app", "2.0.0"), ("lib", "1.1.0")]
    # A pin elsewhere in the graph does not make ranges prefer the yanked release.
    assert versions(Requirement("lib", "^1.0.0", shared=True), Requirement("app", "=1.0.0")) == [
        ("app", "1.0.0"), ("lib", "1.0.0")]
