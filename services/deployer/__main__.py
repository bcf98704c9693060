"""`python -m services.deployer`: serve the deployer until SIGTERM."""

from services.deployer.server import build_server
from services.deployer.settings import Settings
from services.runtime.server import main

main("deployer", Settings.from_env, build_server)
