;; A skill for release tests: answers every input with a fixed JSON string naming its version, and can be
;; made to misbehave on inputs that carry a marker byte ('!'), which the load generator puts into a
;; fraction of its calls. tests/e2e/release_skills.py writes variants of this file (version, mode, delay)
;; by replacing the lines marked @OUTPUT, @OUTPUT_LEN, @MODE and @SLOW_NS.
;;
;; Modes: 0 healthy; 1 traps (`unreachable`) on marked inputs; 2 sleeps SLOW_NS nanoseconds on marked
;; inputs (poll_oneoff on the monotonic clock: the thread sleeps rather than burning a core).
;; ABI wasi-command-v1. Exit codes: 1 = writing stdout failed, 2 = reading stdin failed.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))

  ;; Layout: [0, 8) one iovec; [8, 12) bytes transferred; [64, 112) a clock subscription;
  ;; [128, 160) its event; [1024, 2048) the output text; [4096, 65536) the input buffer.
  (memory (export "memory") 1)
  (data (i32.const 1024) "\"ok 1.0.0\"") ;; @OUTPUT
  (global $out_len i32 (i32.const 10)) ;; @OUTPUT_LEN
  (global $mode i32 (i32.const 0)) ;; @MODE
  (global $slow_ns i64 (i64.const 300000000)) ;; @SLOW_NS

  (func $write_all (param $ptr i32) (param $len i32)
    (local $written i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 1))))
        (local.set $written (i32.load (i32.const 8)))
        (if (i32.eqz (local.get $written)) (then (call $proc_exit (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $written)))
        (local.set $len (i32.sub (local.get $len) (local.get $written)))
        (br $more))))

  ;; Sleep $slow_ns on the monotonic clock (relative timeout, subscription tag 0 = clock).
  (func $sleep
    (memory.fill (i32.const 64) (i32.const 0) (i32.const 96))
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (global.get $slow_ns))
    (drop (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (local $n i32)
    (local $end i32)
    (local $i i32)
    (local $marked i32)
    ;; Read the whole input (up to 60 KiB; more is ignored) and look for the marker byte.
    (local.set $end (i32.const 4096))
    (block $eof
      (loop $read
        (br_if $eof (i32.ge_u (local.get $end) (i32.const 65536)))
        (i32.store (i32.const 0) (local.get $end))
        (i32.store (i32.const 4) (i32.sub (i32.const 65536) (local.get $end)))
        (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 2))))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (local.set $end (i32.add (local.get $end) (local.get $n)))
        (br $read)))
    (local.set $i (i32.const 4096))
    (block $scanned
      (loop $next
        (br_if $scanned (i32.ge_u (local.get $i) (local.get $end)))
        (if (i32.eq (i32.load8_u (local.get $i)) (i32.const 33))
          (then (local.set $marked (i32.const 1)) (br $scanned)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (if (local.get $marked)
      (then
        (if (i32.eq (global.get $mode) (i32.const 1)) (then unreachable))
        (if (i32.eq (global.get $mode) (i32.const 2)) (then (call $sleep)))))
    (call $write_all (i32.const 1024) (global.get $out_len)))
)
