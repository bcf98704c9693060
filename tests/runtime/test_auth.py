"""services/runtime/auth.py: credentials to principals (cache bound, JWTs) and refusals."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.runtime.auth import (
    Authenticator,
    AuthSettings,
    Principal,
    authorize,
    key_principal,
    new_api_key,
    read_jwks,
    token_sha256,
)
from services.runtime.errors import Reason, ServiceError

SECRET = b"s" * 40


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_a_revoked_key_is_refused_once_the_one_second_cache_bound_passes() -> None:
    key_id, key = new_api_key()
    known = {token_sha256(key): key_principal(key_id, "bot", "invoker", ())}
    lookups = []

    async def resolve(digest: str) -> Principal | None:
        lookups.append(digest)
        return known.get(digest)

    now = [100.0]
    auth = Authenticator(AuthSettings(enabled=True), resolve, clock=lambda: now[0])
    assert (await auth.principal(bearer(key))).name == f"chk_{key_id} (bot)"
    known.clear()  # revoked at the registry
    now[0] += 0.99
    assert (await auth.principal(bearer(key))).roles == {"invoker"}  # still cached
    now[0] += 0.02
    with pytest.raises(ServiceError) as caught:
        await auth.principal(bearer(key))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and caught.value.reason == Reason.INVALID_TOKEN
    assert f"chk_{key_id}" in caught.value.message and key not in caught.value.message
    assert len(lookups) == 2


def test_missing_and_refused_permissions_name_the_permission() -> None:
    with pytest.raises(ServiceError) as caught:
        authorize(Principal("anonymous", "anonymous"), "skills.invoke", "com.acme.x")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and caught.value.reason == Reason.CREDENTIALS_REQUIRED
    with pytest.raises(ServiceError) as caught:
        authorize(Principal("k", "key", frozenset({"invoker"})), "deployments.create", "com.acme.x")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.metadata["permission"] == "deployments.create"
    with pytest.raises(ServiceError) as caught:
        authorize(Principal("k", "key", frozenset({"operator"}), ("com.acme",)), "deployments.create", "com.ex.y")
    assert caught.value.metadata["scope"] == "com.ex.y" and caught.value.metadata["granted_scopes"] == "com.acme"
    # Anonymous roles open what they grant, nothing else.
    authorize(Principal("anonymous", "anonymous", frozenset({"viewer"})), "catalog.read", "com.acme.x")


async def test_jwts_hs256_and_eddsa_map_sub_roles_and_scopes(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    settings = AuthSettings(enabled=True, hs256_secret=SECRET, jwks=read_jwks(tmp_path / "jwks.json"),
                            issuer="https://idp", audience="clawhub")
    auth = Authenticator(settings, None)
    now = int(time.time())
    claims = {"sub": "alice", "roles": ["operator"], "scope": "com.acme. com.beta", "exp": now + 60,
              "iss": "https://idp", "aud": "clawhub"}
    alice = await auth.principal(bearer(jwt.encode(claims, SECRET, algorithm="HS256")))
    assert (alice.name, alice.roles, alice.scopes) == ("jwt:alice", {"operator"}, ("com.acme", "com.beta"))
    bob = await auth.principal(bearer(jwt.encode({**claims, "sub": "bob", "role": "viewer", "roles": None},
                                                 private, algorithm="EdDSA", headers={"kid": "k1"})))
    assert bob.name == "jwt:bob"
    for bad, problem in (({**claims, "exp": now - 30}, "expired"), ({**claims, "nbf": now + 60}, "nbf"),
                         ({**claims, "aud": "other"}, "does not verify"),
                         ({k: v for k, v in claims.items() if k != "exp"}, "does not verify")):
        with pytest.raises(ServiceError) as caught:
            await auth.principal(bearer(jwt.encode(bad, SECRET, algorithm="HS256")))
        assert caught.value.reason == Reason.INVALID_TOKEN and problem in caught.value.message, problem
    # Signed with a key the JWKS does not have; the `none` algorithm.
    with pytest.raises(ServiceError):
        await auth.principal(bearer(jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                                               headers={"kid": "k1"})))
    with pytest.raises(ServiceError):
        await auth.principal(bearer(jwt.encode(claims, None, algorithm="none")))


async def test_a_jwt_is_refused_where_no_jwt_keys_are_configured() -> None:
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    with pytest.raises(ServiceError) as caught:
        await Authenticator(AuthSettings(enabled=True), None).principal(bearer(token))
    assert "accepts none" in caught.value.message


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CLAWHUB_USER_AUTH", "CLAWHUB_ANONYMOUS_ROLES", "CLAWHUB_JWT_HS256_SECRET_FILE",
                 "CLAWHUB_JWT_JWKS_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert AuthSettings.from_env() == AuthSettings(enabled=True)
    monkeypatch.setenv("CLAWHUB_ANONYMOUS_ROLES", "viewer,invoker")
    assert AuthSettings.from_env().anonymous_roles == {"viewer", "invoker"}
    monkeypatch.setenv("CLAWHUB_ANONYMOUS_ROLES", "root")
    with pytest.raises(Exception, match="unknown role"):
        AuthSettings.from_env()
    monkeypatch.delenv("CLAWHUB_ANONYMOUS_ROLES")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o644)
    monkeypatch.setenv("CLAWHUB_JWT_HS256_SECRET_FILE", str(secret))
    with pytest.raises(Exception, match="chmod 600"):
        AuthSettings.from_env()


async def test_while_the_registry_is_down_a_recently_confirmed_key_keeps_working() -> None:
    key_id, key = new_api_key()
    principal = key_principal(key_id, "bot", "invoker", ())
    down = [False]

    async def resolve(digest: str) -> Principal | None:
        if down[0]:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE, "registry down")
        return principal if digest == token_sha256(key) else None

    now = [0.0]
    auth = Authenticator(AuthSettings(enabled=True), resolve, clock=lambda: now[0])
    assert await auth.principal(bearer(key)) == principal
    down[0] = True
    now[0] += 5.0
    assert await auth.principal(bearer(key)) == principal  # invoking needs no registry
    with pytest.raises(ServiceError) as caught:  # a credential never confirmed: refused, UNAVAILABLE
        await auth.principal(bearer(new_api_key()[1]))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    now[0] += 601.0
    with pytest.raises(ServiceError):
        await auth.principal(bearer(key))


async def test_callers_of_one_key_share_its_lookup_and_a_busy_key_is_refreshed_without_waiting() -> None:
    key_id, key = new_api_key()
    principal = key_principal(key_id, "bot", "invoker", ())
    lookups: list[str] = []
    answer = asyncio.Event()

    async def resolve(digest: str) -> Principal | None:
        lookups.append(digest)
        await answer.wait()
        return principal if digest == token_sha256(key) else None

    now = [0.0]
    auth = Authenticator(AuthSettings(enabled=True), resolve, clock=lambda: now[0])
    callers = [asyncio.ensure_future(auth.principal(bearer(key))) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert len(lookups) == 1  # fifty callers of a key the cache does not hold: one registry lookup
    callers[0].cancel()  # a caller that goes away does not cancel the lookup for the others
    answer.set()
    assert all(p == principal for p in await asyncio.gather(*callers[1:]))
    # Half-way through the cache time a hit refreshes the answer in the background: the caller does not wait.
    answer.clear()
    now[0] = 0.6
    assert await asyncio.wait_for(auth.principal(bearer(key)), 0.5) == principal
    await asyncio.sleep(0.01)
    assert len(lookups) == 2
    assert await auth.principal(bearer(key)) == principal  # one refresh at a time
    assert len(lookups) == 2
    answer.set()
    await asyncio.sleep(0.01)
    now[0] = 1.5  # past the first answer's bound, within the refreshed one's (looked up at 0.6)
    assert await asyncio.wait_for(auth.principal(bearer(key)), 0.5) == principal
    # An unknown token is not refreshed ahead (made-up keys cost one lookup per cache time, not more).
    unknown = new_api_key()[1]
    answer.set()
    for at in (2.0, 2.7):
        now[0] = at
        with pytest.raises(ServiceError):
            await auth.principal(bearer(unknown))
    await asyncio.sleep(0.01)
    assert lookups.count(token_sha256(unknown)) == 1
