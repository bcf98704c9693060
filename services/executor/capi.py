"""Direct calls into wasmtime's C API for the per-call hot path of the memory-v1 ABI.

wasmtime-py's wrappers cost more than the work for a small call (measured on an echo, per call: looking
up exports through `instance.exports(store)` builds every export, a `Func.__call__` converts types and
values, `Memory.read/write` go through slices; with the pooling allocator, about 80 µs for the whole call
against about 10 µs for the same C calls made here). Here, every function takes and returns plain
addresses (`c_void_p` as int), so ctypes has nothing to convert:

- functions that run no wasm (store set-up, export look-up, memory data) come from a `PyDLL` handle,
  which keeps the GIL: releasing and re-taking it would cost more than they do;
- the two functions that run wasm (`instantiate`, `call`) come from a `CDLL` handle, which releases the
  GIL, so calls on other threads run in parallel (the epoch callback and WASI callbacks take it back).

Scratch structures (externs, argument array, trap slot) are per thread, built once: a run uses them only
inside `Sandbox._call_memory` (and `instantiate`), and the runs of one thread are sequential.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import wasmtime
from wasmtime import _bindings
from wasmtime import _ffi as ffi

_V = ctypes.c_void_p
_SIZE = ctypes.c_size_t
_gil_held = ctypes.PyDLL(ffi.dll._name)
_gil_released = ffi.dll


def _fn(lib: Any, name: str, restype: Any, *argtypes: Any) -> Any:
    # A fresh function pointer object, so the argtypes set here do not change wasmtime-py's own.
    fn = lib[name]
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


store_limiter = _fn(_gil_held, "wasmtime_store_limiter", None, _V, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
epoch_deadline_callback = _fn(_gil_held, "wasmtime_store_epoch_deadline_callback", None, _V, _V, _V, _V)
set_epoch_deadline = _fn(_gil_held, "wasmtime_context_set_epoch_deadline", None, _V, ctypes.c_uint64)
export_get = _fn(_gil_held, "wasmtime_instance_export_get", ctypes.c_bool, _V, _V, ctypes.c_char_p, _SIZE, _V)
memory_data = _fn(_gil_held, "wasmtime_memory_data", _V, _V, _V)
memory_data_size = _fn(_gil_held, "wasmtime_memory_data_size", _SIZE, _V, _V)
instantiate_pre = _fn(_gil_released, "wasmtime_instance_pre_instantiate", _V, _V, _V, _V, _V)
call_unchecked = _fn(_gil_released, "wasmtime_func_call_unchecked", _V, _V, _V, _V, _SIZE, _V)
_store_new = _fn(_gil_held, "wasmtime_store_new", ctypes.POINTER(ffi.wasmtime_store_t),
                 ctypes.POINTER(ffi.wasm_engine_t), _V, _V)
_store_context = _fn(_gil_held, "wasmtime_store_context", ctypes.POINTER(ffi.wasmtime_context_t),
                     ctypes.POINTER(ffi.wasmtime_store_t))
# memmove that keeps the GIL (ctypes.memmove releases and re-takes it).
write_bytes = ctypes.PYFUNCTYPE(_V, _V, ctypes.c_char_p, _SIZE)(ctypes.cast(ctypes.memmove, _V).value or 0)
read_bytes = ctypes.string_at

# Offset of the union (the func / memory handle) inside a `wasmtime_extern_t`.
_EXTERN_OF = ffi.wasmtime_extern_t.of.offset
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
                   externs + _EXTERN_OF, externs + size + _EXTERN_OF, externs + 2 * size + _EXTERN_OF)


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
