"""`python -m services.deployer`: serve the deployer until SIGTERM."""

from services.deployer.server import build_server
from services.deployer.settings import Settings
from services.runtime.server import run

settings = Settings.from_env()
run(lambda: build_server(settings), host=settings.host)
