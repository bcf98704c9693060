"""Skill modules for the executor tests, in WAT: a well-behaved echo and hostile ones."""

from __future__ import annotations

from tests.conftest import wat

_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""


def command(body: str, *, memory: str = "1", extra: str = "", imports: str = "") -> bytes:
    """A WASI command module whose `_start` runs `body` (`imports`: more imports, such as a dependency's)."""
    return wat(f"""(module {_IMPORTS} {imports}
      (memory (export "memory") {memory})
      {extra}
      (func (export "_start") (local $n i32) {body}))""")


# Reads up to 60000 bytes of stdin into 1024 and writes them back; "ok:" first.
ECHO = command("""
  (i32.store (i32.const 0) (i32.const 1024))
  (i32.store (i32.const 4) (i32.const 60000))
  (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
  (local.set $n (i32.load (i32.const 8)))
  (i32.store (i32.const 0) (i32.const 16))
  (i32.store (i32.const 4) (i32.const 3))
  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
  (i32.store (i32.const 0) (i32.const 1024))
  (i32.store (i32.const 4) (local.get $n))
  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
""", extra='(data (i32.const 16) "ok:")')

TRAP = command("unreachable")
# Exits 0 having printed nothing.
NO_OUTPUT = wat('(module (memory (export "memory") 1) (func (export "_start")))')

INFINITE_LOOP = command("(loop $forever (br $forever))")

# A start function runs during instantiation, before `_start`; it loops too.
LOOP_IN_START_FUNCTION = command("", extra="(func $init (loop $forever (br $forever))) (start $init)")

# Writes a message to stderr, then exits with code 3.
EXIT_3 = command("""
  (i32.store (i32.const 0) (i32.const 16))
  (i32.store (i32.const 4) (i32.const 26))
  (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
  (call $proc_exit (i32.const 3))
""", extra='(data (i32.const 16) "something went wrong here\\n")')

# Writes 1,500 bytes of noise and then a last line to stderr, then exits with code 1.
LONG_STDERR_LAST_LINE = "the last line before the failure\n"
_LONG_STDERR = "noise " * 250 + LONG_STDERR_LAST_LINE
_LONG_STDERR_WAT = _LONG_STDERR.replace("\n", "\\n")
EXIT_1_LONG_STDERR = command(f"""
  (i32.store (i32.const 0) (i32.const 16))
  (i32.store (i32.const 4) (i32.const {len(_LONG_STDERR)}))
  (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
  (call $proc_exit (i32.const 1))
""", extra=f'(data (i32.const 16) "{_LONG_STDERR_WAT}")')

EXIT_0_EXPLICIT = command("(call $proc_exit (i32.const 0))")

# Grows memory one page at a time until refused, then traps (what allocators do when out of memory).
MEMORY_BOMB = command("""
  (block $refused
    (loop $grow
      (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
      (br $grow)))
  unreachable
""")

# Asks for 100 pages (6.25 MiB) up front.
BIG_INITIAL_MEMORY = command("", memory="100")

# Writes the first 64 KiB of memory to stdout forever, ignoring errors.
OUTPUT_FLOOD = command("""
  (i32.store (i32.const 0) (i32.const 0))
  (i32.store (i32.const 4) (i32.const 65536))
  (loop $forever
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (br $forever))
""")

# Writes 64 KiB blocks to stdout until a write fails, then exits 1 like a careful program.
OUTPUT_FLOOD_STOPS_ON_ERROR = command("""
  (i32.store (i32.const 0) (i32.const 0))
  (i32.store (i32.const 4) (i32.const 65536))
  (loop $more
    (br_if $more (i32.eqz (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
  (call $proc_exit (i32.const 1))
""")

# Writes 64 KiB to stderr four times, then exits 0.
STDERR_FLOOD = command("""
  (i32.store (i32.const 0) (i32.const 0))
  (i32.store (i32.const 4) (i32.const 65536))
  (local.set $n (i32.const 4))
  (loop $more
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.sub (local.get $n) (i32.const 1)))
    (br_if $more (local.get $n)))
""")

STACK_OVERFLOW = command("(call $recurse)", extra="(func $recurse (call $recurse))")

# Asks for things it was not granted: environment variables, arguments, a file. Each WASI call must
# fail cleanly (nothing is preopened or set) rather than abort the host; then it exits 0.
PROBES_WASI = wat("""(module
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "/etc/passwd")
  (func (export "_start")
    (drop (call $env (i32.const 0) (i32.const 4)))
    (drop (call $args (i32.const 8) (i32.const 12)))
    ;; Report path_open's errno and the environment variable count as two bytes of output.
    (i32.store8 (i32.const 200)
      (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 11) (i32.const 0)
                  (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 16)))
    (i32.store8 (i32.const 201) (i32.load (i32.const 0)))
    (i32.store (i32.const 20) (i32.const 200))
    (i32.store (i32.const 24) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 20) (i32.const 1) (i32.const 28)))))""")

GARBAGE = b"\x7fELF this is not webassembly at all" * 10
TRUNCATED_WASM = ECHO[: len(ECHO) // 2]
EMPTY = b""

IMPORTS_UNKNOWN_HOST_FUNCTION = wat("""(module
  (import "env" "steal_credentials" (func $steal (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $steal (i32.const 0)))))""")

IMPORTS_UNKNOWN_WASI_FUNCTION = wat("""(module
  (import "wasi_snapshot_preview1" "sock_steal_everything" (func $x))
  (memory (export "memory") 1)
  (func (export "_start") (call $x)))""")

NO_START = wat('(module (memory (export "memory") 1) (func (export "main")))')

_WASI = '"wasi_snapshot_preview1"'

# Writes its arguments (NUL-terminated, as WASI lays them out), "|", then its environment ("NAME=value\0").
SHOWS_ARGS_AND_ENV = wat(f"""(module
  (import {_WASI} "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import {_WASI} "args_get" (func $args_get (param i32 i32) (result i32)))
  (import {_WASI} "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import {_WASI} "environ_get" (func $env_get (param i32 i32) (result i32)))
  (import {_WASI} "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func $out (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (drop (call $args_sizes (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (call $out (i32.const 4096) (i32.load (i32.const 20)))
    (i32.store8 (i32.const 32) (i32.const 124))
    (call $out (i32.const 32) (i32.const 1))
    (drop (call $env_sizes (i32.const 16) (i32.const 20)))
    (drop (call $env_get (i32.const 2048) (i32.const 16384)))
    (call $out (i32.const 16384) (i32.load (i32.const 20)))))""")

# Stdin is a mode byte then a path, opened relative to fd 3 (the first preopen: /skill with `files`).
# 'r': prints "F" and up to 60000 bytes of the file. 'w': creates/truncates it for writing, writes
# "pwned" and prints "W" and that write's errno. Any failed open prints "E" and the errno.
OPENS_FILE = wat(f"""(module
  (import {_WASI} "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import {_WASI} "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import {_WASI} "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 40) "pwned")
  (func $out (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $report (param $tag i32) (param $errno i32)
    (i32.store8 (i32.const 32) (local.get $tag))
    (i32.store8 (i32.const 33) (local.get $errno))
    (call $out (i32.const 32) (i32.const 2)))
  (func (export "_start") (local $n i32) (local $err i32) (local $fd i32) (local $write i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1000))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (local.set $write (i32.eq (i32.load8_u (i32.const 1024)) (i32.const 119)))
    (local.set $err (call $open (i32.const 3) (i32.const 1) (i32.const 1025)
      (i32.sub (local.get $n) (i32.const 1))
      (select (i32.const 9) (i32.const 0) (local.get $write))
      (select (i64.const 64) (i64.const 2) (local.get $write))
      (i64.const 0) (i32.const 0) (i32.const 16)))
    (if (local.get $err) (then (call $report (i32.const 69) (local.get $err)) (return)))
    (local.set $fd (i32.load (i32.const 16)))
    (if (local.get $write) (then
      (i32.store (i32.const 0) (i32.const 40))
      (i32.store (i32.const 4) (i32.const 5))
      (call $report (i32.const 87)
        (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
      (return)))
    (i32.store (i32.const 0) (i32.const 4096))
    (i32.store (i32.const 4) (i32.const 60000))
    (drop (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store8 (i32.const 4095) (i32.const 70))
    (call $out (i32.const 4095) (i32.add (i32.const 1) (i32.load (i32.const 8))))))""")

# Counts down from the 32-bit number on stdin (little-endian), then prints "done": a CPU-bound skill.
COUNTDOWN = command("""
  (i32.store (i32.const 0) (i32.const 100))
  (i32.store (i32.const 4) (i32.const 4))
  (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
  (local.set $n (i32.load (i32.const 100)))
  (block $done
    (loop $more
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $more)))
  (i32.store (i32.const 0) (i32.const 16))
  (i32.store (i32.const 4) (i32.const 4))
  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
""", extra='(data (i32.const 16) "done")')

# Writes 64 KiB blocks to stdout 1600 times (100 MiB), ignoring errors, then exits 0.
OUTPUT_100MB = command("""
  (i32.store (i32.const 0) (i32.const 0))
  (i32.store (i32.const 4) (i32.const 65536))
  (local.set $n (i32.const 1600))
  (loop $more
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.sub (local.get $n) (i32.const 1)))
    (br_if $more (local.get $n)))
""")

# Writes 64 KiB to stderr forever.
STDERR_FOREVER = command("""
  (i32.store (i32.const 0) (i32.const 0))
  (i32.store (i32.const 4) (i32.const 65536))
  (loop $forever
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (br $forever))
""")


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _section(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _leb(len(body)) + body


def _name(text: str) -> bytes:
    return _leb(len(text)) + text.encode()


def huge_data_module(size: int) -> bytes:
    """A valid command (no imports, `_start` does nothing) with a `size`-byte data segment, built as
    binary directly (WAT text of that size would be slow)."""
    pages = -(-size // 65536)
    return b"".join([
        b"\0asm\x01\0\0\0",
        _section(1, b"\x01\x60\x00\x00"),  # one type: () -> ()
        _section(3, b"\x01\x00"),  # one function of that type
        _section(5, b"\x01\x00" + _leb(pages)),  # one memory, no maximum
        _section(7, b"\x02" + _name("memory") + b"\x02\x00" + _name("_start") + b"\x00\x00"),
        _section(10, b"\x01\x02\x00\x0b"),  # the body: no locals, end
        _section(11, b"\x01\x00\x41\x00\x0b" + _leb(size) + b"\xab" * size),  # at offset 0
    ])
