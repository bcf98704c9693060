"""The deployer: takes Ready versions to Active through the release state machine and owns the route table.

A deployment preloads the version's digest on every executor, pushes a new route-table generation to every
watching dispatcher and waits for their acknowledgements; a failure on the way rolls the skill back to the
version that served before. Deployments and the route table live in aiosqlite, so a restarted deployer
serves the same table and generation.
"""
