"""Token-bucket rate limits for every service: a policy from `CLAWHUB_RATE_*` settings, buckets in this
process or in Redis, and a grpc.aio server interceptor that applies them (see docs/ratelimits.md).

    settings = RateLimitSettings.from_env()
    interceptor = rate_limit_interceptor(settings, domain="gateway.clawhub")   # None when turned off
    create_server(..., interceptors=[interceptor] if interceptor else [])      # after the ErrorInterceptor
    ...
    await interceptor.close()
"""

from services.runtime.ratelimit.buckets import Backend, Decision, LocalBackend, RateLimitCounters, refill
from services.runtime.ratelimit.interceptor import (
    METHOD_CLASSES,
    RETRY_AFTER_METADATA,
    CallKey,
    Identify,
    PeerIdentity,
    RateLimiter,
    RateLimitInterceptor,
    bucket_key,
    rate_limit_interceptor,
)
from services.runtime.ratelimit.policy import CLASSES, ROLES, Limit, RateLimitSettings, parse_limit
from services.runtime.ratelimit.redis_backend import RedisBackend

__all__ = [
    "CLASSES",
    "METHOD_CLASSES",
    "RETRY_AFTER_METADATA",
    "ROLES",
    "Backend",
    "CallKey",
    "Decision",
    "Identify",
    "Limit",
    "LocalBackend",
    "PeerIdentity",
    "RateLimitCounters",
    "RateLimitInterceptor",
    "RateLimitSettings",
    "RateLimiter",
    "RedisBackend",
    "bucket_key",
    "parse_limit",
    "rate_limit_interceptor",
    "refill",
]
