"""The executor's ring of skill logs (services/executor/skilllogs.py): its bounds, per-version tails, and
followers that never slow a call down."""

from __future__ import annotations

import asyncio

from services.executor.skilllogs import ELLIPSIS, LINE_BYTES, SkillLogs, split_lines

SKILL = "com.example.logger"


def texts(lines: list) -> list[str]:  # type: ignore[type-arg]
    return [line.text for line in lines]


def test_stderr_is_cut_into_lines() -> None:
    assert split_lines(b"") == ([], False)
    assert split_lines(b"one\ntwo\r\n\nthree") == (["one", "two", "", "three"], False)
    assert split_lines(b"bad \xff byte\n") == (["bad \ufffd byte"], False)


def test_a_long_line_is_cut_to_one_kib() -> None:
    (line,), more = split_lines(b"x" * 5000 + b"\n")
    assert len(line.encode()) <= LINE_BYTES and line.endswith(ELLIPSIS) and not more
    # Never in the middle of a character.
    (line,), _ = split_lines("é".encode() * 2000)
    assert len(line.encode()) <= LINE_BYTES and set(line[:-1]) == {"é"}


def test_a_call_keeps_its_first_lines_and_marks_the_last_kept_one() -> None:
    logs = SkillLogs(lines_per_call=3)
    kept = logs.record(SKILL, "1.0.0", "sha256:d", b"1\n2\n3\n4\n5\n", request_id="r1", trace_id="t" * 32)
    assert kept == 3
    lines = logs.tail(SKILL, count=10)
    assert texts(lines) == ["1", "2", "3"]
    assert [line.truncated for line in lines] == [False, False, True]
    assert {(line.request_id, line.trace_id, line.digest, line.version) for line in lines} == {
        ("r1", "t" * 32, "sha256:d", "1.0.0")}
    # Stderr the executor cut at its limit is marked too, even within the line bound.
    logs.record(SKILL, "1.0.0", "sha256:d", b"a\nb", cut=True)
    assert [(line.text, line.truncated) for line in logs.tail(SKILL, count=2)] == [("a", False), ("b", True)]


def test_each_version_keeps_its_last_lines() -> None:
    logs = SkillLogs(lines_per_version=4)
    for call in range(5):
        logs.record(SKILL, "1.0.0", "sha256:a", f"old {call}\n".encode())
        logs.record(SKILL, "2.0.0", "sha256:b", f"new {call}\n".encode())
    assert texts(logs.tail(SKILL, "1.0.0", 100)) == ["old 1", "old 2", "old 3", "old 4"]
    assert texts(logs.tail(SKILL, "2.0.0", 2)) == ["new 3", "new 4"]
    # Every version: interleaved as the calls ended, the newest `count`.
    assert texts(logs.tail(SKILL, "", 3)) == ["new 3", "old 4", "new 4"]
    assert logs.tail(SKILL, "3.0.0", 10) == [] and logs.tail("com.example.other", "", 10) == []
    assert logs.tail(SKILL, "", 0) == []


def test_the_version_written_least_recently_goes_first() -> None:
    logs = SkillLogs(max_versions=2)
    logs.record(SKILL, "1.0.0", "sha256:a", b"one\n")
    logs.record(SKILL, "2.0.0", "sha256:b", b"two\n")
    logs.record(SKILL, "1.0.0", "sha256:a", b"one again\n")
    logs.record("com.example.other", "1.0.0", "sha256:c", b"other\n")
    assert logs.versions == [(SKILL, "1.0.0"), ("com.example.other", "1.0.0")]
    assert texts(logs.tail(SKILL, "", 10)) == ["one", "one again"]


def test_a_call_with_nothing_on_stderr_or_no_skill_keeps_nothing() -> None:
    logs = SkillLogs()
    assert logs.record(SKILL, "1.0.0", "sha256:a", b"") == 0
    assert logs.record("", "", "sha256:a", b"internal call\n") == 0
    assert logs.versions == []


async def test_a_follower_gets_its_versions_new_lines_after_the_tail() -> None:
    logs = SkillLogs()
    logs.record(SKILL, "1.0.0", "sha256:a", b"before\n")
    kept, everything = logs.open(SKILL, "", 10, follow=True)
    _, only_two = logs.open(SKILL, "2.0.0", 10, follow=True)
    assert texts(kept) == ["before"] and everything is not None and only_two is not None
    logs.record(SKILL, "1.0.0", "sha256:a", b"after 1\n")
    logs.record(SKILL, "2.0.0", "sha256:b", b"after 2\n")
    logs.record("com.example.other", "2.0.0", "sha256:c", b"not this skill\n")
    assert texts(await everything.next_batch() or []) == ["after 1", "after 2"]
    assert texts(await only_two.next_batch() or []) == ["after 2"]
    logs.unfollow(everything)
    logs.unfollow(only_two)
    assert logs.followers == 0


async def test_a_slow_follower_loses_lines_and_is_told_how_many() -> None:
    logs = SkillLogs(follow_queue=3)
    _, follower = logs.open(SKILL, "", 0, follow=True)
    assert follower is not None
    # Nobody reads: the calls go on (record never waits), and the follower keeps the first 3 lines.
    for call in range(10):
        logs.record(SKILL, "1.0.0", "sha256:a", f"line {call}\n".encode())
    assert follower.dropped == 7
    batch = await follower.next_batch()
    assert batch is not None
    assert texts(batch[:3]) == ["line 0", "line 1", "line 2"]
    assert batch[3].text.startswith("clawhub: 7 line(s) dropped") and not batch[3].request_id
    # Once read, it has room again, and the gap stays where it was.
    logs.record(SKILL, "1.0.0", "sha256:a", b"line 10\n")
    assert texts(await follower.next_batch() or []) == ["line 10"]
    # Every line is still in the ring itself.
    assert len(logs.tail(SKILL, "", 100)) == 11


async def test_closing_ends_every_follower() -> None:
    logs = SkillLogs()
    _, follower = logs.open(SKILL, "", 0, follow=True)
    assert follower is not None
    waiting = asyncio.create_task(follower.next_batch())
    await asyncio.sleep(0)
    await logs.close()
    assert await asyncio.wait_for(waiting, 5) is None
    _, late = logs.open(SKILL, "", 0, follow=True)
    assert late is not None and await late.next_batch() is None
