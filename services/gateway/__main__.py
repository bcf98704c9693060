from services.gateway.server import build_server
from services.gateway.settings import Settings
from services.runtime.server import main

main("gateway", Settings.from_env, build_server)
