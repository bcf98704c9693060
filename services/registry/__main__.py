"""`python -m services.registry`: serve the registry until SIGTERM/SIGINT."""

from __future__ import annotations

from services.registry.server import build_server
from services.registry.settings import Settings
from services.runtime.server import main

main("registry", Settings.from_env, build_server)
