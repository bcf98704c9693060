"""`python -m services.dispatcher`: serve the dispatcher until SIGTERM."""

from services.dispatcher.server import build_server
from services.dispatcher.settings import Settings
from services.runtime.server import main

main("dispatcher", Settings.from_env, build_server)
