"""Run-time dependencies: a skill imports functions from a dependency by its package name.

A module's imports whose module name is not `wasi_snapshot_preview1` name dependency packages
(`(import "com.acme.textutil" "shout" (func ...))`). The registry checks at publish that each such package
is a declared dependency and that the version the dependencies resolve to exports a function of that
name with exactly that type; the executor checks the same against the versions a deployment pinned, and
links them when it instantiates the skill:

- a **shared** dependency is one instance for the whole graph of one call: every module importing that
  package gets the same instance (and so the same memory and globals);
- a **non-shared** dependency gets one instance per dependent instance: two skills (or two dependencies)
  importing it never share its state.

Only functions may be imported from a dependency: memories, tables and globals stay private to their
module, so a dependency cannot reach into its dependent's memory (or the other way round).

`DependencyGraph` is built once per (module, resolution): it checks that every dependency import is
satisfied by the pinned version's exports (same name, same function type) and that the graph has no cycle,
and keeps the compiled modules; the registry builds one to verify a publish, the executor to run calls.
`instantiate(store)` builds the instances for one call inside that call's Store, dependencies first.
Dependency modules may not import WASI (in the skill's Store they would act with its grant), and are
bounded by the call's wall clock and fuel and, each memory, by its memory limit.

Pure wasmtime, no I/O: shared by the registry and the executor.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from services.runtime.names import skill_name_problem
from services.runtime.wasm import WASI_P1

ROOT = "(root)"
# One call instantiates at most this many modules (the skill and its dependency instances), and a graph
# holds at most MAX_MODULES distinct modules: bounds on the work, memory and pooled instance slots a
# single skill can take (each module's memory is limited to the call's memory limit).
MAX_INSTANCES = 16
MAX_MODULES = 64


def dependency_imports(module: wasmtime.Module) -> dict[str, list[wasmtime.ImportType]]:
    """The module's imports from dependency packages (import modules that are package names, such as
    `com.acme.util`), by package name. Anything else (`env`, say) is neither WASI nor a package: the ABI
    check refuses it."""
    found: dict[str, list[wasmtime.ImportType]] = {}
    for imp in module.imports:
        if imp.module != WASI_P1 and skill_name_problem(imp.module) is None:
            found.setdefault(imp.module, []).append(imp)
    return found


def undeclared_imports(module: wasmtime.Module, declared: Collection[str]) -> list[str]:
    """Problems for imports from packages that are not declared dependencies; empty when none."""
    return [f"the module imports `{package}.{imports[0].name}`, but `{package}` is not a declared dependency "
            "(add it to [[dependencies]] in skill.toml)"
            for package, imports in sorted(dependency_imports(module).items()) if package not in declared]


def _describe(kind: object) -> str:
    if isinstance(kind, wasmtime.FuncType):
        params = ", ".join(str(p) for p in kind.params)
        results = ", ".join(str(r) for r in kind.results)
        return f"func ({params}) -> ({results})"
    return type(kind).__name__.removesuffix("Type").lower()


def _same_func(a: wasmtime.FuncType, b: wasmtime.FuncType) -> bool:
    return ([str(p) for p in a.params] == [str(p) for p in b.params]
            and [str(r) for r in a.results] == [str(r) for r in b.results])


def link_problems(importer: str, module: wasmtime.Module,
                  providers: Mapping[str, tuple[str, wasmtime.Module]]) -> list[str]:
    """Why `module` (described as `importer`) cannot be linked with `providers` (package → (label such as
    `com.acme.util@1.2.0`, its module)); empty when every dependency import is satisfied."""
    problems: list[str] = []
    for package, imports in sorted(dependency_imports(module).items()):
        provider = providers.get(package)
        if provider is None:
            problems.append(f"{importer} imports from `{package}`, which the dependency resolution does not provide")
            continue
        label, dep = provider
        exports = {e.name: e.type for e in dep.exports}
        for imp in imports:
            wanted = imp.type
            if not isinstance(wanted, wasmtime.FuncType):
                problems.append(f"{importer} imports `{package}.{imp.name}` as a {_describe(wanted)}; only "
                                "functions can be imported from a dependency")
                continue
            got = exports.get(imp.name or "")
            if got is None:
                problems.append(f"{importer} imports `{package}.{imp.name}`, which {label} does not export")
            elif not isinstance(got, wasmtime.FuncType) or not _same_func(wanted, got):
                problems.append(f"{importer} imports `{package}.{imp.name}` as {_describe(wanted)}, but {label} "
                                f"exports it as {_describe(got)}")
    return problems


@dataclass(frozen=True)
class Copy:
    """One package version of a resolution, as the registry's `ResolvedDependency` describes it."""

    package: str
    version: str
    digest: str
    shared: bool
    required_by: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.package}@{self.version}"


def provider_for(package: str, dependent: str, copies: Iterable[Copy]) -> Copy | None:
    """The copy of `package` that `dependent` (`(root)` or `package@version`) links: the one resolved for
    that requirement, the graph's shared version if it required it shared, else its isolated copy."""
    found = [c for c in copies if c.package == package and dependent in c.required_by]
    found.sort(key=lambda c: not c.shared)
    return found[0] if found else None


class LinkError(Exception):
    """The module cannot be linked with its resolved dependencies; `problems` says why, for people."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(eq=False)
class _Node:
    label: str
    module: wasmtime.Module
    shared: bool
    # Package → the node this module's imports from that package are linked to.
    links: dict[str, _Node] = field(default_factory=dict)
    # The module's imports in order: (package, name) for each.
    imports: list[tuple[str, str]] = field(default_factory=list)


class DependencyGraph:
    """A root module with the dependency modules it is linked with."""

    def __init__(self, engine: wasmtime.Engine, root: wasmtime.Module, copies: Sequence[Copy],
                 modules: Mapping[str, wasmtime.Module], *, root_label: str = "the skill") -> None:
        """`copies` is the pinned resolution (`(root)` names the skill in `required_by`); `modules` the
        compiled module of each copy's digest, for the same engine as `root`. Raises LinkError."""
        self._wasi = wasmtime.Linker(engine)
        self._wasi.define_wasi()
        problems: list[str] = []
        nodes: dict[tuple[str, str, bool], _Node] = {}

        def node_of(copy: Copy) -> _Node:
            key = (copy.package, copy.version, copy.shared)
            node = nodes.get(key)
            if node is None:
                if len(nodes) >= MAX_MODULES:
                    raise LinkError([f"the dependency graph has more than {MAX_MODULES} modules"])
                node = _Node(copy.label, modules[copy.digest], copy.shared)
                nodes[key] = node
                expand(node, copy.label)
            return node

        def expand(node: _Node, dependent: str) -> None:
            node.imports = [(i.module, i.name or "") for i in node.module.imports]
            if dependent != ROOT:
                # A dependency runs in its dependent's Store: with WASI it would see the skill's environment
                # (its secrets), arguments, files and output. Dependencies compute; they do no I/O.
                problems.extend(f"{node.label} imports `{WASI_P1}.{name}`: a dependency may not use WASI (it "
                                "would act with its dependent's grant); only functions of other packages"
                                for package, name in node.imports if package == WASI_P1)
            providers: dict[str, tuple[str, wasmtime.Module]] = {}
            for package in dependency_imports(node.module):
                copy = provider_for(package, dependent, copies)
                if copy is None:
                    continue  # link_problems reports it
                if copy.digest not in modules:
                    problems.append(f"the module of {copy.label} ({copy.digest}) was not loaded")
                    continue
                providers[package] = (copy.label, modules[copy.digest])
                node.links[package] = node_of(copy)
            problems.extend(link_problems(node.label, node.module, providers))

        self.root = _Node(root_label, root, False)
        expand(self.root, ROOT)
        # Whether any module of the graph imports WASI (then every call's Store needs a WASI config).
        self.imports_wasi = any(imp.module == WASI_P1 for node in [self.root, *nodes.values()]
                                for imp in node.module.imports)
        cycle = self._cycle()
        if cycle:
            problems.append("the dependencies import each other in a cycle: " + " -> ".join(cycle))
        elif (count := self._instances()) > MAX_INSTANCES:
            problems.append(f"one call would instantiate {count} modules (non-shared dependencies get an "
                            f"instance per dependent); at most {MAX_INSTANCES} are allowed")
        if problems:
            raise LinkError(list(dict.fromkeys(problems)))

    def _instances(self) -> int:
        """How many instances one call creates: each node once per dependent instance when non-shared,
        once per call when shared. Only called on an acyclic graph."""
        shared: set[int] = set()
        per_node: dict[int, int] = {}

        def subtree(node: _Node) -> int:
            # Instances made when `node` is instantiated once, shared ones excluded (counted once below).
            if id(node) not in per_node:
                total = 1
                for child in node.links.values():
                    if child.shared:
                        shared.add(id(child))
                        subtree(child)
                    else:
                        total += subtree(child)
                per_node[id(node)] = total
            return per_node[id(node)]

        return subtree(self.root) + sum(per_node[n] for n in shared)

    def _cycle(self) -> list[str]:
        """A chain of labels that leads back to its start, or [] when the graph is acyclic."""
        done: set[int] = set()

        def visit(node: _Node, path: list[_Node]) -> list[str]:
            if node in path:
                return [n.label for n in path[path.index(node):]] + [node.label]
            if id(node) in done:
                return []
            for child in node.links.values():
                found = visit(child, [*path, node])
                if found:
                    return found
            done.add(id(node))
            return []

        return visit(self.root, [])

    def instantiate(self, store: wasmtime.Store) -> wasmtime.Instance:
        """Instantiate the root with its dependencies inside `store` (one call's Store)."""
        return self._instantiate(self.root, store, {})

    def _instantiate(self, node: _Node, store: wasmtime.Store,
                     shared: dict[int, tuple[wasmtime.Instance, Any]]) -> wasmtime.Instance:
        deps: dict[str, Any] = {}
        for package, child in node.links.items():
            if child.shared:
                made = shared.get(id(child))
                if made is None:
                    instance = self._instantiate(child, store, shared)
                    made = (instance, instance.exports(store))
                    shared[id(child)] = made
                deps[package] = made[1]
            else:
                deps[package] = self._instantiate(child, store, shared).exports(store)
        imports: list[wasmtime.Func | wasmtime.Table | wasmtime.Memory | wasmtime.SharedMemory | wasmtime.Global
                      | wasmtime.Tag] = []
        for package, name in node.imports:
            if package == WASI_P1:
                imports.append(self._wasi.get(store, package, name))
            else:
                item = deps[package][name]
                if not isinstance(item, wasmtime.Func):  # link_problems allows functions only
                    raise wasmtime.WasmtimeError(f"{package}.{name} is not a function")
                imports.append(item)
        return wasmtime.Instance(store, node.module, imports)
