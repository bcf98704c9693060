"""Skill logs: what skills wrote to stderr in their recent calls, kept on each executor in a bounded ring per
skill version, and followed live (`clawhub logs SKILL --follow`; docs/logs.md).

A successful call's stderr used to be thrown away (a failed one's end still travels in its error, as
`stderr_tail`). Now every call's stderr is cut into lines and kept, each line with the call's time, version,
digest, request id and trace id, so an operator can read what a skill said about the calls it served.

Everything is bounded, since a skill is untrusted and its calls are many:
- a line is at most LINE_BYTES (1 KiB; a longer one is cut and ends with `…`);
- a call keeps at most its first LINES_PER_CALL lines; the last kept one is marked `truncated` when the call
  wrote more (or more than the executor's stderr limit, CLAWHUB_EXECUTOR_MAX_STDERR);
- a version keeps its last LINES_PER_VERSION lines (a ring: the oldest go first);
- at most MAX_VERSIONS versions are kept; the one written least recently goes first.
So the whole ring holds at most MAX_VERSIONS × LINES_PER_VERSION × ~1 KiB (64 MiB in the worst case, when
every line of every version is as long as it can be; a few MiB for skills that log like people do).

A follower gets each new line of its skill (and version, when it asks for one) through a bounded queue. The
calls never wait for followers: when a follower's queue is full (it reads more slowly than the skills write),
new lines for it are dropped and counted, and it reads a line saying how many in their place.

Every method runs on the event loop's thread (the servicer records a call once its run returned there), so
the ring needs no lock, and a tail taken together with a new follower (`open`) misses and repeats nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from clawhub.common.v1 import observability_pb2

LINE_BYTES = 1024
LINES_PER_CALL = 100
LINES_PER_VERSION = 1000
MAX_VERSIONS = 64
# Lines a follower may have waiting before new ones are dropped for it.
FOLLOW_QUEUE_LINES = 1000
ELLIPSIS = "…"

Line = observability_pb2.SkillLogLine


def split_lines(stderr: bytes, *, max_lines: int = LINES_PER_CALL, line_bytes: int = LINE_BYTES,
                cut: bool = False) -> tuple[list[str], bool]:
    """A call's stderr as (lines kept, whether it wrote more than those). Lines end at `\\n` (a `\\r` before it
    goes too); a last line without one counts; invalid UTF-8 is replaced; a line longer than `line_bytes`
    (encoded) is cut to fit, ending with `…`. `cut`: the stderr was cut already (the executor's limit)."""
    if not stderr:
        return [], cut
    raw = stderr.split(b"\n")
    if raw[-1] == b"":
        raw.pop()  # the newline ending the last line
    more = cut or len(raw) > max_lines
    lines = [_fit(piece.removesuffix(b"\r").decode("utf-8", "replace"), line_bytes) for piece in raw[:max_lines]]
    return lines, more


def _fit(text: str, line_bytes: int) -> str:
    encoded = text.encode()
    if len(encoded) <= line_bytes:
        return text
    room = max(0, line_bytes - len(ELLIPSIS.encode()))
    return encoded[:room].decode("utf-8", "ignore") + ELLIPSIS


@dataclass
class _Dropped:
    """Where a follower's queue lost lines, and how many."""

    count: int = 1


@dataclass(eq=False)
class Follower:
    """One `--follow` stream: the new lines of `skill` (of `version`, or every version when empty)."""

    skill: str
    version: str
    capacity: int = FOLLOW_QUEUE_LINES
    dropped: int = 0
    closed: bool = False
    _items: deque[Line | _Dropped] = field(default_factory=deque)
    _queued: int = 0
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, line: Line) -> None:
        """Queue `line`, or count it as dropped when the queue is full: never waits."""
        if self.closed:
            return
        if self._queued >= self.capacity:
            self.dropped += 1
            last = self._items[-1] if self._items else None
            if isinstance(last, _Dropped):
                last.count += 1
            else:
                self._items.append(_Dropped())
        else:
            self._items.append(line)
            self._queued += 1
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next_batch(self, max_lines: int = 256) -> list[Line] | None:
        """The lines queued now (at least one; waits for it), in order, with a notice line where lines were
        dropped; None once the follower is closed (the executor is stopping)."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.closed:
            return None
        batch: list[Line] = []
        while self._items and len(batch) < max_lines:
            item = self._items.popleft()
            if isinstance(item, _Dropped):
                batch.append(self._notice(item.count))
            else:
                self._queued -= 1
                batch.append(item)
        return batch

    def _notice(self, count: int) -> Line:
        notice = Line(skill=self.skill, version=self.version,
                      text=f"clawhub: {count} line(s) dropped here: this follow read more slowly than the skill "
                           "wrote")
        notice.time.FromNanoseconds(time.time_ns())
        return notice


class SkillLogs:
    """The ring of every skill version's recent stderr lines on this executor, and its followers."""

    def __init__(self, *, lines_per_version: int = LINES_PER_VERSION, max_versions: int = MAX_VERSIONS,
                 lines_per_call: int = LINES_PER_CALL, line_bytes: int = LINE_BYTES,
                 follow_queue: int = FOLLOW_QUEUE_LINES) -> None:
        self._lines_per_version = lines_per_version
        self._max_versions = max_versions
        self._lines_per_call = lines_per_call
        self._line_bytes = line_bytes
        self._follow_queue = follow_queue
        # (skill, version) → its lines with their sequence numbers, least recently written first.
        self._rings: OrderedDict[tuple[str, str], deque[tuple[int, Line]]] = OrderedDict()
        self._followers: set[Follower] = set()
        self._seq = 0
        self._closed = False

    def record(self, skill: str, version: str, digest: str, stderr: bytes, *, request_id: str = "",
               trace_id: str = "", cut: bool = False, time_ns: int | None = None) -> int:
        """Keep a call's stderr (at its end) and hand its lines to the followers; returns the lines kept."""
        texts, more = split_lines(stderr, max_lines=self._lines_per_call, line_bytes=self._line_bytes, cut=cut)
        if not texts or not skill:
            return 0
        ended = time.time_ns() if time_ns is None else time_ns
        key = (skill, version)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = deque(maxlen=self._lines_per_version)
            while len(self._rings) > self._max_versions:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(key)
        followers = [f for f in self._followers if f.skill == skill and (not f.version or f.version == version)]
        for index, text in enumerate(texts):
            line = Line(skill=skill, version=version, digest=digest, request_id=request_id, trace_id=trace_id,
                        text=text, truncated=more and index == len(texts) - 1)
            line.time.FromNanoseconds(ended)
            self._seq += 1
            ring.append((self._seq, line))
            for follower in followers:
                follower.offer(line)
        return len(texts)

    def tail(self, skill: str, version: str = "", count: int = 100) -> list[Line]:
        """The newest `count` lines of `skill` (of `version` only, when given), oldest first."""
        if count <= 0:
            return []
        if version:
            ring = self._rings.get((skill, version), ())
            return [line for _, line in list(ring)[-count:]]
        newest: list[tuple[int, Line]] = []
        for (name, _), ring in self._rings.items():
            if name == skill:
                newest += list(ring)[-count:]
        newest.sort(key=lambda entry: entry[0])
        return [line for _, line in newest[-count:]]

    def open(self, skill: str, version: str, count: int, follow: bool) -> tuple[list[Line], Follower | None]:
        """The tail and, when `follow`, a follower of every line after it (`unfollow` it when done)."""
        lines = self.tail(skill, version, count)
        if not follow:
            return lines, None
        follower = Follower(skill, version, capacity=self._follow_queue)
        if self._closed:
            follower.close()
        self._followers.add(follower)
        return lines, follower

    def unfollow(self, follower: Follower) -> None:
        self._followers.discard(follower)

    async def close(self) -> None:
        """End every follow (the executor is stopping); later ones end at once."""
        self._closed = True
        for follower in self._followers:
            follower.close()

    @property
    def versions(self) -> list[tuple[str, str]]:
        """(skill, version) of every ring kept, least recently written first."""
        return list(self._rings)

    @property
    def followers(self) -> int:
        return len(self._followers)
