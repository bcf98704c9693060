;; com.example.counter-kv: a counter kept in the skill's key-value store (the `kv` capability).
;;
;; Each call adds one to the counter under the key "count" and returns the new count (a JSON number); the
;; input "reset" (the JSON string, quotes included) deletes the key and returns 0. State lives in the store,
;; not in the instance: every call gets a fresh instance, and every version of the skill and every executor
;; sharing the store sees the same counter.
;;
;; ABI memory-v1 (docs in services/runtime/wasm.py), plus the kv host functions of docs/skills/host-api.md,
;; imported from the `clawhub` module. Their errors are negative codes; here any but "not found" fails the
;; call with a message (and the host has already named the refusal's reason on stderr).
(module
  (import "clawhub" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i64)))
  (import "clawhub" "kv_put" (func $kv_put (param i32 i32 i32 i32 i64) (result i32)))
  (import "clawhub" "kv_delete" (func $kv_delete (param i32 i32) (result i32)))
  (memory (export "memory") 1)

  (data (i32.const 16) "count")              ;; the key, 5 bytes
  (data (i32.const 32) "\"reset\"")          ;; the reset input, 7 bytes
  (data (i32.const 48) "kv_get failed")      ;; 13 bytes
  (data (i32.const 64) "kv_put failed")      ;; 13 bytes
  (data (i32.const 80) "kv_delete failed")   ;; 16 bytes
  (data (i32.const 96) "0")                  ;; the reset output
  ;; 128..148: the stored value as read; 200..220: the new count, written backwards from 220.
  (global $input i32 (i32.const 1024))

  (func (export "clawhub_alloc") (param $len i32) (result i32)
    (local $pages i32)
    (local.set $pages (i32.wrap_i64 (i64.shr_u
      (i64.add (i64.add (i64.extend_i32_u (global.get $input)) (i64.extend_i32_u (local.get $len)))
               (i64.const 65535))
      (i64.const 16))))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable))))
    (global.get $input))

  ;; (ptr << 32) | len; with $failed, bit 63 too.
  (func $region (param $ptr i32) (param $len i32) (param $failed i32) (result i64)
    (i64.or
      (select (i64.const 0x8000000000000000) (i64.const 0) (local.get $failed))
      (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len)))))

  ;; Whether the input is exactly "reset" (with its quotes).
  (func $is_reset (param $ptr i32) (param $len i32) (result i32)
    (local $i i32)
    (if (i32.ne (local.get $len) (i32.const 7)) (then (return (i32.const 0))))
    (block $differ
      (loop $next
        (br_if $differ (i32.ne (i32.load8_u (i32.add (local.get $ptr) (local.get $i)))
                               (i32.load8_u (i32.add (i32.const 32) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $next (i32.lt_u (local.get $i) (i32.const 7))))
      (return (i32.const 1)))
    (i32.const 0))

  (func (export "clawhub_run") (param $ptr i32) (param $len i32) (result i64)
    (local $n i64) (local $count i64) (local $i i32) (local $at i32)
    (if (call $is_reset (local.get $ptr) (local.get $len))
      (then
        (if (i32.lt_s (call $kv_delete (i32.const 16) (i32.const 5)) (i32.const 0))
          (then (return (call $region (i32.const 80) (i32.const 16) (i32.const 1)))))
        (return (call $region (i32.const 96) (i32.const 1) (i32.const 0)))))
    ;; The current count: absent is 0, else decimal digits (at most 20 bytes).
    (local.set $n (call $kv_get (i32.const 16) (i32.const 5) (i32.const 128) (i32.const 20)))
    (if (i64.eq (local.get $n) (i64.const -1))
      (then (local.set $n (i64.const 0)))
      (else
        (if (i32.or (i64.lt_s (local.get $n) (i64.const 0)) (i64.gt_s (local.get $n) (i64.const 20)))
          (then (return (call $region (i32.const 48) (i32.const 13) (i32.const 1)))))))
    (block $done
      (loop $digit
        (br_if $done (i32.ge_u (local.get $i) (i32.wrap_i64 (local.get $n))))
        (local.set $count (i64.add (i64.mul (local.get $count) (i64.const 10))
          (i64.extend_i32_u (i32.sub (i32.load8_u (i32.add (i32.const 128) (local.get $i))) (i32.const 48)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digit)))
    (local.set $count (i64.add (local.get $count) (i64.const 1)))
    ;; Format it backwards from 220.
    (local.set $at (i32.const 220))
    (loop $format
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $count) (i64.const 10)))))
      (local.set $count (i64.div_u (local.get $count) (i64.const 10)))
      (br_if $format (i64.ne (local.get $count) (i64.const 0))))
    ;; Store it (no expiry), then return it: the output is the stored digits.
    (if (i32.lt_s (call $kv_put (i32.const 16) (i32.const 5) (local.get $at) (i32.sub (i32.const 220) (local.get $at))
                               (i64.const 0))
                  (i32.const 0))
      (then (return (call $region (i32.const 64) (i32.const 13) (i32.const 1)))))
    (call $region (local.get $at) (i32.sub (i32.const 220) (local.get $at)) (i32.const 0))))
