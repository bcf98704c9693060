"""The signed payload is a contract between CLI, registry and executor versions: pinned byte for byte."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from clawhub.common.v1 import skill_pb2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from services.runtime import signing

DIGEST = "sha256:" + "ab" * 32
BUNDLE = "sha256:" + "cd" * 32


def subject(**changes: object) -> signing.Subject:
    base = signing.Subject(name="com.acme.echo", version="1.2.3", digest=DIGEST, bundle_digest=BUNDLE,
                           manifest=b"manifest bytes")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_payload_format_is_pinned() -> None:
    assert subject().payload() == (
        b"clawhub-skill-signature-v1\n"
        b"name:com.acme.echo\n"
        b"version:1.2.3\n"
        b"digest:" + DIGEST.encode() + b"\n"
        b"bundle-digest:" + BUNDLE.encode() + b"\n"
        b"manifest:sha256:66444334cfc47d81840f88c1e690564d3c130e9237482a58d7631124e9b9a815\n")


def test_every_field_is_covered() -> None:
    key = signing.generate()
    public = signing.raw_public_key(key)
    signature = signing.sign(key, subject())
    assert signing.verify(public, signature, subject())
    for change in ({"name": "com.acme.other"}, {"version": "1.2.4"}, {"digest": "sha256:" + "00" * 32},
                   {"bundle_digest": ""}, {"manifest": b"manifest bytez"}):
        assert not signing.verify(public, signature, subject(**change)), change
    assert not signing.verify(signing.raw_public_key(signing.generate()), signature, subject())
    # Malformed keys and signatures do not verify (and do not raise).
    assert not signing.verify(public[:31], signature, subject())
    assert not signing.verify(public, signature[:63], subject())


def test_a_line_break_in_a_field_is_refused_not_escaped() -> None:
    with pytest.raises(ValueError, match="line break"):
        subject(name="com.acme.echo\nversion:9.9.9").payload()


def test_the_manifest_serialization_survives_a_round_trip_even_with_unknown_fields() -> None:
    manifest = skill_pb2.Manifest(name="com.acme.echo", version="1.0.0", capabilities=["env:B", "env:A"],
                                  dependencies=[skill_pb2.Dependency(package="com.acme.lib", version_range="^1")])
    manifest.limits.memory_bytes = 1 << 20
    # Field 99 (a varint) stands for a manifest field a newer CLI knows and this code does not: it must stay
    # covered by the signature after the registry parses and re-serializes the manifest.
    newer = signing.manifest_bytes(manifest) + b"\x98\x06\x01"
    again = skill_pb2.Manifest.FromString(newer)
    assert signing.manifest_bytes(again) == newer
    assert signing.manifest_bytes(skill_pb2.Manifest.FromString(signing.manifest_bytes(again))) == newer


def test_key_ids_and_key_files(tmp_path: Path) -> None:
    key = signing.generate()
    public = signing.raw_public_key(key)
    key_id = signing.key_id(public)
    assert key_id.startswith("ed25519:") and len(key_id) == len("ed25519:") + 16
    path = tmp_path / "k.key"
    public_path = signing.write_keypair(path, key)
    assert public_path == tmp_path / "k.key.pub"
    assert signing.load_public_key(public_path) == public
    assert signing.load_public_key(path) == public  # a private key file gives its public half
    with pytest.raises(signing.SigningError, match="refusing to overwrite"):
        signing.write_keypair(path, signing.generate())
    with pytest.raises(signing.SigningError, match="cannot read"):
        signing.load_private_key(tmp_path / "missing")
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(signing.SigningError, match="not an unencrypted PEM private key"):
        signing.load_private_key(tmp_path / "junk")
    ec = tmp_path / "ec.key"
    ec.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(signing.SigningError, match="not an Ed25519 key"):
        signing.load_private_key(ec)
    assert signing.public_key_problem(b"\0" * 31) is not None
    assert signing.public_key_problem(public) is None
