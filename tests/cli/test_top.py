"""`clawhub top`'s rendering: every line within the width, names cut in the middle, numbers readable."""

from __future__ import annotations

import pytest
from clawhub.common.v1 import observability_pb2 as obs
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb

from services.cli import top

LONG = "com.acme.very-long-organisation-name.image-processing-pipeline-resize"


def response() -> gateway_pb.GetSkillStatsResponse:
    return gateway_pb.GetSkillStatsResponse(
        skills=[
            obs.SkillStats(skill="com.example.echo-memory", calls=1200, calls_per_second=20.0, p50_ms=0.42,
                           p99_ms=2.3, errors=3, errors_by_reason={"OUTPUT_LIMIT_EXCEEDED": 3}, window_seconds=60,
                           active_version="1.0.0", deployment_state="ACTIVE"),
            obs.SkillStats(skill=LONG, calls=10, calls_per_second=0.17, p50_ms=120, p99_ms=1500, errors=5,
                           errors_by_reason={"SKILL_TIMEOUT": 4, "SKILL_TRAPPED": 1}, window_seconds=60,
                           active_version="2.0.0-rc.1+build.5", deployment_state="ROLLING_BACK"),
            obs.SkillStats(skill="com.example.idle", window_seconds=60, active_version="1.0.0",
                           deployment_state="ACTIVE"),
        ],
        executors=[obs.ExecutorLoad(executor="executor-1", reachable=True, busy_threads=1, threads=4, queued=2,
                                    queue_capacity=64),
                   obs.ExecutorLoad(executor="executor-2")])


@pytest.mark.parametrize("width", [30, 60, 80, 132, 200])
def test_no_line_is_wider_than_the_terminal(width: int) -> None:
    lines = top.render(response(), width=width, gateway="127.0.0.1:50051", clock="03:12:44")
    assert all(len(line) <= width for line in lines), "\n".join(lines)


def test_a_row_per_skill_with_its_numbers() -> None:
    lines = top.render(response(), width=80, gateway="127.0.0.1:50051", clock="03:12:44")
    assert lines[:3] == ["clawhub top  127.0.0.1:50051  last 60s  03:12:44",
                         "executor-1  threads 1/4 busy  queue 2/64", "executor-2  unreachable"]
    header = lines[4].split()
    assert header == ["SKILL", "VERSION", "STATE", "CALLS/S", "P50", "P99", "ERR%", "TOP", "ERROR"]
    echo, long, idle = (line.split() for line in lines[5:8])
    assert echo[1:7] == ["1.0.0", "ACTIVE", "20.0", "420µs", "2.3ms", "0.2%"]
    assert echo[7].startswith("OUTPUT_LIMIT")
    head, cut, tail = long[0].partition("…")
    assert cut and LONG.startswith(head) and LONG.endswith(tail)
    assert long[2:7] == ["ROLLING_BACK", "0.2", "120ms", "1.5s", "50.0%"]
    assert idle[1:] == ["1.0.0", "ACTIVE", "0", "-", "-", "-"]


def test_whole_names_when_there_is_room_and_the_height_limit() -> None:
    wide = top.render(response(), width=200, gateway="g")
    assert any(line.startswith(LONG + " ") for line in wide)
    assert any("SKILL_TIMEOUT +1" in line for line in wide)
    short = top.render(response(), width=80, gateway="g", height=7)
    assert len(short) == 7 and short[-1].startswith("… 2 more skill(s)")


def test_nothing_to_show() -> None:
    lines = top.render(gateway_pb.GetSkillStatsResponse(), width=80, gateway="g")
    assert lines == ["clawhub top  g", "no executors", "", "no skills deployed and no calls in the window"]


def test_server_text_cannot_move_the_cursor() -> None:
    evil = gateway_pb.GetSkillStatsResponse(skills=[obs.SkillStats(
        skill="com.example.x", calls=1, errors=1, errors_by_reason={"\x1b[2JBAD": 1})])
    assert not any("\x1b" in line for line in top.render(evil, width=80, gateway="g"))
