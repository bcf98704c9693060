"""`clawhub`: run the suite and drive it (publish, deploy, invoke, status, rollback)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from clawhub.common.v1 import release_pb2, skill_pb2
from clawhub.deployer.v1 import deployer_service_pb2 as deployer_pb
from clawhub.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from clawhub.gateway.v1 import gateway_service_pb2 as gateway_pb
from clawhub.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from clawhub.registry.v1 import access_pb2_grpc as access_grpc
from clawhub.registry.v1 import registry_service_pb2 as registry_pb
from clawhub.registry.v1 import registry_service_pb2_grpc as registry_grpc
from google.protobuf import json_format, struct_pb2

from services.cli import admin, author, credentials, keys, manifest, top, trust, watch
from services.cli import logs as skill_logs
from services.cli.up import DEFAULT_GATEWAY, DEFAULT_PORTS, run_up
from services.runtime.errors import bad_request, error_info
from services.runtime.jsonvalue import value_to_json
from services.runtime.names import version_problem
from services.runtime.signing import SigningError
from services.runtime.traceparent import new_traceparent

CHUNK_BYTES = 256 * 1024
TERMINAL = {release_pb2.RELEASE_STATE_ACTIVE, release_pb2.RELEASE_STATE_FAILED}
# Exit codes (listed in `clawhub --help`): 1 a command that failed (the server refused, a release failed and
# was rolled back, a service is not SERVING), 2 a usage error (argparse's own code: a bad flag, argument or
# reference), 3 the gateway (or the address `health` checks) could not be reached.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
# Exit code of `deploy`/`watch` when the release ends Failed (rolled back): the same 1 as any failed command,
# as scripts already expect; the reason is printed.
RELEASE_FAILED_EXIT = EXIT_FAILED
EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    the command failed: the server refused it (the reason is printed), a release failed and was
       rolled back, a service is not SERVING (health), a verify-blobs scrub found a problem
  2    usage error: a bad command, flag, argument or NAME@VERSION reference (nothing was sent)
  3    the gateway (or the address given to health) could not be reached
  130  interrupted (Ctrl-C); a release goes on in the deployer
  141  the reader of the output went away (`clawhub status | head`)"""


class CliError(Exception):
    """A failure to report in one clear paragraph; exit code EXIT_FAILED unless told otherwise (EXIT_USAGE for
    a bad flag or argument, EXIT_UNREACHABLE when the gateway cannot be reached)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def usage_error(message: str) -> CliError:
    return CliError(message, EXIT_USAGE)


def state_name(state: int) -> str:
    return release_pb2.ReleaseState.Name(state).removeprefix("RELEASE_STATE_")  # type: ignore[arg-type]


def printable(text: str) -> str:
    """Text from the server (a skill's stderr included) with control characters escaped, so an untrusted
    skill cannot send escape sequences to the operator's terminal."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _names_field(message: str, field: str) -> bool:
    """Whether a message says which field it is about (`env[X]: …`, `… field `name` …`), not merely uses the
    word (`… not a reverse-DNS skill name`)."""
    return message.startswith(f"{field}:") or f"`{field}`" in message or f"field {field}" in message


def _says(message: str, value: str) -> bool:
    """Whether the message states a metadata value already: the value (each part of a comma-separated list) as a
    whole word of it, so `version: 1.0.0` is not repeated under "no version 1.0.0 of …"."""
    parts = [part.strip() for part in value.split(",")]
    return all(part and re.search(rf"(?<![\w.\-]){re.escape(part)}(?![\w\-]|\.\w)", message) for part in parts)


def describe_rpc_error(err: grpc.RpcError, gateway: str) -> CliError:
    """One paragraph saying each fact once: the message (prefixed with the field it is about, unless it names
    it already), status and reason, the metadata the message does not state, and the field violations it does
    not already say. Empty metadata values are left out."""
    code = err.code()
    info = error_info(err)
    if code == grpc.StatusCode.UNAVAILABLE and info is None:
        return CliError(f"cannot reach the gateway at {gateway}: {err.details()}\n"
                        "  Is `clawhub up` running? Point elsewhere with --gateway or CLAWHUB_GATEWAY.",
                        EXIT_UNREACHABLE)
    message = (err.details() or "").strip() or code.name
    request = bad_request(err)
    violations = [(v.field, v.description.strip()) for v in request.field_violations] if request else []
    # A violation whose description the message already says is said once, by the message; the field it names
    # leads the message unless the message names it itself.
    said = [(field, text) for field, text in violations if text and text in message]
    unnamed = [field for field, _ in said if field and not _names_field(message, field)]
    if unnamed:
        message = f"field{'s' if len(unnamed) > 1 else ''} {', '.join(unnamed)}: {message}"
    lines = [f"error: {message}", f"  status: {code.name}"
             + (f"  reason: {info.reason}  ({info.domain})" if info and info.reason else "")]
    fields = {field for field, _ in violations}
    if info:
        lines += [f"  {key}: {value}" for key, value in sorted(info.metadata.items())
                  if value.strip() and not (key == "field" and value in fields) and not _says(message, value)]
    lines += [f"  field {field}" + (f": {text}" if text else "") for field, text in violations
              if (field, text) not in said]
    return CliError(printable("\n".join(lines)))


def open_channel(address: str, tls_ca: str = "", options: list[tuple[str, int]] | None = None) -> grpc.Channel:
    """A channel to `address`: TLS verified with the CA file `tls_ca` (--tls-ca, $CLAWHUB_TLS_CA_FILE), else
    plaintext. `address` may name several gateways (`IP:PORT,IP:PORT` or `dns:///NAME:PORT`): calls go to
    the ones that are up."""
    from services.runtime.channels import AddressError, grpc_target

    try:
        target, balancing = grpc_target(address)
    except AddressError as exc:
        raise CliError(f"error: the gateway address {exc}") from None
    options = [*(options or []), *balancing]
    address = target
    if not tls_ca:
        return grpc.insecure_channel(address, options=options)
    try:
        ca = Path(tls_ca).expanduser().read_bytes()
    except OSError as exc:
        raise CliError(f"error: --tls-ca {tls_ca}: cannot read it ({exc.strerror})") from None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=options)


class Client:
    def __init__(self, gateway: str, timeout: float, token: str = "", tls_ca: str = "") -> None:
        self.gateway = gateway
        self.timeout = timeout
        # No receive limit of its own: the gateway bounds what it sends (CLAWHUB_EXECUTOR_MAX_OUTPUT), and
        # gRPC's default 4 MiB would refuse a skill's full-size output.
        self.channel = open_channel(gateway, tls_ca, options=[("grpc.max_receive_message_length", -1)])
        # Every call carries the credential (services/cli/credentials.py): the gateway checks each one.
        self.token = token
        self.registry = trust.authorized(registry_grpc.RegistryServiceStub(self.channel), token)
        self.deployer = trust.authorized(deployer_grpc.DeployerServiceStub(self.channel), token)
        self.invoker = trust.authorized(gateway_grpc.GatewayServiceStub(self.channel), token)
        self.access = trust.authorized(access_grpc.AccessServiceStub(self.channel), token)

    def close(self) -> None:
        self.channel.close()


def _at(args: argparse.Namespace) -> str:
    """` --gateway ADDRESS` for a command the user is told to run next, when this one was pointed at a gateway
    that command would not find by itself (neither $CLAWHUB_GATEWAY nor the default)."""
    default = os.environ.get("CLAWHUB_GATEWAY", DEFAULT_GATEWAY)
    return f" --gateway {args.gateway}" if args.gateway != default else ""


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{message}", end="", file=sys.stderr, flush=True)


def cmd_publish(client: Client, args: argparse.Namespace) -> int:
    try:
        package = manifest.load(Path(args.dir))
    except (manifest.ManifestError, OSError) as exc:
        raise CliError(f"error: {exc}") from None
    data, tar = package.module, package.bundle
    sha = hashlib.sha256(data).hexdigest()
    bundle_sha = hashlib.sha256(tar).hexdigest() if tar else ""
    name = f"{package.manifest.name}@{package.manifest.version}"
    files = (f" + {len(package.manifest.files)} bundled file(s) in {len(tar):,} bytes, sha256:{bundle_sha[:12]}…"
             if tar else "")
    print(f"publishing {name} ({len(data):,} bytes, sha256:{sha[:12]}…{files}) to {client.gateway}",
          file=sys.stderr)
    total = len(data) + len(tar)
    metadata = registry_pb.PublishSkillMetadata(
        manifest=package.manifest, sha256=sha, size_bytes=len(data), request_id=str(uuid.uuid4()),
        bundle_sha256=bundle_sha, bundle_size_bytes=len(tar))
    if args.sign:
        try:
            print(f"  signed with {trust.sign_publish(metadata, args.sign)}", file=sys.stderr)
        except SigningError as exc:
            raise CliError(f"error: --sign: {exc}") from None

    def requests() -> Iterator[registry_pb.PublishSkillRequest]:
        # Order: metadata, the module's chunks, then the bundle's chunks.
        yield registry_pb.PublishSkillRequest(metadata=metadata)
        for offset in range(0, len(data), CHUNK_BYTES):
            yield registry_pb.PublishSkillRequest(chunk=data[offset:offset + CHUNK_BYTES])
            _progress(f"  uploaded {min(offset + CHUNK_BYTES, len(data)):,}/{total:,} bytes")
        for offset in range(0, len(tar), CHUNK_BYTES):
            yield registry_pb.PublishSkillRequest(bundle_chunk=tar[offset:offset + CHUNK_BYTES])
            _progress(f"  uploaded {len(data) + min(offset + CHUNK_BYTES, len(tar)):,}/{total:,} bytes")
        _progress("")

    response = client.registry.PublishSkill(requests(), timeout=args.timeout)
    version = response.skill_version
    verb = ("published" if response.created else "repaired (a stored blob was missing or corrupt)" if response.repaired
            else "already published (identical bytes)")
    print(f"{verb}: {version.name}@{version.version}  {version.digest}  state {state_name(version.state)}")
    if version.bundle_digest:
        print(f"  file bundle {version.bundle_digest}")
    if version.HasField("signature"):
        print(f"  signed by {version.signature.key_id}" + (f", publisher {version.publisher}" if version.publisher
                                                           else ""))
    if version.manifest.abi == skill_pb2.ABI_LIBRARY_V1:
        print(f"next: publish a skill that depends on {version.name} (a library is linked into its dependents, "
              "not deployed)", file=sys.stderr)
    else:
        print(f"next: clawhub deploy {version.name}@{version.version}{_at(args)}", file=sys.stderr)
    return 0


def _split_ref(ref: str) -> tuple[str, str]:
    """NAME[@VERSION|@TAG] as (name, version or tag, empty when not given); a usage error when a part is empty."""
    name, at, version = ref.partition("@")
    if not name or (at and not version):
        raise usage_error(f"error: {ref!r}: expected NAME, NAME@VERSION or NAME@TAG, such as "
                          "com.acme.image-process@1.2.3 or com.acme.image-process@stable")
    return name, version


def _exact_version(client: Client, name: str, version: str, args: argparse.Namespace) -> str:
    """`version` itself when it is an exact version; for a tag (`latest`, `stable`, …) the version the registry
    says it points at, told on stderr."""
    if not version_problem(version):
        return version
    exact: str = client.registry.GetSkillVersion(registry_pb.GetSkillVersionRequest(
        name=name, version=version), timeout=args.timeout).skill_version.version
    print(f"{name}@{version} is {exact}", file=sys.stderr)
    return exact


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """`--env KEY=VALUE` flags as a dict; `--env KEY` takes the value from this process's environment, so a
    secret need not appear on the command line."""
    env: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not key:
            raise usage_error(f"error: --env {pair!r}: expected KEY=VALUE (or KEY to pass on $KEY)")
        if not sep:
            if key not in os.environ:
                raise usage_error(f"error: --env {key}: no value given and ${key} is not set here")
            value = os.environ[key]
        if key in env:
            raise usage_error(f"error: --env {key} is given more than once")
        env[key] = value
    return env


def cmd_deploy(client: Client, args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    if args.no_wait and (args.watch or args.plain):
        raise usage_error("error: --no-wait returns at once, so there is nothing to --watch")
    env = parse_env(args.env)
    request = deployer_pb.CreateDeploymentRequest(
        skill=name, request_id=str(uuid.uuid4()), env=env, allow_unset_env=args.allow_unset_env,
        http_allow=[h if h.startswith("http:") else f"http:{h}" for h in args.allow_http or ()])
    try:
        watch.rollout_fields(request, args)
    except argparse.ArgumentTypeError as exc:
        raise usage_error(f"error: {exc}") from None
    if not version:
        skill = client.registry.GetSkill(registry_pb.GetSkillRequest(name=name), timeout=args.timeout).skill
        if not skill.latest_version:
            raise CliError(printable(f"error: {name} has nothing to deploy: {_no_ready_version(client, name, args)}"))
        version = skill.latest_version
    request.version = _exact_version(client, name, version, args)
    version = request.version
    deployment = client.deployer.CreateDeployment(request, timeout=args.timeout).deployment
    strategy = watch.describe_strategy(deployment)
    print(f"deploying {name}@{version} (deployment {deployment.id}{', ' + strategy if strategy else ''})",
          file=sys.stderr)
    if deployment.inherited_env:
        print(f"  env {', '.join(deployment.inherited_env)} kept from {deployment.previous_version} (the deployment "
              "serving now); --env NAME=value sets another value", file=sys.stderr)
    if deployment.unset_env:
        unset = ", ".join(deployment.unset_env)
        print(f"warning: {name}@{version} runs with {unset} unset (--allow-unset-env): the skill declares "
              f"{'it' if len(deployment.unset_env) == 1 else 'them'} but gets no value; set with --env NAME=value",
              file=sys.stderr)
    if args.no_wait:
        print(deployment.id)
        return 0
    return _follow(client, args, deployment)


def _follow(client: Client, args: argparse.Namespace, deployment: deployer_pb.Deployment) -> int:
    """Show the release until it ends: exit 0 when Active, RELEASE_FAILED_EXIT when it failed (rolled back)."""
    ref = f"{deployment.skill}@{deployment.version}"
    # The stream lives as long as the release: the bake window and canary steps come on top of the deadline.
    budget = args.timeout + watch.planned_seconds(deployment)
    try:
        last = watch.follow_reconnecting(client.deployer.WatchDeployment, deployment,
                                         live=watch.use_live_display(args), timeout=budget, out=sys.stderr,
                                         printable=printable,
                                         get=lambda id_: client.deployer.GetDeployment(
                                             deployer_pb.GetDeploymentRequest(id=id_), timeout=args.timeout).deployment)
    except KeyboardInterrupt:
        print("\nstopped watching; the release goes on. Follow it again with: clawhub watch "
              f"{deployment.id}{_at(args)}", file=sys.stderr)
        return 130
    except grpc.RpcError as err:
        # The release goes on in the deployer whatever happened to this stream.
        failure = describe_rpc_error(err, args.gateway)
        raise CliError(f"{failure}\n  the watch broke; follow the release again with: clawhub watch "
                       f"{deployment.id}{_at(args)}", failure.exit_code) from None
    if last.state == release_pb2.RELEASE_STATE_ACTIVE:
        print(f"{ref} is active")
        return 0
    if last.state not in TERMINAL:
        raise CliError(f"error: the deployer ended the watch while {ref} was {state_name(last.state)}; "
                       f"follow it again with: clawhub watch {deployment.id}{_at(args)}")
    print(f"error: deployment of {ref} ended {state_name(last.state)}: {printable(watch.last_reason(last))}",
          file=sys.stderr)
    return RELEASE_FAILED_EXIT


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    deployment = client.deployer.GetDeployment(deployer_pb.GetDeploymentRequest(id=args.id),
                                               timeout=args.timeout).deployment
    print(f"watching {deployment.skill}@{deployment.version} (deployment {deployment.id})", file=sys.stderr)
    return _follow(client, args, deployment)


def _invoke_request(args: argparse.Namespace) -> gateway_pb.InvokeSkillRequest:
    request = gateway_pb.InvokeSkillRequest(name=args.name, request_id=str(uuid.uuid4()),
                                            no_cache=getattr(args, "no_cache", False))
    if args.input is not None:
        try:
            json_format.Parse(args.input, request.input)
        except json_format.ParseError as exc:
            problem = ("is nested too deeply for the gateway (send it as bytes with --input-file)"
                       if "too deep" in str(exc) else f"is not valid JSON: {exc}")
            raise usage_error(f"error: --input {problem}\n"
                              "  (pass raw text with --raw, or a file with --input-file)") from None
    elif args.raw is not None:
        request.raw_input = args.raw.encode()
    elif args.input_file is not None:
        try:
            request.raw_input = (sys.stdin.buffer.read() if args.input_file == "-"
                                 else Path(args.input_file).read_bytes())
        except OSError as exc:
            raise CliError(f"error: cannot read --input-file: {exc}") from None
    return request


def _loose(value: struct_pb2.Value) -> Any:
    """A Value as Python objects, NaN and infinities included (value_to_json refuses them)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _loose(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_loose(v) for v in value.list_value.values]
    return None if kind in (None, "null_value") else getattr(value, kind)


def render_output(output: struct_pb2.Value, pretty: bool) -> str:
    """The JSON `output` of an invocation as text. What is not JSON (a NaN from an older gateway) is printed
    as close to the skill's text as can be, never raised: the skill ran, its answer must reach the user."""
    try:
        text = value_to_json(output).decode()
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False) if pretty else text
    except (ValueError, RecursionError):
        try:
            return json.dumps(_loose(output), indent=2 if pretty else None, ensure_ascii=False)
        except (ValueError, RecursionError):
            return str(output)


def cmd_invoke(client: Client, args: argparse.Namespace) -> int:
    request = _invoke_request(args)
    # -v starts a trace: a fresh sampled W3C traceparent, so every service that exports traces records this
    # call whatever its sampler's ratio (docs/tracing.md); its id is printed to look the call up.
    traceparent, trace_id = new_traceparent() if args.verbose else ("", "")
    try:
        response = client.invoker.InvokeSkill(request, timeout=args.timeout,
                                              metadata=(("traceparent", traceparent),) if traceparent else None)
    except grpc.RpcError as err:
        if trace_id:
            print(f"trace id: {trace_id}", file=sys.stderr)
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(err) is None:
            # gRPC's own refusal of a message over the gateway's limit: no details, so say what to do.
            raise CliError(printable(
                f"error: the gateway refused the request as too large ({err.details()})\n"
                f"  it is {request.ByteSize():,} bytes encoded; the gateway takes CLAWHUB_GATEWAY_MAX_INPUT plus "
                "64 KiB per message. A JSON --input of many small numbers encodes larger than its text: send it "
                "as bytes with --input-file")) from None
        raise
    if response.HasField("output"):
        print(render_output(response.output, args.pretty))
    else:
        sys.stdout.buffer.write(response.raw_output)
        sys.stdout.flush()
    if args.verbose:
        usage = response.usage
        print(f"version {response.version}, {usage.wall_time.ToMicroseconds() / 1000:.2f} ms in the sandbox, "
              # Components report none (services/executor/components.py: not observable through their API).
              + (f"peak memory {usage.peak_memory_bytes:,} bytes" if usage.peak_memory_bytes
                 else "peak memory not reported"), file=sys.stderr)
        if response.cache_status != gateway_pb.CACHE_STATUS_UNSPECIFIED:  # the skill declares a cache
            cache = gateway_pb.CacheStatus.Name(response.cache_status).removeprefix("CACHE_STATUS_").lower()
            print(f"cache: {cache}", file=sys.stderr)
        print(f"trace id: {trace_id}", file=sys.stderr)
    return 0


def _all_pages(call: Any, request: Any, field: str, timeout: float) -> Iterator[Any]:
    while True:
        response = call(request, timeout=timeout)
        yield from getattr(response, field)
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    skills = list(_all_pages(client.registry.ListSkills, registry_pb.ListSkillsRequest(page_size=200),
                             "skills", args.timeout))
    if args.name:
        skills = [s for s in skills if s.name == args.name]
        if not skills:
            raise CliError(f"error: no skill named {args.name!r} is published")
    if not skills:
        print(f"no skills published yet; try: clawhub publish examples/skills/uppercase{_at(args)}")
        return 0
    rows = [("SKILL", "LATEST", "SERVING", "LAST DEPLOYMENT", "VERDICT")]
    # Under the table: what the columns cannot say (why nothing is Ready, a manual rollback).
    notes: list[str] = []
    for skill in skills:
        deployments = client.deployer.ListDeployments(
            deployer_pb.ListDeploymentsRequest(skill=skill.name, page_size=20), timeout=args.timeout).deployments
        # A manual rollback leaves the rolled-back deployment Active (its release passed) but not serving:
        # its state reads ROLLED_BACK, and SERVING (from the route's weights) names what serves instead.
        last = (f"{deployments[0].version} {watch.release_state(deployments[0])}" if deployments else "-")
        verdict = watch.verdict_name(deployments[0].verdict) if deployments else ""
        serving = watch.describe_serving(deployments)
        # Routed is not always runnable: a signing key revoked since the deploy stops every call, a corrupt or
        # missing blob stops every executor that does not hold the module yet.
        broken = _serving_problems(client, skill.name, deployments, args)
        if broken:
            serving += " PROBLEM"
            notes += [f"{skill.name}: {version}: {problem}" for version, problem in broken]
        rows.append((skill.name, skill.latest_version or "-", serving, last, verdict or "-"))
        if not skill.latest_version:
            notes.append(f"{skill.name}: {_no_ready_version(client, skill.name, args)}")
        if args.name and deployments:
            notes += watch.describe_deployment(deployments[0])
        elif deployments and deployments[0].HasField("rolled_back"):
            notes.append(f"{skill.name}: {deployments[0].version} {watch.describe_rollback(deployments[0])}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for line in notes:
        print(printable(line))
    return 0


def _serving_problems(client: Client, name: str, deployments: Any, args: argparse.Namespace,
                      ) -> list[tuple[str, str]]:
    """(version, problem) for each version taking traffic that the registry says cannot run now."""
    versions = dict.fromkeys(d.version for d in deployments if d.traffic_weight > 0 or d.serving)
    found = []
    for version in versions:
        try:
            record = client.registry.GetSkillVersion(registry_pb.GetSkillVersionRequest(
                name=name, version=version), timeout=args.timeout).skill_version
        except grpc.RpcError:
            continue  # unknown is not "cannot run": the columns above come from the registry anyway
        found += [(version, problem) for problem in record.problems]
    return found


def _no_ready_version(client: Client, name: str, args: argparse.Namespace) -> str:
    """Why a skill has no version to deploy, from its newest version: `no Ready version: 1.0.0 FAILED:
    verification failed: …`."""
    try:
        versions = client.registry.ListSkillVersions(registry_pb.ListSkillVersionsRequest(
            name=name, page_size=1), timeout=args.timeout).skill_versions
    except grpc.RpcError as err:
        return f"no Ready version (its versions could not be listed: {err.code().name})"
    if not versions:
        return "no Ready version: no version is published"
    version = versions[0]
    state = state_name(version.state)
    last = version.history[-1].reason if version.history else ""
    if version.state == release_pb2.RELEASE_STATE_FAILED:
        why = last or "; ".join(version.verification_errors)
    elif version.state == release_pb2.RELEASE_STATE_READY and version.yanked:
        state, why = "yanked", version.yank_reason or "no reason given"
    elif version.state in (release_pb2.RELEASE_STATE_PENDING, release_pb2.RELEASE_STATE_VERIFYING):
        why = "verification has not finished yet"
    else:
        why = last
    return f"no Ready version: {version.version} {state}" + (f": {why}" if why else "")


def cmd_rollback(client: Client, args: argparse.Namespace) -> int:
    response = client.deployer.Rollback(deployer_pb.RollbackRequest(
        skill=args.name, request_id=str(uuid.uuid4())), timeout=args.timeout)
    print(f"{args.name} rolled back to {response.deployment.version} (route generation {response.generation})")
    return 0


def _versioned_ref(ref: str) -> tuple[str, str]:
    name, version = _split_ref(ref)
    if not name or not version:
        raise usage_error(f"error: {ref!r}: expected NAME@VERSION, such as com.acme.image-process@1.2.3")
    return name, version


def cmd_yank(client: Client, args: argparse.Namespace) -> int:
    name, version = _versioned_ref(args.ref)
    response = client.registry.YankSkillVersion(registry_pb.YankSkillVersionRequest(
        name=name, version=version, yanked=not args.undo, reason=args.reason or "",
        request_id=str(uuid.uuid4())), timeout=args.timeout)
    if response.skill_version.yanked:
        why = f" ({printable(response.skill_version.yank_reason)})" if response.skill_version.yank_reason else ""
        print(f"{name}@{version} yanked{why}: reserved, no longer latest or resolved unless pinned exactly")
    else:
        print(f"{name}@{version} is no longer yanked")
    return 0


def cmd_tag(client: Client, args: argparse.Namespace) -> int:
    if args.delete:
        if args.version:
            raise usage_error("error: --delete takes no VERSION")
        skill = client.registry.DeleteSkillTag(registry_pb.DeleteSkillTagRequest(
            name=args.name, tag=args.tag, request_id=str(uuid.uuid4())), timeout=args.timeout).skill
        print(f"{args.name}: tag {args.tag} removed")
    else:
        if not args.version:
            raise usage_error("error: expected NAME TAG VERSION (or NAME TAG --delete)")
        skill = client.registry.SetSkillTag(registry_pb.SetSkillTagRequest(
            name=args.name, tag=args.tag, version=args.version, request_id=str(uuid.uuid4())),
            timeout=args.timeout).skill
        print(f"{args.name}: {args.tag} -> {args.version}")
    for tag, version in sorted(skill.tags.items()):
        print(f"  {tag}: {version}")
    return 0


def cmd_search(client: Client, args: argparse.Namespace) -> int:
    request = registry_pb.ListSkillsRequest(page_size=200, prefix=args.prefix or "", query=args.query or "")
    skills = list(_all_pages(client.registry.ListSkills, request, "skills", args.timeout))
    if not skills:
        print("no skill matches")
        return 0
    rows = [("SKILL", "LATEST", "DESCRIPTION")]
    rows += [(s.name, s.latest_version or "-", printable(s.description)) for s in skills]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for row in rows:
        print(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}".rstrip())
    return 0


def cmd_resolve(client: Client, args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    version = _exact_version(client, name, version or "latest", args)
    response = client.registry.ResolveDependencies(registry_pb.ResolveDependenciesRequest(
        name=name, version=version), timeout=args.timeout)
    if not response.dependencies:
        print(f"{name}@{version} has no dependencies")
        return 0
    rows = [("PACKAGE", "VERSION", "SHARED", "DIGEST", "REQUIRED BY")]
    rows += [(d.package, d.version, "yes" if d.is_shared else "no", d.digest[:19],
              ", ".join(name + "@" + version if r == "(root)" else r for r in d.required_by))
             for d in response.dependencies]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _tls_ca_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=os.environ.get("CLAWHUB_TLS_CA_FILE", ""), metavar="FILE",
                   help="connect over TLS, verifying the server's certificate with this CA file (PEM; default: "
                        "$CLAWHUB_TLS_CA_FILE; unset: plaintext)")


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 check of a service (for probes: exit 0 only when SERVING); with --all, of the overall
    status and every service name the server lists through reflection (exit 0 only when all are SERVING)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.all and args.service:
        raise usage_error("error: --all checks every service name; give no SERVICE with it")
    with open_channel(args.address, args.tls_ca) as channel:
        try:
            names = ["", *_listed_services(channel, args.timeout)] if args.all else [args.service]
            stub = health_pb2_grpc.HealthStub(channel)
            statuses = [(name, stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=args.timeout).status)
                        for name in names]
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
            unreachable = err.code() == grpc.StatusCode.UNAVAILABLE and error_info(err) is None
            return EXIT_UNREACHABLE if unreachable else EXIT_FAILED
    for name, status in statuses:
        label = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(f"{args.address}{'/' + name if name else ''}: {label}")
    return 0 if all(status == health_pb2.HealthCheckResponse.SERVING for _, status in statuses) else 1


def _listed_services(channel: grpc.Channel, timeout: float) -> list[str]:
    """The service names a server lists through reflection, but for health and reflection themselves."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=timeout)
    names = [service.name for response in responses for service in response.list_services_response.service]
    return sorted(n for n in names if not n.startswith(("grpc.health.", "grpc.reflection.")))


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return value


def _port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: a port is from 1 to 65535 (0 picks a free port)")
    return value


def _executor_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value}: run from 1 to 64 executors")
    return value


UP_PORTS_HELP = f"""\
ports (each moved with its environment variable; 0 picks a free port):
  gateway     --gateway-port or CLAWHUB_GATEWAY_PORT  default {DEFAULT_PORTS['gateway']}, the public one
  registry    CLAWHUB_REGISTRY_PORT                   default {DEFAULT_PORTS['registry']}
  deployer    CLAWHUB_DEPLOYER_PORT                   default {DEFAULT_PORTS['deployer']}
  dispatcher  CLAWHUB_DISPATCHER_PORT                 default {DEFAULT_PORTS['dispatcher']}
  executor    CLAWHUB_EXECUTOR_PORT                   default {DEFAULT_PORTS['executor']}; executor N takes port + N - 1
The other services find each other by themselves. When the gateway is not on {DEFAULT_GATEWAY}, the clients
need its address: `export CLAWHUB_GATEWAY=ADDRESS` (or --gateway ADDRESS on each command); the banner says
so. When stdout is not a terminal, `up` also prints one `LABEL ADDRESS` line per service there once all
serve, the gateway last, for scripts.

Prometheus metrics (docs/metrics.md): every service serves /metrics on its own port, 9151 (gateway) to 9155
(executor; executor N takes 9155 + N - 1), or a free one when its gRPC port is 0; CLAWHUB_<SERVICE>_METRICS_PORT
moves one (0 picks a free port, off turns it off), CLAWHUB_METRICS_HOST sets their interface (127.0.0.1)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clawhub",
        description="Publish, deploy and serve WebAssembly skills over gRPC.",
        epilog="Start with `clawhub up` in one terminal, then publish, deploy and invoke in another.\n\n"
               + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_command(name: str, help_text: str, timeout: float = 30.0) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--gateway", default=os.environ.get("CLAWHUB_GATEWAY", DEFAULT_GATEWAY),
                       help="gateway address (default: $CLAWHUB_GATEWAY or %(default)s)")
        p.add_argument("--timeout", type=positive_seconds, default=timeout,
                       help="deadline in seconds for the call (default: %(default)s)")
        _tls_ca_argument(p)
        return p

    up = sub.add_parser("up", help="run all five services on this machine until Ctrl-C",
                        description="Run registry, executor(s), deployer, dispatcher and gateway, each in "
                                    "its own process, with embedded storage (sqlite and files; no Redis).",
                        epilog=UP_PORTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--data-dir", default=os.environ.get("CLAWHUB_DATA_DIR", ".clawhub"),
                    help="where sqlite files and blobs live (default: $CLAWHUB_DATA_DIR or %(default)s)")
    up.add_argument("--executors", type=_executor_count, default=1,
                    help="executor processes to run (default: %(default)s)")
    up.add_argument("--host", default="127.0.0.1", help="interface every service binds (default: %(default)s)")
    up.add_argument("--gateway-port", type=_port_number, default=None,
                    help="the public port (default: $CLAWHUB_GATEWAY_PORT or 50051; 0 picks a free port)")

    p = sub.add_parser("health", help="check a service's grpc.health.v1 status (exit 0 when SERVING)",
                       description="Check a service's grpc.health.v1 status; exit 0 only when SERVING, 1 when "
                                   "not (or the check failed), 3 when the address cannot be reached. The "
                                   "gateway's status for the registry and deployer names follows the real ones.")
    p.add_argument("address", nargs="?", default=os.environ.get("CLAWHUB_GATEWAY", DEFAULT_GATEWAY),
                   help="service address, such as 127.0.0.1:50052 (default: the gateway, $CLAWHUB_GATEWAY or "
                        f"{DEFAULT_GATEWAY})")
    p.add_argument("service", nargs="?", default="", help="service name or skill digest (default: overall)")
    p.add_argument("--all", action="store_true",
                   help="check the overall status and every service name the server lists, one line each "
                        "(exit 0 only when all are SERVING)")
    p.add_argument("--timeout", type=positive_seconds, default=3.0, help="deadline in seconds (default: %(default)s)")
    _tls_ca_argument(p)

    p = client_command("publish", "publish the skill in a directory (reads skill.toml)", timeout=300)
    p.add_argument("dir", help="skill directory holding skill.toml")
    p.add_argument("--sign", metavar="KEYFILE",
                   help="sign name, version, digests and manifest with this Ed25519 key (from clawhub keygen)")
    trust.add_token_flag(p)
    p = client_command("deploy", "deploy a published version and follow the release until it ends", timeout=300)
    p.description = ("Deploy a published version (blue-green by default, canary with --canary) and follow the "
                     "release until it is active (exit 0) or has failed and been rolled back (exit 1, with the "
                     "reason). On a terminal the progress is a live display (--watch, the default there); "
                     "otherwise, or with --plain, one line per event.")
    p.add_argument("ref", metavar="NAME[@VERSION|@TAG]",
                   help="skill and exact version or tag, such as stable (default: the latest version)")
    p.add_argument("--no-wait", action="store_true", help="print the deployment id and return at once")
    p.add_argument("--watch", action="store_true",
                   help="live progress display (the default when stderr is a terminal; plain lines otherwise)")
    p.add_argument("--plain", action="store_true", help="one plain line per event, even on a terminal")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="value of an environment variable the skill declares (capability env:KEY); repeat for "
                        "several; KEY alone passes on this shell's $KEY. A declared KEY left out keeps the value "
                        "of the deployment serving now")
    p.add_argument("--allow-unset-env", action="store_true",
                   help="deploy even if a declared env:KEY gets no value (refused otherwise); the skill runs with it "
                        "unset, and a warning names it")
    p.add_argument("--allow-http", action="append", metavar="HOST",
                   help="grant only these of the skill's http:HOST capabilities in this deployment (as declared, "
                        "such as api.example.com or *.example.com:8443); repeat for several; default: all")
    watch.add_rollout_flags(p)
    p = client_command("watch", "follow a deployment until it ends (exit 0 active, 1 failed)", timeout=300)
    p.add_argument("id", help="deployment id, as printed by `clawhub deploy`")
    p.add_argument("--plain", action="store_true", help="one plain line per event, even on a terminal")
    p = client_command("invoke", "invoke the active version of a skill and print its output")
    p.add_argument("name", help="skill name, such as com.example.uppercase")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--input", help="input as JSON, such as '{\"text\": \"hi\"}'")
    group.add_argument("--raw", help="input as raw text")
    group.add_argument("--input-file", help="input as raw bytes from a file ('-' for stdin)")
    p.add_argument("--pretty", action="store_true", help="indent JSON output")
    p.add_argument("-v", "--verbose", action="store_true", help="print version, usage and cache status to stderr")
    p.add_argument("--no-cache", action="store_true",
                   help="run the skill even if the gateway holds a cached result (and do not cache this one)")
    p = client_command("status", "list skills with their latest and serving versions")
    p.add_argument("name", nargs="?", help="only this skill")
    p = client_command("rollback", "route a skill back to its previous version")
    p.add_argument("name", help="skill name")
    p = client_command("yank", "yank a version: reserved forever, not latest, not resolved unless pinned exactly")
    p.add_argument("ref", metavar="NAME@VERSION", help="skill and exact version")
    p.add_argument("--reason", help="why (shown to anyone who reads the version)")
    p.add_argument("--undo", action="store_true", help="un-yank the version")
    trust.add_token_flag(p)
    p = client_command("tag", "point a tag (such as stable) of a skill at a version; `latest` is automatic")
    p.add_argument("name", help="skill name")
    p.add_argument("tag", help="tag name: lowercase letters, digits and hyphens, starting with a letter")
    p.add_argument("version", nargs="?", help="exact Ready version")
    p.add_argument("--delete", action="store_true", help="remove the tag instead")
    trust.add_token_flag(p)
    p = client_command("search", "list skills matching a keyword (name or description) and/or a name prefix")
    p.add_argument("query", nargs="?", help="keyword, case-insensitive (default: every skill)")
    p.add_argument("--prefix", help="only names starting with this, such as com.acme.")
    p = client_command("logs", skill_logs.HELP)
    skill_logs.add_arguments(p)
    p = client_command("resolve", "print the flattened dependency set of a published version")
    p.add_argument("ref", metavar="NAME[@VERSION|@TAG]",
                   help="skill and exact version or tag, such as stable (default: the latest version)")
    trust.add_commands(sub, DEFAULT_GATEWAY, positive_seconds)
    admin.add_commands(sub, DEFAULT_GATEWAY, positive_seconds)
    keys.add_commands(sub, DEFAULT_GATEWAY, positive_seconds, _tls_ca_argument)
    top.add_commands(sub, DEFAULT_GATEWAY, positive_seconds, _tls_ca_argument)
    author.add_commands(sub)  # new, build, run, test: local, no server (services/cli/author.py)
    return parser


COMMANDS = {"publish": cmd_publish, "deploy": cmd_deploy, "watch": cmd_watch, "invoke": cmd_invoke,
            "status": cmd_status,
            "rollback": cmd_rollback, "yank": cmd_yank, "tag": cmd_tag, "search": cmd_search,
            "resolve": cmd_resolve, "logs": skill_logs.cmd_logs}


# Exit status when the reader of our output went away (`clawhub status | head`): what a shell reports for a Unix
# tool ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader has what it wanted and is gone: stop quietly, like any Unix tool. Later writes (the
        # interpreter's final flush of stdout included) go to /dev/null instead of raising again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # stdout is not a file descriptor (captured); nothing will flush to a closed pipe
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return run_up(Path(args.data_dir), args.executors, args.host, args.gateway_port)
    if args.command == "health":
        try:
            return cmd_health(args)
        except CliError as exc:
            print(exc, file=sys.stderr)
            return exc.exit_code
    if args.command == "keygen":
        return trust.cmd_keygen(args)
    if args.command in author.COMMANDS:
        return author.run_command(args)
    try:
        # An explicit credential (the command's --token / --admin-token, $CLAWHUB_TOKEN) wins over the key
        # `clawhub up` recorded for this gateway in the credentials file.
        token = trust.credential(args) or os.environ.get("CLAWHUB_TOKEN", "") or credentials.lookup(args.gateway)
        client = Client(args.gateway, args.timeout, token=token,
                        tls_ca=getattr(args, "tls_ca", None) or os.environ.get("CLAWHUB_TLS_CA_FILE", ""))
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    try:
        command = (COMMANDS.get(args.command) or top.COMMANDS.get(args.command)
                   or trust.COMMANDS.get(args.command) or keys.COMMANDS.get(args.command)
                   or admin.COMMANDS[args.command])
        return command(client, args)
    except grpc.RpcError as err:
        failure = describe_rpc_error(err, args.gateway)
        info = error_info(err)
        if hint := trust.credential_hint(info.reason if info else "", args):
            failure = CliError(f"{failure}\n  {hint}", failure.exit_code)
    except CliError as exc:
        failure = exc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # not a failure of the command: see main()
    except Exception as exc:  # noqa: BLE001 - a bug or an answer we did not expect: one line, not a traceback
        problem = " ".join(printable(str(exc)).split())[:500]
        failure = CliError(f"error: clawhub {args.command} failed unexpectedly: {type(exc).__name__}: {problem}")
    finally:
        client.close()
    print(failure, file=sys.stderr)
    return failure.exit_code


if __name__ == "__main__":
    sys.exit(main())
