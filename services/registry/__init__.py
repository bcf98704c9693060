"""The registry service: stores, verifies and serves skill packages.

Metadata lives in aiosqlite (WAL), module bytes in a content-addressed blob store on disk. A publish streams
the module while hashing it, checks the expected sha256, then takes the version through the release state
machine `Pending → Verifying → Ready/Failed`, with every transition persisted.
"""
