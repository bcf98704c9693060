"""The executor: runs skill modules by digest, each call in a fresh wasmtime sandbox with limits.

Modules come from a `ModuleSource` (the registry in production), are sha256-checked, compiled, checked
against the skill ABI and kept hot in an LRU cache bounded by module bytes (hot tier), with their
precompiled artifacts on disk under the data dir (warm tier: a restart loads them without fetching or
compiling); calls run on a bounded thread pool (wasm releases the GIL) behind admission control.

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
- Capabilities come with each request (from the route table). The module is re-checked against them on
  every call (remembered per capability set): a module that imports `path_open` runs only for calls that
  declare `files`, whatever ran before. A call gets argv `["skill", *args]`, only the env vars its
  `env:NAME` capabilities name (values from the request; the host's environment never), and, with
  `files`, its bundle (an uncompressed tar fetched and checked like a module, unpacked once per digest,
  read-only) preopened read-only at `/skill`; `files` without a bundle sees an empty `/skill`.
- Fuel: a call with `limits.fuel > 0` runs on a second, fuel-metering engine (metering makes tight CPU-bound
  loops ~2.5x slower, so unmetered calls do not pay for it); exhaustion is RESOURCE_EXHAUSTED /
  FUEL_EXHAUSTED, and `usage.fuel_consumed` is reported. There is no platform default or ceiling.
- A caller who cancels (or whose deadline passes) stops the sandbox within one epoch slice (~50 ms), so
  its worker thread is free again.
"""
