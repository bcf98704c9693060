"""WAT modules for the kv tests: real guests calling the `clawhub` host functions."""

from __future__ import annotations

import struct

# memory-v1. Input: op (1 byte: g get, p put, d delete, l list, x get with a key outside the memory),
# ttl_ms (i64 LE), key length (u32 LE), out_cap (u32 LE), key, value (the rest). Output: the host function's
# result as an i64 LE, then for g and l the bytes it wrote (when the result is from 0 to out_cap).
KV_SHELL = r'''
(module
  (import "clawhub" "kv_get" (func $get (param i32 i32 i32 i32) (result i64)))
  (import "clawhub" "kv_put" (func $put (param i32 i32 i32 i32 i64) (result i32)))
  (import "clawhub" "kv_delete" (func $delete (param i32 i32) (result i32)))
  (import "clawhub" "kv_list" (func $list (param i32 i32 i32 i32) (result i64)))
  (memory (export "memory") 1)
  (func $room (param $end i32)
    (local $pages i32)
    (local.set $pages (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
        (then unreachable)))))
  (func (export "clawhub_alloc") (param $len i32) (result i32)
    (call $room (i32.add (i32.const 1024) (local.get $len)))
    (i32.const 1024))
  (func (export "clawhub_run") (param $ptr i32) (param $len i32) (result i64)
    (local $op i32) (local $ttl i64) (local $klen i32) (local $cap i32) (local $key i32) (local $val i32)
    (local $vlen i32) (local $out i32) (local $r i64) (local $n i32)
    (local.set $op (i32.load8_u (local.get $ptr)))
    (local.set $ttl (i64.load (i32.add (local.get $ptr) (i32.const 1))))
    (local.set $klen (i32.load (i32.add (local.get $ptr) (i32.const 9))))
    (local.set $cap (i32.load (i32.add (local.get $ptr) (i32.const 13))))
    (local.set $key (i32.add (local.get $ptr) (i32.const 17)))
    (local.set $val (i32.add (local.get $key) (local.get $klen)))
    (local.set $vlen (i32.sub (i32.add (local.get $ptr) (local.get $len)) (local.get $val)))
    (local.set $out (i32.add (local.get $ptr) (local.get $len)))
    (call $room (i32.add (i32.add (local.get $out) (i32.const 8)) (local.get $cap)))
    (if (i32.eq (local.get $op) (i32.const 103)) ;; g
      (then (local.set $r (call $get (local.get $key) (local.get $klen) (i32.add (local.get $out) (i32.const 8))
                                     (local.get $cap)))))
    (if (i32.eq (local.get $op) (i32.const 112)) ;; p
      (then (local.set $r (i64.extend_i32_s (call $put (local.get $key) (local.get $klen) (local.get $val)
                                                      (local.get $vlen) (local.get $ttl))))))
    (if (i32.eq (local.get $op) (i32.const 100)) ;; d
      (then (local.set $r (i64.extend_i32_s (call $delete (local.get $key) (local.get $klen))))))
    (if (i32.eq (local.get $op) (i32.const 108)) ;; l
      (then (local.set $r (call $list (local.get $key) (local.get $klen) (i32.add (local.get $out) (i32.const 8))
                                      (local.get $cap)))))
    (if (i32.eq (local.get $op) (i32.const 120)) ;; x: a key far outside the memory
      (then (local.set $r (call $get (i32.const 0x7fffff00) (i32.const 64) (local.get $out) (i32.const 0)))))
    (i64.store (local.get $out) (local.get $r))
    (local.set $n (i32.const 8))
    (if (i32.and (i64.ge_s (local.get $r) (i64.const 0)) (i64.le_s (local.get $r) (i64.extend_i32_u (local.get $cap))))
      (then (if (i32.or (i32.eq (local.get $op) (i32.const 103)) (i32.eq (local.get $op) (i32.const 108)))
        (then (local.set $n (i32.add (i32.const 8) (i32.wrap_i64 (local.get $r))))))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32)) (i64.extend_i32_u (local.get $n)))))
'''

# A WASI command: puts "greeting" = "hello from wasi", reads it back and prints it; then tries a 300-byte key
# (over the default limit) and prints the error code after it.
KV_WASI = r'''
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "clawhub" "kv_get" (func $get (param i32 i32 i32 i32) (result i64)))
  (import "clawhub" "kv_put" (func $put (param i32 i32 i32 i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "greeting")
  (data (i32.const 32) "hello from wasi")
  (func (export "_start")
    (local $n i64) (local $r i32)
    (drop (call $put (i32.const 16) (i32.const 8) (i32.const 32) (i32.const 15) (i64.const 0)))
    (local.set $n (call $get (i32.const 16) (i32.const 8) (i32.const 100) (i32.const 64)))
    ;; iovec at 0: (100, n)
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.wrap_i64 (local.get $n)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; A 300-byte key: refused (E_KEY_TOO_LARGE, -3); print " " and the code's digit.
    (local.set $r (call $put (i32.const 1000) (i32.const 300) (i32.const 32) (i32.const 1) (i64.const 0)))
    (i32.store8 (i32.const 200) (i32.const 32))
    (i32.store8 (i32.const 201) (i32.sub (i32.const 48) (local.get $r)))
    (i32.store (i32.const 0) (i32.const 200))
    (i32.store (i32.const 4) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
'''

# memory-v1, importing kv_get with no other import: needs the `kv` capability.
KV_GET_ONLY = r'''
(module
  (import "clawhub" "kv_get" (func $get (param i32 i32 i32 i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "clawhub_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "clawhub_run") (param i32 i32) (result i64) (i64.const 0)))
'''

# The same with a wrong type, and an import that is no host function.
KV_GET_WRONG_TYPE = KV_GET_ONLY.replace("(param i32 i32 i32 i32) (result i64)", "(param i32 i32) (result i32)", 1)
NOT_A_HOST_FUNCTION = KV_GET_ONLY.replace('"kv_get"', '"kv_increment"', 1)


def command(op: str, key: bytes = b"", value: bytes = b"", *, ttl_ms: int = 0, cap: int = 4096) -> bytes:
    """KV_SHELL's input for one operation."""
    return op.encode() + struct.pack("<qII", ttl_ms, len(key), cap) + key + value


def answer(output: bytes) -> tuple[int, bytes]:
    """KV_SHELL's output: (result, bytes written)."""
    return struct.unpack("<q", output[:8])[0], output[8:]


def listed(data: bytes) -> list[bytes]:
    """kv_list's buffer: length-prefixed keys."""
    keys, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "little")
        keys.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return keys
