"""The executor: runs skill modules by digest, each call in a fresh wasmtime sandbox with limits.

Modules come from a `ModuleSource` (the registry in production), are sha256-checked, compiled, checked
against the skill ABI and kept hot in an LRU cache bounded by module bytes; calls run on a bounded thread
pool (wasm releases the GIL) behind admission control.

Decisions worth knowing:

- Limits in a request are resolved against the settings: a zero field takes the default; memory, timeout,
  output, stderr and input requests above the platform ceiling are capped to it rather than refused.
- The wall-clock budget of a call counts from when it starts running and is also cut to the caller's gRPC
  deadline, so a call the caller gave up on frees its thread.
- A denied `memory.grow` is invisible through wasmtime's C API; a trap with memory within 1/16 of the limit
  is reported as MEMORY_LIMIT_EXCEEDED (see `sandbox._near_limit`). A non-zero exit stays
  SKILL_EXIT_NONZERO: the skill handled the failure itself.
- Output past its cap fails the guest's write (EFBIG) and the call reports OUTPUT_LIMIT_EXCEEDED however
  the skill reacts; stderr past its cap is dropped silently.
- Per-digest health turns SERVING after LoadSkill and NOT_SERVING after UnloadSkill. A module evicted
  from the hot cache stays SERVING: the next call loads it cold again.
- Bytes whose sha256 is not the digest asked for are never compiled: DATA_LOSS / CHECKSUM_MISMATCH.
"""
