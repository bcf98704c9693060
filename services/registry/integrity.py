"""Blob integrity: whether the blobs a Ready version needs are there and intact, quarantine of corrupt ones,
repair by a publish of the same bytes, and the scrub that hashes everything. Also where `SkillVersion.problems`
is decided (`version_problems`): a missing or corrupt blob, or a signature its namespace no longer trusts.

A blob that fails its digest check (while served, at a republish or in a scrub) is moved to
`blobs/quarantine/` and recorded in the metadata store; from then on `SkillVersion.problems` of every Ready
version that needs it says so, `DownloadBlob` answers DATA_LOSS, and a publish of the same bytes (which must
hash to the digest) puts them back and closes the record. See docs/registry.md, "Blob integrity".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from services.registry.blobs import BlobBackend, BlobCondition, BlobCorrupt, Upload
from services.registry.store import MetadataStore, NamespaceRecord, QuarantineRecord, State, VersionRecord
from services.runtime.errors import Reason, ServiceError
from services.runtime.tasks import BackgroundLoop

log = logging.getLogger("clawhub.registry.integrity")

# How often a scrub reports progress when it finds nothing (each problem is reported at once).
PROGRESS_SECONDS = 0.25
MODULE = "module"
BUNDLE = "bundle"
ROLE_WORDS = {MODULE: "module", BUNDLE: "file bundle"}


def _date(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True)
class BlobHealth:
    """What is known about one stored blob without hashing it: is the file there, is it quarantined."""

    present: bool
    quarantine: QuarantineRecord | None = None

    @property
    def usable(self) -> bool:
        return self.present and self.quarantine is None


def blob_problem(role: str, digest: str, health: BlobHealth | None) -> str | None:
    """The problem with a blob a version needs, in words; None when there is none (or nothing is known)."""
    if health is None or health.usable:
        return None
    what = f"{ROLE_WORDS.get(role, role)} blob {digest}"
    if health.quarantine is not None:
        return (f"{what} failed its digest check on {_date(health.quarantine.time_ns)} and is quarantined; "
                "publish the same bytes again to repair it")
    return f"{what} is missing from the registry's blob store; publish the same bytes again to restore it"


def trust_problem(record: VersionRecord, namespace: NamespaceRecord | None) -> str | None:
    """Why executors refuse to run a version for its signature as things stand now (they re-verify it
    against the namespace's current keys: services/executor/provenance.py), in words; None when they run it."""
    key_id = record.signature_key_id
    if key_id and namespace is None:
        return f"signed by {key_id}, but no namespace governs the name any more, so no key is trusted for it"
    if key_id and namespace is not None and namespace.key(key_id) is None:
        return (f"signed by {key_id}, a key namespace {namespace.name} no longer trusts, so executors refuse to run "
                f"it; add the key back (clawhub namespace add-key) or publish a version signed with a trusted key")
    if not key_id and namespace is not None and namespace.require_signatures:
        return (f"not signed, and namespace {namespace.name} now requires signatures, so executors refuse to run "
                "it; publish a signed version")
    return None


def version_problems(record: VersionRecord, blobs: Mapping[str, BlobHealth],
                     namespaces: Mapping[str, NamespaceRecord | None] | None = None) -> list[str]:
    """Why a Ready version cannot run now; empty when it can (and for a version that is not Ready: its state
    says enough). The one place that decides: a new kind of problem goes here, with what it needs to know
    passed in beside `blobs` (and `namespaces`, the namespace governing each name, when known)."""
    if record.state is not State.READY:
        return []
    problems = []
    for role, digest in ((MODULE, record.digest), (BUNDLE, record.bundle_digest)):
        if digest and (problem := blob_problem(role, digest, blobs.get(digest))):
            problems.append(problem)
    if namespaces is not None and (problem := trust_problem(record, namespaces.get(record.name))):
        problems.append(problem)
    return problems


def blob_corrupt_error(digest: str, record: QuarantineRecord | None) -> ServiceError:
    """DATA_LOSS for a blob whose stored bytes are not what its digest says."""
    when = f" on {_date(record.time_ns)}" if record else ""
    metadata = {"digest": digest}
    if record is not None:
        metadata |= {"actual_digest": record.actual_digest, "quarantine_time": _date(record.time_ns)}
    return ServiceError(grpc.StatusCode.DATA_LOSS, Reason.BLOB_CORRUPT,
                        f"the stored bytes of blob {digest} failed their digest check{when} and are quarantined, so "
                        "the registry will not serve them; publish the same bytes again to repair the blob",
                        metadata=metadata)


@dataclass(frozen=True)
class FoundProblem:
    """One problem a scrub found: a blob a Ready version needs, or a stored blob no version needs (empty name,
    role "")."""

    name: str
    version: str
    role: str
    digest: str
    condition: str  # "corrupt" (quarantined by this scrub), "quarantined" (earlier), "missing"
    description: str


@dataclass
class ScrubProgress:
    """Where a scrub stands; `problems` holds what was found since the previous report."""

    blobs_total: int
    blobs_checked: int = 0
    bytes_checked: int = 0
    blobs_quarantined: int = 0
    problems: list[FoundProblem] = field(default_factory=list)
    problem_count: int = 0
    done: bool = False


class Integrity:
    """The blob checks shared by the servicer and the periodic scrub."""

    def __init__(self, store: MetadataStore, blobs: BlobBackend) -> None:
        self._store = store
        self._blobs = blobs

    async def health(self, digests: Iterable[str]) -> dict[str, BlobHealth]:
        wanted = {d for d in digests if d}
        if not wanted:
            return {}
        present = await self._blobs.existing(wanted)
        quarantined = await self._store.quarantined(wanted)
        return {d: BlobHealth(d in present, quarantined.get(d)) for d in wanted}

    async def problems(self, records: Sequence[VersionRecord]) -> list[list[str]]:
        """`version_problems` of each record (one file-system pass and one query for all of them)."""
        ready = [r for r in records if r.state is State.READY]
        health = await self.health(d for r in ready for d in (r.digest, r.bundle_digest))
        namespaces = {name: await self._store.governing_namespace(name) for name in {r.name for r in ready}}
        return [version_problems(r, health, namespaces) for r in records]

    async def quarantine(self, corrupt: BlobCorrupt, detected_by: str) -> QuarantineRecord | None:
        """Move a blob found corrupt aside, record it and log it; None when another check got there first or
        a publish has replaced the file meanwhile.

        The record is written under the digest's lock, with the move: a repair (`restore`, a publish placing
        verified bytes), which takes that lock to put the bytes back, then always closes it. Written after the
        lock, it could land after the repair had closed nothing, leaving a quarantine on record for a blob that
        is back (NOT RUNNABLE until the next scrub)."""
        recorded: list[QuarantineRecord] = []

        async def record_it(path: str) -> None:
            record = QuarantineRecord(corrupt.digest, corrupt.actual, corrupt.size, path, detected_by,
                                      time.time_ns())
            await self._store.record_quarantine(record)
            recorded.append(record)

        path = await self._blobs.quarantine(corrupt.digest, corrupt.identity, record_it)
        if path is None:
            return None
        record = recorded[0]
        log.error("blob %s failed its digest check (found by %s: %d bytes hashing to %s); quarantined as %s; "
                  "publish the same bytes again to repair it", corrupt.digest, detected_by, corrupt.size,
                  corrupt.actual, path)
        return record

    async def quarantine_record(self, digest: str) -> QuarantineRecord | None:
        return (await self._store.quarantined([digest])).get(digest)

    async def restore(self, upload: Upload, digest: str, what: str) -> bool:
        """Put a finished upload that hashes to `digest` in place of the stored blob when that one is missing
        or corrupt (a corrupt one goes to quarantine first); True when it did. `what` names the version."""
        check = await self._blobs.check(digest)
        if check.condition is BlobCondition.OK:
            # Intact, though possibly restored by hand after a quarantine: nothing to repair any more.
            await self._store.mark_repaired(digest)
            return False
        if check.condition is BlobCondition.CORRUPT:
            await self.quarantine(check.corrupt(), "publish")
        await upload.commit(digest)
        await self._store.mark_repaired(digest)
        log.warning("repaired blob %s of %s with the verified bytes of a new publish (it was %s)", digest, what,
                    check.condition.value)
        return True

    async def scrub(self) -> AsyncIterator[ScrubProgress]:
        """Hash every stored blob, quarantine the corrupt ones, then report the blobs Ready versions need that
        are missing or quarantined. Yields progress (with the problems found since the previous report) and a
        last report with `done` set."""
        # The versions first, then the files: a version Ready by now had its blobs placed before, so they are
        # in the listing that follows unless they are really gone.
        users: dict[str, list[tuple[str, str, str]]] = {}
        for ref in await self._store.blob_references():
            users.setdefault(ref.digest, []).append((ref.name, ref.version, MODULE))
            if ref.bundle_digest:
                users.setdefault(ref.bundle_digest, []).append((ref.name, ref.version, BUNDLE))
        stored = await self._blobs.stored()
        open_records = await self._store.quarantined(stored)
        progress = ScrubProgress(blobs_total=len(stored))
        last_report = time.monotonic()
        for digest in stored:
            check = await self._blobs.check(digest)
            progress.blobs_checked += 1
            progress.bytes_checked += check.size
            if check.condition is BlobCondition.CORRUPT:
                record = await self.quarantine(check.corrupt(), "scrub")
                if record is not None:
                    progress.blobs_quarantined += 1
                else:  # a download quarantined it a moment ago
                    record = await self.quarantine_record(digest)
                progress.problems += self._found(digest, users, "corrupt", BlobHealth(False, record))
            elif check.condition is BlobCondition.OK and digest in open_records:
                await self._store.mark_repaired(digest)
            if progress.problems or time.monotonic() - last_report >= PROGRESS_SECONDS:
                yield self._report(progress)
                last_report = time.monotonic()
            await asyncio.sleep(0)  # let calls in between blobs
        stored_now = set(stored) | await self._blobs.existing(users)
        absent = [d for d in users if d not in stored_now]
        records = await self._store.quarantined(absent)
        for digest in absent:
            record = records.get(digest)
            progress.problems += self._found(digest, users, "quarantined" if record else "missing",
                                             BlobHealth(False, record))
        progress.done = True
        yield self._report(progress)

    @staticmethod
    def _found(digest: str, users: dict[str, list[tuple[str, str, str]]], condition: str,
               health: BlobHealth) -> list[FoundProblem]:
        needed_by = users.get(digest)
        if not needed_by:
            return [FoundProblem("", "", "", digest, condition,
                                 f"stored blob {digest}, which no Ready version needs, failed its digest check and "
                                 "is quarantined")]
        return [FoundProblem(name, version, role, digest, condition,
                             f"{name}@{version}: {blob_problem(role, digest, health) or condition}")
                for name, version, role in needed_by]

    @staticmethod
    def _report(progress: ScrubProgress) -> ScrubProgress:
        report = ScrubProgress(progress.blobs_total, progress.blobs_checked, progress.bytes_checked,
                               progress.blobs_quarantined, list(progress.problems),
                               progress.problem_count + len(progress.problems), progress.done)
        progress.problem_count = report.problem_count
        progress.problems.clear()
        return report


class PeriodicScrub(BackgroundLoop):
    """Runs a scrub every `interval` seconds (the first one an interval after the start) and logs what it
    finds: each problem on a line of its own, then a summary."""

    task_name = "registry-scrub"

    def __init__(self, integrity: Integrity, interval: float) -> None:
        super().__init__()
        self._integrity = integrity
        self._interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.scrub_once()

    async def scrub_once(self) -> ScrubProgress | None:
        started = time.monotonic()
        last: ScrubProgress | None = None
        try:
            async for progress in self._integrity.scrub():
                for problem in progress.problems:
                    log.warning("scrub: %s", problem.description)
                last = progress
        except Exception:  # noqa: BLE001 - a failed scrub must not stop the next one
            log.exception("the periodic blob scrub failed")
            return None
        if last is not None:
            log.log(logging.WARNING if last.problem_count else logging.INFO,
                    "scrub: %d blob(s), %d bytes hashed in %.1fs; %d quarantined now; %d problem(s)",
                    last.blobs_checked, last.bytes_checked, time.monotonic() - started, last.blobs_quarantined,
                    last.problem_count)
        return last
