"""The credentials file `clawhub up` writes: several suites starting at once each keep their entry."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from services.cli import credentials


def _remember(config: str, index: int, data_dir: str) -> None:
    os.environ["XDG_CONFIG_HOME"] = config
    for round_ in range(20):
        credentials.remember(f"127.0.0.1:{50000 + index}", f"chk_{index:012x}_{round_}", Path(data_dir))


def test_concurrent_writers_lose_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = str(tmp_path / "config")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_remember, args=(config, i, str(tmp_path))) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    monkeypatch.setenv("XDG_CONFIG_HOME", config)
    found = {i: credentials.lookup(f"127.0.0.1:{50000 + i}") for i in range(6)}
    assert found == {i: f"chk_{i:012x}_19" for i in range(6)}
    assert oct(credentials.credentials_path().stat().st_mode & 0o777) == "0o600"
