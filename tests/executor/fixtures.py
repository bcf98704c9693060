"""Skill modules for the executor tests, in WAT: a well-behaved echo and hostile ones."""

from __future__ import annotations

from tests.conftest import wat

_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""


def command(body: str, *, memory: str = "1", extra: str = "") -> bytes:
    """A WASI command module whose `_start` runs `body`."""
    return wat(f"""(module {_IMPORTS}
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
