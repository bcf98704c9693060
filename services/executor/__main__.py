from services.executor.server import build_server
from services.executor.settings import Settings
from services.runtime.server import run

settings = Settings.from_env()
run(lambda: build_server(settings), host=settings.host)
