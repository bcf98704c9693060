"""Run-time dependency linking: shared packages are one instance per call graph, non-shared ones one per
dependent; imports are checked against the pinned versions' exports; cycles are refused."""

from __future__ import annotations

import pytest
import wasmtime

from services.runtime.linking import Copy, DependencyGraph, LinkError, link_problems, provider_for, undeclared_imports
from tests.conftest import wat

# A counter library: `bump` adds one to its private global and returns the new value.
COUNTER = wat("""(module
  (global $n (mut i32) (i32.const 0))
  (func (export "bump") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1))) (global.get $n)))""")

# A library that bumps the counter package it depends on.
def via(name: str) -> bytes:
    return wat(f"""(module
      (import "org.counter" "bump" (func $bump (result i32)))
      (func (export "{name}") (result i32) (call $bump)))""")

# Calls a.viaA then b.viaB; returns what the second bump saw (2 if a and b share one counter, else 1).
ROOT = wat("""(module
  (import "org.a" "viaA" (func $a (result i32)))
  (import "org.b" "viaB" (func $b (result i32)))
  (func (export "run") (result i32) (drop (call $a)) (call $b)))""")

DIGESTS = {"counter1": "sha256:" + "1" * 64, "counter2": "sha256:" + "2" * 64,
           "a": "sha256:" + "a" * 64, "b": "sha256:" + "b" * 64}


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


def modules(engine: wasmtime.Engine) -> dict[str, wasmtime.Module]:
    return {DIGESTS["counter1"]: wasmtime.Module(engine, COUNTER),
            DIGESTS["counter2"]: wasmtime.Module(engine, COUNTER),
            DIGESTS["a"]: wasmtime.Module(engine, via("viaA")),
            DIGESTS["b"]: wasmtime.Module(engine, via("viaB"))}


def run(engine: wasmtime.Engine, graph: DependencyGraph) -> int:
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    instance = graph.instantiate(store)
    func = instance.exports(store)["run"]
    assert isinstance(func, wasmtime.Func)
    result = func(store)
    assert isinstance(result, int)
    return result


def ab(shared_counter: bool) -> list[Copy]:
    copies = [Copy("org.a", "1.0.0", DIGESTS["a"], False, ("(root)",)),
              Copy("org.b", "1.0.0", DIGESTS["b"], False, ("(root)",))]
    if shared_counter:
        copies.append(Copy("org.counter", "1.0.0", DIGESTS["counter1"], True, ("org.a@1.0.0", "org.b@1.0.0")))
    else:
        copies.append(Copy("org.counter", "1.0.0", DIGESTS["counter1"], False, ("org.a@1.0.0",)))
        copies.append(Copy("org.counter", "2.0.0", DIGESTS["counter2"], False, ("org.b@1.0.0",)))
    return copies


def test_a_shared_dependency_is_one_instance_for_the_graph(engine: wasmtime.Engine) -> None:
    graph = DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(True), modules(engine))
    assert run(engine, graph) == 2


def test_non_shared_dependencies_are_isolated_per_dependent(engine: wasmtime.Engine) -> None:
    graph = DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(False), modules(engine))
    assert run(engine, graph) == 1


def test_each_call_starts_from_fresh_dependency_state(engine: wasmtime.Engine) -> None:
    graph = DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(True), modules(engine))
    assert [run(engine, graph) for _ in range(3)] == [2, 2, 2]


def test_a_missing_export_is_a_link_problem(engine: wasmtime.Engine) -> None:
    wrong = dict(modules(engine))
    wrong[DIGESTS["counter1"]] = wasmtime.Module(engine, wat('(module (func (export "other")))'))
    with pytest.raises(LinkError) as err:
        DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(True), wrong)
    assert "imports `org.counter.bump`, which org.counter@1.0.0 does not export" in str(err.value)


def test_a_type_mismatch_is_a_link_problem(engine: wasmtime.Engine) -> None:
    wrong = dict(modules(engine))
    wrong[DIGESTS["counter1"]] = wasmtime.Module(engine, wat(
        '(module (func (export "bump") (param i64) (result i32) (i32.const 0)))'))
    with pytest.raises(LinkError) as err:
        DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(True), wrong)
    assert "as func () -> (i32), but org.counter@1.0.0 exports it as func (i64) -> (i32)" in str(err.value)


def test_only_functions_can_be_imported_from_a_dependency(engine: wasmtime.Engine) -> None:
    importer = wasmtime.Module(engine, wat('(module (import "org.counter" "mem" (memory 1)))'))
    provider = wasmtime.Module(engine, wat('(module (memory (export "mem") 1))'))
    problems = link_problems("the skill", importer, {"org.counter": ("org.counter@1.0.0", provider)})
    assert problems == ["the skill imports `org.counter.mem` as a memory; only functions can be imported "
                        "from a dependency"]


def test_an_unresolved_package_is_a_link_problem(engine: wasmtime.Engine) -> None:
    with pytest.raises(LinkError) as err:
        DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(True)[:1], modules(engine))
    assert "imports from `org.b`, which the dependency resolution does not provide" in str(err.value)


def test_a_cycle_is_refused(engine: wasmtime.Engine) -> None:
    ping = wat('(module (import "org.pong" "f" (func)) (func (export "f")))')
    pong = wat('(module (import "org.ping" "f" (func)) (func (export "f")))')
    root = wat('(module (import "org.ping" "f" (func)))')
    copies = [Copy("org.ping", "1.0.0", DIGESTS["a"], True, ("(root)", "org.pong@1.0.0")),
              Copy("org.pong", "1.0.0", DIGESTS["b"], True, ("org.ping@1.0.0",))]
    mods = {DIGESTS["a"]: wasmtime.Module(engine, ping), DIGESTS["b"]: wasmtime.Module(engine, pong)}
    with pytest.raises(LinkError) as err:
        DependencyGraph(engine, wasmtime.Module(engine, root), copies, mods)
    assert "cycle: org.ping@1.0.0 -> org.pong@1.0.0 -> org.ping@1.0.0" in str(err.value)


def test_undeclared_packages_are_reported(engine: wasmtime.Engine) -> None:
    module = wasmtime.Module(engine, ROOT)
    assert undeclared_imports(module, {"org.a", "org.b"}) == []
    assert undeclared_imports(module, {"org.a"}) == [
        "the module imports `org.b.viaB`, but `org.b` is not a declared dependency "
        "(add it to [[dependencies]] in skill.toml)"]


def test_provider_prefers_the_copy_resolved_for_the_dependent() -> None:
    copies = ab(False)
    assert provider_for("org.counter", "org.b@1.0.0", copies) == copies[3]
    assert provider_for("org.counter", "org.a@1.0.0", copies) == copies[2]
    assert provider_for("org.counter", "(root)", copies) is None


def test_a_dependency_may_not_use_wasi(engine: wasmtime.Engine) -> None:
    # It would run with the skill's grant: read its env secrets, write to its output.
    leaky = wat('(module (import "wasi_snapshot_preview1" "environ_get" (func (param i32 i32) (result i32)))'
                ' (func (export "bump") (result i32) (i32.const 0)))')
    mods = modules(engine)
    mods[DIGESTS["counter1"]] = wasmtime.Module(engine, leaky)
    with pytest.raises(LinkError) as err:
        DependencyGraph(engine, wasmtime.Module(engine, ROOT), ab(True), mods)
    assert "org.counter@1.0.0 imports `wasi_snapshot_preview1.environ_get`: a dependency may not use WASI" \
        in str(err.value)


def layered(engine: wasmtime.Engine, depth: int, *, shared: bool) -> tuple[wasmtime.Module, list[Copy],
                                                                          dict[str, wasmtime.Module]]:
    """A diamond chain: each layer's two packages both import both packages of the next layer."""
    copies: list[Copy] = []
    mods: dict[str, wasmtime.Module] = {}
    for layer in range(depth):
        for side in "lr":
            name = f"org.l{layer}{side}"
            imports = "" if layer == depth - 1 else "".join(
                f'(import "org.l{layer + 1}{s}" "f" (func))' for s in "lr")
            digest = "sha256:" + f"{layer:02d}{side}".encode().hex().ljust(64, "0")
            mods[digest] = wasmtime.Module(engine, wat(f'(module {imports} (func (export "f")))'))
            requirers = ("(root)",) if layer == 0 else tuple(f"org.l{layer - 1}{s}@1.0.0" for s in "lr")
            copies.append(Copy(name, "1.0.0", digest, shared, requirers))
    root = wasmtime.Module(engine, wat('(module (import "org.l0l" "f" (func)) (import "org.l0r" "f" (func)))'))
    return root, copies, mods


def test_non_shared_diamonds_that_multiply_instances_are_refused(engine: wasmtime.Engine) -> None:
    # Non-shared: every layer doubles the instances (2 + 4 + 8 + 16 ...): 3 layers = 15 with the root.
    DependencyGraph(engine, *layered(engine, 3, shared=False))
    with pytest.raises(LinkError) as err:
        DependencyGraph(engine, *layered(engine, 4, shared=False))
    assert "one call would instantiate 31 modules" in str(err.value)
    # Shared, the same graph is one instance per package: 1 + 2 * 6 = 13.
    DependencyGraph(engine, *layered(engine, 6, shared=True))
