"""The deployer: takes Ready versions to Active through the release state machine and owns the route table.

A deployment preloads the version's digest on every executor, pushes a new route-table generation to every
watching dispatcher and waits for their acknowledgements, then analyses the new version (a blue-green bake
window or canary steps) with the dispatchers' per-version stats and the executors' per-digest health; a
failure on the way, or a breach, rolls the skill back to the version that served before. A circuit breaker
refuses deployments of a skill that failed too often lately. Deployments and the route table live in
aiosqlite, so a restarted deployer serves the same table and generation (and keeps the breaker).
"""
