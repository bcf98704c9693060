"""Registry metadata: skills, their versions and each version's release history.

`MetadataStore` is the interface the servicer uses. Its logic is written once, in `SqlMetadataStore`, over a
connection (`Sql`) that speaks the SQL sqlite and PostgreSQL share; a backend supplies only the transactions.
`SqliteMetadataStore` is the embedded default, on aiosqlite in WAL mode. It keeps two connections: one writer,
whose transactions are serialized by a lock (`BEGIN IMMEDIATE`, so another process cannot interleave either),
and one reader, which in WAL mode sees the last committed state without waiting for the writer. The schema is
created and upgraded by `MIGRATIONS`: append a new entry to change it, never edit a released one.
`services/registry/pgstore.py` is the PostgreSQL store, shared by registry replicas.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import aiosqlite
from clawhub.common.v1 import skill_pb2

from services.runtime import metrics
from services.runtime.names import is_prerelease, semver_key
from services.runtime.sqlite import read_transaction, write_transaction

T = TypeVar("T")


class State(StrEnum):
    """The registry's part of the release state machine (the deployer owns the states after READY)."""

    PENDING = "PENDING"
    VERIFYING = "VERIFYING"
    READY = "READY"
    FAILED = "FAILED"


# Legal transitions; None is "no state yet". Anything else is refused with IllegalTransition.
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.PENDING}),
    State.PENDING: frozenset({State.VERIFYING, State.FAILED}),
    State.VERIFYING: frozenset({State.READY, State.FAILED}),
    State.READY: frozenset(),
    State.FAILED: frozenset(),
}


class IllegalTransition(Exception):
    """A transition the release state machine does not allow."""

    def __init__(self, name: str, version: str, from_state: State | None, to_state: State) -> None:
        super().__init__(f"{name}@{version}: illegal transition {from_state} → {to_state}")
        self.from_state = from_state
        self.to_state = to_state


class VersionNotFound(LookupError):
    """No such name@version."""


@dataclass(frozen=True)
class Transition:
    """One persisted transition of a version's release state."""

    from_state: State | None
    to_state: State
    time_ns: int
    reason: str


@dataclass(frozen=True)
class VersionRecord:
    """One version of a skill as stored."""

    name: str
    version: str
    digest: str
    size_bytes: int
    # The serialized clawhub.common.v1.Manifest it was published with.
    manifest: bytes
    state: State
    verification_errors: tuple[str, ...]
    history: tuple[Transition, ...]
    create_time_ns: int
    # Digest of the file bundle, empty when the version bundles no files.
    bundle_digest: str = ""
    # Yanked: reserved forever, never `latest`, resolved only when pinned exactly.
    yanked: bool = False
    yank_reason: str = ""
    # The signature it was published with (verified then): key id and signature bytes, empty when unsigned.
    signature_key_id: str = ""
    signature: bytes = b""
    # The publisher whose token published it, empty when published without a token.
    publisher: str = ""


@dataclass(frozen=True)
class NewVersion:
    """A version whose bytes arrived and matched their checksum, about to be verified."""

    name: str
    version: str
    digest: str
    size_bytes: int
    manifest: bytes
    # When the upload started (the PENDING transition) and when it completed (PENDING → VERIFYING).
    upload_started_ns: int
    upload_completed_ns: int
    pending_reason: str
    verifying_reason: str
    # Digest of the file bundle uploaded with the module, empty for none.
    bundle_digest: str = ""
    # Verified signature (key id, bytes), empty when unsigned; publisher whose token published, if any.
    signature_key_id: str = ""
    signature: bytes = b""
    publisher: str = ""


class AlreadyExists(Exception):
    """A publisher or namespace of that name exists."""


class NotFound(LookupError):
    """No such publisher, namespace or key; the message names it."""


class NamespaceOverlap(Exception):
    """A claimed prefix is inside, or contains, a namespace another publisher owns."""

    def __init__(self, name: str, other: str, owner: str) -> None:
        super().__init__(f"{name} overlaps {other}, owned by {owner}")
        self.other = other
        self.owner = owner


@dataclass(frozen=True)
class PublisherRecord:
    """A publisher; its token is stored only as a sha256."""

    name: str
    create_time_ns: int


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key; the key itself is stored only as a sha256."""

    id: str
    name: str
    role: str
    scopes: tuple[str, ...]
    created_by: str
    create_time_ns: int
    revoke_time_ns: int | None = None


@dataclass(frozen=True)
class AuditEventRecord:
    """One mutating call, as the audit log keeps it."""

    seq: int
    time_ns: int
    principal: str
    method: str
    target: str
    request_id: str
    outcome: str


@dataclass(frozen=True)
class KeyRecord:
    """A public key a namespace trusts."""

    key_id: str
    public_key: bytes
    create_time_ns: int


@dataclass(frozen=True)
class NamespaceRecord:
    """A claimed name prefix, its owner, its trusted keys and whether it requires signatures."""

    name: str
    owner: str
    require_signatures: bool
    keys: tuple[KeyRecord, ...]
    create_time_ns: int
    update_time_ns: int

    def key(self, key_id: str) -> KeyRecord | None:
        return next((k for k in self.keys if k.key_id == key_id), None)


def namespace_candidates(skill: str) -> list[str]:
    """Every prefix of `skill` on a dot boundary that a namespace could claim (at least two labels), the
    name itself included, longest first: the first one claimed governs the skill."""
    labels = skill.split(".")
    return [".".join(labels[:n]) for n in range(len(labels), 1, -1)]


@dataclass(frozen=True)
class SkillRecord:
    """A skill: every version under one name, summarized."""

    name: str
    create_time_ns: int
    update_time_ns: int
    # See `latest_version`; empty when no version is READY.
    latest_version: str
    # Manifest of the latest version, empty bytes when there is none.
    latest_manifest: bytes
    # Explicit tags (tag → version); `latest` is not among them, it is computed.
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CatalogEntry:
    """One READY version as dependency resolution sees it."""

    name: str
    version: str
    digest: str
    manifest: bytes
    yanked: bool


@dataclass(frozen=True)
class QuarantineRecord:
    """A blob that failed its digest check and was moved aside (kept as evidence) until a publish repairs it."""

    digest: str
    # What the bytes hashed to instead, and how many there were.
    actual_digest: str
    size_bytes: int
    # Where the bytes went, and what noticed (`download`, `scrub`, `publish`).
    path: str
    detected_by: str
    time_ns: int


@dataclass(frozen=True)
class BlobReference:
    """The blobs one READY version needs."""

    name: str
    version: str
    digest: str
    bundle_digest: str


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; `more` says whether anything follows the last item."""

    items: list[T]
    more: bool


def latest_version(ready_versions: Iterable[str]) -> str:
    """The highest READY non-yanked non-prerelease version, else the highest such prerelease, else empty
    (the caller passes only READY non-yanked versions)."""
    versions = list(ready_versions)
    releases = [v for v in versions if not is_prerelease(v)]
    pool = releases or versions
    return max(pool, key=version_order) if pool else ""


def version_order(version: str) -> tuple[tuple[int, int, int, int, tuple[tuple[int, int | str], ...]], str]:
    """SemVer precedence, then the string itself so that `1.0.0+a` and `1.0.0+b` still order stably."""
    return (semver_key(version), version)


class MetadataStore(Protocol):
    """What the servicer needs from the metadata backend."""

    async def close(self) -> None: ...

    async def begin_version(self, new: NewVersion) -> tuple[VersionRecord, bool]:
        """Atomically record `new` as VERIFYING (history PENDING → VERIFYING) and return (record, True);
        or, when name@version exists and is not FAILED, change nothing and return (existing, False).
        A FAILED version is replaced."""
        ...

    async def transition(self, name: str, version: str, to_state: State, reason: str, *,
                         errors: Sequence[str] = ()) -> VersionRecord:
        """Move a version to `to_state`, persisting the transition; raises IllegalTransition or
        VersionNotFound."""
        ...

    async def get_version(self, name: str, version: str) -> VersionRecord | None: ...

    async def list_versions(self, name: str, *, after: str | None, limit: int) -> Page[VersionRecord] | None:
        """Versions newest first by SemVer precedence, starting after `after`; None for an unknown skill."""
        ...

    async def get_skill(self, name: str) -> SkillRecord | None: ...

    async def list_skills(self, *, after: str | None, limit: int) -> Page[SkillRecord]:
        """Skills in name order, starting after the name `after`."""
        ...

    async def skill_names(self, *, limit: int) -> list[str]:
        """The names of up to `limit` skills, in name order (what an unknown name is compared with)."""
        ...

    async def unsettled_versions(self) -> list[VersionRecord]:
        """Versions left PENDING or VERIFYING (the registry stopped mid-publish)."""
        ...

    async def set_yanked(self, name: str, version: str, yanked: bool, reason: str) -> VersionRecord:
        """Yank or un-yank a version; raises VersionNotFound."""
        ...

    async def set_tag(self, name: str, tag: str, version: str) -> SkillRecord:
        """Point `tag` at `version` (which the caller checked exists and is READY)."""
        ...

    async def delete_tag(self, name: str, tag: str) -> SkillRecord | None:
        """Remove `tag`; None when the skill had no such tag."""
        ...

    async def search_skills(self, *, after: str | None, limit: int, prefix: str, query: str) -> Page[SkillRecord]:
        """Skills in name order after `after` whose name starts with `prefix` and whose name or latest
        description contains `query` (case-insensitive)."""
        ...

    async def catalog(self) -> list[CatalogEntry]:
        """Every READY version, for dependency resolution."""
        ...

    async def create_publisher(self, name: str, token_sha256: str) -> PublisherRecord:
        """Record a publisher; raises AlreadyExists."""
        ...

    async def publisher_by_token(self, token_sha256: str) -> str | None:
        """The name of the publisher holding the token with this sha256, if any."""
        ...

    async def create_namespace(self, name: str, owner: str, require_signatures: bool,
                               keys: Sequence[tuple[str, bytes]]) -> NamespaceRecord:
        """Claim `name` for `owner` with keys (key id, raw public key); raises NotFound (no such publisher),
        AlreadyExists (claimed) or NamespaceOverlap (inside or around another publisher's namespace)."""
        ...

    async def get_namespace(self, name: str) -> NamespaceRecord | None: ...

    async def governing_namespace(self, skill: str) -> NamespaceRecord | None:
        """The namespace with the longest prefix of `skill` (on a dot boundary), if any."""
        ...

    async def list_namespaces(self, *, after: str | None, limit: int) -> Page[NamespaceRecord]:
        """Namespaces in prefix order, starting after `after`."""
        ...

    async def update_namespace(self, name: str, *, add_keys: Sequence[tuple[str, bytes]],
                               remove_key_ids: Sequence[str], require_signatures: bool | None,
                               ) -> NamespaceRecord:
        """Add keys, then remove key ids, then set the flag (None leaves it), in one transaction; raises
        NotFound for an unknown namespace or a key id it does not have (and changes nothing)."""
        ...

    async def create_api_key(self, record: ApiKeyRecord, key_sha256: str) -> None:
        """Store a new API key (its id is fresh: 48 random bits)."""
        ...

    async def api_key_by_sha256(self, key_sha256: str) -> ApiKeyRecord | None:
        """The key with this sha256, revoked or not."""
        ...

    async def list_api_keys(self, *, before: str | None, limit: int) -> Page[ApiKeyRecord]:
        """Keys, newest first (`before`: the id the previous page ended with)."""
        ...

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """Mark the key revoked (once: a second revocation keeps the first time); None when no key has the id."""
        ...

    async def append_audit(self, time_ns: int, principal: str, method: str, target: str, request_id: str,
                           outcome: str) -> None: ...

    async def list_audit(self, *, before: int | None, limit: int) -> Page[AuditEventRecord]:
        """Audit events, newest first (`before`: the sequence number the previous page ended with)."""
        ...

    async def record_quarantine(self, record: QuarantineRecord) -> None:
        """Remember that a blob was quarantined (until `mark_repaired`)."""
        ...

    async def quarantined(self, digests: Iterable[str]) -> dict[str, QuarantineRecord]:
        """The unrepaired quarantine of each of `digests` that has one (the latest, if several)."""
        ...

    async def mark_repaired(self, digest: str) -> int:
        """Close the quarantine records of `digest` (its verified bytes are back); returns how many."""
        ...

    async def blob_references(self) -> list[BlobReference]:
        """The blobs every READY version needs (yanked ones included: they stay downloadable)."""
        ...


# Each migration is a list of statements run in one transaction; schema_version records the last one applied.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE skills (
            name TEXT PRIMARY KEY,
            create_time_ns INTEGER NOT NULL,
            update_time_ns INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE versions (
            name TEXT NOT NULL REFERENCES skills(name),
            version TEXT NOT NULL,
            digest TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            manifest BLOB NOT NULL,
            state TEXT NOT NULL,
            verification_errors TEXT NOT NULL DEFAULT '[]',
            create_time_ns INTEGER NOT NULL,
            PRIMARY KEY (name, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX versions_by_digest ON versions(digest)",
        "CREATE INDEX versions_by_state ON versions(state)",
        """CREATE TABLE transitions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            time_ns INTEGER NOT NULL,
            reason TEXT NOT NULL,
            FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
        )""",
        "CREATE INDEX transitions_by_version ON transitions(name, version, id)",
    ),
    (
        # 2: the file bundle a version ships with (issue 3: capabilities).
        "ALTER TABLE versions ADD COLUMN bundle_digest TEXT NOT NULL DEFAULT ''",
    ),
    (
        # 3: yank and explicit tags (issue 4: catalogue).
        "ALTER TABLE versions ADD COLUMN yanked INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE versions ADD COLUMN yank_reason TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE tags (
            name TEXT NOT NULL,
            tag TEXT NOT NULL,
            version TEXT NOT NULL,
            PRIMARY KEY (name, tag),
            FOREIGN KEY (name, version) REFERENCES versions(name, version)
        ) WITHOUT ROWID""",
    ),
    (
        # 4: publishers, namespaces and signatures (issue 4: trust). Tokens are stored as sha256 only.
        """CREATE TABLE publishers (
            name TEXT PRIMARY KEY,
            token_sha256 TEXT NOT NULL UNIQUE,
            create_time_ns INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE namespaces (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL REFERENCES publishers(name),
            require_signatures INTEGER NOT NULL DEFAULT 0,
            create_time_ns INTEGER NOT NULL,
            update_time_ns INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE namespace_keys (
            namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
            key_id TEXT NOT NULL,
            public_key BLOB NOT NULL,
            create_time_ns INTEGER NOT NULL,
            PRIMARY KEY (namespace, key_id)
        ) WITHOUT ROWID""",
        "ALTER TABLE versions ADD COLUMN signature_key_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE versions ADD COLUMN signature BLOB NOT NULL DEFAULT x''",
        "ALTER TABLE versions ADD COLUMN publisher TEXT NOT NULL DEFAULT ''",
    ),
    (
        # 5: blobs that failed their digest check (issue 9). Rows are kept after a repair, as history.
        """CREATE TABLE blob_quarantine (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            digest TEXT NOT NULL,
            actual_digest TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            path TEXT NOT NULL,
            detected_by TEXT NOT NULL,
            time_ns INTEGER NOT NULL,
            repair_time_ns INTEGER
        )""",
        "CREATE INDEX blob_quarantine_by_digest ON blob_quarantine(digest, repair_time_ns)",
    ),
    (
        # 6: API keys (only the sha256 of each key) and the audit log of mutating calls (issue 11).
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            scopes TEXT NOT NULL,
            key_sha256 TEXT NOT NULL UNIQUE,
            created_by TEXT NOT NULL,
            create_time_ns INTEGER NOT NULL,
            revoke_time_ns INTEGER
        )""",
        """CREATE TABLE audit_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            time_ns INTEGER NOT NULL,
            principal TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            request_id TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
    ),
)

_VERSION_COLUMNS = ("name, version, digest, size_bytes, manifest, state, verification_errors, create_time_ns, "
                    "bundle_digest, yanked, yank_reason, signature_key_id, signature, publisher")


class Sql(Protocol):
    """One connection inside a transaction, as the store logic below uses it. Queries are written once, in the
    SQL both engines speak, with `?` placeholders; rows are indexable by position and by column name."""

    async def rows(self, query: str, params: Sequence[object] = ()) -> list[Any]: ...

    async def row(self, query: str, params: Sequence[object] = ()) -> Any | None: ...

    async def run(self, query: str, params: Sequence[object] = ()) -> int:
        """Execute a statement; the number of rows it changed."""
        ...


class SqlMetadataStore(ABC):
    """The MetadataStore logic over `Sql`, shared by the sqlite and the PostgreSQL store: they supply only the
    transactions (`_write` serializes writers, across processes too; `_read` reads one snapshot)."""

    # Digests with an unrepaired quarantine record, mirrored in memory where one process owns the database
    # (the common answer, "none of these", then costs no query); None where replicas share it.
    _quarantine_cache: set[str] | None = None

    @abstractmethod
    def _write(self) -> AbstractAsyncContextManager[Sql]: ...

    @abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Sql]: ...

    @abstractmethod
    async def close(self) -> None: ...

    # Writes.

    async def begin_version(self, new: NewVersion) -> tuple[VersionRecord, bool]:
        async with self._write() as db:
            existing = await _fetch_version(db, new.name, new.version)
            if existing is not None and existing.state is not State.FAILED:
                return existing, False
            if existing is not None:
                # Its transitions go with it (ON DELETE CASCADE): the new publish starts a fresh history.
                await db.run("DELETE FROM versions WHERE name = ? AND version = ?", (new.name, new.version))
            await db.run(
                "INSERT INTO skills (name, create_time_ns, update_time_ns) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET update_time_ns = CASE "
                "WHEN excluded.update_time_ns > skills.update_time_ns THEN excluded.update_time_ns "
                "ELSE skills.update_time_ns END",
                (new.name, new.upload_started_ns, new.upload_started_ns),
            )
            await db.run(
                f"INSERT INTO versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, '[]', ?, ?, FALSE, '', ?, ?, ?)",
                (new.name, new.version, new.digest, new.size_bytes, new.manifest, State.VERIFYING.value,
                 new.upload_started_ns, new.bundle_digest, new.signature_key_id, new.signature, new.publisher),
            )
            await _insert_transition(db, new.name, new.version, None, State.PENDING, new.upload_started_ns,
                                     new.pending_reason)
            await _insert_transition(db, new.name, new.version, State.PENDING, State.VERIFYING,
                                     new.upload_completed_ns, new.verifying_reason)
            record = await _fetch_version(db, new.name, new.version)
        assert record is not None
        return record, True

    async def transition(self, name: str, version: str, to_state: State, reason: str, *,
                         errors: Sequence[str] = ()) -> VersionRecord:
        async with self._write() as db:
            current = await _fetch_version(db, name, version)
            if current is None:
                raise VersionNotFound(f"{name}@{version}")
            if to_state not in TRANSITIONS[current.state]:
                raise IllegalTransition(name, version, current.state, to_state)
            await db.run(
                "UPDATE versions SET state = ?, verification_errors = ? WHERE name = ? AND version = ?",
                (to_state.value, json.dumps(list(errors) or list(current.verification_errors)), name, version),
            )
            await _insert_transition(db, name, version, current.state, to_state, time.time_ns(), reason)
            record = await _fetch_version(db, name, version)
        assert record is not None
        return record

    # Reads.

    async def get_version(self, name: str, version: str) -> VersionRecord | None:
        async with self._read() as db:
            return await _fetch_version(db, name, version)

    async def list_versions(self, name: str, *, after: str | None, limit: int) -> Page[VersionRecord] | None:
        async with self._read() as db:
            if await db.row("SELECT 1 FROM skills WHERE name = ?", (name,)) is None:
                return None
            versions = [str(row[0]) for row in await db.rows("SELECT version FROM versions WHERE name = ?", (name,))]
            # SemVer precedence is not a SQL ordering; a skill has few enough versions to sort here.
            ordered = sorted(versions, key=version_order, reverse=True)
            if after is not None:
                bound = version_order(after)
                ordered = [v for v in ordered if version_order(v) < bound]
            chosen = ordered[:limit]
            records = [r for v in chosen if (r := await _fetch_version(db, name, v)) is not None]
            return Page(records, more=len(ordered) > limit)

    async def get_skill(self, name: str) -> SkillRecord | None:
        async with self._read() as db:
            skills = await _fetch_skills(db, "WHERE name = ?", (name,))
        return skills[0] if skills else None

    async def list_skills(self, *, after: str | None, limit: int) -> Page[SkillRecord]:
        async with self._read() as db:
            skills = await _fetch_skills(db, "WHERE name > ? ORDER BY name LIMIT ?", (after or "", limit + 1))
        return Page(skills[:limit], more=len(skills) > limit)

    async def skill_names(self, *, limit: int) -> list[str]:
        async with self._read() as db:
            return [str(row[0]) for row in await db.rows("SELECT name FROM skills ORDER BY name LIMIT ?", (limit,))]

    async def unsettled_versions(self) -> list[VersionRecord]:
        async with self._read() as db:
            keys = [(str(row[0]), str(row[1])) for row in await db.rows(
                "SELECT name, version FROM versions WHERE state IN (?, ?) ORDER BY name",
                (State.PENDING.value, State.VERIFYING.value))]
            return [r for name, version in keys if (r := await _fetch_version(db, name, version)) is not None]

    async def set_yanked(self, name: str, version: str, yanked: bool, reason: str) -> VersionRecord:
        async with self._write() as db:
            if not await db.run("UPDATE versions SET yanked = ?, yank_reason = ? WHERE name = ? AND version = ?",
                                (yanked, reason if yanked else "", name, version)):
                raise VersionNotFound(f"{name}@{version}")
            record = await _fetch_version(db, name, version)
        assert record is not None
        return record

    async def set_tag(self, name: str, tag: str, version: str) -> SkillRecord:
        async with self._write() as db:
            await db.run("INSERT INTO tags (name, tag, version) VALUES (?, ?, ?) "
                         "ON CONFLICT (name, tag) DO UPDATE SET version = excluded.version", (name, tag, version))
            skills = await _fetch_skills(db, "WHERE name = ?", (name,))
        return skills[0]

    async def delete_tag(self, name: str, tag: str) -> SkillRecord | None:
        async with self._write() as db:
            if not await db.run("DELETE FROM tags WHERE name = ? AND tag = ?", (name, tag)):
                return None
            skills = await _fetch_skills(db, "WHERE name = ?", (name,))
        return skills[0]

    async def search_skills(self, *, after: str | None, limit: int, prefix: str, query: str) -> Page[SkillRecord]:
        needle = query.casefold()
        found: list[SkillRecord] = []
        cursor_name = after or ""
        batch = max(limit + 1, 200)
        # The keyword matches the latest version's description, which is computed, not stored: scan in name
        # order (bounded by the prefix through the primary key) and filter here.
        async with self._read() as db:
            while len(found) <= limit:
                where = "WHERE name > ?"
                params: list[object] = [cursor_name]
                if prefix:
                    where += " AND name >= ? AND substr(name, 1, ?) = ?"
                    params += [prefix, len(prefix), prefix]
                skills = await _fetch_skills(db, f"{where} ORDER BY name LIMIT ?", (*params, batch))
                for skill in skills:
                    description = (skill_pb2.Manifest.FromString(skill.latest_manifest).description
                                   if skill.latest_manifest else "")
                    if not needle or needle in skill.name.casefold() or needle in description.casefold():
                        found.append(skill)
                if len(skills) < batch:
                    break
                cursor_name = skills[-1].name
        return Page(found[:limit], more=len(found) > limit)

    async def catalog(self) -> list[CatalogEntry]:
        async with self._read() as db:
            return [CatalogEntry(str(r[0]), str(r[1]), str(r[2]), bytes(r[3]), bool(r[4])) for r in await db.rows(
                "SELECT name, version, digest, manifest, yanked FROM versions WHERE state = ?", (State.READY.value,))]

    # Publishers and namespaces.

    async def create_publisher(self, name: str, token_sha256: str) -> PublisherRecord:
        now = time.time_ns()
        async with self._write() as db:
            if await db.row("SELECT 1 FROM publishers WHERE name = ?", (name,)) is not None:
                raise AlreadyExists(f"publisher {name}")
            await db.run("INSERT INTO publishers (name, token_sha256, create_time_ns) VALUES (?, ?, ?)",
                         (name, token_sha256, now))
        return PublisherRecord(name, now)

    async def publisher_by_token(self, token_sha256: str) -> str | None:
        async with self._read() as db:
            row = await db.row("SELECT name FROM publishers WHERE token_sha256 = ?", (token_sha256,))
        return str(row[0]) if row else None

    # API keys and the audit log.

    async def create_api_key(self, record: ApiKeyRecord, key_sha256: str) -> None:
        async with self._write() as db:
            await db.run("INSERT INTO api_keys (id, name, role, scopes, key_sha256, created_by, create_time_ns) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (record.id, record.name, record.role, json.dumps(list(record.scopes)), key_sha256,
                          record.created_by, record.create_time_ns))

    async def api_key_by_sha256(self, key_sha256: str) -> ApiKeyRecord | None:
        async with self._read() as db:
            row = await db.row(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_sha256 = ?", (key_sha256,))
        return _api_key(row) if row else None

    async def list_api_keys(self, *, before: str | None, limit: int) -> Page[ApiKeyRecord]:
        async with self._read() as db:
            params: tuple[str, ...] = ()
            if before is None:
                query = f"SELECT {_KEY_COLUMNS} FROM api_keys"
            else:
                query = (f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE (create_time_ns, id) < "
                         "(SELECT create_time_ns, id FROM api_keys WHERE id = ?)")
                params = (before,)
            rows = [_api_key(r) for r in await db.rows(query + " ORDER BY create_time_ns DESC, id DESC LIMIT ?",
                                                       (*params, limit + 1))]
        return Page(rows[:limit], len(rows) > limit)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord | None:
        async with self._write() as db:
            await db.run("UPDATE api_keys SET revoke_time_ns = ? WHERE id = ? AND revoke_time_ns IS NULL",
                         (time.time_ns(), key_id))
            row = await db.row(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return _api_key(row) if row else None

    async def append_audit(self, time_ns: int, principal: str, method: str, target: str, request_id: str,
                           outcome: str) -> None:
        async with self._write() as db:
            await db.run("INSERT INTO audit_events (time_ns, principal, method, target, request_id, outcome) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (time_ns, principal, method, target, request_id, outcome))

    async def list_audit(self, *, before: int | None, limit: int) -> Page[AuditEventRecord]:
        async with self._read() as db:
            rows = [AuditEventRecord(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]))
                    for r in await db.rows("SELECT seq, time_ns, principal, method, target, request_id, outcome "
                                           "FROM audit_events WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                                           (before if before is not None else 2**62, limit + 1))]
        return Page(rows[:limit], len(rows) > limit)

    async def create_namespace(self, name: str, owner: str, require_signatures: bool,
                               keys: Sequence[tuple[str, bytes]]) -> NamespaceRecord:
        now = time.time_ns()
        async with self._write() as db:
            if await db.row("SELECT 1 FROM publishers WHERE name = ?", (owner,)) is None:
                raise NotFound(f"no publisher named {owner!r}")
            if await _fetch_namespace(db, name) is not None:
                raise AlreadyExists(f"namespace {name}")
            # Inside the write transaction, so two overlapping claims cannot both pass the check.
            for other in await _related_namespaces(db, name):
                if other.owner != owner:
                    raise NamespaceOverlap(name, other.name, other.owner)
            await db.run("INSERT INTO namespaces (name, owner, require_signatures, create_time_ns, "
                         "update_time_ns) VALUES (?, ?, ?, ?, ?)", (name, owner, require_signatures, now, now))
            await _add_keys(db, name, keys, now)
            record = await _fetch_namespace(db, name)
        assert record is not None
        return record

    async def get_namespace(self, name: str) -> NamespaceRecord | None:
        async with self._read() as db:
            return await _fetch_namespace(db, name)

    async def governing_namespace(self, skill: str) -> NamespaceRecord | None:
        candidates = namespace_candidates(skill)
        placeholders = ", ".join("?" * len(candidates))
        async with self._read() as db:
            row = await db.row(f"SELECT name FROM namespaces WHERE name IN ({placeholders}) "
                               "ORDER BY length(name) DESC LIMIT 1", tuple(candidates))
            return await _fetch_namespace(db, str(row[0])) if row else None

    async def list_namespaces(self, *, after: str | None, limit: int) -> Page[NamespaceRecord]:
        async with self._read() as db:
            names = [str(row[0]) for row in await db.rows("SELECT name FROM namespaces WHERE name > ? "
                                                          "ORDER BY name LIMIT ?", (after or "", limit + 1))]
            records = [r for n in names[:limit] if (r := await _fetch_namespace(db, n)) is not None]
        return Page(records, more=len(names) > limit)

    async def update_namespace(self, name: str, *, add_keys: Sequence[tuple[str, bytes]],
                               remove_key_ids: Sequence[str], require_signatures: bool | None,
                               ) -> NamespaceRecord:
        now = time.time_ns()
        async with self._write() as db:
            if await _fetch_namespace(db, name) is None:
                raise NotFound(f"no namespace {name!r}")
            await _add_keys(db, name, add_keys, now)
            for key_id in remove_key_ids:
                if not await db.run("DELETE FROM namespace_keys WHERE namespace = ? AND key_id = ?", (name, key_id)):
                    # Raising rolls the whole update back: a typo in one key id changes nothing.
                    raise NotFound(f"namespace {name} has no key {key_id}")
            if require_signatures is not None:
                await db.run("UPDATE namespaces SET require_signatures = ? WHERE name = ?",
                             (require_signatures, name))
            await db.run("UPDATE namespaces SET update_time_ns = ? WHERE name = ?", (now, name))
            record = await _fetch_namespace(db, name)
        assert record is not None
        return record

    # Blob integrity.

    async def record_quarantine(self, record: QuarantineRecord) -> None:
        async with self._write() as db:
            await db.run("INSERT INTO blob_quarantine (digest, actual_digest, size_bytes, path, detected_by, "
                         "time_ns) VALUES (?, ?, ?, ?, ?, ?)",
                         (record.digest, record.actual_digest, record.size_bytes, record.path,
                          record.detected_by, record.time_ns))
        if self._quarantine_cache is not None:
            self._quarantine_cache.add(record.digest)

    async def quarantined(self, digests: Iterable[str]) -> dict[str, QuarantineRecord]:
        wanted = set(digests)
        if self._quarantine_cache is not None:
            wanted &= self._quarantine_cache
        found: dict[str, QuarantineRecord] = {}
        if not wanted:
            return found
        ordered = sorted(wanted)
        async with self._read() as db:
            # In slices: sqlite bounds the number of parameters of one statement.
            for start in range(0, len(ordered), 500):
                part = ordered[start:start + 500]
                placeholders = ", ".join("?" * len(part))
                for r in await db.rows(
                        "SELECT digest, actual_digest, size_bytes, path, detected_by, time_ns FROM blob_quarantine "
                        f"WHERE repair_time_ns IS NULL AND digest IN ({placeholders}) ORDER BY id", part):
                    found[str(r[0])] = QuarantineRecord(str(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]),
                                                        int(r[5]))
        return found

    async def mark_repaired(self, digest: str) -> int:
        if self._quarantine_cache is not None and digest not in self._quarantine_cache:
            return 0
        async with self._write() as db:
            repaired = await db.run("UPDATE blob_quarantine SET repair_time_ns = ? "
                                    "WHERE digest = ? AND repair_time_ns IS NULL", (time.time_ns(), digest))
        if self._quarantine_cache is not None:
            self._quarantine_cache.discard(digest)
        return repaired

    async def blob_references(self) -> list[BlobReference]:
        async with self._read() as db:
            return [BlobReference(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in await db.rows(
                "SELECT name, version, digest, bundle_digest FROM versions WHERE state = ? ORDER BY name, version",
                (State.READY.value,))]


_KEY_COLUMNS = "id, name, role, scopes, created_by, create_time_ns, revoke_time_ns"


def _api_key(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(str(row[0]), str(row[1]), str(row[2]), tuple(json.loads(row[3])), str(row[4]), int(row[5]),
                        int(row[6]) if row[6] is not None else None)


async def _add_keys(db: Sql, namespace: str, keys: Sequence[tuple[str, bytes]], now: int) -> None:
    for key_id, public_key in keys:
        await db.run("INSERT INTO namespace_keys (namespace, key_id, public_key, create_time_ns) "
                     "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (namespace, key_id, public_key, now))


async def _fetch_namespace(db: Sql, name: str) -> NamespaceRecord | None:
    row = await db.row("SELECT name, owner, require_signatures, create_time_ns, update_time_ns FROM namespaces "
                       "WHERE name = ?", (name,))
    if row is None:
        return None
    keys = tuple(KeyRecord(str(k[0]), bytes(k[1]), int(k[2])) for k in await db.rows(
        "SELECT key_id, public_key, create_time_ns FROM namespace_keys WHERE namespace = ? "
        "ORDER BY create_time_ns, key_id", (name,)))
    return NamespaceRecord(name=str(row[0]), owner=str(row[1]), require_signatures=bool(row[2]), keys=keys,
                           create_time_ns=int(row[3]), update_time_ns=int(row[4]))


async def _related_namespaces(db: Sql, name: str) -> list[NamespaceRecord]:
    """Claimed namespaces that contain `name` (its dot-prefixes) or that it contains (`name.` + anything)."""
    ancestors = namespace_candidates(name)[1:]
    found: list[str] = []
    if ancestors:
        placeholders = ", ".join("?" * len(ancestors))
        found += [str(row[0]) for row in await db.rows(f"SELECT name FROM namespaces WHERE name IN ({placeholders})",
                                                       tuple(ancestors))]
    # `/` is the character after `.`: this range is every name starting with `name.` (in byte order, which the
    # PostgreSQL schema asks for with COLLATE "C").
    found += [str(row[0]) for row in await db.rows("SELECT name FROM namespaces WHERE name > ? AND name < ?",
                                                   (name + ".", name + "/"))]
    return [r for n in found if (r := await _fetch_namespace(db, n)) is not None]


async def _insert_transition(db: Sql, name: str, version: str, from_state: State | None,
                             to_state: State, time_ns: int, reason: str) -> None:
    await db.run(
        "INSERT INTO transitions (name, version, from_state, to_state, time_ns, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (name, version, from_state.value if from_state else None, to_state.value, time_ns, reason),
    )


async def _fetch_version(db: Sql, name: str, version: str) -> VersionRecord | None:
    row = await db.row(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? AND version = ?", (name, version))
    if row is None:
        return None
    history = [
        Transition(State(t["from_state"]) if t["from_state"] else None, State(t["to_state"]),
                   int(t["time_ns"]), str(t["reason"]))
        for t in await db.rows("SELECT from_state, to_state, time_ns, reason FROM transitions "
                               "WHERE name = ? AND version = ? ORDER BY id", (name, version))
    ]
    return VersionRecord(
        name=str(row["name"]), version=str(row["version"]), digest=str(row["digest"]),
        size_bytes=int(row["size_bytes"]), manifest=bytes(row["manifest"]), state=State(row["state"]),
        verification_errors=tuple(json.loads(row["verification_errors"])), history=tuple(history),
        create_time_ns=int(row["create_time_ns"]), bundle_digest=str(row["bundle_digest"]),
        yanked=bool(row["yanked"]), yank_reason=str(row["yank_reason"]),
        signature_key_id=str(row["signature_key_id"]), signature=bytes(row["signature"]),
        publisher=str(row["publisher"]),
    )


async def _fetch_skills(db: Sql, where: str, params: Sequence[object]) -> list[SkillRecord]:
    rows = [(str(r[0]), int(r[1]), int(r[2]))
            for r in await db.rows(f"SELECT name, create_time_ns, update_time_ns FROM skills {where}", params)]
    if not rows:
        return []
    names = [name for name, _, _ in rows]
    placeholders = ", ".join("?" * len(names))
    ready: dict[str, list[str]] = {name: [] for name in names}
    for r in await db.rows(f"SELECT name, version FROM versions WHERE state = ? AND yanked = ? "
                           f"AND name IN ({placeholders})", (State.READY.value, False, *names)):
        ready[str(r[0])].append(str(r[1]))
    tags: dict[str, dict[str, str]] = {name: {} for name in names}
    for r in await db.rows(f"SELECT name, tag, version FROM tags WHERE name IN ({placeholders}) ORDER BY tag",
                           tuple(names)):
        tags[str(r[0])][str(r[1])] = str(r[2])
    skills = []
    for name, created, updated in rows:
        latest = latest_version(ready[name])
        manifest = b""
        if latest:
            row = await db.row("SELECT manifest FROM versions WHERE name = ? AND version = ?", (name, latest))
            manifest = bytes(row[0]) if row else b""
        skills.append(SkillRecord(name, created, updated, latest, manifest, tags[name]))
    return skills


# The sqlite store.

async def _configure(conn: aiosqlite.Connection) -> None:
    await conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable against process crashes in WAL mode; blobs are fsynced separately.
    await conn.execute("PRAGMA synchronous=NORMAL")
    await conn.execute("PRAGMA foreign_keys=ON")
    await conn.execute("PRAGMA busy_timeout=5000")


async def migrate(conn: aiosqlite.Connection) -> int:
    """Apply pending migrations; returns the schema version. Refuses a database newer than this code."""
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    async with write_transaction(conn):
        async with conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version") as cursor:
            row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(f"the registry database has schema version {current}, newer than this "
                               f"registry understands ({len(MIGRATIONS)}); upgrade the registry")
        for number, statements in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
    return len(MIGRATIONS)


class _SqliteSql:
    """`Sql` on an aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def rows(self, query: str, params: Sequence[object] = ()) -> list[Any]:
        async with self._db.execute(query, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def row(self, query: str, params: Sequence[object] = ()) -> Any | None:
        async with self._db.execute(query, tuple(params)) as cursor:
            return await cursor.fetchone()

    async def run(self, query: str, params: Sequence[object] = ()) -> int:
        async with self._db.execute(query, tuple(params)) as cursor:
            return int(cursor.rowcount)


class SqliteMetadataStore(SqlMetadataStore):
    """MetadataStore on an sqlite file (aiosqlite, WAL)."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        # This process owns the database: the unrepaired quarantines are mirrored in memory.
        self._quarantine_cache = set()

    @classmethod
    async def open(cls, path: Path) -> SqliteMetadataStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        connections: list[aiosqlite.Connection] = []
        try:
            for _ in range(2):
                conn = await aiosqlite.connect(path, isolation_level=None)
                connections.append(conn)
                metrics.observe_queries(conn, "registry")  # clawhub_db_query_duration_seconds
                await _configure(conn)
                conn.row_factory = aiosqlite.Row
            await migrate(connections[0])
            store = cls(connections[0], connections[1])
            async with connections[0].execute("SELECT DISTINCT digest FROM blob_quarantine "
                                              "WHERE repair_time_ns IS NULL") as cursor:
                store._quarantine_cache = {str(row[0]) async for row in cursor}
        except BaseException:
            for conn in connections:
                await conn.close()
            raise
        return store

    async def close(self) -> None:
        async with self._write_lock, self._read_lock:
            await self._reader.close()
            await self._writer.close()

    # Cancel-safe transactions (services/runtime/sqlite.py), one user of each connection at a time.
    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Sql]:
        async with self._write_lock, write_transaction(self._writer) as db:
            yield _SqliteSql(db)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Sql]:
        # One read transaction, so a version and its history come from the same snapshot.
        async with self._read_lock, read_transaction(self._reader) as db:
            yield _SqliteSql(db)
