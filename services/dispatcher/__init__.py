"""The dispatcher: routes each invocation to an executor running the skill's active version.

It keeps the route table from the deployer's WatchRoutes stream (acknowledging every generation it
applies), picks a target version by weight and an executor by power of two choices on outstanding calls,
and retries on another executor when one is UNAVAILABLE. While a release is analysed, a call that fails on
the new (candidate) version is retried once on the stable one; per-version stats go to the deployer
(ReportStats) for its analysis.
"""
