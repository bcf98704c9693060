;; com.example.greeter: prints "<GREETING>, <name><end>" as a JSON string, where
;;   GREETING is the environment variable the operator sets at deploy time (capability env:GREETING),
;;   name is the content of the bundled file /skill/data/name.txt, trailing whitespace removed (capability
;;     files: the bundle is preopened read-only as fd 3, so the path is relative to it),
;;   end is argv[1] from the manifest's args ("." without one).
;; stdin is ignored. Exit codes: 1 = writing failed, 2 = GREETING is not set, 3 = the name file cannot be
;; opened or read, 4 = the environment or the arguments are too large.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))

  ;; Layout: [0, 8) one iovec; [8, 12) bytes transferred; [12, 20) environ count and size; [20, 28) argc and
  ;; argv size; [28, 32) the opened fd; [64, 512) constant strings; 0x1000 environ pointers (1024);
  ;; 0x2000 environ strings (64 KiB); 0x12000 argv pointers (256); 0x12400 argv strings (16 KiB);
  ;; 0x16400 the name (16 KiB); 0x1A400 to 0x40000 the output buffer, flushed when full.
  (memory (export "memory") 4)
  (data (i32.const 64) "data/name.txt")
  (data (i32.const 96) "GREETING=")
  (data (i32.const 120) ".")
  (data (i32.const 128) "greeter: GREETING is not set (deploy with --env GREETING=...)\n")
  (data (i32.const 256) "greeter: cannot read /skill/data/name.txt\n")
  (data (i32.const 320) "greeter: the environment or the arguments are too large\n")
  (data (i32.const 384) ", ")

  (global $env_ptrs i32 (i32.const 0x1000))
  (global $env_buf i32 (i32.const 0x2000))
  (global $arg_ptrs i32 (i32.const 0x12000))
  (global $arg_buf i32 (i32.const 0x12400))
  (global $name i32 (i32.const 0x16400))
  (global $name_cap i32 (i32.const 0x4000))
  (global $out i32 (i32.const 0x1A400))
  (global $out_cap i32 (i32.const 0x25C00))
  (global $out_len (mut i32) (i32.const 0))

  ;; Write [ptr, ptr+len) to fd, looping over short writes.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (local $written i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (if (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 1))))
        (local.set $written (i32.load (i32.const 8)))
        (if (i32.eqz (local.get $written)) (then (call $proc_exit (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $written)))
        (local.set $len (i32.sub (local.get $len) (local.get $written)))
        (br $more))))

  (func $fail (param $msg i32) (param $len i32) (param $code i32)
    (call $write_all (i32.const 2) (local.get $msg) (local.get $len))
    (call $proc_exit (local.get $code)))

  (func $flush
    (call $write_all (i32.const 1) (global.get $out) (global.get $out_len))
    (global.set $out_len (i32.const 0)))

  (func $emit (param $byte i32)
    (if (i32.ge_u (global.get $out_len) (global.get $out_cap)) (then (call $flush)))
    (i32.store8 (i32.add (global.get $out) (global.get $out_len)) (local.get $byte))
    (global.set $out_len (i32.add (global.get $out_len) (i32.const 1))))

  (func $hex (param $n i32) (result i32)
    (if (result i32) (i32.lt_u (local.get $n) (i32.const 10))
      (then (i32.add (local.get $n) (i32.const 48)))
      (else (i32.add (local.get $n) (i32.const 87)))))

  ;; Emit [ptr, ptr+len) as the inside of a JSON string: `"` and `\` escaped, control characters as \u00XX.
  (func $emit_escaped (param $ptr i32) (param $len i32)
    (local $end i32)
    (local $c i32)
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $ptr) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $ptr)))
        (if (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 92)))
          (then (call $emit (i32.const 92)) (call $emit (local.get $c)))
          (else
            (if (i32.lt_u (local.get $c) (i32.const 32))
              (then
                (call $emit (i32.const 92)) (call $emit (i32.const 117))
                (call $emit (i32.const 48)) (call $emit (i32.const 48))
                (call $emit (call $hex (i32.shr_u (local.get $c) (i32.const 4))))
                (call $emit (call $hex (i32.and (local.get $c) (i32.const 15)))))
              (else (call $emit (local.get $c))))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (br $next))))

  (func $strlen (param $ptr i32) (result i32)
    (local $p i32)
    (local.set $p (local.get $ptr))
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (local.get $p))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (i32.sub (local.get $p) (local.get $ptr)))

  ;; 1 when the NUL-terminated string at $s starts with the $n bytes at $prefix.
  (func $starts_with (param $s i32) (param $prefix i32) (param $n i32) (result i32)
    (local $i i32)
    (block $no
      (loop $next
        (if (i32.ge_u (local.get $i) (local.get $n)) (then (return (i32.const 1))))
        (br_if $no (i32.ne (i32.load8_u (i32.add (local.get $s) (local.get $i)))
                           (i32.load8_u (i32.add (local.get $prefix) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  (func (export "_start")
    (local $count i32)
    (local $i i32)
    (local $entry i32)
    (local $greeting i32)
    (local $greeting_len i32)
    (local $end i32)
    (local $end_len i32)
    (local $fd i32)
    (local $n i32)
    (local $got i32)

    ;; The environment: find GREETING=.
    (if (call $environ_sizes_get (i32.const 12) (i32.const 16))
      (then (call $fail (i32.const 320) (i32.const 56) (i32.const 4))))
    (local.set $count (i32.load (i32.const 12)))
    (if (i32.or (i32.gt_u (local.get $count) (i32.const 1024))
                (i32.gt_u (i32.load (i32.const 16)) (i32.const 0x10000)))
      (then (call $fail (i32.const 320) (i32.const 56) (i32.const 4))))
    (if (call $environ_get (global.get $env_ptrs) (global.get $env_buf))
      (then (call $fail (i32.const 320) (i32.const 56) (i32.const 4))))
    (local.set $greeting (i32.const -1))
    (block $found
      (loop $next
        (br_if $found (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $entry (i32.load (i32.add (global.get $env_ptrs) (i32.shl (local.get $i) (i32.const 2)))))
        (if (call $starts_with (local.get $entry) (i32.const 96) (i32.const 9))
          (then (local.set $greeting (i32.add (local.get $entry) (i32.const 9))) (br $found)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (if (i32.eq (local.get $greeting) (i32.const -1))
      (then (call $fail (i32.const 128) (i32.const 62) (i32.const 2))))
    (local.set $greeting_len (call $strlen (local.get $greeting)))

    ;; The arguments: argv[1] ends the greeting.
    (local.set $end (i32.const 120))
    (local.set $end_len (i32.const 1))
    (if (call $args_sizes_get (i32.const 20) (i32.const 24))
      (then (call $fail (i32.const 320) (i32.const 56) (i32.const 4))))
    (if (i32.or (i32.gt_u (i32.load (i32.const 20)) (i32.const 256))
                (i32.gt_u (i32.load (i32.const 24)) (i32.const 0x4000)))
      (then (call $fail (i32.const 320) (i32.const 56) (i32.const 4))))
    (if (call $args_get (global.get $arg_ptrs) (global.get $arg_buf))
      (then (call $fail (i32.const 320) (i32.const 56) (i32.const 4))))
    (if (i32.ge_u (i32.load (i32.const 20)) (i32.const 2))
      (then
        (local.set $end (i32.load (i32.add (global.get $arg_ptrs) (i32.const 4))))
        (local.set $end_len (call $strlen (local.get $end)))))

    ;; The bundled file, relative to the preopened bundle directory (fd 3): rights fd_read only.
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 13) (i32.const 0)
                         (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 28))
      (then (call $fail (i32.const 256) (i32.const 42) (i32.const 3))))
    (local.set $fd (i32.load (i32.const 28)))
    (block $eof
      (loop $read
        (br_if $eof (i32.ge_u (local.get $n) (global.get $name_cap)))
        (i32.store (i32.const 0) (i32.add (global.get $name) (local.get $n)))
        (i32.store (i32.const 4) (i32.sub (global.get $name_cap) (local.get $n)))
        (if (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $fail (i32.const 256) (i32.const 42) (i32.const 3))))
        (local.set $got (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $got)))
        (local.set $n (i32.add (local.get $n) (local.get $got)))
        (br $read)))
    (drop (call $fd_close (local.get $fd)))
    ;; Trim trailing whitespace (space, \t, \n, \r).
    (block $trimmed
      (loop $trim
        (br_if $trimmed (i32.eqz (local.get $n)))
        (local.set $got (i32.load8_u (i32.add (global.get $name) (i32.sub (local.get $n) (i32.const 1)))))
        (br_if $trimmed (i32.eqz (i32.or (i32.or (i32.eq (local.get $got) (i32.const 32))
                                                 (i32.eq (local.get $got) (i32.const 9)))
                                         (i32.or (i32.eq (local.get $got) (i32.const 10))
                                                 (i32.eq (local.get $got) (i32.const 13))))))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $trim)))

    (call $emit (i32.const 34))
    (call $emit_escaped (local.get $greeting) (local.get $greeting_len))
    (call $emit_escaped (i32.const 384) (i32.const 2))
    (call $emit_escaped (global.get $name) (local.get $n))
    (call $emit_escaped (local.get $end) (local.get $end_len))
    (call $emit (i32.const 34))
    (call $flush))
)
