"""`clawhub deploy --watch` and the rollout flags, against a scripted DeployerService on a real gRPC server."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as pb_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import duration_pb2

from services.cli import watch
from services.cli.main import EXIT_UNREACHABLE, RELEASE_FAILED_EXIT, main, printable

K = pb.DeploymentEventKind
DEPLOYING, ACTIVE, ROLLING_BACK, FAILED = (release_pb2.RELEASE_STATE_DEPLOYING, release_pb2.RELEASE_STATE_ACTIVE,
                                           release_pb2.RELEASE_STATE_ROLLING_BACK, release_pb2.RELEASE_STATE_FAILED)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(value * 1e9))
    return d


def deployment(state: int, reason: str = "", **fields: Any) -> pb.Deployment:
    d = pb.Deployment(id="d1", skill="com.example.x", version="2.0.0", state=state, **fields)
    if reason:
        d.history.add(from_state=DEPLOYING, to_state=state, reason=reason)
    return d


def response(state: int, kind: int = 0, message: str = "", history: str = "", **event: Any,
             ) -> pb.WatchDeploymentResponse:
    r = pb.WatchDeploymentResponse(deployment=deployment(state, history), message=message)
    if kind:
        r.event.CopyFrom(pb.DeploymentEvent(kind=kind, **event))  # type: ignore[arg-type]
    return r


def transition(from_state: int, to_state: int, reason: str) -> pb.WatchDeploymentResponse:
    r = response(to_state, K.DEPLOYMENT_EVENT_KIND_STATE_CHANGED, history=reason)
    r.event.transition.CopyFrom(release_pb2.StateTransition(from_state=from_state, to_state=to_state, reason=reason))  # type: ignore[arg-type]
    return r


def stats(requests: int, success: float, p99_ms: float) -> pb.VersionStats:
    return pb.VersionStats(requests=requests, failures=round(requests * (1 - success)), success_rate=success,
                           p99_latency=seconds(p99_ms / 1000))


CANARY_OK = [
    response(DEPLOYING, message="currently Deploying"),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_PRELOADED, executor="127.0.0.1:1"),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_SMOKE_PASSED, executor="127.0.0.1:1", smoke_examples=2),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED, generation=7, weight=10),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ACKED, generation=7, acknowledged=1, dispatchers=1),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_CANARY_STEP, step=1, steps=2, weight=10, window=seconds(1)),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS, weight=10, window=seconds(1),
             elapsed=seconds(0.5), stats=stats(40, 1.0, 12)),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_CANARY_STEP, step=2, steps=2, weight=100, window=seconds(1)),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PASSED, stats=stats(200, 1.0, 9)),
    transition(DEPLOYING, ACTIVE, "canary passed"),
]
BREACH = "success rate 0.90 < 0.99 over 40 requests"
BREACH_EVENT = f"analysis breach: {BREACH}"  # the deployer's wording: the prefix is not repeated
BAKE_BREACH = [
    response(DEPLOYING, message="currently Deploying"),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED, window=seconds(30)),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH, reason=BREACH_EVENT, stats=stats(40, 0.9, 20)),
    response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED, reason=BREACH),
    transition(DEPLOYING, ROLLING_BACK, f"deploy failed: {BREACH}"),
    transition(ROLLING_BACK, FAILED, f"{BREACH}; previous version 1.0.0 restored at route generation 9"),
]


@dataclass
class FakeDeployer(pb_grpc.DeployerServiceServicer):
    """Records CreateDeployment requests and plays a scripted WatchDeployment stream."""

    script: list[pb.WatchDeploymentResponse]
    # After the script, end the stream with this status (None: end it cleanly), on the first `aborts` watches.
    abort: grpc.StatusCode | None = None
    aborts: int = 1_000
    watches: int = 0
    created: list[pb.CreateDeploymentRequest] = field(default_factory=list)
    listed: list[pb.Deployment] = field(default_factory=list)
    # Served beside it on the same port, as the gateway serves both.
    registry: FakeRegistry = field(default_factory=lambda: FakeRegistry())

    def CreateDeployment(self, request: pb.CreateDeploymentRequest, context: Any) -> pb.CreateDeploymentResponse:
        self.created.append(request)
        created = deployment(DEPLOYING)
        if request.allow_unset_env:
            created.unset_env.append("API_TOKEN")
        if request.HasField("canary"):
            created.canary.CopyFrom(request.canary)
        else:
            created.blue_green.bake.CopyFrom(request.blue_green.bake if request.HasField("blue_green") else seconds(10))
        return pb.CreateDeploymentResponse(deployment=created)

    def ListDeployments(self, request: pb.ListDeploymentsRequest, context: Any) -> pb.ListDeploymentsResponse:
        return pb.ListDeploymentsResponse(deployments=self.listed)

    def GetDeployment(self, request: pb.GetDeploymentRequest, context: Any) -> pb.GetDeploymentResponse:
        return pb.GetDeploymentResponse(deployment=deployment(DEPLOYING))

    def WatchDeployment(self, request: pb.WatchDeploymentRequest, context: Any) -> Iterator[pb.WatchDeploymentResponse]:
        self.watches += 1
        if self.abort is not None and self.watches <= self.aborts:
            yield from self.script[:3]
            context.abort(self.abort, "deployer going away")
        yield from self.script


@dataclass
class FakeRegistry(registry_grpc.RegistryServiceServicer):
    skills: list[registry_pb.Skill] = field(
        default_factory=lambda: [registry_pb.Skill(name="com.example.x", latest_version="2.0.0")])
    versions: list[registry_pb.SkillVersion] = field(default_factory=list)

    def ListSkills(self, request: registry_pb.ListSkillsRequest, context: Any) -> registry_pb.ListSkillsResponse:
        return registry_pb.ListSkillsResponse(skills=self.skills)

    def GetSkill(self, request: registry_pb.GetSkillRequest, context: Any) -> registry_pb.GetSkillResponse:
        return registry_pb.GetSkillResponse(skill=next(s for s in self.skills if s.name == request.name))

    def ListSkillVersions(self, request: registry_pb.ListSkillVersionsRequest, context: Any,
                          ) -> registry_pb.ListSkillVersionsResponse:
        return registry_pb.ListSkillVersionsResponse(skill_versions=self.versions[:request.page_size or 50])


@pytest.fixture
def fake() -> Iterator[tuple[FakeDeployer, str]]:
    servicer = FakeDeployer(script=[])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DeployerServiceServicer_to_server(servicer, server)
    registry_grpc.add_RegistryServiceServicer_to_server(servicer.registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


# Flag parsing.

@pytest.mark.parametrize(("text", "expected"), [("300ms", 0.3), ("10s", 10.0), ("1.5s", 1.5), ("2m", 120.0),
                                                ("1h", 3600.0), (" 250ms ", 0.25)])
def test_durations_take_a_unit(text: str, expected: float) -> None:
    assert watch.parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "problem"), [("10", "add a unit"), ("ten s", "not a duration"),
                                               ("-1s", "not a duration"), ("0s", "more than 0"),
                                               ("5 parsecs", "not a duration"),
                                               ("\u0665s", "not a duration")])
def test_bad_durations_are_explained(text: str, problem: str) -> None:
    with pytest.raises(Exception, match=problem):
        watch.parse_duration(text)


def test_zero_windows_are_allowed_where_they_mean_skip() -> None:
    assert watch.parse_window("0s") == 0.0 and watch.parse_window("0") == 0.0
    assert watch.parse_window("30s") == 30.0


def test_canary_weights() -> None:
    assert watch.parse_weights("5,25,50,100") == [5, 25, 50, 100]
    assert watch.parse_weights("10,50") == [10, 50, 100]
    for bad, problem in (("50,25", "must increase"), ("0,10", "from 1 to 100"), ("5,,10", "percentages"),
                         ("10,150", "from 1 to 100"), ("10,10", "must increase")):
        with pytest.raises(Exception, match=problem):
            watch.parse_weights(bad)


def test_success_rates_and_counts() -> None:
    assert watch.parse_rate("0.99") == 0.99 and watch.parse_rate("99.5%") == pytest.approx(0.995)
    for bad in ("1.5", "0", "lots", "-1%"):
        with pytest.raises(Exception, match="rate"):
            watch.parse_rate(bad)
    assert watch.parse_count("20") == 20
    with pytest.raises(Exception, match="from 1"):
        watch.parse_count("0")


def test_bad_flag_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["deploy", "com.example.x@1.0.0", "--max-p99", "250", "--gateway", "127.0.0.1:9"])
    assert caught.value.code == 2
    assert "add a unit" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "problem"), [(["--step", "1s"], "give --canary too"),
                                                (["--canary", "10,100", "--bake", "5s"], "use --step"),
                                                (["--no-wait", "--watch"], "nothing to --watch")])
def test_contradictory_flags_are_refused_before_any_call(flags: list[str], problem: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "com.example.x@1.0.0", *flags, "--gateway", "127.0.0.1:9"]) == 2
    assert problem in capsys.readouterr().err


# Deploying against a real server.

def test_canary_flags_reach_the_request_and_the_plain_display_shows_each_step(
        fake: tuple[FakeDeployer, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "PLAIN_PROGRESS_SECONDS", 0.0)
    servicer, address = fake
    servicer.script = CANARY_OK
    code = main(["deploy", "com.example.x@2.0.0", "--canary", "10,100", "--step", "1s", "--min-success-rate", "99%",
                 "--max-p99", "250ms", "--min-requests", "5", "--gateway", address])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == "com.example.x@2.0.0 is active"
    request = servicer.created[0]
    assert list(request.canary.weights) == [10, 100] and request.canary.step.ToMilliseconds() == 1000
    assert request.analysis.min_success_rate == 0.99 and request.analysis.min_requests == 5
    assert request.analysis.max_p99_latency.ToMilliseconds() == 250
    assert "canary 10→100% every 1s" in err
    lines = [line for line in err.splitlines() if line.startswith("  [")]
    # One line per event (not a terminal; routine ones unthrottled here), in order, no escape sequences.
    assert len(lines) == len(CANARY_OK)
    assert "\x1b" not in err
    assert "canary step 1/2: 10% of traffic to 2.0.0 for 1s" in err
    assert "2.0.0 at 10%, 500ms of 1s: 40 calls, 100.0% ok, p99 12ms" in err
    assert "acknowledged by 1/1 dispatchers" in err and "2 smoke example(s) passed" in err
    assert re.search(r"\] ACTIVE\s+DEPLOYING → ACTIVE: canary passed", err)


def test_plain_output_keeps_few_progress_lines(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    display, status = watch.PlainDisplay(out, printable), watch.Status()
    progress = CANARY_OK[6]
    for i in range(40):  # 4 s of progress events every 100 ms
        display.event(i * 0.1, status, *watch.describe(progress, status, 0.0))
    display.event(4.0, status, *watch.describe(CANARY_OK[7], status, 0.0))
    lines = out.getvalue().splitlines()
    # One progress line in 4 s (every 2 s without another line), then the next step.
    assert len(lines) == 2 and "40 calls" in lines[0] and "canary step 2/2" in lines[1]


def test_blue_green_is_the_default_and_bake_goes_out(fake: tuple[FakeDeployer, str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.script = [transition(DEPLOYING, ACTIVE, "baked")]
    assert main(["deploy", "com.example.x@2.0.0", "--bake", "0s", "--gateway", address]) == 0
    request = servicer.created[0]
    assert request.WhichOneof("strategy") == "blue_green" and request.blue_green.bake.ToNanoseconds() == 0
    assert not request.HasField("analysis")
    assert "blue-green, no bake" in capsys.readouterr().err


def test_a_rolled_back_release_exits_non_zero_with_the_reason(fake: tuple[FakeDeployer, str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.script = BAKE_BREACH
    code = main(["deploy", "com.example.x@2.0.0", "--watch", "--gateway", address])
    out, err = capsys.readouterr()
    assert code == RELEASE_FAILED_EXIT and out == ""
    assert f"analysis breach: {BREACH} (40 calls, 90.0% ok, p99 20ms)" in err
    assert f"rolling back: {BREACH}" in err
    assert err.rstrip().splitlines()[-1] == (
        f"error: deployment of com.example.x@2.0.0 ended FAILED: {BREACH}; previous version 1.0.0 restored at "
        "route generation 9")


def test_a_stream_that_ends_early_is_not_success(fake: tuple[FakeDeployer, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.script = [response(DEPLOYING, message="currently Deploying")]
    assert main(["watch", "d1", "--gateway", address]) == 1
    assert "follow it again with: clawhub watch d1" in capsys.readouterr().err


def test_a_broken_watch_reconnects(fake: tuple[FakeDeployer, str], capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "WATCH_BACKOFF", (0.0, 0.0))
    servicer, address = fake
    servicer.script, servicer.abort, servicer.aborts = CANARY_OK, grpc.StatusCode.UNAVAILABLE, 2
    assert main(["deploy", "com.example.x@2.0.0", "--gateway", address]) == 0
    err = capsys.readouterr().err
    assert err.count("the watch broke (deployer going away); reconnecting") == 2 and servicer.watches == 3


def test_a_watch_that_stays_broken_says_how_to_follow_again(fake: tuple[FakeDeployer, str],
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "WATCH_BACKOFF", (0.0, 0.0))
    servicer, address = fake
    monkeypatch.delenv("CLAWHUB_GATEWAY", raising=False)
    servicer.script, servicer.abort = CANARY_OK, grpc.StatusCode.UNAVAILABLE
    assert main(["deploy", "com.example.x@2.0.0", "--gateway", address]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    # The command to run next reaches the same gateway as this one did.
    assert f"follow the release again with: clawhub watch d1 --gateway {address}\n" in err
    assert servicer.watches == watch.WATCH_RETRIES + 1


def test_other_watch_errors_are_not_retried(fake: tuple[FakeDeployer, str], capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.script, servicer.abort = CANARY_OK, grpc.StatusCode.NOT_FOUND
    assert main(["watch", "d1", "--gateway", address]) == 1
    assert servicer.watches == 1 and "NOT_FOUND" in capsys.readouterr().err


def test_no_wait_prints_the_id_and_returns(fake: tuple[FakeDeployer, str], capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.script = BAKE_BREACH  # never watched
    assert main(["deploy", "com.example.x@2.0.0", "--no-wait", "--gateway", address]) == 0
    assert capsys.readouterr().out.strip() == "d1"


def test_status_shows_the_split_strategy_and_verdict(fake: tuple[FakeDeployer, str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    canary = deployment(DEPLOYING, verdict=pb.ANALYSIS_VERDICT_RUNNING, traffic_weight=25,
                        canary=pb.CanaryStrategy(weights=[5, 25, 100], step=seconds(10)),
                        analysis=pb.Analysis(min_success_rate=0.99, max_p99_latency=seconds(0.25), min_requests=20),
                        verdict_reason="step 2 of 3", stats=stats(120, 1.0, 8))
    previous = pb.Deployment(id="d0", skill="com.example.x", version="1.0.0", state=ACTIVE, serving=True,
                             traffic_weight=75)
    servicer.listed = [canary, previous]
    assert main(["status", "com.example.x", "--gateway", address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SKILL", "LATEST", "SERVING", "LAST", "DEPLOYMENT", "VERDICT"]
    assert out[1].split() == ["com.example.x", "2.0.0", "2.0.0:25%,1.0.0:75%", "2.0.0", "DEPLOYING", "RUNNING"]
    details = "\n".join(out[2:])
    assert "strategy  canary 5→25→100% every 10s" in details
    assert "analysis  success rate ≥ 99%, p99 ≤ 250ms, after 20 calls" in details
    assert "traffic   25%" in details and "verdict   RUNNING: step 2 of 3" in details
    assert "stats     120 calls, 100.0% ok, p99 8ms" in details


def test_status_of_a_plain_release_keeps_the_old_columns() -> None:
    only = pb.Deployment(version="1.0.0", state=ACTIVE, serving=True, traffic_weight=100)
    assert watch.describe_serving([only]) == "1.0.0"
    assert watch.describe_serving([]) == "-"
    # Weights are per version: a version deployed twice is one entry.
    again = pb.Deployment(version="1.0.0", state=ACTIVE, traffic_weight=100)
    assert watch.describe_serving([only, again]) == "1.0.0"
    canary = pb.Deployment(version="2.0.0", state=DEPLOYING, traffic_weight=5)
    assert watch.describe_serving([canary, only, again]) == "2.0.0:5%,1.0.0:100%"
    # A server from before traffic weights.
    assert watch.describe_serving([pb.Deployment(version="1.0.0", serving=True)]) == "1.0.0"


# The live display.

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_display_redraws_one_status_line_and_hides_routine_events() -> None:
    term = Terminal()
    status = watch.Status()
    display = watch.LiveDisplay(term, printable)
    for event in CANARY_OK[:7]:
        text, routine = watch.describe(event, status, now=0.0)
        display.event(1.0, status, text, routine)
    display.tick(1.2, status)
    display.close()
    screen = term.getvalue()
    lines = screen.split("\n")
    assert any("canary step 1/2: 10% of traffic" in line for line in lines)
    # Progress events update the status line only; the status line is redrawn in place.
    assert not any(line.strip().endswith("p99 12ms") and "\r" not in line for line in lines)
    assert "\r\x1b[K" in screen and "canary 10% (step 1/2) · 40 calls, 100.0% ok, p99 12ms" in screen
    assert "step" in screen and "left" in screen
    assert screen.endswith("\r\x1b[K")  # closed: the status line is erased before the final verdict


def test_live_is_the_default_on_a_terminal_only() -> None:
    args = main.__globals__["build_parser"]().parse_args(["deploy", "com.example.x"])
    assert watch.use_live_display(args, Terminal())
    assert not watch.use_live_display(args, io.StringIO())
    plain = main.__globals__["build_parser"]().parse_args(["deploy", "com.example.x", "--plain"])
    assert not watch.use_live_display(plain, Terminal())


def test_joining_a_release_under_analysis_says_where_it_is() -> None:
    first = pb.WatchDeploymentResponse(deployment=deployment(
        DEPLOYING, verdict=pb.ANALYSIS_VERDICT_RUNNING, traffic_weight=25, canary=pb.CanaryStrategy(weights=[25, 100]),
        stats=stats(12, 1.0, 3)), message="currently Deploying")
    status = watch.Status()
    text, routine = watch.describe(first, status, 0.0)
    assert (text, routine) == ("2.0.0 takes 25% of traffic, under analysis", False)
    assert status.detail == "canary 25%" and status.stats == "12 calls, 100.0% ok, p99 3ms"


def test_joining_just_before_the_first_route_is_out_says_no_zero_percent_headline() -> None:
    # The analysis is marked running just before the first route generation goes out (at weight 0): a
    # watcher that joins in that gap is shown the current state, not "takes 0% of traffic, under analysis".
    first = pb.WatchDeploymentResponse(deployment=deployment(
        DEPLOYING, verdict=pb.ANALYSIS_VERDICT_RUNNING, traffic_weight=0, canary=pb.CanaryStrategy(weights=[25, 100])),
        message="currently Deploying")
    text, routine = watch.describe(first, watch.Status(), 0.0)
    assert "0%" not in text and text == "currently Deploying"


def test_untrusted_text_cannot_drive_the_terminal() -> None:
    term = Terminal()
    status = watch.Status()
    event = response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED, reason="bad\x1b[2Jskill")
    display = watch.LiveDisplay(term, printable)
    display.event(0.0, status, *watch.describe(event, status, 0.0))
    assert "\x1b[2J" not in term.getvalue() and "bad\\x1b[2Jskill" in term.getvalue()


class SilentStream:
    """A WatchDeployment stream that never says a word until cancelled (a lost stream)."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[pb.WatchDeploymentResponse]:
        self._cancelled.wait(30)
        return iter(())

    def cancel(self) -> None:
        self._cancelled.set()


def test_a_silent_stream_falls_back_to_asking_for_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "QUIET_POLL_SECONDS", 0.2)
    monkeypatch.setattr(watch, "PUMP_JOIN_SECONDS", 0.1)
    deploying = pb.Deployment(id="d1", skill="com.example.x", version="1.0.0",
                              state=release_pb2.RELEASE_STATE_DEPLOYING)
    active = pb.Deployment(id="d1", skill="com.example.x", version="1.0.0", state=release_pb2.RELEASE_STATE_ACTIVE)
    active.history.add(reason="route acknowledged")
    asked: list[str] = []

    def get(deployment_id: str) -> pb.Deployment:
        asked.append(deployment_id)
        return deploying if len(asked) < 2 else active

    out = io.StringIO()
    last = watch.follow(lambda request, timeout: SilentStream(), deploying, live=False, timeout=10, out=out,
                        printable=printable, get=get)
    assert last.state == release_pb2.RELEASE_STATE_ACTIVE
    assert asked == ["d1", "d1"]
    assert "ACTIVE: route acknowledged" in out.getvalue()


# The deployment's event log (issue 10): a watch that joins late is shown what already happened.

def sequenced(responses: list[pb.WatchDeploymentResponse]) -> list[pb.WatchDeploymentResponse]:
    """The responses numbered as the deployer numbers its events (the first, the current state, has none)."""
    numbered = [pb.WatchDeploymentResponse() for _ in responses]
    for number, (response, copy) in enumerate(zip(responses, numbered, strict=True)):
        copy.CopyFrom(response)
        copy.sequence = number if response.HasField("event") else 0
    return numbered


def test_watching_a_finished_release_shows_its_whole_log(fake: tuple[FakeDeployer, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    # What the deployer sends for a release that ended before the watch: its state (Active), then its log.
    servicer.script = [response(ACTIVE, message="currently Active"), *sequenced(CANARY_OK)[1:]]
    assert main(["watch", "d1", "--plain", "--gateway", address]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "com.example.x@2.0.0 is active"
    for line in ("preloaded on 127.0.0.1:1", "2 smoke example(s) passed on 127.0.0.1:1",
                 "route generation 7 pushed: 10% of traffic to 2.0.0", "route generation 7 acknowledged by 1/1",
                 "canary step 1/2", "canary step 2/2", "analysis passed: 200 calls",
                 "DEPLOYING → ACTIVE: canary passed"):
        assert line in err, err


def test_a_reconnected_watch_shows_each_event_once(fake: tuple[FakeDeployer, str], capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "WATCH_BACKOFF", (0.0, 0.0))
    monkeypatch.setattr(watch, "PLAIN_PROGRESS_SECONDS", 0.0)
    servicer, address = fake
    # Every new stream replays the log from the start: what the broken one showed is skipped.
    servicer.script, servicer.abort, servicer.aborts = sequenced(CANARY_OK), grpc.StatusCode.UNAVAILABLE, 2
    assert main(["deploy", "com.example.x@2.0.0", "--gateway", address]) == 0
    err = capsys.readouterr().err
    assert servicer.watches == 3
    for line in ("preloaded on 127.0.0.1:1", "2 smoke example(s) passed", "route generation 7 pushed",
                 "canary step 1/2", "DEPLOYING → ACTIVE"):
        assert err.count(line) == 1, err


def test_a_release_that_was_not_analysed_says_so(fake: tuple[FakeDeployer, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    reason = "not analysed: no traffic (blue-green, bake 10s)"
    event = response(DEPLOYING, K.DEPLOYMENT_EVENT_KIND_NOT_ANALYSED, reason=reason, stats=stats(0, 1.0, 0))
    status = watch.Status()
    assert watch.describe(event, status, 0.0) == (reason, False)
    assert status.detail == "not analysed" and status.until is None

    servicer, address = fake
    servicer.listed = [deployment(ACTIVE, "baked", serving=True, traffic_weight=100,
                                  verdict=pb.ANALYSIS_VERDICT_NOT_ANALYSED, verdict_reason=reason)]
    assert main(["status", "com.example.x", "--gateway", address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["com.example.x", "2.0.0", "2.0.0", "2.0.0", "ACTIVE", "NOT_ANALYSED"]
    assert "  verdict   NOT_ANALYSED: no traffic (blue-green, bake 10s)" in out


def test_status_after_a_manual_rollback_shows_the_rollback_and_what_serves(
        fake: tuple[FakeDeployer, str], capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    rolled = deployment(ACTIVE, "rolled back: 1.0.0 (deployment d0) serves from route generation 4",
                        verdict=pb.ANALYSIS_VERDICT_PASSED, verdict_reason="blue-green, bake 10s passed")
    rolled.rolled_back.CopyFrom(pb.RolledBack(deployment_id="d0", version="1.0.0", generation=4))
    rolled.rolled_back.time.FromSeconds(1_700_000_000)
    previous = pb.Deployment(id="d0", skill="com.example.x", version="1.0.0", state=ACTIVE, serving=True,
                             traffic_weight=100)
    servicer.listed = [rolled, previous]
    assert main(["status", "--gateway", address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["com.example.x", "2.0.0", "1.0.0", "2.0.0", "ROLLED_BACK", "PASSED"]
    assert out[2] == ("com.example.x: 2.0.0 rolled back to 1.0.0 (deployment d0, route generation 4) at "
                      "2023-11-14 22:13:20 UTC")

    assert main(["status", "com.example.x", "--gateway", address]) == 0
    details = capsys.readouterr().out.splitlines()[2:]
    assert details[0] == "last deployment 2.0.0 (d1): ROLLED_BACK"
    assert details[1].startswith("  rollback  rolled back to 1.0.0 (deployment d0, route generation 4) at ")
    assert details[1].endswith("2.0.0 stays Active (its release passed) but serves no more")


def test_status_of_a_skill_with_no_ready_version_says_why(fake: tuple[FakeDeployer, str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.registry.skills = [registry_pb.Skill(name="com.example.x")]
    failed = registry_pb.SkillVersion(name="com.example.x", version="1.0.0", state=FAILED,
                                      verification_errors=["imports fd_write without a capability"])
    failed.history.add(to_state=FAILED, reason="verification failed: imports fd_write without a capability")
    servicer.registry.versions = [failed]
    assert main(["status", "--gateway", address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["com.example.x", "-", "-", "-", "-"]
    assert out[2] == ("com.example.x: no Ready version: 1.0.0 FAILED: verification failed: imports fd_write "
                      "without a capability")
    # And `clawhub deploy NAME` says the same instead of only "no Ready version".
    assert main(["deploy", "com.example.x", "--gateway", address]) == 1
    assert "com.example.x has nothing to deploy: no Ready version: 1.0.0 FAILED" in capsys.readouterr().err

    servicer.registry.versions = [registry_pb.SkillVersion(name="com.example.x", version="1.1.0",
                                                           state=release_pb2.RELEASE_STATE_VERIFYING)]
    assert main(["status", "--gateway", address]) == 0
    assert "no Ready version: 1.1.0 VERIFYING: verification has not finished yet" in capsys.readouterr().out


def test_allow_unset_env_reaches_the_request_and_warns(fake: tuple[FakeDeployer, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    servicer, address = fake
    servicer.script = [transition(DEPLOYING, ACTIVE, "baked")]
    assert main(["deploy", "com.example.x@2.0.0", "--allow-unset-env", "--gateway", address]) == 0
    assert servicer.created[0].allow_unset_env
    assert ("warning: com.example.x@2.0.0 runs with API_TOKEN unset (--allow-unset-env): the skill declares it but "
            "gets no value") in capsys.readouterr().err
    assert main(["deploy", "com.example.x@2.0.0", "--gateway", address]) == 0
    assert not servicer.created[1].allow_unset_env and "warning" not in capsys.readouterr().err
