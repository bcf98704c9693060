;; com.example.echo-memory: returns its input unchanged, through guest memory.
;;
;; ABI memory-v1 (the fast one): the host calls `clawhub_alloc(n)`, writes the n-byte input at the address
;; it returns, then calls `clawhub_run(address, n)`, whose i64 result packs `(out_ptr << 32) | out_len`:
;; the output region. Setting bit 63 would report a failure whose message is that region. No WASI import
;; at all, so a call needs no WASI config and no stdio: it costs little more than its fresh instance.
(module
  (memory (export "memory") 1)
  ;; Where the input goes: after a small reserved area (unused here, kept for scratch data).
  (global $input i32 (i32.const 1024))

  ;; Make room for `len` bytes at $input, growing the memory as needed; a refused growth traps (the host
  ;; reports it against the memory limit).
  (func (export "clawhub_alloc") (param $len i32) (result i32)
    (local $pages i32)
    ;; pages needed = ceil((input + len) / 64 KiB), computed in 64 bits so no length can wrap around.
    (local.set $pages (i32.wrap_i64 (i64.shr_u
      (i64.add (i64.add (i64.extend_i32_u (global.get $input)) (i64.extend_i32_u (local.get $len)))
               (i64.const 65535))
      (i64.const 16))))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable))))
    (global.get $input))

  ;; The output is the input, where it already is.
  (func (export "clawhub_run") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))
