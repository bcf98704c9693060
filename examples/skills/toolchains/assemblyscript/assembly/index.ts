// com.example.hello-assemblyscript: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.
//
// ABI memory-v1: the host calls clawhub_alloc(len), writes the input at the address it returns, then
// clawhub_run(ptr, len), which returns (out_ptr << 32) | out_len (bit 63 set: the region is an error
// message). Compiled with the stub runtime (a bump allocator: every call gets a fresh instance, so nothing
// needs freeing) and without the `env.abort` import (asconfig.json). See docs/skills/assemblyscript.md.

const PREFIX = '{"hello":';
const PREFIX_LEN: usize = 9;

// Room for the prefix before the input and the closing brace after it, so the output is one region.
export function clawhub_alloc(len: i32): usize {
  return heap.alloc(PREFIX_LEN + <usize>len + 1) + PREFIX_LEN;
}

export function clawhub_run(input: usize, len: i32): i64 {
  const out = input - PREFIX_LEN;
  for (let i: usize = 0; i < PREFIX_LEN; i++) {
    store<u8>(out + i, <u8>PREFIX.charCodeAt(<i32>i));
  }
  store<u8>(input + <usize>len, 0x7d); // '}'
  return (<i64>out << 32) | <i64>(PREFIX_LEN + <usize>len + 1);
}
