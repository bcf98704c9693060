"""What `clawhub new` writes: one skill per language and ABI, all answering `{"hello":INPUT}` (their input,
JSON text, wrapped in an object), so that every scaffold passes the same two examples as generated.

Kept apart from `author.py` because it is data: each template is the smallest program in its language that
implements the ABI correctly (streaming stdin for WASI commands, bounds kept for memory-v1), with comments
that say what to change. `{name}`, `{slug}` and `{module}` are filled by `str.format` (`author.scaffold`);
literal braces are doubled (or the template is wrapped in `_literal`).
"""

from __future__ import annotations

import re

WASI = "wasi-command-v1"
MEMORY = "memory-v1"
COMPONENT = "component-v1"


def _literal(text: str) -> str:
    """A template written with plain braces (C is full of them): braces doubled for `str.format`, except
    around the placeholders."""
    doubled = text.replace("{", "{{").replace("}", "}}")
    return re.sub(r"\{\{(name|slug|module)\}\}", r"{\1}", doubled)


# The examples every scaffold passes: (input, expected output), as TOML basic-string bodies (escaped).
EXAMPLES = (('\\"world\\"', '{\\"hello\\":\\"world\\"}'),
            ('[1, 2, 3]', '{\\"hello\\":[1, 2, 3]}'))

MANIFEST = """\
name = "{name}"
version = "0.1.0"
description = "Answers {{\\"hello\\": INPUT}}: its input wrapped in a JSON object"
abi = "{abi}"
module = "{module}"
capabilities = []

[limits]
memory = "{memory}"
timeout_ms = 2000
{examples}"""

EXAMPLE = """
[[examples]]
input = "{input}"
output = "{output}"
"""

README = """\
# {name}

A clawhub skill in {language}: answers `{{"hello": INPUT}}`, its input wrapped in a JSON object.
Made by `clawhub new`; the guide is docs/skills/{guide}.md in the clawhub repository.

{build}{steps}"""

STEPS = """\
    clawhub test .                       # run the examples in skill.toml, in the executor's sandbox
    clawhub run . --input '"world"' -v   # one call, with its usage
    clawhub publish .                    # when it is ready (needs `clawhub up` running)
"""

# Python and JavaScript skills: what the README says instead of the steps above.
COMPONENT_STEPS = """\
    clawhub build .                      # the component, from the sources and wit/skill.wit
    clawhub test .                       # run the examples in skill.toml, in the executor's sandbox
    clawhub run . --input '"world"' -v   # one call, with its usage

A clawhub without the component-v1 ABI says so in each command, and what to install.
"""

# --- WAT --------------------------------------------------------------------------------------------------

WAT_WASI = """\
;; {name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.
;;
;; ABI wasi-command-v1: input on stdin, output on stdout, exit code 0 is success. clawhub compiles this
;; file itself (no toolchain). Streams stdin in 64 KiB chunks, so any input size works in two pages.
;; Exit codes: 1 = writing stdout failed, 2 = reading stdin failed.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))

  ;; Layout: [0, 8) one iovec {{ptr, len}}; [8, 12) bytes transferred; [16, 25) the prefix; [32, 33) the
  ;; suffix; [65536, 131072) the read buffer.
  (memory (export "memory") 2)
  (data (i32.const 16) "{{\\"hello\\":")
  (data (i32.const 32) "}}")
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
        (if (i32.eqz (local.get $written)) (then (call $proc_exit (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $written)))
        (local.set $len (i32.sub (local.get $len) (local.get $written)))
        (br $more))))

  (func (export "_start")
    (local $n i32)
    (call $write_all (i32.const 16) (i32.const 9))
    (block $eof
      (loop $read
        (i32.store (i32.const 0) (global.get $buf))
        (i32.store (i32.const 4) (global.get $chunk))
        (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 2))))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (call $write_all (global.get $buf) (local.get $n))
        (br $read)))
    ;; Returning from _start is exit code 0.
    (call $write_all (i32.const 32) (i32.const 1)))
)
"""

WAT_MEMORY = """\
;; {name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.
;;
;; ABI memory-v1: the host calls clawhub_alloc(len), writes the input at the address it returns, then calls
;; clawhub_run(ptr, len), which returns (out_ptr << 32) | out_len. clawhub compiles this file itself.
;; The prefix sits at 0, the input right after it (at 9) and the closing brace right after the input, so the
;; output is one region and nothing is copied.
(module
  (memory (export "memory") 1)
  (data (i32.const 0) "{{\\"hello\\":")

  (func (export "clawhub_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local $have i32)
    ;; Prefix (9) + input + "}}" (1), in 64 KiB pages. A refused growth (the memory limit) traps, which the
    ;; host reports as MEMORY_LIMIT_EXCEEDED.
    (local.set $need (i32.add (local.get $len) (i32.const 10)))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $need) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $need) (local.get $have))
                                                     (i32.const 65535))
                                            (i32.const 16)))
                    (i32.const -1))
          (then unreachable))))
    (i32.const 9))

  (func (export "clawhub_run") (param $ptr i32) (param $len i32) (result i64)
    (i32.store8 (i32.add (local.get $ptr) (local.get $len)) (i32.const 125))  ;; '}}'
    (i64.or (i64.shl (i64.extend_i32_u (i32.sub (local.get $ptr) (i32.const 9))) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 10)))))
)
"""

# --- C ----------------------------------------------------------------------------------------------------

C_WASI = _literal("""\
/* {name}: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.
 *
 * ABI wasi-command-v1: an ordinary program. The input is stdin, the output stdout, exit code 0 success;
 * what goes to stderr is kept for `clawhub logs`. Built by `clawhub build` with clang and wasi-libc
 * (--target=wasm32-wasi): see docs/skills/c.md. */
#include <stdio.h>

/* Static, not on the stack: a wasm32 program's stack is small (64 KiB by default). */
static char buffer[65536];

int main(void) {
    size_t n;
    if (fputs("{\\"hello\\":", stdout) == EOF) return 1;
    while ((n = fread(buffer, 1, sizeof buffer, stdin)) > 0) {
        if (fwrite(buffer, 1, n, stdout) != n) return 1;
    }
    if (ferror(stdin)) return 2;
    if (fputs("}", stdout) == EOF) return 1;
    return fflush(stdout) == 0 ? 0 : 1;
}
""")

C_MEMORY = _literal("""\
/* {name}: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.
 *
 * ABI memory-v1: no main. The host calls clawhub_alloc(len), writes the input at the address it returns,
 * then clawhub_run(ptr, len), which returns (out_ptr << 32) | out_len (bit 63 set: the region is an error
 * message). Built as a reactor (-mexec-model=reactor) by `clawhub build`; the host does not call
 * _initialize, so do not rely on static constructors. See docs/skills/c.md. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFIX "{\\"hello\\":"
#define PREFIX_LEN (sizeof PREFIX - 1)

/* Room for the prefix before the input and the closing brace after it, so the output is one region. */
__attribute__((export_name("clawhub_alloc")))
uint8_t *clawhub_alloc(int32_t len) {
    uint8_t *block = malloc(PREFIX_LEN + (size_t)len + 1);
    if (block == NULL) __builtin_trap(); /* over the memory limit: reported as MEMORY_LIMIT_EXCEEDED */
    return block + PREFIX_LEN;
}

__attribute__((export_name("clawhub_run")))
int64_t clawhub_run(uint8_t *input, int32_t len) {
    uint8_t *out = input - PREFIX_LEN;
    memcpy(out, PREFIX, PREFIX_LEN);
    input[len] = '}';
    return (int64_t)((uint64_t)(uintptr_t)out << 32 | (uint32_t)(PREFIX_LEN + (size_t)len + 1));
}
""")

# --- Rust -------------------------------------------------------------------------------------------------

CARGO_WASI = """\
[package]
name = "{slug}"
version = "0.1.0"
edition = "2021"
publish = false

# `clawhub build` runs `cargo build --release --target wasm32-wasip1` and copies
# target/wasm32-wasip1/release/skill.wasm to the module named in skill.toml.
[[bin]]
name = "skill"
path = "src/main.rs"

[profile.release]
opt-level = "s"
lto = true
strip = true
"""

CARGO_MEMORY = """\
[package]
name = "{slug}"
version = "0.1.0"
edition = "2021"
publish = false

# `clawhub build` runs `cargo build --release --target wasm32-wasip1` and copies
# target/wasm32-wasip1/release/skill.wasm to the module named in skill.toml.
[lib]
name = "skill"
path = "src/lib.rs"
crate-type = ["cdylib"]

[profile.release]
opt-level = "s"
lto = true
strip = true
panic = "abort"
"""

RUST_WASI = """\
//! {name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.
//!
//! ABI wasi-command-v1: an ordinary program. The input is stdin, the output stdout, exit code 0 success;
//! stderr (eprintln!) is kept for `clawhub logs`. See docs/skills/rust.md.
use std::io::{{self, Read, Write}};
use std::process::exit;

fn main() {{
    let mut input = Vec::new();
    if io::stdin().read_to_end(&mut input).is_err() {{
        exit(2);
    }}
    let mut out = io::stdout().lock();
    let written = out
        .write_all(b"{{\\"hello\\":")
        .and_then(|_| out.write_all(&input))
        .and_then(|_| out.write_all(b"}}"))
        .and_then(|_| out.flush());
    if written.is_err() {{
        exit(1);
    }}
}}
"""

RUST_MEMORY = """\
//! {name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.
//!
//! ABI memory-v1: the host calls `clawhub_alloc(len)`, writes the input at the address it returns, then
//! `clawhub_run(ptr, len)`, which returns `(out_ptr << 32) | out_len` (bit 63 set: the region is an error
//! message). Every call gets a fresh instance, so nothing needs freeing. See docs/skills/rust.md.

const PREFIX: &[u8] = b"{{\\"hello\\":";

/// Room for the prefix before the input and the closing brace after it, so the output is one region.
#[no_mangle]
pub extern "C" fn clawhub_alloc(len: i32) -> *mut u8 {{
    let mut block = Vec::<u8>::with_capacity(PREFIX.len() + len as usize + 1);
    let ptr = block.as_mut_ptr();
    std::mem::forget(block); // freed with the instance
    unsafe {{ ptr.add(PREFIX.len()) }}
}}

/// # Safety
/// The host passes the address `clawhub_alloc` returned and the length it was given.
#[no_mangle]
pub unsafe extern "C" fn clawhub_run(input: *mut u8, len: i32) -> i64 {{
    let out = input.sub(PREFIX.len());
    std::ptr::copy_nonoverlapping(PREFIX.as_ptr(), out, PREFIX.len());
    *input.add(len as usize) = b'}}';
    ((out as usize as i64) << 32) | (PREFIX.len() + len as usize + 1) as i64
}}
"""

# --- AssemblyScript ---------------------------------------------------------------------------------------

AS_MEMORY = """\
// {name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.
//
// ABI memory-v1: the host calls clawhub_alloc(len), writes the input at the address it returns, then
// clawhub_run(ptr, len), which returns (out_ptr << 32) | out_len (bit 63 set: the region is an error
// message). Compiled with the stub runtime (a bump allocator: every call gets a fresh instance, so nothing
// needs freeing) and without the `env.abort` import (asconfig.json). See docs/skills/assemblyscript.md.

const PREFIX = '{{"hello":';
const PREFIX_LEN: usize = 9;

// Room for the prefix before the input and the closing brace after it, so the output is one region.
export function clawhub_alloc(len: i32): usize {{
  return heap.alloc(PREFIX_LEN + <usize>len + 1) + PREFIX_LEN;
}}

export function clawhub_run(input: usize, len: i32): i64 {{
  const out = input - PREFIX_LEN;
  for (let i: usize = 0; i < PREFIX_LEN; i++) {{
    store<u8>(out + i, <u8>PREFIX.charCodeAt(<i32>i));
  }}
  store<u8>(input + <usize>len, 0x7d); // '}}'
  return (<i64>out << 32) | <i64>(PREFIX_LEN + <usize>len + 1);
}}
"""

AS_CONFIG = """\
{{
  "targets": {{
    "release": {{
      "outFile": "{module}",
      "optimizeLevel": 3,
      "shrinkLevel": 0,
      "noAssert": true
    }}
  }},
  "options": {{
    "runtime": "stub",
    "use": ["abort="],
    "exportRuntime": false
  }}
}}
"""

AS_PACKAGE = """\
{{
  "name": "{slug}",
  "version": "0.1.0",
  "private": true,
  "description": "clawhub skill {name}",
  "scripts": {{
    "build": "asc assembly/index.ts --target release"
  }},
  "devDependencies": {{
    "assemblyscript": "^0.28.0"
  }}
}}
"""

# --- Components (Python, JavaScript): the ABI is not there yet ----------------------------------------------

# The world of ABI component-v1, as in the repository's wit/skill.wit (`author.scaffold` copies that file
# when it is there, so a scaffold follows the platform's world; this is the fallback for an installed CLI).
WIT = """\
package clawhub:skill@1.0.0;

/// A clawhub skill under the `component-v1` ABI.
///
/// The host calls `run` once per invocation, in a fresh instance, with the call's input bytes; `ok` is the
/// output, `err` a message that fails the call (it is kept with the call's stderr).
world skill {{
  /// One line for the call's log (kept with stderr, within the call's stderr limit). Always available.
  import log: func(line: string);

  /// The entry point: the call's input in, its output (or a failure message) out.
  export run: func(input: list<u8>) -> result<list<u8>, string>;
}}
"""

PY_APP = """\
\"\"\"{name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.

ABI component-v1: a WebAssembly component of the world in wit/skill.wit, built by `clawhub build` with
componentize-py (`pip install componentize-py`). See docs/skills/python.md.
\"\"\"

import wit_world  # the bindings componentize-py generates for the `skill` world
from componentize_py_types import Err


class WitWorld(wit_world.WitWorld):
    def run(self, input: bytes) -> bytes:
        if not input:
            # `Err` fails the call with this message; any other exception traps (SKILL_TRAPPED).
            raise Err("send some JSON, such as \\"world\\"")
        wit_world.log(f"wrapping {{len(input)}} bytes")
        return b'{{"hello":' + input + b'}}'
"""

JS_APP = """\
// {name}: answers {{"hello":INPUT}}, its input (JSON text) wrapped in a JSON object.
//
// ABI component-v1: a WebAssembly component of the world in wit/skill.wit, built by `clawhub build` with
// componentize-js (`npm install`). See docs/skills/js.md.

const PREFIX = new TextEncoder().encode('{{"hello":');

// input: Uint8Array. Return the output bytes; throw a string to fail the call with it as the message.
export function run(input) {{
  if (input.length === 0) {{
    throw 'send some JSON, such as "world"';
  }}
  const out = new Uint8Array(PREFIX.length + input.length + 1);
  out.set(PREFIX);
  out.set(input, PREFIX.length);
  out[out.length - 1] = 0x7d; // '}}'
  return out;
}}
"""

JS_PACKAGE = """\
{{
  "name": "{slug}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "description": "clawhub skill {name} (ABI component-v1)",
  "scripts": {{
    "build": "componentize-js app.js --wit wit/skill.wit --world-name skill -d http fetch-event -o {module}"
  }},
  "devDependencies": {{
    "@bytecodealliance/componentize-js": "^0.18.5"
  }}
}}
"""

GITIGNORE = {"rust": "target/\n*.wasm\n", "assemblyscript": "node_modules/\n*.wasm\n", "c": "*.wasm\n",
             "python": "*.wasm\n__pycache__/\nwit_world/\n", "js": "node_modules/\n*.wasm\n"}

# How each scaffold's README says to build it (the command block before `clawhub test`).
BUILD_STEPS = {
    "wat": "No toolchain: clawhub compiles the .wat itself (`clawhub build .` only checks it).\n",
    "c": "Needs clang with a WASI sysroot (wasi-sdk, or clang + lld + wasi-libc): see the guide.\n\n"
         "    clawhub build .                      # clang --target=wasm32-wasi ... -o {module}",
    "rust": "Needs cargo and the wasm32-wasip1 target (`rustup target add wasm32-wasip1`).\n\n"
            "    clawhub build .                      # cargo build --release --target wasm32-wasip1",
    "assemblyscript": "Needs Node.js (18 or later).\n\n"
                      "    npm install                          # once: the AssemblyScript compiler\n"
                      "    clawhub build .                      # npx asc assembly/index.ts --target release",
    "python": "Needs componentize-py (`pip install componentize-py`).\n",
    "js": "Needs Node.js (18 or later) and `npm install` (componentize-js).\n",
}

LANGUAGE_NAMES = {"wat": "WebAssembly text (WAT)", "c": "C", "rust": "Rust", "assemblyscript": "AssemblyScript",
                  "python": "Python", "js": "JavaScript"}


def files_for(language: str, abi: str, module: str) -> dict[str, str]:
    """The source files of a scaffold (path → template, before `render`), besides skill.toml and README."""
    if language == "wat":
        return {module: WAT_WASI if abi == WASI else WAT_MEMORY}
    if language == "c":
        return {"src/skill.c": C_WASI if abi == WASI else C_MEMORY}
    if language == "rust":
        if abi == WASI:
            return {"Cargo.toml": CARGO_WASI, "src/main.rs": RUST_WASI}
        return {"Cargo.toml": CARGO_MEMORY, "src/lib.rs": RUST_MEMORY}
    if language == "assemblyscript":
        return {"assembly/index.ts": AS_MEMORY, "asconfig.json": AS_CONFIG, "package.json": AS_PACKAGE}
    if language == "python":
        return {"app.py": PY_APP, "wit/skill.wit": WIT}
    if language == "js":
        return {"app.js": JS_APP, "wit/skill.wit": WIT, "package.json": JS_PACKAGE}
    raise ValueError(f"unknown language {language!r}")


def manifest_text(name: str, abi: str, module: str) -> str:
    examples = "".join(EXAMPLE.format(input=i, output=o) for i, o in EXAMPLES)
    # A component carries its language's runtime: CPython's heap alone starts at about 12 MiB.
    memory = "64MiB" if abi == COMPONENT else "16MiB"
    return MANIFEST.format(name=name, abi=abi, module=module, examples=examples, memory=memory)
