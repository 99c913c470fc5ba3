from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent_bootstrap.keys import KeyFileError, default_path, load_or_create
from agent_bootstrap.paths import mode_of


def test_the_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "darkgpu" / "x25519.key"
    first = load_or_create(path)
    assert first.created and mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
    content = path.read_bytes()
    assert content.startswith(b"-----BEGIN PRIVATE KEY-----")
    second = load_or_create(path)
    assert not second.created
    assert second.public_bytes == first.public_bytes
    assert path.read_bytes() == content  # never rewritten
    assert len(base64.b64decode(first.public_b64)) == 32


def test_the_public_key_is_the_private_keys(tmp_path: Path) -> None:
    pair = load_or_create(tmp_path / "k")
    peer = X25519PrivateKey.generate()
    shared_here = pair.private.exchange(peer.public_key())
    shared_there = peer.exchange(X25519PublicKey.from_public_bytes(pair.public_bytes))
    assert shared_here == shared_there


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "x25519.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="does not hold an X25519 private key"):
        load_or_create(path)
    assert path.read_bytes() == b"not a key"


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x25519.key"
    load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create(path)


def test_default_path_honours_the_config_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DARKGPU_CONFIG_DIR", str(tmp_path / "conf"))
    assert default_path() == tmp_path / "conf" / "x25519.key"
    monkeypatch.delenv("DARKGPU_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "darkgpu" / "x25519.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_path() == Path(os.path.expanduser("~/.config/darkgpu/x25519.key"))
