"""Dependency resolution: root requirements → the flattened set of package versions to link.

- A **shared** requirement (`is_shared`) means one version of that package for the whole graph: every
  shared requirement of a package, from anywhere in the graph, must be satisfied by that one version.
- A **non-shared** requirement gets its own copy: it resolves independently (isolated), so one package may
  appear in several versions.
- Highest first: each decision tries the highest allowed version first and backtracks only on conflict, so
  the result is the highest-versioned solution in decision order.
- A conflict raises `ResolutionError` whose message tells the chain: who requires what, which ranges cannot
  meet, what is available. A dependency cycle is reported, never looped on.

Pure and synchronous (no I/O): the registry feeds it a `Catalog` snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    """One resolvable version of a package (Ready, not yanked) with its own requirements."""

    version: str
    requirements: tuple[Requirement, ...] = ()
    digest: str = ""


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


@dataclass
class _Failure:
    depth: int = -1
    message: str = ""
    package: str = ""
    cycle: tuple[str, ...] = ()


@dataclass
class _State:
    shared: dict[str, str] = field(default_factory=dict)
    shared_edges: dict[str, list[_Edge]] = field(default_factory=dict)
    # (package, version) → requirers, for non-shared copies.
    copies: dict[tuple[str, str], list[str]] = field(default_factory=dict)


class Resolver:
    def __init__(self, catalog: Catalog, *, max_steps: int = 200_000) -> None:
        self._catalog = catalog
        self._versions = {name: sorted(releases, key=lambda r: semver_key(r.version), reverse=True)
                          for name, releases in catalog.items()}
        self._max_steps = max_steps
        self._steps = 0
        self._failure = _Failure()

    def resolve(self, roots: Sequence[Requirement]) -> list[Resolved]:
        pending = [self._edge(ROOT, (), r) for r in roots]
        state = self._search(pending, _State(), 0)
        if state is None:
            failure = self._failure
            raise ResolutionError(failure.message or "the requirements cannot be satisfied",
                                  package=failure.package, cycle=failure.cycle)
        return self._flatten(state)

    # Search.

    def _edge(self, requirer: str, path: tuple[str, ...], requirement: Requirement) -> _Edge:
        return _Edge(requirer, path, requirement, parse_range(requirement.range))

    def _fail(self, depth: int, message: str, package: str, cycle: tuple[str, ...] = ()) -> None:
        # Keep the failure found deepest in the search: it is the most specific explanation.
        if depth > self._failure.depth:
            self._failure = _Failure(depth, message, package, cycle)

    def _search(self, pending: list[_Edge], state: _State, depth: int) -> _State | None:
        self._steps += 1
        if self._steps > self._max_steps:
            raise ResolutionError(f"dependency resolution gave up after {self._max_steps} steps; "
                                  "the graph has too many conflicting alternatives")
        if not pending:
            return state
        edge, rest = pending[0], pending[1:]
        name = edge.requirement.package
        if name in edge.path:
            cycle = (*edge.path[edge.path.index(name):], name)
            self._fail(1 << 30, "dependency cycle: " + " → ".join(cycle), name, cycle)
            return None
        releases = self._versions.get(name)
        if not releases:
            self._fail(depth, f"{_who(edge)} requires {name} {edge.range}, but no version of {name} is "
                              "published (or every version is yanked or not Ready)", name)
            return None
        if edge.requirement.shared:
            edges = [*state.shared_edges.get(name, []), edge]
            chosen = state.shared.get(name)
            if chosen is not None:
                if not edge.range.allows(chosen):
                    self._fail(depth, _conflict(name, edges, releases), name)
                    return None
                return self._search(rest, _with_shared_edge(state, name, edges), depth + 1)
            candidates = [r for r in releases if all(e.range.allows(r.version) for e in edges)]
            if not candidates:
                self._fail(depth, _conflict(name, edges, releases), name)
                return None
            for release in candidates:
                next_state = _with_shared_edge(state, name, edges)
                next_state.shared[name] = release.version
                found = self._search(rest + self._children(edge, release), next_state, depth + 1)
                if found is not None:
                    return found
            return None
        candidates = [r for r in releases if edge.range.allows(r.version)]
        if not candidates:
            self._fail(depth, _conflict(name, [edge], releases), name)
            return None
        for release in candidates:
            next_state = _State(dict(state.shared), state.shared_edges, dict(state.copies))
            key = (name, release.version)
            next_state.copies[key] = [*next_state.copies.get(key, []), edge.requirer]
            found = self._search(rest + self._children(edge, release), next_state, depth + 1)
            if found is not None:
                return found
        return None

    def _children(self, edge: _Edge, release: Release) -> list[_Edge]:
        requirer = f"{edge.requirement.package}@{release.version}"
        path = (*edge.path, edge.requirement.package)
        return [self._edge(requirer, path, r) for r in release.requirements]

    def _flatten(self, state: _State) -> list[Resolved]:
        digests = {(name, r.version): r.digest for name, rs in self._catalog.items() for r in rs}
        out = [Resolved(name, version, digests[(name, version)], True,
                        tuple(dict.fromkeys(e.requirer for e in state.shared_edges[name])))
               for name, version in state.shared.items()]
        out += [Resolved(name, version, digests[(name, version)], False, tuple(dict.fromkeys(requirers)))
                for (name, version), requirers in state.copies.items()]
        return sorted(out, key=lambda r: (r.package, semver_key(r.version), not r.shared))


def _with_shared_edge(state: _State, name: str, edges: list[_Edge]) -> _State:
    return _State(dict(state.shared), {**state.shared_edges, name: edges}, state.copies)


def _who(edge: _Edge) -> str:
    return "the request" if edge.requirer == ROOT else edge.requirer


def _conflict(name: str, edges: list[_Edge], releases: Sequence[Release]) -> str:
    asks = "; ".join(f"{_who(e)} requires {name} {e.range}" + (" (shared)" if e.requirement.shared else "")
                     + (f" via {' → '.join(e.path)}" if len(e.path) > 1 else "") for e in edges)
    available = ", ".join(r.version for r in releases[:10]) + (" …" if len(releases) > 10 else "")
    what = "these ranges cannot meet" if len(edges) > 1 else "no version satisfies it"
    return f"cannot resolve {name}: {asks}; {what} (available: {available})"


def resolve(catalog: Catalog, roots: Sequence[Requirement]) -> list[Resolved]:
    return Resolver(catalog).resolve(roots)
