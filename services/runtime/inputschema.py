"""A skill's `input_schema` (JSON Schema, as JSON text in its manifest): checked when it is published (the CLI
before upload, the registry before any byte is stored, with the same words) and compiled by the gateway,
which validates every input against it (services/gateway/schemas.py, docs/validation.md).

A schema is refused at publish when it is not JSON, is not an object or a boolean, is larger than
MAX_SCHEMA_BYTES or nested deeper than MAX_SCHEMA_DEPTH, names a `$schema` draft this module does not know, is
not valid under its draft's metaschema (including a `pattern` that is not a regular expression), or has a
`$ref` that does not point inside the schema itself: nothing is ever fetched over the network.

Validation runs on the gateway's event loop, on inputs a stranger sends, so no keyword may take more than
linear time in the input: `pattern` and `patternProperties` run on RE2 (google-re2: no backtracking, so no
catastrophic patterns such as `^(a+)+$`), and a pattern RE2 cannot run (lookaround, backreferences) is refused
at publish; `uniqueItems` compares items by a canonical key in one pass instead of jsonschema's pairwise
comparison (quadratic for arrays of objects). What is left grows with the schema's size times the input's,
both bounded (MAX_SCHEMA_BYTES; the gateway's message size limit).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema.validators
import re2  # type: ignore[import-untyped]
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS  # type: ignore[import-untyped]

# The manifest's schema text, in UTF-8 bytes; also the bound on the Manifest.input_schema string field.
MAX_SCHEMA_BYTES = 64 * 1024
# Nesting of JSON objects and arrays in the schema.
MAX_SCHEMA_DEPTH = 32
# At most this many problems of one schema are reported.
MAX_SCHEMA_PROBLEMS = 10

DEFAULT_DRAFT: type[Validator] = jsonschema.Draft202012Validator
DRAFTS: tuple[type[Validator], ...] = (jsonschema.Draft4Validator, jsonschema.Draft6Validator,
                                      jsonschema.Draft7Validator, jsonschema.Draft201909Validator,
                                      jsonschema.Draft202012Validator)


def _normalised(uri: str) -> str:
    return uri.rstrip("#")


_BY_URI: dict[str, type[Validator]] = {
    _normalised(str(cls.META_SCHEMA.get("$id") or cls.META_SCHEMA.get("id"))): cls for cls in DRAFTS}
# Also the `http:` spellings people write for the newer drafts.
_BY_URI.update({uri.replace("https://", "http://"): cls for uri, cls in list(_BY_URI.items())})
KNOWN_DRAFTS = ", ".join(sorted({_normalised(str(c.META_SCHEMA.get("$id") or c.META_SCHEMA.get("id")))
                                 for c in DRAFTS}))

# Only the metaschemas, and no `retrieve`: a reference to anything else is unresolvable, never fetched
# (jsonschema's default registry would fetch remote references over HTTP).
_NO_NETWORK: referencing.Registry[Any] = METASCHEMAS


class SchemaProblem(ValueError):
    """Why a schema text cannot be used (one sentence, or several joined with `; `)."""


# Linear-time keywords (see the module docstring).

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the publisher, not printed by absl


@functools.lru_cache(maxsize=1024)
def regex(pattern: str) -> Any:
    """`pattern` compiled by RE2. Raises re2.error for what RE2 cannot run."""
    return re2.compile(pattern, options=_RE2_OPTIONS)


def _pattern(validator: Validator, pattern: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(validator: Validator, patterns: dict[str, Any], instance: Any,
                        schema: Any) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        compiled = regex(pattern)
        for key, child in instance.items():
            if compiled.search(key):
                yield from validator.descend(child, subschema, path=key, schema_path=pattern)


def _key(value: Any) -> Any:
    """A hashable key equal for JSON values JSON Schema calls equal (1 and 1.0 are; true and 1 are not)."""
    if isinstance(value, bool) or value is None:
        return ("c", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("a", tuple(_key(item) for item in value))
    if isinstance(value, dict):
        return ("o", frozenset((name, _key(item)) for name, item in value.items()))
    return ("?", repr(value))


def _unique_items(validator: Validator, unique: bool, instance: Any,
                  schema: Any) -> Iterator[jsonschema.ValidationError]:
    if unique and validator.is_type(instance, "array"):
        seen: set[Any] = set()
        for index, item in enumerate(instance):
            key = _key(item)
            if key in seen:
                yield jsonschema.ValidationError(f"item {index} repeats an earlier item; the items must be unique")
                return
            seen.add(key)


def _short(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:57]) + "…"


_SAFE_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties, "uniqueItems": _unique_items}
_SAFE: dict[type[Validator], type[Validator]] = {
    cls: jsonschema.validators.extend(cls, _SAFE_KEYWORDS) for cls in DRAFTS}


def _patterns(value: Any) -> Iterator[str]:
    """Every `pattern` string and `patternProperties` key in the schema (also in places that are not
    subschemas, which only makes the check stricter)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key == "pattern" and isinstance(child, str):
                    yield child
                elif key == "patternProperties" and isinstance(child, dict):
                    yield from (name for name in child if isinstance(name, str))
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _depth(value: Any, limit: int) -> bool:
    """Whether `value` nests objects/arrays deeper than `limit` (iterative: a deep schema cannot overflow)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _refs(value: Any) -> Iterator[str]:
    """Every `$ref` / `$dynamicRef` string in the schema (also in places that are not subschemas, which only
    makes the check stricter)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(child, str):
                    yield child
                else:
                    stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def draft_of(schema: Any) -> type[Validator]:
    """The validator class of the draft `$schema` names (Draft 2020-12 when it names none)."""
    if not isinstance(schema, dict) or "$schema" not in schema:
        return DEFAULT_DRAFT
    named = schema["$schema"]
    cls = _BY_URI.get(_normalised(named)) if isinstance(named, str) else None
    if cls is None:
        raise SchemaProblem(f"$schema {str(named)[:120]!r} is not a JSON Schema draft this platform knows "
                            f"(known: {KNOWN_DRAFTS}; without $schema, Draft 2020-12)")
    return cls


def parse(text: str) -> Any:
    """The schema document `text` holds, with its size and nesting bounded. Raises SchemaProblem."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise SchemaProblem(f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} bytes")
    try:
        schema = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise SchemaProblem(f"the schema is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(schema, (dict, bool)):
        raise SchemaProblem(f"a schema is a JSON object (or true/false), not {type(schema).__name__}")
    if _depth(schema, MAX_SCHEMA_DEPTH):
        raise SchemaProblem(f"the schema nests objects and arrays deeper than {MAX_SCHEMA_DEPTH} levels")
    return schema


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def compile_schema(text: str) -> Validator:
    """A validator for the schema `text`, after every check above. Raises SchemaProblem."""
    schema = parse(text)
    cls = draft_of(schema)
    problems: list[str] = []
    try:
        for error in sorted(cls(cls.META_SCHEMA).iter_errors(schema), key=lambda e: list(e.absolute_path)):
            problems.append(f"at {pointer(error.absolute_path) or 'the root'}: {error.message[:200]}")
            if len(problems) >= MAX_SCHEMA_PROBLEMS:
                break
        # Also the format checks of the metaschema (a `pattern` must be a regular expression).
        if not problems:
            cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        problems.append(f"at {pointer(exc.absolute_path) or 'the root'}: {exc.message[:200]}")
    except RecursionError:
        problems.append("the schema is nested too deeply to check")
    if problems:
        raise SchemaProblem("; ".join(problems))
    for pattern in sorted(set(_patterns(schema))):
        try:
            regex(pattern)
        except re2.error as exc:
            why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            problems.append(f"pattern {pattern[:120]!r} cannot be used ({why[:120]}): patterns run on RE2, which "
                            "guarantees linear time and so has no lookaround (`(?=`, `(?!`) or backreferences "
                            "(`\\1`)")
        if len(problems) >= MAX_SCHEMA_PROBLEMS:
            break
    if problems:
        raise SchemaProblem("; ".join(problems))
    validator = _SAFE[cls](schema, registry=_NO_NETWORK)
    resolver = _NO_NETWORK.with_resource("urn:clawhub:input-schema", referencing.Resource.from_contents(
        schema, default_specification=referencing.jsonschema.specification_with(
            str(cls.META_SCHEMA.get("$id") or cls.META_SCHEMA.get("id"))))).resolver("urn:clawhub:input-schema")
    for ref in sorted(set(_refs(schema))):
        if ref.startswith("#"):
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                problems.append(f"$ref {ref[:120]!r} does not resolve inside the schema")
        elif _normalised(ref) not in _BY_URI and ref not in _NO_NETWORK:
            problems.append(f"$ref {ref[:120]!r} points outside the schema; a $ref must point inside it "
                            "(`#/$defs/NAME`): nothing is fetched over the network")
        if len(problems) >= MAX_SCHEMA_PROBLEMS:
            break
    if problems:
        raise SchemaProblem("; ".join(problems))
    return validator


def schema_problem(text: str) -> str | None:
    """Why the manifest's `input_schema` text cannot be published; None when it can (or is empty)."""
    if not text:
        return None
    try:
        compile_schema(text)
    except SchemaProblem as exc:
        return str(exc)
    return None


def pointer(path: Any) -> str:
    """A JSON Pointer (RFC 6901) for a path of keys and indexes: `/items/0/id`, `` for the root."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)
