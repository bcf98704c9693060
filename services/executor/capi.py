"""Direct calls into wasmtime's C API for the per-call hot path of the memory-v1 ABI.

wasmtime-py's wrappers cost more than the work for a small call (measured on an echo, per call: looking
up exports through `instance.exports(store)` builds every export, a `Func.__call__` converts types and
values, `Memory.read/write` go through slices; with the pooling allocator, about 80 µs for the whole call
against about 9 µs for the same C calls made here). Here, every function takes and returns plain
addresses (`c_void_p` as int), so ctypes has nothing to convert:

- functions that run no wasm (store set-up, export look-up, memory data) come from a `PyDLL` handle,
  which keeps the GIL: releasing and re-taking it would cost more than they do;
- the two functions that run wasm (`instantiate`, `call`) come from a `CDLL` handle, which releases the
  GIL, so calls on other threads run in parallel (the epoch callback and WASI callbacks take it back).

`Sandbox._run_raw` (a memory-v1 module without WASI imports, the common fast case) goes further: it makes
no wasmtime-py object at all (a raw Store from `u_store_new`, deleted by `u_store_delete`), and calls the
`u_` functions, declared without argtypes, with arguments ctypes passes as they are: per-thread slots as
`byref` objects built once (`Scratch.raw`), constants and per-engine or per-module addresses as `word`s,
the Store and its context as `Addr` objects. ctypes then runs no converter per argument, which is most
of what a C call costs it.

Scratch structures (externs, argument array, instance and trap slots) are per thread, built once: a run
uses them only inside `Sandbox._call_memory` or `Sandbox._run_raw` (and `instantiate`), and the runs of
one thread are sequential.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import wasmtime
from wasmtime import _bindings
from wasmtime import _ffi as ffi

_V = ctypes.c_void_p
# wasmtime ships for 64-bit hosts only; the argument passing below relies on it.
if ctypes.sizeof(_V) != 8:
    raise ImportError("services.executor.capi needs a 64-bit host")
# 64-bit integer arguments (int64_t, uint64_t, size_t) are declared as `c_void_p`: a C function receives
# such an integer exactly as it receives a pointer (the same register or stack word, negative numbers in
# two's complement), and ctypes converts an int to a pointer through a dedicated converter, 4-5x cheaper
# than its generic one for c_int64 or c_size_t (measured: 1.2 µs of a 9.3 µs memory-v1 call). Return
# values keep their exact types.
_I64 = _U64 = _SIZE = _V
_MASK64 = (1 << 64) - 1
_gil_held = ctypes.PyDLL(ffi.dll._name)
_gil_released = ffi.dll


def _fn(lib: Any, name: str, restype: Any, *argtypes: Any) -> Any:
    # A fresh function pointer object, so the argtypes set here do not change wasmtime-py's own.
    fn = lib[name]
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


store_limiter = _fn(_gil_held, "wasmtime_store_limiter", None, _V, _I64, _I64, _I64, _I64, _I64)
epoch_deadline_callback = _fn(_gil_held, "wasmtime_store_epoch_deadline_callback", None, _V, _V, _V, _V)
set_epoch_deadline = _fn(_gil_held, "wasmtime_context_set_epoch_deadline", None, _V, _U64)
export_get = _fn(_gil_held, "wasmtime_instance_export_get", ctypes.c_bool, _V, _V, ctypes.c_char_p, _SIZE, _V)
memory_data = _fn(_gil_held, "wasmtime_memory_data", _V, _V, _V)
memory_data_size = _fn(_gil_held, "wasmtime_memory_data_size", ctypes.c_size_t, _V, _V)
instantiate_pre = _fn(_gil_released, "wasmtime_instance_pre_instantiate", _V, _V, _V, _V, _V)
call_unchecked = _fn(_gil_released, "wasmtime_func_call_unchecked", _V, _V, _V, _V, _SIZE, _V)
set_fuel = _fn(_gil_held, "wasmtime_context_set_fuel", _V, _V, _U64)
get_fuel = _fn(_gil_held, "wasmtime_context_get_fuel", _V, _V, _V)
_store_new = _fn(_gil_held, "wasmtime_store_new", ctypes.POINTER(ffi.wasmtime_store_t),
                 ctypes.POINTER(ffi.wasm_engine_t), _V, _V)
_store_context = _fn(_gil_held, "wasmtime_store_context", ctypes.POINTER(ffi.wasmtime_context_t),
                     ctypes.POINTER(ffi.wasmtime_store_t))
# memmove that keeps the GIL (ctypes.memmove releases and re-takes it).
write_bytes = ctypes.PYFUNCTYPE(_V, _V, ctypes.c_char_p, _SIZE)(ctypes.cast(ctypes.memmove, _V).value or 0)
# `bytes` of `size` bytes at an address: `PyBytes_FromStringAndSize` (what `ctypes.string_at` does, without
# its Python wrapper and its C int length).
read_bytes = _fn(ctypes.pythonapi, "PyBytes_FromStringAndSize", ctypes.py_object, _V, _SIZE)


class Addr(ctypes.c_void_p):
    """An address kept as a ctypes object: a function whose restype this is returns it as is (a subclass
    of c_void_p is not turned into an int), and it goes to a function without argtypes as a pointer with
    no conversion call."""


def _untyped(lib: Any, name: str, restype: Any) -> Any:
    fn = lib[name]
    fn.restype = restype
    return fn


# The functions of `Sandbox._run_raw`'s calls, without argtypes: ctypes then calls no converter (about
# 0.1 µs per argument), but takes every argument as it is. So each argument must be an `Addr`, a `byref`
# (the per-thread slots of `Scratch.raw`), a `word`, bytes (a char*) or None (NULL), and never a bare int,
# which ctypes would pass as a 32-bit C int.
# `u_store_new` makes `_run_raw`'s raw Store; `u_store_delete` drops what it owns (instances, their pool
# slots), and runs no wasm and no Python (the Store has no WASI config and no host data).
u_store_new = _untyped(_gil_held, "wasmtime_store_new", Addr)
u_store_context = _untyped(_gil_held, "wasmtime_store_context", Addr)
u_store_delete = _untyped(_gil_held, "wasmtime_store_delete", None)
u_store_limiter = _untyped(_gil_held, "wasmtime_store_limiter", None)
u_epoch_deadline_callback = _untyped(_gil_held, "wasmtime_store_epoch_deadline_callback", None)
u_set_epoch_deadline = _untyped(_gil_held, "wasmtime_context_set_epoch_deadline", None)
u_export_get = _untyped(_gil_held, "wasmtime_instance_export_get", ctypes.c_bool)
u_memory_data = _untyped(_gil_held, "wasmtime_memory_data", _V)
u_memory_data_size = _untyped(_gil_held, "wasmtime_memory_data_size", ctypes.c_size_t)
u_instantiate_pre = _untyped(_gil_released, "wasmtime_instance_pre_instantiate", _V)
u_call_unchecked = _untyped(_gil_released, "wasmtime_func_call_unchecked", _V)

words: dict[int, Any] = {}


def word(value: int) -> Any:
    """An argument for the `u_` functions that C receives as the 64-bit integer (or pointer) `value`: a
    `byref` of that address, built once per value (and reused: it is never dereferenced here)."""
    arg = words.get(value)
    if arg is None:
        if len(words) >= 4096:  # limits and modules come and go: keep the cache bounded
            words.clear()
        arg = words[value] = ctypes.byref(ctypes.c_char.from_address(value & _MASK64))
    return arg

# Offset of the union (the func / memory handle) inside a `wasmtime_extern_t`.
EXTERN_OF = ffi.wasmtime_extern_t.of.offset
EXTERN_FUNC = 0  # WASMTIME_EXTERN_FUNC
EXTERN_MEMORY = 3  # WASMTIME_EXTERN_MEMORY


def kind(extern: Any) -> int:
    """The kind of a `wasmtime_extern_t` (EXTERN_FUNC, EXTERN_MEMORY, ...)."""
    return int(extern.kind)


def address(obj: Any) -> int:
    """The address of a ctypes function pointer (or any object ctypes can cast), as an int."""
    return ctypes.cast(obj, _V).value or 0


def target(pointer: Any) -> int:
    """The address a (non-NULL) typed ctypes pointer holds: 10x cheaper than `ctypes.cast`."""
    return ctypes.addressof(pointer.contents)


def new_store(engine: wasmtime.Engine) -> wasmtime.Store:
    """`wasmtime.Store(engine)` without the per-call ctypes type and cast work of its constructor (half of
    the cost of a small call's Store). Fills in exactly what that constructor sets (wasmtime-py is
    pinned; `tests/executor` run every call through this)."""
    store: Any = wasmtime.Store.__new__(wasmtime.Store)
    pointer = _store_new(engine.ptr(), None, None)
    store._set_ptr(pointer)
    store._Store__context = _store_context(pointer)
    store.engine = engine
    result: wasmtime.Store = store
    return result


class Scratch(threading.local):
    """Per-thread structures for one call at a time on that thread, and their addresses (`at`)."""

    def __init__(self) -> None:
        self.trap = ctypes.c_void_p()
        self.externs = (ffi.wasmtime_extern_t * 3)()  # clawhub_alloc, clawhub_run, memory
        self.args = (ffi.wasmtime_val_raw_t * 2)()
        size = ctypes.sizeof(ffi.wasmtime_extern_t)
        externs = ctypes.addressof(self.externs)
        # (trap slot, argument array, the three externs, and the func/memory handle inside each extern)
        self.at = (ctypes.addressof(self.trap), ctypes.addressof(self.args),
                   externs, externs + size, externs + 2 * size,
                   externs + EXTERN_OF, externs + size + EXTERN_OF, externs + 2 * size + EXTERN_OF)
        self.instance = ffi.wasmtime_instance_t()
        self.instance_at = ctypes.addressof(self.instance)
        self.fuel = ctypes.c_uint64()
        self.fuel_at = ctypes.addressof(self.fuel)
        # For `Sandbox._run_raw`, which calls the `u_` functions: the trap slot, argument array, instance
        # slot, three externs and the func/memory handles inside them as `byref` arguments (each passed
        # with no conversion at all); then views of the argument slots as the unsigned values wasm's i32
        # arguments and results and i64 result are (reading them masks nothing), and the trap slot.
        ref = ctypes.byref
        args = ctypes.addressof(self.args)
        second = args + ctypes.sizeof(ffi.wasmtime_val_raw_t)
        self.raw = (ref(self.trap), ref(self.args), ref(self.instance),
                    ref(self.externs), ref(self.externs, size), ref(self.externs, 2 * size),
                    ref(self.externs, EXTERN_OF), ref(self.externs, size + EXTERN_OF),
                    ref(self.externs, 2 * size + EXTERN_OF),
                    ctypes.c_uint32.from_address(args), ctypes.c_uint32.from_address(second),
                    ctypes.c_uint64.from_address(args), self.trap)


scratch = Scratch()


def raise_failure(error: int | None, trap: ctypes.c_void_p) -> None:
    """Raise what a C call reported, as wasmtime-py would (WasmtimeError, ExitTrap or Trap), taking
    ownership of the error or trap. Returns when there was neither."""
    if error:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
    if trap.value:
        pointer = ctypes.cast(trap.value, ctypes.POINTER(ffi.wasm_trap_t))
        trap.value = None
        raise wasmtime.Trap._from_ptr(pointer)


def fuel_left(context: Any) -> int:
    """The fuel a metered Store (by its context address) has left."""
    s = scratch
    raise_failure(get_fuel(context, s.fuel_at), s.trap)
    return int(s.fuel.value)


def instantiate(pre: wasmtime.InstancePre, store: wasmtime.Store) -> wasmtime.Instance:
    """`pre.instantiate(store)` without the context manager and wrappers around the same C call."""
    s = scratch
    s.trap.value = None
    instance = ffi.wasmtime_instance_t()
    error = instantiate_pre(target(pre.ptr()), target(store._context()), ctypes.addressof(instance), s.at[0])
    raise_failure(error, s.trap)
    return wasmtime.Instance._from_raw(instance)


def pooling_config(config: wasmtime.Config, slots: int, table_elements: int) -> None:
    """Use the pooling instance allocator: `slots` memories, tables and instances are reserved up front
    (about 4 GiB of address space per memory slot, nothing committed) and reused, so a fresh instance
    costs no mmap/munmap. The first 64 KiB of each memory is kept resident and zeroed on reuse rather
    than decommitted: a small skill then takes no page faults at all."""
    pool = _bindings.wasmtime_pooling_allocation_config_new()
    try:
        _bindings.wasmtime_pooling_allocation_config_total_memories_set(pool, slots)
        _bindings.wasmtime_pooling_allocation_config_total_tables_set(pool, slots)
        _bindings.wasmtime_pooling_allocation_config_total_core_instances_set(pool, slots)
        _bindings.wasmtime_pooling_allocation_config_total_stacks_set(pool, 0)  # async stacks: unused
        _bindings.wasmtime_pooling_allocation_config_table_elements_set(pool, table_elements)
        _bindings.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pool, 64 * 1024)
        _bindings.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, 64 * 1024)
        _bindings.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        _bindings.wasmtime_pooling_allocation_config_delete(pool)
