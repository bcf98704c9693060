"""Who may call what: the one policy table of the platform.

`INTERNAL_CALLERS`: for every method of every service served on an internal port (dispatcher, executor, deployer,
registry), the platform services allowed to call it (checked by services/runtime/identity.py's
PlatformAuthInterceptor against the caller's `x-clawhub-service` token). A method missing here is refused to
everyone; tests/runtime/test_policy.py fails when a method of an internal service has no entry. The gateway
relays the public RegistryService and DeployerService on behalf of users: those entries name "gateway", and
the user's own permissions are checked by the gateway before it relays.

Keyed by full method name (`/package.Service/Method`), as gRPC names the method a call is for.
"""

from __future__ import annotations

from collections.abc import Mapping

GATEWAY = "gateway"
DISPATCHER = "dispatcher"
EXECUTOR = "executor"
DEPLOYER = "deployer"
REGISTRY = "registry"
ANY_SERVICE = frozenset({GATEWAY, DISPATCHER, EXECUTOR, DEPLOYER, REGISTRY})


def _only(*services: str) -> frozenset[str]:
    return frozenset(services)


# --- Internal methods: platform service → internal service. ---------------------------------------------------
INTERNAL_CALLERS: Mapping[str, frozenset[str]] = {
    # Dispatcher: invocations come through the gateway. The route table is an operator's debugging view (env
    # values masked): any platform credential may read it.
    "/clawhub.dispatcher.v1.DispatcherService/Dispatch": _only(GATEWAY),
    "/clawhub.dispatcher.v1.DispatcherService/GetRouteTable": ANY_SERVICE,
    "/clawhub.dispatcher.v1.DispatcherService/TailSkillLogs": _only(GATEWAY),
    "/clawhub.dispatcher.v1.DispatcherService/GetSkillStats": _only(GATEWAY),
    # The data plane's control plane (docs/routing.md): gateways follow the routes and executors (env values
    # included), acknowledge generations (a subscriber that never acknowledges would hold a release) and report
    # the calls releases are judged by: gateways only.
    "/clawhub.dispatcher.v1.DataPlaneService/WatchDataPlane": _only(GATEWAY),
    "/clawhub.dispatcher.v1.DataPlaneService/AcknowledgeDataPlane": _only(GATEWAY),
    "/clawhub.dispatcher.v1.DataPlaneService/ReportCalls": _only(GATEWAY),
    # Executor: runs what gateways and dispatchers route to it; loads and unloads what the deployer deploys
    # (LoadSkill runs the smoke examples itself).
    "/clawhub.executor.v1.ExecutorService/Execute": _only(GATEWAY, DISPATCHER),
    "/clawhub.executor.v1.ExecutorService/ExecuteStream": _only(GATEWAY, DISPATCHER),
    "/clawhub.executor.v1.ExecutorService/LoadSkill": _only(DEPLOYER),
    "/clawhub.executor.v1.ExecutorService/UnloadSkill": _only(DEPLOYER),
    "/clawhub.executor.v1.ExecutorService/TailSkillLogs": _only(DISPATCHER),
    "/clawhub.executor.v1.ExecutorService/GetLoad": _only(DISPATCHER),
    # Deployer, public API: relayed by the gateway.
    "/clawhub.deployer.v1.DeployerService/CreateDeployment": _only(GATEWAY),
    "/clawhub.deployer.v1.DeployerService/GetDeployment": _only(GATEWAY),
    "/clawhub.deployer.v1.DeployerService/ListDeployments": _only(GATEWAY),
    "/clawhub.deployer.v1.DeployerService/Rollback": _only(GATEWAY),
    "/clawhub.deployer.v1.DeployerService/WatchDeployment": _only(GATEWAY),
    "/clawhub.deployer.v1.DeployerService/ListAuditEvents": _only(GATEWAY),
    # Deployer, internal: the route feed and the statistics releases are judged by come from dispatchers only,
    # so no one else can stall a deploy (a subscriber that never acknowledges) or fail it (fake failures).
    "/clawhub.deployer.v1.DeployerInternalService/WatchRoutes": _only(DISPATCHER),
    "/clawhub.deployer.v1.DeployerInternalService/AcknowledgeRoutes": _only(DISPATCHER),
    "/clawhub.deployer.v1.DeployerInternalService/ReportStats": _only(DISPATCHER),
    # Executors register (and renew their lease) themselves, and deregister when they stop (docs/routing.md).
    "/clawhub.deployer.v1.DeployerInternalService/RegisterExecutor": _only(EXECUTOR),
    "/clawhub.deployer.v1.DeployerInternalService/DeregisterExecutor": _only(EXECUTOR),
    # Registry, public API: relayed by the gateway; the deployer asks whether a version is Ready and resolves
    # its dependencies; executors re-verify provenance (the version, its namespace's keys).
    "/clawhub.registry.v1.RegistryService/PublishSkill": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/GetSkill": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/ListSkills": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/GetSkillVersion": _only(GATEWAY, DEPLOYER, EXECUTOR),
    "/clawhub.registry.v1.RegistryService/ListSkillVersions": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/YankSkillVersion": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/SetSkillTag": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/DeleteSkillTag": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/ResolveDependencies": _only(GATEWAY, DEPLOYER),
    "/clawhub.registry.v1.RegistryService/CreatePublisher": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/CreateNamespace": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/GetNamespace": _only(GATEWAY, EXECUTOR),
    "/clawhub.registry.v1.RegistryService/ListNamespaces": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/UpdateNamespace": _only(GATEWAY),
    "/clawhub.registry.v1.RegistryService/VerifyBlobs": _only(GATEWAY),
    # Registry, internal: module and bundle downloads, for executors.
    "/clawhub.registry.v1.RegistryInternalService/DownloadBlob": _only(EXECUTOR),
    # Registry, internal: users' credentials, resolved for the gateway and the deployer (services/runtime/auth.py).
    "/clawhub.registry.v1.RegistryInternalService/Authenticate": _only(GATEWAY, DEPLOYER),
    # Registry, public API keys and audit log: relayed by the gateway.
    "/clawhub.registry.v1.AccessService/CreateApiKey": _only(GATEWAY),
    "/clawhub.registry.v1.AccessService/ListApiKeys": _only(GATEWAY),
    "/clawhub.registry.v1.AccessService/RevokeApiKey": _only(GATEWAY),
    "/clawhub.registry.v1.AccessService/ListAuditEvents": _only(GATEWAY),
}


# --- Public methods: user (principal) → public RPC. ------------------------------------------------------------
# Checked by services/runtime/auth.py's UserAuthInterceptor at the gateway, and again by the service that owns
# the method (registry, deployer): a service never trusts that the gateway checked. tests/runtime/
# test_user_policy.py walks every method of every public service (from the descriptors: a new RPC without a
# rule fails) against every role.

from dataclasses import dataclass as _dataclass  # noqa: E402 - this section stands on its own


@_dataclass(frozen=True)
class Rule:
    """What a public method needs: a permission, checked for the skill name at `name_field` (a dotted path in
    the request; for a client stream, in its first message) when the call names one and the principal is
    limited to scopes. `mutating` calls are recorded in the owning service's audit log (with `target_fields`
    added to the target)."""

    permission: str
    name_field: str = ""
    mutating: bool = False
    target_fields: tuple[str, ...] = ()


# Permissions. Scopes limit every permission whose method names a skill; calls that name none (listing
# everything, a deployment by id) need the permission only, and the deployer checks the scope of a deployment
# it reads by id itself.
CATALOG_READ = "catalog.read"
DEPLOYMENTS_READ = "deployments.read"
SKILLS_INVOKE = "skills.invoke"
SKILLS_PUBLISH = "skills.publish"
SKILLS_YANK = "skills.yank"
SKILLS_TAG = "skills.tag"
NAMESPACES_UPDATE = "namespaces.update"
DEPLOYMENTS_CREATE = "deployments.create"
DEPLOYMENTS_ROLLBACK = "deployments.rollback"
DEPLOYMENTS_WATCH = "deployments.watch"
PUBLISHERS_CREATE = "publishers.create"
NAMESPACES_CREATE = "namespaces.create"
BLOBS_VERIFY = "blobs.verify"
KEYS_CREATE = "keys.create"
KEYS_LIST = "keys.list"
KEYS_REVOKE = "keys.revoke"
AUDIT_READ = "audit.read"
LOGS_READ = "logs.read"

_VIEWER = frozenset({CATALOG_READ, DEPLOYMENTS_READ})
PERMISSIONS: frozenset[str] = frozenset({
    CATALOG_READ, DEPLOYMENTS_READ, SKILLS_INVOKE, SKILLS_PUBLISH, SKILLS_YANK, SKILLS_TAG, NAMESPACES_UPDATE,
    DEPLOYMENTS_CREATE, DEPLOYMENTS_ROLLBACK, DEPLOYMENTS_WATCH, PUBLISHERS_CREATE, NAMESPACES_CREATE, BLOBS_VERIFY,
    KEYS_CREATE, KEYS_LIST, KEYS_REVOKE, AUDIT_READ, LOGS_READ})

# Roles → the permissions they grant. Ordered from least to most.
ROLES: Mapping[str, frozenset[str]] = {
    "viewer": _VIEWER,
    "invoker": _VIEWER | {SKILLS_INVOKE},
    # The registry also limits publishing, yanking, tagging and namespace changes to the namespaces the
    # publisher owns (an existing publisher's token) or to the key's scopes.
    "publisher": _VIEWER | {SKILLS_PUBLISH, SKILLS_YANK, SKILLS_TAG, NAMESPACES_UPDATE},
    # Skill logs may hold what a skill printed about its inputs: operators (who run the skill) and admins.
    "operator": _VIEWER | {DEPLOYMENTS_CREATE, DEPLOYMENTS_ROLLBACK, DEPLOYMENTS_WATCH, LOGS_READ},
    "admin": PERMISSIONS,
}

_R = "/clawhub.registry.v1.RegistryService/"
_A = "/clawhub.registry.v1.AccessService/"
_D = "/clawhub.deployer.v1.DeployerService/"

PUBLIC_RULES: Mapping[str, Rule] = {
    "/clawhub.gateway.v1.GatewayService/InvokeSkill": Rule(SKILLS_INVOKE, "name"),
    "/clawhub.gateway.v1.GatewayService/TailSkillLogs": Rule(LOGS_READ, "skill"),
    "/clawhub.gateway.v1.GatewayService/GetSkillStats": Rule(DEPLOYMENTS_READ, "skill"),
    # Registry: the catalogue.
    _R + "PublishSkill": Rule(SKILLS_PUBLISH, "metadata.manifest.name", mutating=True,
                              target_fields=("metadata.manifest.version",)),
    _R + "GetSkill": Rule(CATALOG_READ, "name"),
    _R + "ListSkills": Rule(CATALOG_READ),
    _R + "GetSkillVersion": Rule(CATALOG_READ, "name"),
    _R + "ListSkillVersions": Rule(CATALOG_READ, "name"),
    _R + "YankSkillVersion": Rule(SKILLS_YANK, "name", mutating=True, target_fields=("version",)),
    _R + "SetSkillTag": Rule(SKILLS_TAG, "name", mutating=True, target_fields=("tag", "version")),
    _R + "DeleteSkillTag": Rule(SKILLS_TAG, "name", mutating=True, target_fields=("tag",)),
    _R + "ResolveDependencies": Rule(CATALOG_READ, "name"),
    # Registry: publishers and namespaces (the owner of a namespace may change its keys: checked by the registry).
    _R + "CreatePublisher": Rule(PUBLISHERS_CREATE, mutating=True, target_fields=("name",)),
    _R + "CreateNamespace": Rule(NAMESPACES_CREATE, "name", mutating=True),
    _R + "GetNamespace": Rule(CATALOG_READ),
    _R + "ListNamespaces": Rule(CATALOG_READ),
    _R + "UpdateNamespace": Rule(NAMESPACES_UPDATE, "name", mutating=True),
    _R + "VerifyBlobs": Rule(BLOBS_VERIFY),
    # Registry: keys and the audit log.
    _A + "CreateApiKey": Rule(KEYS_CREATE, mutating=True, target_fields=("name",)),
    _A + "ListApiKeys": Rule(KEYS_LIST),
    _A + "RevokeApiKey": Rule(KEYS_REVOKE, mutating=True, target_fields=("id",)),
    _A + "ListAuditEvents": Rule(AUDIT_READ),
    # Deployer.
    _D + "CreateDeployment": Rule(DEPLOYMENTS_CREATE, "skill", mutating=True, target_fields=("version",)),
    _D + "GetDeployment": Rule(DEPLOYMENTS_READ),
    _D + "ListDeployments": Rule(DEPLOYMENTS_READ, "skill"),
    _D + "Rollback": Rule(DEPLOYMENTS_ROLLBACK, "skill", mutating=True),
    _D + "WatchDeployment": Rule(DEPLOYMENTS_WATCH),
    _D + "ListAuditEvents": Rule(AUDIT_READ),
}
