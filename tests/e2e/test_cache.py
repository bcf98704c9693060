"""The result cache through the real suite and CLI (docs/cache.md): `[cache] ttl` in skill.toml travels from
publish through the deployer's route to the gateway; `clawhub invoke -v` says miss, then hit; `--no-cache`
bypasses; a TTL out of range is refused at publish."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.e2e.conftest import ROOT, Suite
from tests.e2e.test_users import run

SKILL = "com.example.cached-shout"


def cached_dir(tmp_path: Path, ttl: str) -> Path:
    directory = tmp_path / f"cached-{ttl}"
    directory.mkdir()
    shutil.copy(ROOT / "examples" / "skills" / "uppercase" / "uppercase.wat", directory)
    (directory / "skill.toml").write_text(f'''name = "{SKILL}"
version = "1.0.0"
description = "Shouts its input back, a pure function"
abi = "wasi-command-v1"
module = "uppercase.wat"
capabilities = []

[cache]
ttl = "{ttl}"

[limits]
memory = "16MiB"
timeout_ms = 2000
''')
    return directory


def cache_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("cache: "))


def test_invoke_says_miss_then_hit_and_no_cache_bypasses(suite: Suite, tmp_path: Path) -> None:
    refused = run(suite, "publish", str(cached_dir(tmp_path, "48h")))
    assert refused.returncode != 0 and "cache.ttl" in refused.stderr and "out of range" in refused.stderr
    for args in (("publish", str(cached_dir(tmp_path, "60s"))), ("deploy", f"{SKILL}@1.0.0", "--plain")):
        done = run(suite, *args)
        assert done.returncode == 0, done.stderr
    time.sleep(1.5)  # the gateway reads the route table again within a second (ROUTES_MAX_AGE_SECONDS)
    first = run(suite, "invoke", SKILL, "--raw", "hello cache", "-v")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "HELLO CACHE" and cache_line(first.stderr) == "cache: miss"
    second = run(suite, "invoke", SKILL, "--raw", "hello cache", "-v")
    assert second.stdout.strip() == "HELLO CACHE" and cache_line(second.stderr) == "cache: hit_l1"
    bypassed = run(suite, "invoke", SKILL, "--raw", "hello cache", "-v", "--no-cache")
    assert bypassed.stdout.strip() == "HELLO CACHE" and cache_line(bypassed.stderr) == "cache: bypass"
    other = run(suite, "invoke", SKILL, "--raw", "other input", "-v")
    assert other.stdout.strip() == "OTHER INPUT" and cache_line(other.stderr) == "cache: miss"
