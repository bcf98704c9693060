"""A service started by `clawhub up` dies with it, even when `up` is killed with SIGKILL.

`up` starts each service in a session of its own (so Ctrl-C reaches only `up`, which then stops the services
in order), which also means nothing else stops them when `up` dies abruptly: they would run on without a
supervisor, and a new `up` would start a second suite beside them. Two mechanisms prevent that:

- the **lifeline**: `up` gives each child the read end of a pipe (its fd number in `CLAWHUB_LIFELINE_FD`)
  and keeps the only write end. Nothing is ever written; when `up` exits, however it exits, the kernel
  closes the write end and the child reads EOF. The child then SIGTERMs itself, which is the ordinary
  graceful shutdown (NOT_SERVING, drain, close storage; before its handler is installed, the default
  action ends the process at once). If that shutdown hangs, nobody is left to SIGKILL the child, so it
  ends itself a while later.
- on Linux, `prctl(PR_SET_PDEATHSIG, SIGTERM)` as a backstop. The kernel sends it when the *thread* that
  forked the child exits, so `up` starts every service from its main thread.

A service started any other way (a container, systemd, a shell) has no lifeline and is not affected.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

LIFELINE_VARIABLE = "CLAWHUB_LIFELINE_FD"
_PR_SET_PDEATHSIG = 1


class Lifeline:
    """The watch on a supervisor's pipe; see the module's docstring."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # How long a service whose supervisor is gone may take to stop gracefully before it exits
        # regardless; `run` sets it to the service's drain grace plus a margin once it knows that grace.
        self.shutdown_budget = 20.0

    def start(self) -> None:
        _set_parent_death_signal(signal.SIGTERM)
        threading.Thread(target=self._watch, name="clawhub-lifeline", daemon=True).start()

    def _watch(self) -> None:
        try:
            while os.read(self.fd, 64):
                pass  # `up` never writes; bytes from anyone else mean nothing
        except OSError:
            pass
        _say("the supervisor (clawhub up) is gone; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.shutdown_budget)
        _say(f"still running {self.shutdown_budget:.0f}s after the supervisor went away; exiting")
        os._exit(1)


def follow_supervisor() -> Lifeline | None:
    """Stop this process when the `clawhub up` that started it is gone. Call it first thing in a service's
    entry point; None when no supervisor gave this process a lifeline."""
    raw = os.environ.pop(LIFELINE_VARIABLE, "")  # popped: nothing this process starts inherits it
    if not raw:
        return None
    try:
        fd = int(raw)
        os.fstat(fd)
    except (ValueError, OSError):
        _say(f"ignoring {LIFELINE_VARIABLE}={raw!r}: not an open file descriptor")
        return None
    lifeline = Lifeline(fd)
    lifeline.start()
    return lifeline


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return  # the lifeline alone does the job elsewhere
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _say(message: str) -> None:
    # stderr is a pipe to `up`, which may be gone: a write then fails (EPIPE), and must not stop the shutdown.
    try:
        print(f"clawhub: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
