"""`clawhub new`, `build`, `run` and `test`: the skill author's loop on one machine, with no server.

`new` scaffolds a skill that builds and passes its own examples as generated; `build` runs the language's
toolchain, and when one is missing says which and exactly how to install it; `run` and `test` run the skill
in process in the executor's own sandbox (`services/executor/sandbox.py`'s `Sandbox`), with the limits the
executor would resolve for it, so what passes here passes the deployer's smoke test.

The CLI stays light to import: the sandbox (wasmtime's engines, the executor's tracing and metrics) is
imported only inside `run` and `test`.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.cli import manifest, templates
from services.runtime.names import skill_name_problem

if TYPE_CHECKING:
    from services.executor.sandbox import CompiledModule, RunLimits, RunResult, Sandbox

LANGUAGES = ("wat", "c", "rust", "assemblyscript", "python", "js")
# The ABIs each language's scaffold can target; the first is the default.
LANGUAGE_ABIS: dict[str, tuple[str, ...]] = {
    "wat": (templates.WASI, templates.MEMORY),
    "c": (templates.WASI, templates.MEMORY),
    "rust": (templates.WASI, templates.MEMORY),
    # A WASI command needs a WASI shim in AssemblyScript; memory-v1 needs nothing and is its natural fit.
    "assemblyscript": (templates.MEMORY,),
    "python": (templates.COMPONENT,),
    "js": (templates.COMPONENT,),
}
RUST_TARGET = "wasm32-wasip1"
# clang's name for WASI preview 1: every clang that targets WASI knows `wasm32-wasi` (newer ones also
# `wasm32-wasip1`), so the older name works with the widest range of compilers.
C_TARGET = "wasm32-wasi"
EXIT_FAILED = 1
EXIT_USAGE = 2
# The platform's WIT world for component-v1 skills, in a source checkout (scaffolds copy it when it is there).
PLATFORM_WIT = Path(__file__).resolve().parents[2] / "wit" / "skill.wit"
PY_INSTALL = "pip install componentize-py"

C_INSTALL = ("install wasi-sdk (clang with wasi-libc: https://github.com/WebAssembly/wasi-sdk/releases, unpacked "
             "to /opt/wasi-sdk or with WASI_SDK_PATH set to where it is), or on Debian/Ubuntu "
             "`apt-get install clang lld wasi-libc libclang-rt-dev-wasm32` (Debian 12: `apt-get install clang-14 "
             "lld-14 wasi-libc libclang-rt-14-dev-wasm32`)")
RUST_INSTALL = "install Rust with rustup (https://rustup.rs), then `rustup target add wasm32-wasip1`"
NODE_INSTALL = ("install Node.js 18 or later (https://nodejs.org, or `apt-get install nodejs npm`), then run "
                "`npm install` in the skill directory")


class AuthorError(Exception):
    """A failure to report in one clear paragraph, with the exit code to end with."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ToolchainMissing(AuthorError):
    """The language's toolchain (or a part of it) is not installed; the message says how to install it."""


# --- new --------------------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    """A package name for Cargo/npm from the skill name's last label."""
    return re.sub(r"[^a-z0-9-]", "-", name.rsplit(".", 1)[-1]).strip("-") or "skill"


def scaffold(name: str, language: str, abi: str | None, directory: Path) -> list[Path]:
    """Write a new skill directory; returns the files written. Refuses a directory that has anything in it,
    so that nothing of the author's is overwritten."""
    if "." not in name:
        name = f"com.example.{name}"
    if problem := skill_name_problem(name):
        raise AuthorError(f"error: NAME: {problem}", EXIT_USAGE)
    if language not in LANGUAGE_ABIS:
        raise AuthorError(f"error: --lang: {language!r} is not one of {', '.join(LANGUAGES)}", EXIT_USAGE)
    abis = LANGUAGE_ABIS[language]
    abi = abi or abis[0]
    if abi not in abis:
        why = {"assemblyscript": " (AssemblyScript has no stdin/stdout without a WASI shim: memory-v1 needs "
                                 "nothing)"}.get(language, "")
        raise AuthorError(f"error: --abi: a {language} skill can be {' or '.join(abis)}, not {abi}{why}", EXIT_USAGE)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise AuthorError(f"error: {directory} already exists and is not an empty directory: pick another DIR")
    module = "skill.wat" if language == "wat" else "skill.wasm"
    values = {"name": name, "slug": _slug(name), "module": module}
    files = {path: text.format(**values) for path, text in templates.files_for(language, abi, module).items()}
    if "wit/skill.wit" in files and PLATFORM_WIT.is_file():
        files["wit/skill.wit"] = PLATFORM_WIT.read_text(encoding="utf-8")
    files["skill.toml"] = templates.manifest_text(name, abi, module)
    build = templates.BUILD_STEPS[language].format(**values).rstrip("\n")
    # A build command joins the indented block of steps; a sentence stands before it as a paragraph.
    build += "\n" if "\n    " in build else "\n\n"
    steps = templates.COMPONENT_STEPS if abi == templates.COMPONENT else templates.STEPS
    files["README.md"] = templates.README.format(name=name, language=templates.LANGUAGE_NAMES[language],
                                                 guide=language, build=build, steps=steps)
    if language in templates.GITIGNORE:
        files[".gitignore"] = templates.GITIGNORE[language]
    written = []
    for path, text in files.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def cmd_new(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else Path(args.name.rsplit(".", 1)[-1])
    written = scaffold(args.name, args.lang, args.abi, directory)
    print(f"created {directory}/ ({args.lang}): " + ", ".join(str(p.relative_to(directory)) for p in written))
    steps = [] if args.lang in ("wat", "python", "js") else [f"clawhub build {directory}"]
    if args.lang == "assemblyscript":
        steps.insert(0, f"(cd {directory} && npm install)")
    if args.lang in ("python", "js") and not component_abi_available():
        print(f"note: {args.lang} skills use the component-v1 ABI, which this clawhub does not run yet; "
              f"`clawhub build {directory}` says what it will need")
        return 0
    if args.lang == "js":
        steps.insert(0, f"(cd {directory} && npm install)")
    if args.lang in ("python", "js"):
        steps.append(f"clawhub build {directory}")
    steps += [f"clawhub test {directory}", f"clawhub run {directory} --input '\"world\"' -v"]
    print("next: " + "  then  ".join(steps))
    return 0


# --- build ------------------------------------------------------------------------------------------------

def _doc(directory: Path) -> dict[str, Any]:
    """The raw skill.toml (before `manifest.load`, which refuses ABIs this version cannot run)."""
    path = directory / manifest.MANIFEST_FILE
    if not path.is_file():
        raise AuthorError(f"error: {directory}: no {manifest.MANIFEST_FILE} here (is this a skill directory? "
                          "`clawhub new NAME --lang LANG DIR` makes one)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AuthorError(f"error: {path}: not valid TOML: {exc}") from None


def detect_language(directory: Path, doc: dict[str, Any]) -> str:
    """The language a skill directory is written in, from its files: Cargo.toml (Rust), asconfig.json
    (AssemblyScript), app.py / app.js (Python / JavaScript components), C files under src/ or beside the
    manifest, else the module itself (.wat: nothing to build)."""
    if (directory / "Cargo.toml").is_file():
        return "rust"
    if (directory / "asconfig.json").is_file():
        return "assemblyscript"
    if (directory / "app.py").is_file():
        return "python"
    if (directory / "app.js").is_file() or doc.get("abi") == templates.COMPONENT:
        return "js"
    if _c_sources(directory):
        return "c"
    if str(doc.get("module", "")).endswith(".wat"):
        return "wat"
    raise AuthorError(f"error: {directory}: nothing clawhub knows how to build (no Cargo.toml, asconfig.json, "
                      "src/*.c, app.py or app.js; a .wat module needs no build); build the module named in "
                      f"{manifest.MANIFEST_FILE} with your own toolchain")


def _c_sources(directory: Path) -> list[Path]:
    return sorted((directory / "src").glob("*.c")) or sorted(directory.glob("*.c"))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_tool(command: Sequence[str], cwd: Path, what: str, hint: Callable[[str], str | None] | None = None,
              env: dict[str, str] | None = None) -> None:
    """Run one toolchain command, its output going to the terminal as it comes (compilers' diagnostics are
    for the author); a failure names the command and, when `hint` recognises its output, what to install."""
    _progress("  $ " + " ".join(command))
    try:
        process = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                 check=False)
    except OSError as exc:
        raise AuthorError(f"error: cannot run {command[0]}: {exc.strerror or exc}") from None
    output = process.stdout.decode("utf-8", errors="replace")
    if output:
        sys.stderr.write(output if output.endswith("\n") else output + "\n")
    if process.returncode != 0:
        extra = hint(output) if hint else None
        raise AuthorError(f"error: {what} failed (exit code {process.returncode})"
                          + (f"\n  {extra}" if extra else ""))


def _find_clang() -> tuple[str, Path | None]:
    """The C compiler and the WASI sysroot to build with: $CC and $WASI_SYSROOT when set, else wasi-sdk
    ($WASI_SDK_PATH, /opt/wasi-sdk), else clang (or the newest clang-N) on PATH with a sysroot in one of the
    places packages put it. The sysroot is None when the compiler brings its own (wasi-sdk's does)."""
    sdk_roots = [Path(p) for p in (os.environ.get("WASI_SDK_PATH"), "/opt/wasi-sdk") if p]
    compiler = os.environ.get("CC", "")
    sysroot_env = os.environ.get("WASI_SYSROOT")
    if not compiler:
        for root in sdk_roots:
            if (root / "bin" / "clang").is_file():
                sysroot = Path(sysroot_env) if sysroot_env else root / "share" / "wasi-sysroot"
                return str(root / "bin" / "clang"), sysroot
        compiler = shutil.which("clang") or _newest_versioned_clang() or ""
    if not compiler:
        raise ToolchainMissing(f"error: no C compiler for WebAssembly (clang) found: {C_INSTALL}")
    if sysroot_env:
        return compiler, Path(sysroot_env)
    for candidate in (Path("/usr/share/wasi-sysroot"), Path("/usr/local/share/wasi-sysroot"),
                      *(root / "share" / "wasi-sysroot" for root in sdk_roots)):
        if (candidate / "include").is_dir():
            return compiler, candidate
    if Path("/usr/include/wasm32-wasi/stdio.h").is_file():  # Debian's and Ubuntu's wasi-libc
        return compiler, Path("/usr")
    raise ToolchainMissing(f"error: {compiler} is there but no WASI sysroot (wasi-libc) was found (looked for "
                           "$WASI_SYSROOT, /usr/share/wasi-sysroot, wasi-sdk's share/wasi-sysroot, "
                           f"/usr/include/wasm32-wasi): {C_INSTALL}")


def _newest_versioned_clang() -> str | None:
    """`clang-18`, `clang-14`...: what Debian installs when the unversioned `clang` package is not there."""
    found: dict[int, str] = {}
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for entry in names:
            if (m := re.fullmatch(r"clang-(\d+)", entry)) and os.access(os.path.join(folder, entry), os.X_OK):
                found.setdefault(int(m.group(1)), os.path.join(folder, entry))
    return found[max(found)] if found else None


def _c_hint(output: str) -> str | None:
    if "libclang_rt.builtins-wasm32" in output:
        return ("the compiler-rt builtins for wasm32 are missing: `apt-get install libclang-rt-dev-wasm32` "
                "(Debian 12: libclang-rt-14-dev-wasm32), or use wasi-sdk, which has them")
    if "wasm-ld" in output and ("not found" in output or "unable to execute" in output or "No such file" in output):
        return "the WebAssembly linker (wasm-ld) is missing: `apt-get install lld`, or use wasi-sdk"
    if re.search(r"unable to find library -l|cannot open crt1", output):
        return f"wasi-libc is missing from the sysroot: {C_INSTALL}"
    if "unknown target triple" in output or "No available targets" in output:
        return f"this clang was built without the WebAssembly target: {C_INSTALL}"
    return None


def build_c(directory: Path, abi: str, module: Path) -> None:
    compiler, sysroot = _find_clang()
    sources = _c_sources(directory)
    command = [compiler, f"--target={C_TARGET}", "-O2", "-Wall", "-o", str(module.relative_to(directory))]
    if sysroot is not None:
        command.append(f"--sysroot={sysroot}")
    if abi == templates.MEMORY:
        # No main: a reactor exports the functions; the host never calls _initialize (no static constructors).
        command.append("-mexec-model=reactor")
    command += [str(p.relative_to(directory)) for p in sources]
    _run_tool(command, directory, "the C build", _c_hint)


def _rust_hint(output: str) -> str | None:
    if RUST_TARGET in output and ("may not be installed" in output or "can't find crate for `std`" in output
                                  or "can't find crate for `core`" in output):
        return f"the Rust standard library for {RUST_TARGET} is not installed: `rustup target add {RUST_TARGET}`"
    return None


def build_rust(directory: Path, module: Path) -> None:
    cargo = shutil.which("cargo")
    if cargo is None:
        raise ToolchainMissing(f"error: cargo (Rust) is not installed or not on PATH: {RUST_INSTALL}")
    rustc = shutil.which("rustc")
    if rustc is not None:
        try:
            sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, check=True,
                                     cwd=directory).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sysroot = ""
        if sysroot and not (Path(sysroot) / "lib" / "rustlib" / RUST_TARGET).is_dir():
            raise ToolchainMissing(f"error: the Rust target {RUST_TARGET} is not installed for {rustc}: run "
                                   f"`rustup target add {RUST_TARGET}`")
    _run_tool([cargo, "build", "--release", "--target", RUST_TARGET], directory, "cargo build", _rust_hint)
    release = directory / "target" / RUST_TARGET / "release"
    built = release / "skill.wasm"
    if not built.is_file():
        candidates = sorted(release.glob("*.wasm"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not candidates:
            raise AuthorError(f"error: cargo build succeeded but left no .wasm in {release}")
        built = candidates[0]
    shutil.copyfile(built, module)


def build_assemblyscript(directory: Path) -> None:
    npx = shutil.which("npx")
    if npx is None or shutil.which("node") is None:
        raise ToolchainMissing(f"error: Node.js (node and npx) is not installed or not on PATH: {NODE_INSTALL}")
    if not (directory / "node_modules" / ".bin" / "asc").exists():
        raise ToolchainMissing(f"error: the AssemblyScript compiler is not installed in {directory}: run "
                               f"`npm install` there (package.json lists assemblyscript; needs Node.js 18 or later)")
    # --no-install: never fetch a compiler behind the author's back; `npm install` put it in node_modules.
    _run_tool([npx, "--no-install", "asc", "assembly/index.ts", "--target", "release"], directory, "asc")


def component_abi_available() -> bool:
    """Whether this clawhub knows the component-v1 ABI (its manifest loader accepts it, so publish can)."""
    return templates.COMPONENT in manifest.ABIS


def build_python(directory: Path, module: Path) -> None:
    tool = shutil.which("componentize-py") or shutil.which("componentize-py", path=str(Path(sys.executable).parent))
    if tool is None:
        raise ToolchainMissing(f"error: componentize-py is not installed or not on PATH: `{PY_INSTALL}` (into "
                               "the Python environment you run it from)")
    world = component_world(_capabilities(directory))
    _run_tool([tool, "-d", "wit", "-w", world, "componentize", "app", "-o", str(module.relative_to(directory))],
              directory, "componentize-py")


def component_world(capabilities: list[str] | tuple[str, ...]) -> str:
    """The WIT world (wit/skill.wit) a component with these capabilities is built for: a componentize-py
    component imports every interface of its world, and a skill may import only what it declares."""
    kv = "kv" in capabilities
    http = any(c.startswith("http:") for c in capabilities)
    return "skill-kv-http" if kv and http else "skill-kv" if kv else "skill-http" if http else "skill"


def _capabilities(directory: Path) -> list[str]:
    """The `capabilities` of the skill.toml in `directory` (empty when it has none)."""
    import tomllib

    data = tomllib.loads((directory / "skill.toml").read_text(encoding="utf-8"))
    listed = data.get("capabilities", [])
    return [str(c) for c in listed] if isinstance(listed, list) else []


def build_js(directory: Path, module: Path) -> None:
    npx = shutil.which("npx")
    if npx is None or shutil.which("node") is None:
        raise ToolchainMissing(f"error: Node.js (node and npx) is not installed or not on PATH: {NODE_INSTALL}")
    if not (directory / "node_modules" / ".bin" / "componentize-js").exists():
        raise ToolchainMissing(f"error: componentize-js is not installed in {directory}: run `npm install` there "
                               "(package.json lists @bytecodealliance/componentize-js; needs Node.js 18 or later)")
    # componentize-js itself: `jco componentize` (1.35) fails to read a WIT path through its WASI wasm-tools.
    # `-d http fetch-event`: without them the component imports wasi:http (for fetch), which a skill may not.
    # The world follows the capabilities, as for Python: app.js may import only what that world has.
    world = component_world(_capabilities(directory))
    _run_tool([npx, "--no-install", "componentize-js", "app.js", "--wit", "wit/skill.wit", "--world-name", world,
               "-d", "http", "fetch-event", "-o", str(module.relative_to(directory))], directory, "componentize-js")


def component_unavailable(language: str, directory: Path) -> AuthorError:
    """What `build`, `run` and `test` say about a Python or JavaScript skill: the ABI is not there yet."""
    tool, install, command = {
        "python": ("componentize-py", f"`{PY_INSTALL}`",
                   "componentize-py -d wit -w skill componentize app -o skill.wasm"),
        "js": ("componentize-js", "`npm install` in the skill directory (package.json lists "
               "@bytecodealliance/componentize-js)",
               "npx componentize-js app.js --wit wit/skill.wit --world-name skill -d http fetch-event -o "
               "skill.wasm"),
    }[language]
    return AuthorError(
        f"error: {directory} is a {templates.LANGUAGE_NAMES[language]} skill for the component-v1 ABI "
        "(WebAssembly components), which this version of clawhub cannot build, run or publish yet.\n"
        f"  A clawhub that has it runs {tool} here: `{command}`; to prepare, {install}.\n"
        "  Until then, write the skill in C, Rust, AssemblyScript or WAT (`clawhub new NAME --lang c`).")


def cmd_build(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    doc = _doc(directory)
    language = detect_language(directory, doc)
    if language in ("python", "js") and not component_abi_available():
        raise component_unavailable(language, directory)
    abi = str(doc.get("abi", templates.WASI))
    module_name = doc.get("module")
    if not isinstance(module_name, str):
        raise AuthorError(f"error: {directory / manifest.MANIFEST_FILE}: `module` is required")
    module = manifest.confined_path(directory, module_name, "module") if language != "wat" else directory / module_name
    started = time.perf_counter()
    if language == "wat":
        _progress(f"{directory}: WAT needs no build (clawhub compiles {module_name} itself); checking it")
    else:
        _progress(f"building {directory} ({templates.LANGUAGE_NAMES[language]}, {abi}) → {module_name}")
        module.parent.mkdir(parents=True, exist_ok=True)
        if language == "c":
            build_c(directory, abi, module)
        elif language == "rust":
            build_rust(directory, module)
        elif language == "python":
            build_python(directory, module)
        elif language == "js":
            build_js(directory, module)
        else:
            build_assemblyscript(directory)
    if abi == templates.COMPONENT:
        # A component is checked by the sandbox that runs it (the executor's check, as the registry's).
        loaded = load(directory, metered=False)
        loaded.sandbox.close()
        package = loaded.package
    else:
        package = manifest.load(directory)  # compiles WAT; reads the .wasm
        problems = _abi_problems(package, abi)
        if problems:
            raise AuthorError(f"error: {module} does not implement {abi}:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    print(f"ok: {module} ({len(package.module):,} bytes, {abi}) in {time.perf_counter() - started:.1f} s")
    return 0


def _abi_problems(package: manifest.SkillPackage, abi: str) -> list[str]:
    """What the registry would refuse about the module (the same check, `compile_and_check`)."""
    from services.runtime.wasm import COMPONENT_ABI, LIBRARY_V1, SKILL_ABIS, compile_and_check, make_engine

    if abi == COMPONENT_ABI:  # the registry's component check: its WIT world and imports
        from services.runtime.components import compile_component

        return compile_component(make_engine(), package.module, list(package.manifest.capabilities))[1]
    checker = SKILL_ABIS.get(abi, LIBRARY_V1 if abi == "library-v1" else None)
    dependencies = [d.package for d in package.manifest.dependencies]
    _, problems = compile_and_check(make_engine(), package.module, checker, list(package.manifest.capabilities),
                                    dependencies)
    return problems


# --- run and test -----------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A skill directory ready to call: its package, the module compiled by the sandbox, its limits."""

    package: manifest.SkillPackage
    sandbox: Sandbox
    compiled: CompiledModule
    limits: RunLimits


def _stale_warning(directory: Path, package: manifest.SkillPackage) -> None:
    """Warn when a built module is older than its sources: running it would test yesterday's code."""
    if package.module_path.suffix == ".wat":
        return
    sources = [p for pattern in ("src/**/*", "assembly/**/*", "*.c", "Cargo.toml", "asconfig.json", "app.py", "app.js",
                                "wit/*.wit")
               for p in directory.glob(pattern) if p.is_file()]
    if sources and max(p.stat().st_mtime for p in sources) > package.module_path.stat().st_mtime:
        _progress(f"warning: {package.module_path} is older than its sources: run `clawhub build {directory}`")


def load(directory: Path, *, metered: bool) -> Loaded:
    """Read the skill directory and compile its module in a fresh sandbox, with the executor's checks and
    the limits the executor would give its calls (its default settings, the manifest's `[limits]`)."""
    doc = _doc(directory)
    abi = str(doc.get("abi", templates.WASI))
    if abi == templates.COMPONENT and not component_abi_available():
        raise component_unavailable(detect_language(directory, doc), directory)
    module_name = doc.get("module")
    if isinstance(module_name, str) and not module_name.endswith(".wat") and not (directory / module_name).exists():
        try:
            language = detect_language(directory, doc)
        except AuthorError:
            language = ""
        if language:
            raise AuthorError(f"error: {directory / module_name} is not built yet: run `clawhub build {directory}`")
    try:
        package = manifest.load(directory)
    except manifest.ManifestError as exc:
        raise AuthorError(f"error: {exc}") from None
    if abi == "library-v1":
        raise AuthorError(f"error: {package.manifest.name} is a library (abi = \"library-v1\"): it is never called "
                          "on its own, so there is nothing to run; test it through a skill that depends on it")
    if package.manifest.dependencies:
        names = ", ".join(d.package for d in package.manifest.dependencies)
        raise AuthorError(f"error: {package.manifest.name} depends on {names}: `clawhub run` and `clawhub test` do "
                          "not link dependency packages yet; publish them and use `clawhub deploy` + `invoke`")
    _stale_warning(directory, package)

    from services.executor.sandbox import ModuleRejected, Sandbox
    from services.runtime.wasm import SKILL_ABIS

    limits = resolve_limits(package, metered=metered)
    # A component (no entry in SKILL_ABIS) is told apart by its binary: the sandbox hands it to its runner.
    sandbox = Sandbox(SKILL_ABIS.get(abi), pool_slots=2)
    digest = "sha256:" + hashlib.sha256(package.module).hexdigest()
    try:
        compiled = sandbox.compile(digest, package.module, list(package.manifest.capabilities),
                                   metered=limits.fuel > 0)
    except ModuleRejected as exc:
        sandbox.close()
        raise AuthorError(f"error: {package.module_path} cannot run as {abi} (the registry would refuse it too):\n"
                          + "\n".join(f"  - {p}" for p in exc.problems)) from None
    return Loaded(package, sandbox, compiled, limits)


def resolve_limits(package: manifest.SkillPackage, *, metered: bool) -> RunLimits:
    """The manifest's limits resolved as the executor resolves a call's (`ExecutorServicer._limits`), against
    its default settings: zero takes the default, anything over the ceiling is capped. `metered` without a
    fuel limit in the manifest counts fuel with a budget nothing reaches (for `run -v`'s report)."""
    from services.executor.sandbox import RunLimits
    from services.executor.servicer import MAX_FUEL
    from services.executor.settings import Settings

    s, requested = Settings(), package.manifest.limits

    def pick(value: int, default: int, ceiling: int) -> int:
        return min(value or default, ceiling)

    timeout = s.default_timeout
    if requested.HasField("timeout") and requested.timeout.ToNanoseconds() > 0:
        timeout = requested.timeout.ToNanoseconds() / 1e9
    fuel = min(requested.fuel, MAX_FUEL) or (MAX_FUEL if metered else 0)
    return RunLimits(memory_bytes=pick(requested.memory_bytes, s.default_memory, s.max_memory),
                     timeout_seconds=min(timeout, s.max_timeout),
                     max_output_bytes=pick(requested.max_output_bytes, s.max_output, s.max_output),
                     max_stderr_bytes=pick(requested.max_stderr_bytes, s.max_stderr, s.max_stderr),
                     fuel=fuel)


def max_input(package: manifest.SkillPackage) -> int:
    from services.executor.settings import Settings

    s = Settings()
    return min(package.manifest.limits.max_input_bytes or s.max_input, s.max_input)


@contextmanager
def bundle_dir(directory: Path, package: manifest.SkillPackage) -> Iterator[str | None]:
    """The manifest's `files`, laid out in a temporary directory as the executor unpacks a bundle (only
    what is listed, nothing else of the skill directory), for a skill that declares `files`."""
    if "files" not in package.manifest.capabilities:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="clawhub-bundle-") as root:
        for path, data in manifest.read_files(directory, [f.path for f in package.manifest.files], "files").items():
            target = Path(root) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield root


@contextmanager
def kv_namespace(package: manifest.SkillPackage, kv_file: str | None) -> Iterator[Any]:
    """The skill's key-value namespace for a skill that declares `kv`: a scratch store, empty at the start
    (what the deployer's smoke test gives examples), or with `kv_file` a sqlite file that keeps the values
    from one `clawhub run` to the next. None without `kv`, or in a clawhub without key-value stores."""
    if "kv" not in package.manifest.capabilities:
        yield None
        return
    try:
        from services.executor import kvstore
    except ImportError:  # a clawhub without the kv capability: the sandbox refuses the skill anyway
        yield None
        return
    store = kvstore.KvStore(kvstore.SqliteBackend(Path(kv_file))) if kv_file else kvstore.scratch_store()
    try:
        yield store.namespace(package.manifest.name)
    finally:
        store.close()


def call(loaded: Loaded, stdin: bytes, env: dict[str, str], bundle: str | None, kv: Any = None) -> RunResult:
    from services.executor.sandbox import Grant

    extra = {"kv": kv} if kv is not None else {}
    grant = Grant.of(list(loaded.package.manifest.capabilities), env=env, args=list(loaded.package.manifest.args),
                     bundle_dir=bundle, **extra)
    return loaded.sandbox.run(loaded.compiled, stdin, loaded.limits, grant)


def failure_text(loaded: Loaded, result: RunResult) -> str:
    """A failed call in the executor's words: gRPC status, ErrorInfo reason, message (and the stderr tail)."""
    from services.executor.servicer import ExecutorServicer

    # The executor's own mapping of a verdict to its error; it reads nothing of the servicer's state.
    error = ExecutorServicer._failure(None, loaded.compiled.digest, loaded.limits, result)  # type: ignore[arg-type]
    text = f"{error.code.name} / {error.reason}: {error.message}"
    tail = error.metadata.get("stderr_tail")
    return text + (f"\n  stderr: {tail.strip()}" if tail and tail.strip() else "")


def _env(pairs: list[str] | None, capabilities: Sequence[str]) -> dict[str, str]:
    """`--env KEY=VALUE` (or KEY alone: this shell's $KEY), only for names the manifest declares (as
    `clawhub deploy` refuses others)."""
    from services.runtime.wasm import env_names

    declared = set(env_names(capabilities))
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if key not in declared:
            raise AuthorError(f"error: --env {key}: the manifest does not declare env:{key} "
                              f"(declared: {', '.join(sorted(declared)) or 'none'})", EXIT_USAGE)
        if not sep:
            if key not in os.environ:
                raise AuthorError(f"error: --env {key}: ${key} is not set in this shell", EXIT_USAGE)
            value = os.environ[key]
        env[key] = value
    return env


def _input(args: argparse.Namespace) -> bytes:
    """The skill's stdin as the gateway gives it: `--input` JSON re-encoded as the gateway does (compact,
    keys sorted), `--raw` text and `--input-file` bytes as they are."""
    if args.input is not None:
        from google.protobuf import json_format, struct_pb2

        from services.runtime.jsonvalue import value_to_json

        value = struct_pb2.Value()
        try:
            json_format.Parse(args.input, value)
            return value_to_json(value)
        except (json_format.ParseError, ValueError) as exc:
            raise AuthorError(f"error: --input is not valid JSON: {exc}\n"
                              "  (pass raw text with --raw, or a file with --input-file)", EXIT_USAGE) from None
    if args.raw is not None:
        return str(args.raw).encode()
    if args.input_file is not None:
        try:
            return sys.stdin.buffer.read() if args.input_file == "-" else Path(args.input_file).read_bytes()
        except OSError as exc:
            raise AuthorError(f"error: cannot read --input-file: {exc.strerror or exc}") from None
    return b""


def _usage_line(loaded: Loaded, result: RunResult) -> str:
    from services.runtime.components import COMPONENT_V1

    limits = loaded.limits
    fuel = f"fuel {result.fuel_consumed:,}" if loaded.compiled.metered else "fuel not counted"
    return (f"usage: {result.wall_seconds * 1e3:.2f} ms (limit {limits.timeout_seconds * 1e3:.0f} ms), "
            + (f"peak memory {result.peak_memory_bytes:,} bytes" if loaded.compiled.abi is not COMPONENT_V1
               # Not observable through the component API (services/executor/components.py).
               else "peak memory not measured for components")
            + f" (limit {limits.memory_bytes:,}), {fuel}, "
            f"output {len(result.output):,} bytes")


def _printable(text: str) -> str:
    """A skill's text with control characters escaped, so it cannot drive the author's terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def cmd_run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    loaded = load(directory, metered=args.verbose)
    try:
        package = loaded.package
        stdin = _input(args)
        if len(stdin) > (limit := max_input(package)):
            raise AuthorError(f"error: INVALID_ARGUMENT / INPUT_TOO_LARGE: the input is {len(stdin)} bytes; this "
                              f"call accepts at most {limit} bytes")
        env = _env(args.env, package.manifest.capabilities)
        with bundle_dir(directory, package) as bundle, kv_namespace(package, args.kv_file) as kv:
            result = call(loaded, stdin, env, bundle, kv)
    finally:
        loaded.sandbox.close()
    from services.executor.sandbox import Verdict

    if result.verdict is Verdict.OK:
        sys.stdout.buffer.write(result.output)
        if sys.stdout.isatty() and not result.output.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    if args.verbose:
        print(_usage_line(loaded, result), file=sys.stderr)
        if result.stderr:
            print("stderr:\n" + _printable(result.stderr.decode("utf-8", errors="replace")).rstrip("\n"),
                  file=sys.stderr)
    if result.verdict is not Verdict.OK:
        raise AuthorError("error: " + _printable(failure_text(loaded, result)))
    return 0


def _show(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", errors="replace")
    shown = json.dumps(text[:limit], ensure_ascii=False)
    return shown + ("…" if len(text) > limit else "")


def diff(expected: bytes, actual: bytes) -> list[str]:
    """How an output differs from the expected one, for people: both, a caret under the first difference
    for one-line outputs, a unified diff for longer ones."""
    want, got = expected.decode("utf-8", errors="replace"), actual.decode("utf-8", errors="replace")
    if "\n" in want.rstrip("\n") or "\n" in got.rstrip("\n"):
        return [line.rstrip("\n") for line in difflib.unified_diff(
            want.splitlines(keepends=True), got.splitlines(keepends=True), "expected", "actual")]
    at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
    shown_want, shown_got = json.dumps(want, ensure_ascii=False), json.dumps(got, ensure_ascii=False)
    caret = len(json.dumps(want[:at], ensure_ascii=False)) - 1  # the quote opens both
    lines = [f"- expected {shown_want}", f"+ actual   {shown_got}", " " * (11 + caret) + "^ first difference "
             f"at byte {len(want[:at].encode())}"]
    return lines


def cmd_test(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    loaded = load(directory, metered=False)
    examples = loaded.package.manifest.examples
    if not examples:
        loaded.sandbox.close()
        raise AuthorError(f"error: {directory / manifest.MANIFEST_FILE} has no [[examples]]: nothing to test. Add "
                          "some (input and the exact expected output); the deployer runs them before a version "
                          "takes traffic")
    from services.executor.sandbox import Verdict

    failed = 0
    try:
        env = _env(args.env, loaded.package.manifest.capabilities)
        # One scratch key-value store for all the examples, in order, as the deployer's smoke test runs them.
        with bundle_dir(directory, loaded.package) as bundle, kv_namespace(loaded.package, None) as kv:
            for index, example in enumerate(examples):
                result = call(loaded, example.input, env, bundle, kv)
                ms = f"({result.wall_seconds * 1e3:.2f} ms)"
                if result.verdict is Verdict.OK and result.output == example.expected_output:
                    print(f"ok    example {index}: {_show(example.input, 60)} → {_show(result.output, 60)} {ms}")
                    continue
                failed += 1
                if result.verdict is not Verdict.OK:
                    print(f"FAIL  example {index}: {_show(example.input, 60)}: "
                          f"{_printable(failure_text(loaded, result))} {ms}")
                else:
                    print(f"FAIL  example {index}: {_show(example.input, 60)}: the output differs {ms}")
                    for line in diff(example.expected_output, result.output):
                        print("      " + _printable(line))
                sys.stdout.flush()
    finally:
        loaded.sandbox.close()
    total = len(examples)
    # Not "N passed, N failed" alone on a line: CI log readers take that for a test runner's summary.
    print(f"{loaded.package.manifest.name}: {total - failed} of {total} example(s) passed"
          + (f", {failed} failed" if failed else ""))
    return EXIT_FAILED if failed else 0


# --- argparse ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "new": cmd_new, "build": cmd_build, "run": cmd_run, "test": cmd_test}


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser whose positionals may come before and after its options."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:  # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_commands(sub: Any) -> None:
    """The four subcommands, on `clawhub`'s subparsers."""
    p = sub.add_parser("new", help="scaffold a skill directory (builds and passes its examples as generated)",
                       description="Scaffold a skill: skill.toml (name, version, abi, module, two examples), the "
                                   "source and a README saying how to build it. Guides: docs/skills/LANG.md.")
    p.add_argument("name", help="skill name, such as com.acme.hello (a bare word gets com.example.)")
    p.add_argument("--lang", required=True, choices=LANGUAGES, help="the language to write it in")
    p.add_argument("--abi", choices=(templates.WASI, templates.MEMORY, templates.COMPONENT),
                   help="wasi-command-v1 (stdin/stdout; the default for wat, c, rust) or memory-v1 (input and "
                        "output in memory; the default for assemblyscript); python and js: component-v1")
    p.add_argument("dir", nargs="?", help="directory to create (default: the name's last label)")
    # `clawhub new NAME --lang c DIR`: argparse alone fills the optional DIR with nothing when it meets NAME,
    # then refuses DIR after the options; intermixed parsing takes it wherever it stands.
    p.__class__ = _IntermixedParser
    p = sub.add_parser("build", help="build a skill's module with its language's toolchain",
                       description="Run the skill's toolchain (clang + wasi-libc for C, cargo for Rust, asc for "
                                   "AssemblyScript; WAT needs none), then check the module as the registry "
                                   "would. A missing toolchain is named, with how to install it.")
    p.add_argument("dir", help="skill directory holding skill.toml")
    p = sub.add_parser("run", help="run a skill once, locally, in the executor's sandbox and limits (no server)",
                       description="Run the skill in DIR once, in process, in the executor's sandbox with the "
                                   "limits the executor would give it, and print its output. Exit 1 when the "
                                   "call fails (the executor's status and reason are printed).")
    p.add_argument("dir", help="skill directory holding skill.toml")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--input", help="input as JSON, such as '{\"text\": \"hi\"}' (re-encoded as the gateway "
                                       "does: compact, keys sorted)")
    group.add_argument("--raw", help="input as raw text")
    group.add_argument("--input-file", help="input as raw bytes from a file ('-' for stdin)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="value of a declared env:KEY (KEY alone passes on this shell's $KEY); repeatable")
    p.add_argument("--kv-file", metavar="FILE",
                   help="with the kv capability: keep the skill's key-value store in this sqlite file from one run "
                        "to the next (default: an empty store for each run)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the usage (time, peak memory, fuel) and the skill's stderr to stderr")
    p = sub.add_parser("test", help="run the manifest's examples locally; exit 1 on any failure",
                       description="Run each [[examples]] of skill.toml in the executor's sandbox, as the "
                                   "deployer's smoke test does, one line each (a diff for a wrong output); "
                                   "exit 1 if any fails.")
    p.add_argument("dir", help="skill directory holding skill.toml")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="value of a declared env:KEY for the examples; repeatable")


def run_command(args: argparse.Namespace) -> int:
    """Run one of COMMANDS, reporting an AuthorError (or a bad manifest) in one paragraph."""
    try:
        code = COMMANDS[args.command](args)
    except AuthorError as exc:
        print(exc, file=sys.stderr)
        code = exc.exit_code
    except manifest.ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    if args.command in ("run", "test") and _is_the_process():
        _exit_now(code)
    return code


def _is_the_process() -> bool:
    """Whether this process is the `clawhub` command itself (not a test or a program calling `main`)."""
    entry = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return entry.name == "clawhub" or entry.resolve().parent == Path(__file__).resolve().parent


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown. Dropping a WASI store hands the flush of its
    stdio to a wasmtime runtime thread, which calls back into Python; when that happens while the
    interpreter is finalizing, the thread panics and the process aborts (measured: 8 of 15 runs of a WASI
    skill exiting right after its call, 1 of 40 even after an explicit close and gc). A long-lived
    executor never exits right after a call; a one-shot CLI always does, so it leaves without teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
