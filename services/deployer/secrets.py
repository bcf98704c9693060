"""Deploy-time secrets (`--env` values) at rest and in free text: the key file, encryption, redaction.

Encryption. The deployer seals every deployment's env values and every stored route (which carries them to
dispatchers) with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) before they reach sqlite. The
keys live in one file (`<deployer data dir>/secrets.key` unless `CLAWHUB_DEPLOYER_SECRETS_KEY_FILE` names
another), one url-safe base64 Fernet key a line, newest first; `#` lines and blank lines are ignored. The
newest key encrypts; the others only decrypt, until the deployer has re-encrypted what they sealed (on
start). Each sealed value is stored with the id of its key (`key_id`: a hash prefix of the key, which says
nothing about the key itself), so the deployer knows which rows a rotation still has to re-encrypt, and can
name the missing key when the file no longer holds it.

The file is created on first start (never overwritten) with mode 0600 and refused when group or others
may read it, when it belongs to another user, or when a line is not a key: each refusal one line naming
the file, never its content. See docs/security.md ("Secrets at rest") for rotation.

Redaction. Env values must never reach a log line or an RPC response, but they can reach free text: a smoke
example that prints its secret fails with "printed b'…' instead of …", and that message becomes a
PRELOAD_FAILED event, a transition reason, a log line. `REDACTOR` knows every env value this process has
stored or read, and replaces each one (of at least MIN_REDACTED_CHARS characters: shorter ones are too
likely to be ordinary words of a message) with `[redacted]` in the text it is given: the store applies it
before it writes reasons and events, the servicer to every response, and `install_log_redaction` to the
deployer's log records.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from cryptography.fernet import Fernet, InvalidToken
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.runtime.server import StartupError

KEY_FILE = "secrets.key"
KEY_FILE_VARIABLE = "CLAWHUB_DEPLOYER_SECRETS_KEY_FILE"
MIN_REDACTED_CHARS = 6
REDACTED = "[redacted]"
_M = TypeVar("_M", bound=Message)
_MAX_KEY_FILE_BYTES = 64 * 1024
_HEADER = ("# clawhub deployer secrets keys: one Fernet key a line, newest first; the first encrypts, the others\n"
           "# only decrypt. Keep this file (mode 0600) and back it up apart from the database; see docs/security.md.\n")


class SecretsKeyError(StartupError):
    """The secrets key file is unusable, or does not hold a key the database needs (one line, no values)."""


def key_id(key: bytes) -> str:
    """A short public name of a key: 16 hex digits of a domain-separated SHA-256 of it."""
    return hashlib.sha256(b"clawhub deployer secrets key id\0" + key).hexdigest()[:16]


class Keyring:
    """The keys of a key file, newest first."""

    def __init__(self, path: Path, keys: Iterable[bytes]) -> None:
        self.path = path
        self._keys = {key_id(k): Fernet(k) for k in keys}
        self._ids = list(self._keys)
        if not self._ids:
            raise SecretsKeyError(f"deployer: secrets key file {path} holds no key")

    @property
    def primary(self) -> str:
        """The id of the key that encrypts (the file's first)."""
        return self._ids[0]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
        """(key id, Fernet token) of `plaintext` under the newest key."""
        return self.primary, self._keys[self.primary].encrypt(plaintext)

    def decrypt(self, kid: str, token: bytes, *, what: str) -> bytes:
        """`token` decrypted with key `kid`; SecretsKeyError (naming the file and `what`, never a value) when
        the file lacks that key or the token does not decrypt under it."""
        fernet = self._keys.get(kid)
        if fernet is None:
            raise missing_key(self.path, kid, what)
        try:
            return fernet.decrypt(token)
        except InvalidToken:
            raise SecretsKeyError(
                f"deployer: the env values of {what} do not decrypt with key {kid} of the secrets key file "
                f"{self.path} (the database was altered, or the key on that line is not the one that sealed them); "
                "restore the key file and database from the same backup (docs/security.md)") from None


def missing_key(path: Path, kid: str, what: str) -> SecretsKeyError:
    return SecretsKeyError(
        f"deployer: the secrets key file {path} does not hold key {kid}, which encrypted the env values of {what}; "
        f"restore the key file that was in use (or add that key back as a line of it), or point "
        f"{KEY_FILE_VARIABLE} at it (docs/security.md)")


def load_keyring(path: Path, *, create: bool) -> Keyring:
    """The keys of the file at `path`. When it does not exist: with `create`, a new file with one fresh key
    (mode 0600, created atomically: never a partial file, never over another process's); without, an error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not create:
            raise SecretsKeyError(
                f"deployer: the secrets key file {path} is missing, but the database holds env values sealed with "
                f"it; restore it from your backup, or point {KEY_FILE_VARIABLE} at it (docs/security.md)") from None
        _create(path)
        return load_keyring(path, create=False)
    except OSError as exc:
        raise SecretsKeyError(f"deployer: cannot open the secrets key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretsKeyError(f"deployer: the secrets key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretsKeyError(
                f"deployer: the secrets key file {path} may be read by group or others (mode {mode:04o}); "
                f"`chmod 600 {path}`, and replace its keys if someone else may have read them (docs/security.md)")
        if info.st_uid != os.geteuid():
            raise SecretsKeyError(
                f"deployer: the secrets key file {path} belongs to uid {info.st_uid}, not to this process's "
                f"uid {os.geteuid()}; `chown` it to the user the deployer runs as")
        raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise SecretsKeyError(f"deployer: the secrets key file {path} is larger than {_MAX_KEY_FILE_BYTES} bytes; "
                              "it is not a key file")
    return Keyring(path, _parse(path, raw))


def _parse(path: Path, raw: bytes) -> list[bytes]:
    keys: list[bytes] = []
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SecretsKeyError(f"deployer: the secrets key file {path} is not text; it holds one Fernet key a "
                              "line (docs/security.md)") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _is_fernet_key(line):
            # Never the line itself: it may be a mangled key.
            raise SecretsKeyError(
                f"deployer: line {number} of the secrets key file {path} is not a Fernet key (44 characters of "
                "url-safe base64, as `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'` prints; docs/security.md)")
        if line.encode() not in keys:
            keys.append(line.encode())
    if not keys:
        raise SecretsKeyError(f"deployer: the secrets key file {path} holds no key; restore it from your backup "
                              "(docs/security.md)")
    return keys


def _is_fernet_key(line: str) -> bool:
    if len(line) != 44:
        return False
    try:
        return len(base64.urlsafe_b64decode(line.encode())) == 32
    except (binascii.Error, ValueError):
        return False


def _create(path: Path) -> None:
    """Write a fresh key file: a temporary file (O_EXCL, 0600 whatever the umask), fsynced, then linked to
    `path`, which fails rather than replace a file that appeared meanwhile (then that one is used)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only have narrowed it; make it exact
        os.write(fd, _HEADER.encode() + Fernet.generate_key() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process created it first: use that one
    finally:
        temporary.unlink()
    with contextlib.suppress(OSError):  # make the new entry durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Redactor:
    """Replaces known secret values in text and protobuf messages. Thread-safe (log records come from any
    thread)."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._ordered: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        """Know `values` from now on, and the form each takes inside a Python bytes repr (how a smoke example's
        unexpected output is shown) when that differs."""
        forms = set()
        for value in values:
            forms.add(value)
            forms.add(repr(value.encode())[2:-1])
        fresh = {v for v in forms if len(v) >= MIN_REDACTED_CHARS} - self._values
        if fresh:
            with self._lock:
                self._values = self._values | fresh
                # Longest first: a value that contains another is replaced whole.
                self._ordered = tuple(sorted(self._values, key=len, reverse=True))

    def redact(self, text: str, extra: Iterable[str] = ()) -> str:
        """`text` with every known value (and every one of `extra` long enough) replaced by `[redacted]`."""
        values = self._ordered
        more = [v for v in extra if len(v) >= MIN_REDACTED_CHARS and v not in self._values]
        if more:
            values = tuple(sorted((*values, *more), key=len, reverse=True))
        for value in values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def redact_message(self, message: _M, extra: Iterable[str] = ()) -> _M:
        """Redact every string field of `message`, nested messages and maps included, in place; returns it."""
        if not self._ordered and not extra:
            return message
        extra = list(extra)
        self._walk(message, extra)
        return message

    def _walk(self, message: Message, extra: list[str]) -> None:
        for field, value in message.ListFields():
            if field.type == FieldDescriptor.TYPE_STRING:
                if field.is_repeated:
                    value[:] = [self.redact(v, extra) for v in value]
                else:
                    redacted = self.redact(value, extra)
                    if redacted != value:
                        setattr(message, field.name, redacted)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                entry = field.message_type
                if entry is not None and entry.GetOptions().map_entry:
                    entry_value = entry.fields_by_name["value"]
                    if entry_value.type == FieldDescriptor.TYPE_STRING:
                        for key in list(value):
                            value[key] = self.redact(value[key], extra)
                    elif entry_value.type == FieldDescriptor.TYPE_MESSAGE:
                        for key in list(value):
                            self._walk(value[key], extra)
                elif field.is_repeated:
                    for item in value:
                        self._walk(item, extra)
                else:
                    self._walk(value, extra)


REDACTOR = Redactor()


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and the text of its exception) with REDACTOR before it is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not REDACTOR._ordered:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error handling
            return True
        redacted = REDACTOR.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = REDACTOR.redact(record.exc_text)
        return True


_FILTER = RedactingFilter()
# The deployer's loggers; a filter on a logger applies to its own records only, so each is named.
LOGGERS = ("clawhub.deployer", "clawhub", "clawhub.errors", "clawhub.upstream")


def install_log_redaction() -> None:
    """Redact known env values from the deployer's log records, and from every record that reaches a handler
    of the root logger configured now (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
