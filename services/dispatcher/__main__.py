"""`python -m services.dispatcher`: serve the dispatcher until SIGTERM."""

from services.dispatcher.server import build_server
from services.dispatcher.settings import Settings
from services.runtime.server import run

settings = Settings.from_env()
run(lambda: build_server(settings), host=settings.host)
