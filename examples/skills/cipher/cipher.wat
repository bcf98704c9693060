;; com.example.cipher: copies stdin to stdout ROT13-encoded, one byte at a time through its dependency
;; com.example.rot13 (a library linked in at run time).
;;
;; ABI wasi-command-v1: input on stdin, output on stdout, exit code 0 is success.
;; Streams in 64 KiB chunks, so any input size works in a fixed two pages of memory.
;; Exit codes: 1 = writing stdout failed, 2 = reading stdin failed.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "com.example.rot13" "rot13" (func $rot13 (param i32) (result i32)))

  ;; Layout: [0, 8) one iovec {ptr, len}; [8, 12) bytes transferred; [65536, 131072) the buffer.
  (memory (export "memory") 2)
  (global $buf i32 (i32.const 65536))
  (global $chunk i32 (i32.const 65536))

  ;; Write [ptr, ptr+len) to stdout, looping over short writes.
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
        ;; No progress and no error would loop forever: treat it as a failure.
        (if (i32.eqz (local.get $written)) (then (call $proc_exit (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $written)))
        (local.set $len (i32.sub (local.get $len) (local.get $written)))
        (br $more))))

  (func (export "_start")
    (local $n i32)
    (local $i i32)
    (loop $read
      (i32.store (i32.const 0) (global.get $buf))
      (i32.store (i32.const 4) (global.get $chunk))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 2))))
      (local.set $n (i32.load (i32.const 8)))
      ;; End of input: returning from _start is exit code 0.
      (if (i32.eqz (local.get $n)) (then (return)))
      (local.set $i (i32.const 0))
      (block $converted
        (loop $next
          (br_if $converted (i32.ge_u (local.get $i) (local.get $n)))
          (i32.store8 (i32.add (global.get $buf) (local.get $i))
                      (call $rot13 (i32.load8_u (i32.add (global.get $buf) (local.get $i)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (call $write_all (global.get $buf) (local.get $n))
      (br $read)))
)
