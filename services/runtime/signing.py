"""Ed25519 signatures over skill versions: keys, key ids and the one canonical signed payload.

Shared by the CLI (signs at publish), the registry (verifies at publish) and the executor (re-verifies on
load), so all three agree byte for byte on what a signature covers. The payload is versioned and
domain-separated (it starts with `clawhub-skill-signature-v1`), so a clawhub signature can never be replayed
as a signature over anything else, and a later payload format cannot be confused with this one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import Message

PAYLOAD_DOMAIN = "clawhub-skill-signature-v1"
KEY_ID_PREFIX = "ed25519:"
# 16 hex digits (64 bits) of sha256: short enough to read aloud, long enough that two keys of one namespace
# never collide by accident. A key id only *names* a key; verification always uses the full public key.
KEY_ID_HEX = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_SUFFIX = ".pub"


class SigningError(ValueError):
    """A key file or key cannot be used; the message says which and why."""


def key_id(public_key: bytes) -> str:
    """`ed25519:<16 hex>` naming a raw 32-byte public key."""
    return KEY_ID_PREFIX + hashlib.sha256(public_key).hexdigest()[:KEY_ID_HEX]


def public_key_problem(public_key: bytes) -> str | None:
    """Why `public_key` is not a raw Ed25519 public key, or None when it is."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes, not {len(public_key)}"
    try:
        Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        return f"not an Ed25519 public key: {exc}"
    return None


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def raw_public_key(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_path_of(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + PUBLIC_SUFFIX)


def write_keypair(private_path: Path, private_key: Ed25519PrivateKey) -> Path:
    """Write the private key (PKCS#8 PEM, mode 0600) and its public key (SubjectPublicKeyInfo PEM) next to
    it as `<path>.pub`; returns the public key's path. Refuses to overwrite either file: losing a signing key
    by a mistyped path is not recoverable."""
    public_path = public_path_of(private_path)
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} already exists; refusing to overwrite a key (choose another --out)")
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never follow a file (or symlink) that appeared since the check; 0600 from the first byte.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(public_pem)
    return public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (as `clawhub keygen` writes)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 key (make one with "
                           "`clawhub keygen`)")
    return key


def load_public_key(path: Path) -> bytes:
    """The raw 32-byte public key in a PEM file: a public key, or a private key whose public half is taken."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the public key {path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        return raw_public_key(load_private_key(path))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def manifest_bytes(manifest: Message) -> bytes:
    """The manifest's deterministic serialization: what the signature's manifest hash covers, and what the
    registry stores."""
    return manifest.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Subject:
    """What a signature covers: one version of a skill and everything that decides how it runs."""

    name: str
    version: str
    # `sha256:<hex>` of the module.
    digest: str
    # `sha256:<hex>` of the file bundle, empty when there is none.
    bundle_digest: str
    # The manifest's deterministic serialization (see `manifest_bytes`).
    manifest: bytes

    def payload(self) -> bytes:
        """The canonical bytes that are signed: one `key:value` line per field after the domain line. Every
        value is a validated name, version or digest, so a newline in one is refused rather than escaped;
        the manifest enters as its sha256, so the payload stays small whatever the manifest holds."""
        fields = (("name", self.name), ("version", self.version), ("digest", self.digest),
                  ("bundle-digest", self.bundle_digest),
                  ("manifest", "sha256:" + hashlib.sha256(self.manifest).hexdigest()))
        for label, value in fields:
            if "\n" in value or "\r" in value:
                raise ValueError(f"the {label} of a signed version cannot contain a line break")
        return (PAYLOAD_DOMAIN + "\n" + "".join(f"{label}:{value}\n" for label, value in fields)).encode()


def sign(private_key: Ed25519PrivateKey, subject: Subject) -> bytes:
    return private_key.sign(subject.payload())


def verify(public_key: bytes, signature: bytes, subject: Subject) -> bool:
    """Whether `signature` is `public_key`'s signature over `subject`. False for a malformed key or signature
    too: the caller only needs to know it does not verify."""
    if len(signature) != SIGNATURE_BYTES or public_key_problem(public_key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, subject.payload())
    except (InvalidSignature, ValueError):
        return False
    return True
