;; com.example.wordcount: counts the bytes, lines ('\n') and whitespace-separated words of stdin and
;; writes them as one JSON object, such as {"bytes":23,"lines":0,"words":4}.
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

  ;; Layout: [0, 8) one iovec; [8, 12) bytes transferred; [16, 80) JSON pieces; [96, 128) digit scratch;
  ;; [128, 256) the output line; [65536, 131072) the input buffer.
  (memory (export "memory") 2)
  (data (i32.const 16) "{\"bytes\":")
  (data (i32.const 32) ",\"lines\":")
  (data (i32.const 48) ",\"words\":")
  (data (i32.const 64) "}")
  (global $buf i32 (i32.const 65536))
  (global $chunk i32 (i32.const 65536))
  (global $out i32 (i32.const 128))
  (global $pos (mut i32) (i32.const 128))

  ;; Append [src, src+len) to the output line.
  (func $append (param $src i32) (param $len i32)
    (memory.copy (global.get $pos) (local.get $src) (local.get $len))
    (global.set $pos (i32.add (global.get $pos) (local.get $len))))

  ;; Append the decimal digits of an unsigned 64-bit number.
  (func $append_u64 (param $n i64)
    (local $p i32)
    ;; Digits are produced last first, right to left, ending at the end of the scratch area.
    (local.set $p (i32.const 128))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $n) (i64.const 0))))
    (call $append (local.get $p) (i32.sub (i32.const 128) (local.get $p))))

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

  (func (export "_start")
    (local $n i32)
    (local $i i32)
    (local $c i32)
    (local $in_word i32)
    (local $bytes i64)
    (local $lines i64)
    (local $words i64)
    (block $eof
      (loop $read
        (i32.store (i32.const 0) (global.get $buf))
        (i32.store (i32.const 4) (global.get $chunk))
        (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 2))))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (local.set $bytes (i64.add (local.get $bytes) (i64.extend_i32_u (local.get $n))))
        (local.set $i (i32.const 0))
        (block $counted
          (loop $next
            (br_if $counted (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $c (i32.load8_u (i32.add (global.get $buf) (local.get $i))))
            (if (i32.eq (local.get $c) (i32.const 10))
              (then (local.set $lines (i64.add (local.get $lines) (i64.const 1)))))
            ;; Whitespace: space, or \t \n \v \f \r (9..13).
            (if (i32.or (i32.eq (local.get $c) (i32.const 32))
                        (i32.lt_u (i32.sub (local.get $c) (i32.const 9)) (i32.const 5)))
              (then (local.set $in_word (i32.const 0)))
              (else
                (if (i32.eqz (local.get $in_word))
                  (then
                    (local.set $words (i64.add (local.get $words) (i64.const 1)))
                    (local.set $in_word (i32.const 1))))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $next)))
        (br $read)))
    (call $append (i32.const 16) (i32.const 9))
    (call $append_u64 (local.get $bytes))
    (call $append (i32.const 32) (i32.const 9))
    (call $append_u64 (local.get $lines))
    (call $append (i32.const 48) (i32.const 9))
    (call $append_u64 (local.get $words))
    (call $append (i32.const 64) (i32.const 1))
    (call $write_all (global.get $out) (i32.sub (global.get $pos) (global.get $out))))
)
