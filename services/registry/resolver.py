"""Dependency resolution: root requirements → the flattened set of package versions to link.

- A **shared** requirement (`is_shared`) means one version of that package for the whole graph: every
  shared requirement of a package, from anywhere in the graph, must be satisfied by that one version.
- A **non-shared** requirement gets its own copy: it resolves independently (isolated), so one package may
  appear in several versions.
- Highest first: each decision tries the highest allowed version first and backtracks only on conflict, so
  the result is the highest-versioned solution in decision order.
- Conflict-directed backjumping: every requirement remembers the decision that introduced it, and a failure
  carries the set of decisions responsible for it; the search jumps straight back to the latest of them
  instead of retrying unrelated decisions in between (plain backtracking is exponential on large graphs).
- Work is not repeated: a non-shared copy another requirer already pulled in is not expanded again, and a
  shared decision skips versions that shared edges already queued (but not yet processed) rule out.
- Yanked releases are hidden unless pinned exactly (`=1.2.3` or `1.2.3`): a non-shared requirement takes a
  yanked release only when it pins that version itself; a shared package takes one only when some requirement
  in the catalog or the roots pins it, and tries it after every non-yanked candidate.
- A conflict raises `ResolutionError` whose message tells the chain: who requires what, which ranges cannot
  meet, what is available. A dependency cycle is reported, never looped on.

Pure and synchronous (no I/O): the registry feeds it a `Catalog` snapshot.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.registry.ranges import Range, parse_range
from services.runtime.names import semver_key

ROOT = "(root)"


@dataclass(frozen=True)
class Requirement:
    package: str
    range: str
    shared: bool = False


@dataclass(frozen=True)
class Release:
    """One resolvable version of a package (Ready) with its own requirements."""

    version: str
    requirements: tuple[Requirement, ...] = ()
    digest: str = ""
    yanked: bool = False


def pinned_version(range_: Range) -> tuple[object, ...] | None:
    """The SemVer key of the one version `range_` pins exactly (`=1.2.3`, `1.2.3`), else None."""
    if len(range_.sets) == 1 and len(range_.sets[0]) == 1 and range_.sets[0][0].op == "=":
        return range_.sets[0][0].key()
    return None


def pins(range_: Range, version: str) -> bool:
    key = pinned_version(range_)
    return key is not None and key == semver_key(version)


# package → its resolvable releases.
Catalog = Mapping[str, Sequence[Release]]


@dataclass(frozen=True)
class Resolved:
    package: str
    version: str
    digest: str
    shared: bool
    # Who pulled this copy in: "(root)" or "package@version", one per dependent edge.
    required_by: tuple[str, ...]


class ResolutionError(Exception):
    """No set of versions satisfies the requirements (or the graph has a cycle)."""

    def __init__(self, message: str, *, package: str = "", cycle: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.package = package
        self.cycle = cycle


@dataclass(frozen=True)
class _Edge:
    requirer: str  # "(root)" or "package@version"
    path: tuple[str, ...]  # packages from the root down to the requirer, for cycles and explanations
    requirement: Requirement
    range: Range
    # Decision levels that chose the requirer and its ancestors (the last is the requirer's); root: ().
    levels: tuple[int, ...] = ()

    @property
    def origin(self) -> int:
        return self.levels[-1] if self.levels else -1


# What a failed search returns: the decision levels responsible for the failure.
Conflict = frozenset[int]


@dataclass
class _Failure:
    depth: int = -1
    message: str = ""
    package: str = ""
    cycle: tuple[str, ...] = ()


class Resolver:
    """One resolution. The search mutates its state in place and undoes it on the way back, so a step
    costs what it touches, not the size of the graph; it recurses only at decisions."""

    def __init__(self, catalog: Catalog, *, max_steps: int = 50_000) -> None:
        self._catalog = catalog
        self._versions = {name: sorted(releases, key=lambda r: semver_key(r.version), reverse=True)
                          for name, releases in catalog.items()}
        self._max_steps = max_steps
        self._steps = 0
        self._failure = _Failure()
        self._queue: list[_Edge] = []
        # Shared package → queue positions of its shared edges, ascending: a decision consults the ones not
        # processed yet (they will be, in this branch), so it never picks a version they already rule out.
        self._queued_shared: dict[str, list[int]] = {}
        self._shared: dict[str, str] = {}
        # Level of the decision that chose each shared package's version.
        self._shared_levels: dict[str, int] = {}
        self._shared_edges: dict[str, list[_Edge]] = {}
        # (package, version) → requirers, for non-shared copies.
        self._copies: dict[tuple[str, str], list[str]] = {}
        # (package, version key) pinned exactly by some requirement: the yanked releases that may be used.
        self._pinned: set[tuple[str, tuple[object, ...]]] = set()

    def resolve(self, roots: Sequence[Requirement]) -> list[Resolved]:
        self._queue = []
        self._enqueue([self._edge(ROOT, (), (), r) for r in roots])
        if any(r.yanked for releases in self._versions.values() for r in releases):
            requirements = [*roots, *(q for rs in self._versions.values() for r in rs for q in r.requirements)]
            for requirement in requirements:
                key = pinned_version(parse_range(requirement.range))
                if key is not None:
                    self._pinned.add((requirement.package, key))
        # One frame per decision; Python-to-Python calls do not use the C stack, so a deep graph only
        # needs a higher limit (never lowered here).
        needed = 2 * len(self._versions) * max((len(v) for v in self._versions.values()), default=1) + 1000
        if sys.getrecursionlimit() < needed:
            sys.setrecursionlimit(needed)
        if self._search(0, 0) is not None:
            failure = self._failure
            raise ResolutionError(failure.message or "the requirements cannot be satisfied",
                                  package=failure.package, cycle=failure.cycle)
        return self._flatten()

    def _edge(self, requirer: str, path: tuple[str, ...], levels: tuple[int, ...],
              requirement: Requirement) -> _Edge:
        return _Edge(requirer, path, requirement, parse_range(requirement.range), levels)

    def _fail(self, depth: int, message: str, package: str, cycle: tuple[str, ...] = ()) -> None:
        # Keep the failure found deepest in the search: it is the most specific explanation.
        if depth > self._failure.depth:
            self._failure = _Failure(depth, message, package, cycle)

    def _children(self, edge: _Edge, release: Release, level: int) -> list[_Edge]:
        requirer = f"{edge.requirement.package}@{release.version}"
        path = (*edge.path, edge.requirement.package)
        levels = (*edge.levels, level)
        return [self._edge(requirer, path, levels, r) for r in release.requirements]

    def _search(self, head: int, depth: int) -> Conflict | None:
        """Satisfy queue[head:]; None when solved (state left in place), else the levels to blame."""
        forced: list[str] = []  # shared packages whose edge lists this frame extended without a decision

        def undo(conflict: Conflict) -> Conflict:
            for name in reversed(forced):
                self._shared_edges[name].pop()
            return conflict

        while head < len(self._queue):
            self._steps += 1
            if self._steps > self._max_steps:
                hint = f"; the deepest conflict found: {self._failure.message}" if self._failure.message else ""
                raise ResolutionError(f"dependency resolution gave up after {self._max_steps} steps: the "
                                      f"graph has too many conflicting alternatives{hint}",
                                      package=self._failure.package)
            edge = self._queue[head]
            name = edge.requirement.package
            if name in edge.path:
                cycle = (*edge.path[edge.path.index(name):], name)
                self._fail(1 << 30, "dependency cycle: " + " → ".join(cycle), name, cycle)
                return undo(frozenset(edge.levels))
            releases = self._versions.get(name)
            if not releases:
                self._fail(depth, f"{_who(edge)} requires {name} {edge.range}, but no version of {name} is "
                                  "published (or every version is yanked or not Ready)", name)
                return undo(frozenset({edge.origin}))
            if not edge.requirement.shared:
                decided = self._decide_copy(edge, releases, head, depth)
                return None if decided is None else undo(decided)
            edges = self._shared_edges.setdefault(name, [])
            chosen = self._shared.get(name)
            if chosen is None:
                decided = self._decide_shared(edge, edges, releases, head, depth)
                return None if decided is None else undo(decided)
            if not edge.range.allows(chosen):
                self._fail(depth, _conflict(name, [*edges, edge], releases), name)
                return undo(frozenset({edge.origin, self._shared_levels[name]}))
            edges.append(edge)
            forced.append(name)
            head += 1
        return None

    def _decide_shared(self, edge: _Edge, edges: list[_Edge], releases: Sequence[Release], head: int,
                       depth: int) -> Conflict | None:
        name = edge.requirement.package
        edges.append(edge)
        narrowing: list[_Edge] = []
        candidates = [r for r in releases if all(e.range.allows(r.version) for e in edges)]
        # Queued edges on this package rule out versions now rather than after a detour; when they narrow
        # the choice, their requirers share the blame for whatever fails below.
        for pending in self._pending_shared(name, head):
            narrowed = [r for r in candidates if pending.range.allows(r.version)]
            if len(narrowed) < len(candidates):
                narrowing.append(pending)
                candidates = narrowed
        if any(r.yanked for r in candidates):
            candidates = ([r for r in candidates if not r.yanked]
                          + [r for r in candidates if r.yanked and (name, semver_key(r.version)) in self._pinned])
        # The requirements that narrowed the candidates share the blame for any failure below.
        blame = {e.origin for e in (*edges, *narrowing)}
        if not candidates:
            self._fail(depth, _conflict(name, [*edges, *narrowing], releases), name)
        for release in candidates:
            self._shared[name] = release.version
            self._shared_levels[name] = depth
            found = self._try(edge, release, head, depth)
            if found is None:
                return None
            if depth not in found:
                blame = set(found)  # this decision is not to blame: jump past it
                break
            blame |= found - {depth}
        self._shared.pop(name, None)
        self._shared_levels.pop(name, None)
        edges.pop()
        return frozenset(blame)

    def _decide_copy(self, edge: _Edge, releases: Sequence[Release], head: int, depth: int) -> Conflict | None:
        name = edge.requirement.package
        candidates = [r for r in releases
                      if edge.range.allows(r.version) and (not r.yanked or pins(edge.range, r.version))]
        blame = {edge.origin}
        if not candidates:
            self._fail(depth, _conflict(name, [edge], releases), name)
        for release in candidates:
            requirers = self._copies.setdefault((name, release.version), [])
            # A copy another requirer already pulled in had its requirements queued then (with the same
            # requirer name, so the same constraints): expanding it again adds nothing but work, and in a
            # DAG of non-shared edges that work multiplies with every path. Any cycle through it was met on
            # the first expansion, which reaches the same packages.
            expand = not requirers
            requirers.append(edge.requirer)
            found = self._try(edge, release, head, depth, expand=expand)
            if found is None:
                return None
            requirers.pop()
            if not requirers:
                del self._copies[(name, release.version)]
            if depth not in found:
                return found
            blame |= found - {depth}
        return frozenset(blame)

    def _try(self, edge: _Edge, release: Release, head: int, depth: int, *, expand: bool = True,
             ) -> Conflict | None:
        mark = len(self._queue)
        if expand:
            self._enqueue(self._children(edge, release, depth))
        found = self._search(head + 1, depth + 1)
        if found is not None:
            self._truncate(mark)
        return found

    def _enqueue(self, edges: list[_Edge]) -> None:
        for edge in edges:
            if edge.requirement.shared:
                self._queued_shared.setdefault(edge.requirement.package, []).append(len(self._queue))
            self._queue.append(edge)

    def _truncate(self, mark: int) -> None:
        for edge in reversed(self._queue[mark:]):
            if edge.requirement.shared:
                self._queued_shared[edge.requirement.package].pop()
        del self._queue[mark:]

    def _pending_shared(self, name: str, head: int) -> list[_Edge]:
        """Shared edges on `name` queued after position `head`."""
        positions = self._queued_shared.get(name, [])
        return [self._queue[i] for i in positions[bisect.bisect_right(positions, head):]]

    def _flatten(self) -> list[Resolved]:
        digests = {(name, r.version): r.digest for name, rs in self._catalog.items() for r in rs}
        out = [Resolved(name, version, digests[(name, version)], True,
                        tuple(dict.fromkeys(e.requirer for e in self._shared_edges[name])))
               for name, version in self._shared.items()]
        out += [Resolved(name, version, digests[(name, version)], False, tuple(dict.fromkeys(requirers)))
                for (name, version), requirers in self._copies.items()]
        return sorted(out, key=lambda r: (r.package, semver_key(r.version), not r.shared))


def _who(edge: _Edge) -> str:
    return "the request" if edge.requirer == ROOT else edge.requirer


def _conflict(name: str, edges: list[_Edge], releases: Sequence[Release]) -> str:
    asks = "; ".join(f"{_who(e)} requires {name} {e.range}" + (" (shared)" if e.requirement.shared else "")
                     + (f" via {' → '.join(e.path)}" if len(e.path) > 1 else "") for e in edges)
    listed = [r.version + (" (yanked)" if r.yanked else "") for r in releases]
    available = ", ".join(listed[:10]) + (" …" if len(listed) > 10 else "")
    what = "these ranges cannot meet" if len(edges) > 1 else "no version satisfies it"
    return f"cannot resolve {name}: {asks}; {what} (available: {available})"


def resolve(catalog: Catalog, roots: Sequence[Requirement]) -> list[Resolved]:
    return Resolver(catalog).resolve(roots)
