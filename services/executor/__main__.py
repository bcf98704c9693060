from services.executor.server import build_server
from services.executor.settings import Settings
from services.runtime.server import main

main("executor", Settings.from_env, build_server)
