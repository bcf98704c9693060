from services.gateway.server import build_server
from services.gateway.settings import Settings
from services.runtime.server import run

settings = Settings.from_env()
run(lambda: build_server(settings), host=settings.host)
