"""`skill.toml`: the skill manifest, parsed into the contract's Manifest with errors that name the field."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from clawhub.common.v1 import skill_pb2

from services.runtime import bundle
from services.runtime.cachettl import parse_ttl, to_duration, ttl_problem
from services.runtime.inputschema import schema_problem
from services.runtime.names import skill_name_problem, version_problem
from services.runtime.settings import parse_size
from services.runtime.wasm import WASM_MAGIC, capability_problem, looks_like_wat, wat_error

MANIFEST_FILE = "skill.toml"
ABIS = {"wasi-command-v1": skill_pb2.ABI_WASI_COMMAND_V1, "memory-v1": skill_pb2.ABI_MEMORY_V1,
        "library-v1": skill_pb2.ABI_LIBRARY_V1, "component-v1": skill_pb2.ABI_COMPONENT_V1}
_KNOWN_KEYS = {"name", "version", "description", "abi", "module", "capabilities", "limits", "dependencies",
               "input_schema", "examples", "args", "files", "cache"}
_LIMIT_KEYS = {"memory", "timeout_ms", "max_output", "max_stderr", "max_input", "fuel"}


class ManifestError(ValueError):
    """The manifest or module of a skill directory is not usable; the message names file and field."""


@dataclass(frozen=True)
class SkillPackage:
    manifest: skill_pb2.Manifest
    module: bytes
    module_path: Path
    # The deterministic tar of the manifest's `files`; empty when the skill bundles none.
    bundle: bytes = b""


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ManifestError(f"{where}: `{key}` is required")
    value = table[key]
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: `{key}` must be a {kind.__name__}")
    return value


def _size(value: Any, where: str) -> int:
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
    raise ManifestError(f"{where}: expected a size such as \"16MiB\" or a number of bytes")


def load(directory: Path) -> SkillPackage:
    """Read `directory/skill.toml` and build its module (WAT is compiled; .wasm is taken as is)."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST_FILE} here (is this a skill directory?)")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    unknown = sorted(set(doc) - _KNOWN_KEYS)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)}")
    manifest = skill_pb2.Manifest()
    manifest.name = _require(doc, "name", str, where)
    if problem := skill_name_problem(manifest.name):
        raise ManifestError(f"{where}: name: {problem}")
    manifest.version = _require(doc, "version", str, where)
    if problem := version_problem(manifest.version):
        raise ManifestError(f"{where}: version: {problem}")
    manifest.description = str(doc.get("description", ""))
    abi = doc.get("abi", "wasi-command-v1")
    if abi not in ABIS:
        raise ManifestError(f"{where}: abi: {abi!r} is not supported (supported: {', '.join(ABIS)})")
    manifest.abi = ABIS[abi]
    capabilities = doc.get("capabilities", [])
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise ManifestError(f"{where}: capabilities must be a list of strings")
    for i, capability in enumerate(capabilities):
        if problem := capability_problem(capability):
            raise ManifestError(f"{where}: capabilities[{i}]: {problem}")
    manifest.capabilities.extend(capabilities)
    args = doc.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ManifestError(f"{where}: args must be a list of strings, such as [\"--verbose\"]")
    for i, arg in enumerate(args):
        if "\0" in arg:
            raise ManifestError(f"{where}: args[{i}]: an argument may not contain a NUL character")
    manifest.args.extend(args)
    files = read_files(directory, doc.get("files", []), where)
    manifest.files.extend(
        skill_pb2.BundledFile(path=path, size_bytes=len(data), digest=bundle.file_digest(data))
        for path, data in sorted(files.items()))
    limits = doc.get("limits", {})
    if not isinstance(limits, dict):
        raise ManifestError(f"{where}: [limits] must be a table")
    if unknown := sorted(set(limits) - _LIMIT_KEYS):
        raise ManifestError(f"{where}: [limits]: unknown key(s) {', '.join(unknown)}")
    if "memory" in limits:
        manifest.limits.memory_bytes = _size(limits["memory"], f"{where}: limits.memory")
    if "timeout_ms" in limits:
        timeout = limits["timeout_ms"]
        if not isinstance(timeout, int) or timeout <= 0:
            raise ManifestError(f"{where}: limits.timeout_ms must be a positive integer")
        manifest.limits.timeout.FromMilliseconds(timeout)
    for key, fieldname in (("max_output", "max_output_bytes"), ("max_stderr", "max_stderr_bytes"),
                           ("max_input", "max_input_bytes")):
        if key in limits:
            setattr(manifest.limits, fieldname, _size(limits[key], f"{where}: limits.{key}"))
    if "fuel" in limits:
        manifest.limits.fuel = _size(limits["fuel"], f"{where}: limits.fuel")
    for i, dep in enumerate(doc.get("dependencies", [])):
        dwhere = f"{where}: dependencies[{i}]"
        if not isinstance(dep, dict):
            raise ManifestError(f"{dwhere}: must be a table with package and version_range")
        manifest.dependencies.add(package=_require(dep, "package", str, dwhere),
                                  version_range=_require(dep, "version_range", str, dwhere),
                                  is_shared=bool(dep.get("is_shared", False)))
    schema = doc.get("input_schema")
    if schema is not None:
        # A string names a JSON file beside the manifest; a table is the schema inline.
        if isinstance(schema, str):
            path = confined_path(directory, schema, f"{where}: input_schema")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ManifestError(f"{where}: input_schema: cannot read {schema!r}: {exc}") from None
        elif isinstance(schema, (dict, bool)):
            text = json.dumps(schema)
        else:
            raise ManifestError(f"{where}: input_schema must be a table (the schema) or the name of a JSON file")
        # The registry refuses what this refuses, in the same words (services/runtime/inputschema.py).
        if problem := schema_problem(text):
            raise ManifestError(f"{where}: input_schema: {problem}")
        manifest.input_schema = text
    cache = doc.get("cache")
    if cache is not None:
        # `[cache] ttl = "60s"`: results may be reused for that long (pure functions only; docs/cache.md).
        if not isinstance(cache, dict) or set(cache) != {"ttl"} or not isinstance(cache["ttl"], str):
            raise ManifestError(f"{where}: [cache] must be a table with one key, ttl, such as ttl = \"60s\"")
        try:
            ttl = to_duration(parse_ttl(cache["ttl"]))
        except ValueError as exc:
            raise ManifestError(f"{where}: cache.ttl: {exc}") from None
        if problem := ttl_problem(ttl):
            raise ManifestError(f"{where}: cache.ttl: {problem}")
        manifest.cache_ttl.CopyFrom(ttl)
    for i, example in enumerate(doc.get("examples", [])):
        ewhere = f"{where}: examples[{i}]"
        if not isinstance(example, dict):
            raise ManifestError(f"{ewhere}: must be a table with input and output")
        manifest.examples.add(input=_require(example, "input", str, ewhere).encode(),
                              expected_output=_require(example, "output", str, ewhere).encode())
    module_path = confined_path(directory, _require(doc, "module", str, where), f"{where}: module")
    return SkillPackage(manifest=manifest, module=build_module(module_path), module_path=module_path,
                        bundle=bundle.build(files) if files else b"")


def confined_path(directory: Path, path: str, where: str) -> Path:
    """`directory / path` for a plain relative path that stays inside the skill directory, symlinks resolved:
    nothing a manifest names (its module, its files) is read from elsewhere, so a hostile skill directory
    cannot make `clawhub publish` upload `../../../etc/passwd` or what a symlink points at."""
    if problem := bundle.path_problem(path):
        raise ManifestError(f"{where}: {problem}")
    target = directory / path
    resolved = target.resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise ManifestError(f"{where}: {path!r} resolves to {resolved}, outside the skill directory "
                            "(a symlink may not lead out of it)")
    return target


def read_files(directory: Path, listed: Any, where: str) -> dict[str, bytes]:
    """The contents of the manifest's `files`, by bundle path. Each must be a regular file inside the skill
    directory, named by a plain relative path (symlinks are followed only while they stay inside)."""
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        raise ManifestError(f"{where}: files must be a list of paths relative to the skill directory, "
                            "such as [\"data/words.txt\"]")
    files: dict[str, bytes] = {}
    for i, path in enumerate(listed):
        fwhere = f"{where}: files[{i}]"
        if path in files:
            raise ManifestError(f"{fwhere}: {path!r} is listed twice")
        target = confined_path(directory, path, fwhere)
        if not target.exists():
            raise ManifestError(f"{fwhere}: {path!r} does not exist in {directory}")
        if target.is_dir():
            raise ManifestError(f"{fwhere}: {path!r} is a directory; list the files inside it one by one")
        if not target.is_file():
            raise ManifestError(f"{fwhere}: {path!r} is not a regular file")
        try:
            files[path] = target.read_bytes()
        except OSError as exc:
            raise ManifestError(f"{fwhere}: cannot read {path!r}: {exc.strerror or exc}") from None
    return files


def build_module(path: Path) -> bytes:
    """The wasm bytes of a module file: `.wat` is compiled here, anything else is read as is."""
    if not path.is_file():
        raise ManifestError(f"{path}: the module file named in {MANIFEST_FILE} does not exist")
    if path.suffix == ".wat":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: a .wat file must be UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            return bytes(wasmtime.wat2wasm(text))
        except wasmtime.WasmtimeError as exc:
            # FILE:LINE:COLUMN, as compilers say it, then the source line.
            raise ManifestError(wat_error(str(exc), str(path), "cannot compile WAT: ")) from None
    data = path.read_bytes()
    if not data.startswith(WASM_MAGIC) and looks_like_wat(data):
        raise ManifestError(f"{path}: the file is WebAssembly text (WAT), not a binary module: rename it to "
                            f"{path.with_suffix('.wat').name} (and name that in {MANIFEST_FILE}) so that "
                            "`clawhub publish` compiles it")
    return data
