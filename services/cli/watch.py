"""`clawhub deploy --watch`: follow a release as it happens, and the parsers of the rollout flags.

Two displays of the same `WatchDeployment` stream:

- **live** (stderr is a terminal): every event is printed once as a short line, and one status line under
  them is redrawn in place (spinner, state, elapsed time, the canary weight and step, the bake countdown,
  the new version's live requests / success rate / p99 as the deployer sees them);
- **plain** (not a terminal, e.g. CI logs, or `--plain`): one line per event, nothing redrawn, no escape
  sequences.

Whatever the display, the caller gets the deployment's last state: Active is success, anything else is
the release failing (rolled back), reported with its last reason.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import grpc
from clawhub.common.v1 import release_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from google.protobuf import duration_pb2, timestamp_pb2

K = deployer_pb.DeploymentEventKind
TERMINAL_STATES = {release_pb2.RELEASE_STATE_ACTIVE, release_pb2.RELEASE_STATE_FAILED}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
REDRAW_SECONDS = 0.1
# The deployer sends analysis progress several times a second: plain output (CI logs) keeps one such line
# per this many seconds without any other line, enough to see the numbers move.
PLAIN_PROGRESS_SECONDS = 2.0
# Reconnecting a broken watch: attempts, and the pause before each (doubling from the first to the cap).
WATCH_RETRIES = 4
WATCH_BACKOFF = (0.25, 2.0)


# Flag parsers (argparse `type=` callables: ArgumentTypeError becomes a clear usage error, exit code 2).

def parse_duration(text: str) -> float:
    """`300ms`, `10s`, `1.5s`, `2m`, `1h` → seconds. A bare number is refused: `--max-p99 250` could mean
    milliseconds or seconds, and guessing wrong silently is worse than asking."""
    match = _DURATION.fullmatch(text)
    if not match:
        hint = " (add a unit: ms, s, m or h)" if re.fullmatch(r"\s*[\d.]+\s*", text) else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 300ms, 10s or 2m{hint}")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be more than 0")
    return seconds


def parse_window(text: str) -> float:
    """A duration that may be zero (`0s`: no bake window, or canary steps that move on at once)."""
    if re.fullmatch(r"\s*0+(?:\.0*)?\s*(ms|s|m|h)?\s*", text):
        return 0.0
    return parse_duration(text)


def parse_weights(text: str) -> list[int]:
    """`5,25,50,100` → canary steps in percent: increasing, each 1–100; 100 is appended when missing (the
    last step always takes all the traffic)."""
    try:
        weights = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of percentages such as 5,25,50,100") from None
    if any(not 1 <= w <= 100 for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every step is a percentage from 1 to 100")
    if any(b <= a for a, b in itertools.pairwise(weights)):
        raise argparse.ArgumentTypeError(f"{text!r}: the steps must increase, such as 5,25,50,100")
    return weights if weights[-1] == 100 else [*weights, 100]


def parse_rate(text: str) -> float:
    """`0.99` or `99%` → 0.99."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate such as 0.99 or 99%") from None
    # 0 would mean "the deployer's default" on the wire, so it cannot mean "accept anything" here.
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a success rate is more than 0 and at most 1 (or 100%)")
    return value


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be from 1 to 1,000,000")
    return value


def add_rollout_flags(parser: argparse.ArgumentParser) -> None:
    """The strategy and analysis flags of `clawhub deploy` (CreateDeploymentRequest.strategy / analysis)."""
    group = parser.add_argument_group(
        "rollout", "Blue-green (the default) moves all traffic at once, then bakes; canary moves it in weighted "
                   "steps. Either way the new version is analysed while it takes traffic, and a breach rolls it "
                   "back at once. Flags left out take the deployer's defaults.")
    group.add_argument("--canary", type=parse_weights, metavar="WEIGHTS",
                       help="canary steps in percent of traffic, such as 5,25,50,100 (100 is added if missing)")
    group.add_argument("--step", type=parse_window, metavar="DURATION",
                       help="how long each canary step is analysed, such as 10s (needs --canary)")
    group.add_argument("--bake", type=parse_window, metavar="DURATION",
                       help="blue-green bake window, such as 30s; 0s skips it")
    group.add_argument("--min-success-rate", type=parse_rate, metavar="RATE",
                       help="lowest acceptable success rate of the new version, such as 0.99 or 99%%")
    group.add_argument("--max-p99", type=parse_duration, metavar="DURATION",
                       help="highest acceptable p99 latency of the new version, such as 250ms")
    group.add_argument("--min-requests", type=parse_count, metavar="N",
                       help="calls the new version must have had before its success rate and p99 count")


def _duration(seconds: float, target: duration_pb2.Duration) -> None:
    target.FromNanoseconds(round(seconds * 1e9))


def rollout_fields(request: deployer_pb.CreateDeploymentRequest, args: argparse.Namespace) -> None:
    """Set the request's strategy and analysis from the flags; a contradictory mix is a usage error."""
    if args.canary is None:
        if args.step is not None:
            raise argparse.ArgumentTypeError("--step sets the length of canary steps: give --canary too")
        if args.bake is not None:
            _duration(args.bake, request.blue_green.bake)
    else:
        if args.bake is not None:
            raise argparse.ArgumentTypeError(
                "--bake is the blue-green bake window; a canary is analysed at each step (use --step)")
        request.canary.weights.extend(args.canary)
        if args.step is not None:
            _duration(args.step, request.canary.step)
    if args.min_success_rate is not None:
        request.analysis.min_success_rate = args.min_success_rate
    if args.max_p99 is not None:
        _duration(args.max_p99, request.analysis.max_p99_latency)
    if args.min_requests is not None:
        request.analysis.min_requests = args.min_requests


def describe_strategy(deployment: deployer_pb.Deployment) -> str:
    """`blue-green, bake 10s` / `canary 5→25→50→100% every 10s`, from the deployment (defaults filled in)."""
    which = deployment.WhichOneof("strategy")
    if which == "canary":
        weights = "→".join(str(w) for w in deployment.canary.weights)
        step = deployment.canary.step.ToNanoseconds() / 1e9
        return f"canary {weights}% every {format_seconds(step)}" if step else f"canary {weights}%, no wait"
    if which == "blue_green":
        bake = deployment.blue_green.bake.ToNanoseconds() / 1e9
        return f"blue-green, bake {format_seconds(bake)}" if bake else "blue-green, no bake"
    return ""


def describe_analysis(deployment: deployer_pb.Deployment) -> str:
    if not deployment.HasField("analysis"):
        return ""
    a = deployment.analysis
    return (f"success rate ≥ {a.min_success_rate * 100:g}%, p99 ≤ "
            f"{format_seconds(a.max_p99_latency.ToNanoseconds() / 1e9)}, after {a.min_requests:,} calls")


def describe_stats(stats: deployer_pb.VersionStats) -> str:
    return (f"{stats.requests:,} calls, {stats.success_rate * 100:.1f}% ok, "
            f"p99 {format_seconds(stats.p99_latency.ToNanoseconds() / 1e9)}")


def verdict_name(verdict: int) -> str:
    if verdict == deployer_pb.ANALYSIS_VERDICT_UNSPECIFIED:
        return ""
    return deployer_pb.AnalysisVerdict.Name(verdict).removeprefix("ANALYSIS_VERDICT_")  # type: ignore[arg-type]


def describe_serving(deployments: Sequence[deployer_pb.Deployment]) -> str:
    """The versions taking traffic: `1.0.0`, or `1.0.0:75%,2.0.0:25%` while a canary runs."""
    # The weight is per version, so every deployment of a version redeployed shows it: one entry each.
    weights: dict[str, int] = {}
    for d in deployments:  # newest first: the new version leads
        if d.traffic_weight > 0:
            weights.setdefault(d.version, d.traffic_weight)
    if len(weights) > 1:
        return ",".join(f"{version}:{weight}%" for version, weight in weights.items())
    # A server from before traffic weights sets only `serving`.
    return next((d.version for d in deployments if d.serving), next(iter(weights), "-"))


def release_state(deployment: deployer_pb.Deployment) -> str:
    """The deployment's state for people: ROLLED_BACK for an Active deployment a manual rollback took the
    traffic from (Active alone would read as if it served)."""
    return "ROLLED_BACK" if deployment.HasField("rolled_back") else state_name(deployment.state)


def format_time(value: timestamp_pb2.Timestamp) -> str:
    return value.ToDatetime(tzinfo=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_rollback(deployment: deployer_pb.Deployment) -> str:
    """`rolled back to 1.0.0 (deployment …, route generation 4) at …`, or "" when it was not rolled back."""
    if not deployment.HasField("rolled_back"):
        return ""
    rolled = deployment.rolled_back
    generation = f", route generation {rolled.generation}" if rolled.generation else ""
    return (f"rolled back to {rolled.version} (deployment {rolled.deployment_id}{generation}) at "
            f"{format_time(rolled.time)}")


def describe_deployment(deployment: deployer_pb.Deployment) -> list[str]:
    """Detail lines of one deployment for `clawhub status NAME`."""
    lines = [f"last deployment {deployment.version} ({deployment.id}): {release_state(deployment)}"]
    rollback = describe_rollback(deployment)
    if rollback:
        lines.append(f"  rollback  {rollback}; {deployment.version} stays Active (its release passed) but serves "
                     "no more")
    strategy = describe_strategy(deployment)
    if strategy:
        lines.append(f"  strategy  {strategy}")
    analysis = describe_analysis(deployment)
    if analysis:
        lines.append(f"  analysis  {analysis}")
    lines.append(f"  traffic   {deployment.traffic_weight}%")
    verdict = verdict_name(deployment.verdict)
    if verdict:
        # `not analysed: no traffic (…)` under NOT_ANALYSED would say it twice.
        reason = deployment.verdict_reason.removeprefix("not analysed: ")
        lines.append(f"  verdict   {verdict}" + (f": {reason}" if reason else ""))
    if deployment.HasField("stats"):
        lines.append(f"  stats     {describe_stats(deployment.stats)}")
    if deployment.unset_env:
        lines.append(f"  env unset {', '.join(deployment.unset_env)} (deployed with --allow-unset-env)")
    if deployment.inherited_env:
        lines.append(f"  env kept  {', '.join(deployment.inherited_env)} (values of the deployment serving before)")
    if deployment.history:
        lines.append(f"  last step {deployment.history[-1].reason}")
    return lines


def planned_seconds(deployment: deployer_pb.Deployment) -> float:
    """How long the release's analysis windows last in all (0 when unknown)."""
    which = deployment.WhichOneof("strategy")
    if which == "canary":
        return len(deployment.canary.weights) * deployment.canary.step.ToNanoseconds() / 1e9
    if which == "blue_green":
        return deployment.blue_green.bake.ToNanoseconds() / 1e9
    return 0.0


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.3g}s"
    return f"{seconds / 60:.3g}m"


# What one event tells the display.

def state_name(state: int) -> str:
    return release_pb2.ReleaseState.Name(state).removeprefix("RELEASE_STATE_")  # type: ignore[arg-type]


def last_reason(deployment: deployer_pb.Deployment) -> str:
    return deployment.history[-1].reason if deployment.history else "unknown reason"


@dataclass
class Status:
    """What the status line shows; updated by each event."""

    state: str = ""
    # The phase of the rollout (`canary 25% (step 2/4)`, `baking 2.0.0`, `rolling back: …`) and the new
    # version's latest stats in it.
    detail: str = ""
    stats: str = ""
    # Monotonic time when the current bake window or canary step ends, if one is running.
    until: float | None = None
    until_label: str = ""


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


def describe(response: deployer_pb.WatchDeploymentResponse, status: Status, now: float) -> tuple[str, bool]:
    """The event's one-line text, and whether it is routine (the live display shows routine events only in
    its status line); updates `status`."""
    deployment, event = response.deployment, response.event
    status.state = state_name(deployment.state)
    kind = event.kind if response.HasField("event") else K.DEPLOYMENT_EVENT_KIND_UNSPECIFIED
    version = deployment.version
    if kind == K.DEPLOYMENT_EVENT_KIND_STATE_CHANGED:
        if deployment.state in TERMINAL_STATES:
            status.until = None
        return (f"{state_name(event.transition.from_state)} → {state_name(event.transition.to_state)}: "
                f"{event.transition.reason}"), False
    if kind == K.DEPLOYMENT_EVENT_KIND_PRELOADED:
        return f"preloaded on {event.executor}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_SMOKE_PASSED:
        return f"{event.smoke_examples} smoke example(s) passed on {event.executor}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_PRELOAD_FAILED:
        return f"preload failed on {event.executor}: {event.reason}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_ROUTE_PUSHED:
        return f"route generation {event.generation} pushed: {event.weight}% of traffic to {version}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_ACKED:
        return (f"route generation {event.generation} acknowledged by {event.acknowledged}/{event.dispatchers} "
                "dispatchers"), False
    if kind == K.DEPLOYMENT_EVENT_KIND_BAKE_STARTED:
        window = _seconds(event.window)
        status.detail, status.until, status.until_label = f"baking {version} at 100%", now + window, "bake"
        return f"baking {version} for {format_seconds(window)}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_CANARY_STEP:
        window = _seconds(event.window)
        status.detail = f"canary {event.weight}% (step {event.step}/{event.steps})"
        status.until, status.until_label, status.stats = now + window, "step", ""
        return (f"canary step {event.step}/{event.steps}: {event.weight}% of traffic to {version} for "
                f"{format_seconds(window)}"), False
    if kind == K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PROGRESS:
        status.until = now + max(0.0, _seconds(event.window) - _seconds(event.elapsed))
        stats = describe_stats(event.stats)
        status.stats = stats
        return (f"{version} at {event.weight}%, {format_seconds(_seconds(event.elapsed))} of "
                f"{format_seconds(_seconds(event.window))}: {stats}"), True
    if kind == K.DEPLOYMENT_EVENT_KIND_ANALYSIS_PASSED:
        status.until = None
        return f"analysis passed: {describe_stats(event.stats)}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_ANALYSIS_BREACH:
        reason = event.reason.removeprefix("analysis breach: ")
        status.until, status.detail, status.stats = None, f"breach: {reason}", ""
        return f"analysis breach: {reason} ({describe_stats(event.stats)})", False
    if kind == K.DEPLOYMENT_EVENT_KIND_HEALTH_NOT_SERVING:
        status.until = None
        return f"{event.executor} reports {version} NOT_SERVING", False
    if kind == K.DEPLOYMENT_EVENT_KIND_ROLLBACK_STARTED:
        status.until, status.detail, status.stats = None, f"rolling back: {event.reason}", ""
        return f"rolling back: {event.reason}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_UNLOADED:
        return f"previous version unloaded from {event.executor}", False
    if kind == K.DEPLOYMENT_EVENT_KIND_NOT_ANALYSED:
        status.until, status.detail, status.stats = None, "not analysed", ""
        return event.reason or response.message, False
    if not response.HasField("event"):
        # The first response, the current state; the deployment's event log follows it. A release already
        # under analysis says so first, as the headline of what the log is about to show.
        # (Not before the first route is out: the analysis starts just before it, at weight 0.)
        if deployment.verdict == deployer_pb.ANALYSIS_VERDICT_RUNNING and deployment.traffic_weight > 0:
            weight = deployment.traffic_weight
            status.detail = (f"canary {weight}%" if deployment.WhichOneof("strategy") == "canary"
                             else f"baking {version} at {weight}%")
            if deployment.HasField("stats"):
                status.stats = describe_stats(deployment.stats)
            return f"{version} takes {weight}% of traffic, under analysis", False
        return response.message, True
    # Kinds newer than this client: the server's own text.
    return response.message, False


# Displays.

class PlainDisplay:
    """One line per event: `[  1.2s] DEPLOYING    preloaded on 127.0.0.1:50055`."""

    def __init__(self, out: IO[str], printable: Callable[[str], str]) -> None:
        self._out = out
        self._printable = printable
        self._last_line = 0.0

    def event(self, elapsed: float, status: Status, text: str, routine: bool = False) -> None:
        if routine and elapsed - self._last_line < PLAIN_PROGRESS_SECONDS:
            return
        if text:
            self._last_line = elapsed
            print(f"  [{elapsed:5.1f}s] {status.state:<12} {self._printable(text)}", file=self._out, flush=True)

    def tick(self, elapsed: float, status: Status) -> None:
        pass

    def close(self) -> None:
        pass


class LiveDisplay:
    """Event lines scroll; the status line below them is redrawn in place (`\\r` + erase line)."""

    def __init__(self, out: IO[str], printable: Callable[[str], str]) -> None:
        self._out = out
        self._printable = printable
        self._frames = itertools.cycle(SPINNER)
        self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self._out.write("\r\x1b[K")
            self._drawn = False

    def event(self, elapsed: float, status: Status, text: str, routine: bool = False) -> None:
        if text and not routine:
            self._clear()
            self._out.write(f"  {elapsed:5.1f}s  {self._printable(text)}\n")
        self.tick(elapsed, status)

    def tick(self, elapsed: float, status: Status) -> None:
        parts = [f"{next(self._frames)} {status.state or 'WAITING'}", f"{elapsed:.1f}s"]
        parts += [part for part in (status.detail, status.stats) if part]
        if status.until is not None:
            left = max(0.0, status.until - time.monotonic())
            parts.append(f"{status.until_label} {left:.1f}s left" if left < 10 else
                         f"{status.until_label} {left:.0f}s left")
        # A line wider than the terminal wraps, and `\r` would then redraw only its last part.
        width = shutil.get_terminal_size().columns - 1
        line = self._printable(" · ".join(parts))
        line = line if len(line) <= width else line[: max(width - 1, 0)] + "…"
        self._out.write(f"\r\x1b[K{line}")
        self._out.flush()
        self._drawn = True

    def close(self) -> None:
        self._clear()
        self._out.flush()


# Following the stream.

_END = object()
# How long a finished watch waits for the deployer to end its stream before cancelling it.
PUMP_JOIN_SECONDS = 2.0
# After this long without a word on the stream, the watch asks for the deployment directly.
QUIET_POLL_SECONDS = 3.0


def _pump(stream: Iterator[deployer_pb.WatchDeploymentResponse], events: queue.Queue[Any]) -> None:
    """Move the blocking stream's events to a queue, so the main thread can redraw between them."""
    try:
        for event in stream:
            events.put(event)
    except grpc.RpcError as err:
        events.put(err)
    events.put(_END)


@dataclass
class Cursor:
    """The sequence number of the last event a watch showed: a reconnected stream replays the deployment's
    event log from the start, and what was already shown is skipped."""

    sequence: int = 0


def _age(deployment: deployer_pb.Deployment) -> float:
    """Seconds since the deployment was created by this machine's clock; 0 when unknown or implausible (a
    clock far off the deployer's)."""
    if not deployment.HasField("create_time"):
        return 0.0
    age = time.time() - deployment.create_time.ToNanoseconds() / 1e9
    return age if 0 <= age <= 7 * 86400 else 0.0


def _event_time(response: deployer_pb.WatchDeploymentResponse) -> float | None:
    """When the event happened, in seconds since the deployment was created, by the deployer's clock alone:
    the same for a replayed event as it was live."""
    if not (response.HasField("event") and response.event.HasField("time")
            and response.deployment.HasField("create_time")):
        return None
    return max(0.0, (response.event.time.ToNanoseconds() - response.deployment.create_time.ToNanoseconds()) / 1e9)


def follow(watch: Callable[..., Any], deployment: deployer_pb.Deployment, *, live: bool, timeout: float,
           out: IO[str], printable: Callable[[str], str],
           get: Callable[[str], deployer_pb.Deployment] | None = None,
           cursor: Cursor | None = None) -> deployer_pb.Deployment:
    """Show the deployment's events until it ends (Active or Failed); returns its last state.

    The deployer sends the deployment's event log first, so a release that is already under way, or over,
    is shown from its start; times are counted from the deployment's creation. A broken stream raises its
    grpc.RpcError. Ctrl-C stops following only: the release goes on in the deployer (the caller says how to
    find it again).
    """
    display: PlainDisplay | LiveDisplay = LiveDisplay(out, printable) if live else PlainDisplay(out, printable)
    cursor = cursor if cursor is not None else Cursor()
    stream = watch(deployer_pb.WatchDeploymentRequest(id=deployment.id), timeout=timeout)
    events: queue.Queue[Any] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(stream, events), daemon=True, name="watch-deployment")
    pump.start()
    started = heard = time.monotonic()
    # The status line's clock: the release's age (for a release joined late), then this watch's time.
    offset = _age(deployment) if deployment.state not in TERMINAL_STATES else 0.0

    def clock() -> float:
        return offset + time.monotonic() - started

    status = Status(state=state_name(deployment.state))
    last = deployment
    # When the release was seen ended; the stream still goes on to its end (a replayed log can hold a manual
    # rollback after the end), but not for longer than PUMP_JOIN_SECONDS.
    ended: float | None = None
    finished = False
    try:
        while ended is None or time.monotonic() - ended < PUMP_JOIN_SECONDS:
            try:
                item = events.get(timeout=REDRAW_SECONDS)
            except queue.Empty:
                display.tick(clock(), status)
                if ended is None and get is not None and time.monotonic() - heard > QUIET_POLL_SECONDS:
                    # A quiet stream: ask for the deployment directly, so a lost stream cannot keep us
                    # waiting after the release ended.
                    heard = time.monotonic()
                    polled = get(deployment.id)
                    if polled.state in TERMINAL_STATES:
                        last = polled
                        display.event(clock(), status, f"{state_name(polled.state)}: {last_reason(polled)}")
                        break
                continue
            heard = time.monotonic()
            if item is _END:
                finished = True
                break
            if isinstance(item, grpc.RpcError):
                raise item
            if item.sequence and item.sequence <= cursor.sequence:
                continue
            cursor.sequence = max(cursor.sequence, item.sequence)
            last = item.deployment
            text, routine = describe(item, status, time.monotonic())
            at = _event_time(item)
            display.event(clock() if at is None else at, status, text, routine)
            ended = (ended or time.monotonic()) if last.state in TERMINAL_STATES else None
    except BaseException:
        stream.cancel()
        raise
    else:
        if not finished:
            # The deployer ends the stream right after the last event: let the pump see that end rather than
            # cancelling the stream under it (a sync stream cancelled from another thread while it is being
            # read can block that reader, and then the channel's close, for good: grpc/grpc#20562).
            pump.join(timeout=0 if ended is not None else PUMP_JOIN_SECONDS)
            if pump.is_alive():
                stream.cancel()
    finally:
        display.close()
    return last


def follow_reconnecting(watch: Callable[..., Any], deployment: deployer_pb.Deployment, *, live: bool,
                        timeout: float, out: IO[str], printable: Callable[[str], str],
                        get: Callable[[str], deployer_pb.Deployment] | None = None) -> deployer_pb.Deployment:
    """`follow`, reconnecting when the stream breaks with UNAVAILABLE (a deployer or gateway restarting:
    `clawhub up` restarts a dead service within a second or two). The release goes on in the deployer
    meanwhile; a new stream replays the deployment's event log, and the events already shown are skipped.
    Other errors, and UNAVAILABLE past the retries, are raised."""
    cursor = Cursor()
    for attempt in itertools.count():
        try:
            return follow(watch, deployment, live=live, timeout=timeout, out=out, printable=printable, get=get,
                          cursor=cursor)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt >= WATCH_RETRIES:
                raise
            pause = min(WATCH_BACKOFF[0] * 2**attempt, WATCH_BACKOFF[1])
            print(printable(f"  the watch broke ({err.details()}); reconnecting in {pause:.1f}s"), file=out,
                  flush=True)
            time.sleep(pause)
    raise AssertionError("unreachable")


def use_live_display(args: argparse.Namespace, stream: IO[str] = sys.stderr) -> bool:
    """The live display needs a terminal to redraw on; `--plain` asks for plain lines anyway."""
    return not getattr(args, "plain", False) and stream.isatty()
