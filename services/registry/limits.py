"""What one publish or download stream may hold, so strangers cannot exhaust the registry: upload and download
slots per caller and in all, a file-descriptor budget, and an idle timeout and a cap on the duration of each
upload.

Before these, 500 streams that sent their metadata and stalled held 1,000 descriptors and temporary files for
ever; at a 1,024-descriptor limit every other publish then failed INTERNAL "Too many open files". Now a stream
holds no descriptor until its bytes outgrow a buffer (see blobs.Upload), at most one after that, a caller
holds at most `max_per_caller` upload slots and everyone together `max_total`, a slot is refused while the
process is near its descriptor limit, and a stream that sends nothing for `idle_timeout` seconds is dropped.

Downloads: 260 `DownloadBlob` streams that read one chunk and stopped held 234 descriptors (each kept its file
open until the client had read it all) and ran a 256-descriptor registry out of them, so publishes failed and
other downloads hit EMFILE. Now a download holds no descriptor between chunks (blobs.BlobReader), the chunks
being read at any moment hold a few (blobs.MAX_CONCURRENT_READS, inside the reserve), and a caller holds at
most `max_per_caller` download slots and everyone together `max_total`.

A stalled download keeps its slot until its client reads on, goes away or reaches its deadline; there is no
idle timeout, on purpose. gRPC's Python server cannot end a call whose response write is still pending: a
handler that gives up returns, but the call and the message it was writing stay in gRPC's core until the
client acts, so a timeout would free the slot and not the memory, and a client stalling stream after stream
would grow the registry without bound. Kept, the slot bounds it: a stalled download holds the one chunk being
written (blobs.DOWNLOAD_CHUNK_BYTES; nothing is read ahead), about 320 KB of memory in all, and no descriptor.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc

from services.registry.blobs import MAX_CONCURRENT_READS
from services.registry.trust import Caller, Context
from services.runtime.auth import current_principal
from services.runtime.channels import PEER_METADATA, peer_host
from services.runtime.errors import RateLimitedLog, Reason, ServiceError
from services.runtime.ratelimit.interceptor import principal_key

log = logging.getLogger("clawhub.registry")

MAX_CALLER_CHARS = 256
# Descriptors kept out of the uploads' reach, for connections, reads (downloads among them: at most
# blobs.MAX_CONCURRENT_READS at once), sqlite and the runtime: an eighth of the limit, at least 32.
MIN_DESCRIPTOR_RESERVE = 32
RETRY_AFTER_SECONDS = 2.0
DESCRIPTOR_RETRY_AFTER_SECONDS = 5.0
_FD_DIRS = ("/proc/self/fd", "/dev/fd")


def caller_key(context: Context, caller: Caller) -> str:
    """Who an upload or a download is counted against: the publisher (or the admin) whose token authenticated the call,
    or the principal users' authentication established (an API key by its id, a JWT by its subject: the same
    names the rate limits use); without credentials, the client the gateway relays for (`x-clawhub-peer`), else
    the connection's peer address without its port (a client must not get a fresh bucket per connection)."""
    if caller.admin:
        return "admin"
    if caller.publisher:
        return f"publisher:{caller.publisher}"
    principal = current_principal()
    if principal is not None and not principal.anonymous:
        return principal_key(principal.kind, principal.subject or principal.name)[:MAX_CALLER_CHARS]
    if context is None:
        return "in-process"
    for key, value in context.invocation_metadata() or ():
        if key == PEER_METADATA:
            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
            return f"peer:{text.strip()[:MAX_CALLER_CHARS]}"
    return f"peer:{peer_host(str(context.peer() or ''))[:MAX_CALLER_CHARS]}"


def _count_open_descriptors() -> int | None:
    for directory in _FD_DIRS:
        try:
            # The listing's own descriptor is among them.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


@dataclass
class DescriptorBudget:
    """How many more file descriptors the uploads may take: the soft RLIMIT_NOFILE minus a reserve minus what
    the process holds now. `limit` None (no limit known, or no way to count) turns the check off."""

    limit: int | None
    reserve: int
    count_open: Callable[[], int | None] = _count_open_descriptors

    @classmethod
    def from_process(cls) -> DescriptorBudget:
        """The budget of this process, after raising its soft descriptor limit to the hard one where allowed
        (a default soft limit of 1,024 is common and low for a server; the hard limit is the operator's)."""
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):
            return cls(None, 0)
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft < hard):
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        if soft == resource.RLIM_INFINITY:
            return cls(None, 0)
        budget = cls(soft, max(MIN_DESCRIPTOR_RESERVE, soft // 8))
        if budget.count_open() is None:
            log.warning("cannot count this process's open file descriptors here: the descriptor budget is off")
            return cls(None, 0)
        log.info("file descriptors: limit %d (hard %s), %d kept in reserve; uploads are refused beyond the rest",
                 soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, budget.reserve)
        return budget

    def headroom(self) -> int | None:
        """Descriptors left before the reserve; None when unbounded."""
        if self.limit is None:
            return None
        count = self.count_open()
        return None if count is None else self.limit - self.reserve - count

    def free(self) -> int | None:
        """Descriptors left before the limit itself (the reserve included); None when unbounded."""
        headroom = self.headroom()
        return None if headroom is None else headroom + self.reserve


@dataclass(frozen=True)
class UploadLimits:
    """The bounds on uploads (see Settings for their variables)."""

    max_total: int = 64
    max_per_caller: int = 32
    idle_timeout_seconds: float = 30.0
    max_duration_seconds: float = 600.0


class _Slots:
    """Slots held per caller and in all, checked and taken without awaiting (two streams cannot both take the
    last one)."""

    def __init__(self) -> None:
        self.by_caller: collections.Counter[str] = collections.Counter()
        self.total = 0

    @contextlib.contextmanager
    def held(self, caller: str) -> Iterator[None]:
        self.by_caller[caller] += 1
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1
            self.by_caller[caller] -= 1
            if not self.by_caller[caller]:
                del self.by_caller[caller]


class _Bounds(Protocol):
    @property
    def max_total(self) -> int: ...

    @property
    def max_per_caller(self) -> int: ...


LimitsT = TypeVar("LimitsT", bound=_Bounds)


class _Gate(Generic[LimitsT]):
    """Admission of one kind of stream: a slot per stream, at most `max_per_caller` per caller and `max_total`
    in all (`limits` has both), and only while `_descriptors_short` finds the descriptor budget has room.
    Checked and taken without awaiting, so two streams cannot both take the last slot."""

    kind = "stream"
    reason = Reason.INTERNAL
    total_variable = per_caller_variable = ""

    def __init__(self, limits: LimitsT, budget: DescriptorBudget | None = None) -> None:
        self.limits = limits
        self._budget = budget or DescriptorBudget(None, 0)
        self._slots = _Slots()
        # Under a flood of refused streams the log gets a few lines, not one per stream.
        self._refusals_log = RateLimitedLog(log)

    @property
    def active(self) -> int:
        return self._slots.total

    def _descriptors_short(self) -> str | None:
        """Why the budget cannot take this stream (a log line), or None."""
        return None

    @contextlib.contextmanager
    def admit(self, caller: str) -> Iterator[None]:
        """Hold a slot for `caller` for the block; RESOURCE_EXHAUSTED with a RetryInfo when none is free."""
        kind, limits = self.kind, self.limits
        if self._slots.by_caller[caller] >= limits.max_per_caller:
            self._refusals_log.warning("refusing a %s of %s: it has %d in flight", kind, caller, limits.max_per_caller)
            raise self._too_many("per_caller", limits.max_per_caller,
                                 f"this caller already has {limits.max_per_caller} {kind}s in flight, the most the "
                                 f"registry allows one caller ({self.per_caller_variable})")
        if self._slots.total >= limits.max_total:
            self._refusals_log.warning("refusing a %s of %s: %d in flight in all", kind, caller, limits.max_total)
            raise self._too_many("total", limits.max_total,
                                 f"the registry has {limits.max_total} {kind}s in flight, the most it allows "
                                 f"({self.total_variable})")
        if (short := self._descriptors_short()) is not None:
            self._refusals_log.warning("refusing a %s: %s (limit %s)", kind, short, self._budget.limit)
            raise out_of_descriptors(self._budget.limit)
        with self._slots.held(caller):
            yield

    def _too_many(self, scope: str, limit: int, message: str) -> ServiceError:
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, self.reason, f"{message}; retry later",
                            metadata={"scope": scope, f"max_{self.kind}s": str(limit)},
                            retry_after_seconds=RETRY_AFTER_SECONDS)


class UploadGate(_Gate[UploadLimits]):
    """Publish streams; admitted only while the descriptor budget has room for one descriptor per admitted
    upload."""

    kind = "upload"
    reason = Reason.TOO_MANY_UPLOADS
    total_variable = "CLAWHUB_REGISTRY_MAX_UPLOADS"
    per_caller_variable = "CLAWHUB_REGISTRY_MAX_UPLOADS_PER_CALLER"

    def _descriptors_short(self) -> str | None:
        # Every admitted upload may come to hold one descriptor (those that do are counted twice: on the safe
        # side), and this one is about to.
        headroom = self._budget.headroom()
        if headroom is not None and headroom < self._slots.total + 1:
            return f"{self._slots.total} uploads in flight and {headroom} file descriptors left before the reserve"
        return None


@dataclass(frozen=True)
class DownloadLimits:
    """The bounds on downloads (see Settings for their variables). Generous: the executors of one host (one
    caller) fetching the modules, dependencies and bundles of many skills at once stay far below them (and
    their fetches retry a refusal after its RetryInfo), while a stranger stalling streams holds at most
    `max_per_caller` of them."""

    max_total: int = 512
    max_per_caller: int = 256


class DownloadGate(_Gate[DownloadLimits]):
    """DownloadBlob streams. A download holds no descriptor of its own between chunks (the chunks read at any
    moment come out of the descriptor reserve), so it is refused for descriptors only when the process is
    within blobs.MAX_CONCURRENT_READS descriptors of its very limit."""

    kind = "download"
    reason = Reason.TOO_MANY_DOWNLOADS
    total_variable = "CLAWHUB_REGISTRY_MAX_DOWNLOADS"
    per_caller_variable = "CLAWHUB_REGISTRY_MAX_DOWNLOADS_PER_CALLER"

    def __init__(self, limits: DownloadLimits, budget: DescriptorBudget | None = None,
                 read_descriptors: int = MAX_CONCURRENT_READS) -> None:
        super().__init__(limits, budget)
        self._read_descriptors = read_descriptors

    def _descriptors_short(self) -> str | None:
        free = self._budget.free()
        if free is not None and free < self._read_descriptors:
            return f"{free} file descriptors left"
        return None


class UploadTimeout(ServiceError):
    """DEADLINE_EXCEEDED (UPLOAD_TIMEOUT): a publish stream went quiet for the idle timeout, or took longer
    than the cap on an upload's duration."""

    def __init__(self, limits: UploadLimits, *, total: bool) -> None:
        if total:
            message = (f"the upload took longer than {limits.max_duration_seconds:g} s, the most the registry "
                       "allows for one (CLAWHUB_REGISTRY_UPLOAD_MAX_DURATION), and was dropped")
            metadata = {"timeout": "total", "seconds": f"{limits.max_duration_seconds:g}"}
        else:
            message = (f"no message of the publish stream arrived for {limits.idle_timeout_seconds:g} s "
                       "(CLAWHUB_REGISTRY_UPLOAD_IDLE_TIMEOUT), so the upload was dropped; send the stream "
                       "without pausing")
            metadata = {"timeout": "idle", "seconds": f"{limits.idle_timeout_seconds:g}"}
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.UPLOAD_TIMEOUT, message, metadata=metadata)


def out_of_descriptors(limit: int | None = None) -> ServiceError:
    """RESOURCE_EXHAUSTED (DESCRIPTOR_BUDGET_EXHAUSTED): the budget is spent, or an open failed with EMFILE or
    ENFILE anyway (another part of the process, or the whole system, took them): a reason to retry, not a bug."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.DESCRIPTOR_BUDGET_EXHAUSTED,
        "the registry is close to its limit of open files and takes no new upload or download now; retry later",
        metadata={"limit": str(limit)} if limit is not None else {}, retry_after_seconds=DESCRIPTOR_RETRY_AFTER_SECONDS)


def is_out_of_descriptors(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)
