"""Versions of the release-test skill (tests/e2e/release_skill.wat), written as skill directories to publish.

Each version answers `"ok VERSION"`; a bad one traps or sleeps on inputs carrying the marker byte `!`
(see the WAT file). Its smoke example has no marker, so a bad version passes the deployer's smoke check
and fails only under real traffic, which is what the bake-window analysis is for.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).with_name("release_skill.wat")
HEALTHY, TRAP_ON_MARKER, SLOW_ON_MARKER = 0, 1, 2
MARKER = "!boom"


def _replace_marked(text: str, tag: str, line: str) -> str:
    lines = text.splitlines()
    hits = [i for i, existing in enumerate(lines) if existing.rstrip().endswith(f";; {tag}")]
    assert len(hits) == 1, f"{tag} must mark exactly one line of {TEMPLATE.name}"
    indent = lines[hits[0]][: len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
    lines[hits[0]] = f"{indent}{line} ;; {tag}"
    return "\n".join(lines) + "\n"


def write_skill(directory: Path, name: str, version: str, *, mode: int = HEALTHY,
                slow_ms: int = 300) -> Path:
    """Write `directory/skill.toml` and its module; returns the directory."""
    output = f'"ok {version}"'
    wat = TEMPLATE.read_text()
    wat = _replace_marked(wat, "@OUTPUT", f'(data (i32.const 1024) "{output.replace(chr(34), chr(92) + chr(34))}")')
    wat = _replace_marked(wat, "@OUTPUT_LEN", f"(global $out_len i32 (i32.const {len(output)}))")
    wat = _replace_marked(wat, "@MODE", f"(global $mode i32 (i32.const {mode}))")
    wat = _replace_marked(wat, "@SLOW_NS", f"(global $slow_ns i64 (i64.const {slow_ms * 1_000_000}))")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "release.wat").write_text(wat)
    escaped = output.replace('"', '\\"')
    (directory / "skill.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\ndescription = "release test skill (mode {mode})"\n'
        f'abi = "wasi-command-v1"\nmodule = "release.wat"\ncapabilities = []\n\n'
        f'[limits]\nmemory = "1MiB"\ntimeout_ms = 5000\n\n'
        f'[[examples]]\ninput = "\\"smoke\\""\noutput = "{escaped}"\n')
    return directory
