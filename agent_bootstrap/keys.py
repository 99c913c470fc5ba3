"""The provider's X25519 key pair: `~/.config/darkgpu/x25519.key`, created once (mode 0600).

The file holds the private key as unencrypted PKCS#8 PEM. It is created with O_EXCL, so it
is never overwritten, not even by two agents starting at once; a key file that is readable
by others, empty or unreadable is refused with the reason rather than replaced (replacing it
would change the public key that `/v1/providers/:id/attestation` advertises).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent_bootstrap.paths import KEY_FILE, config_dir, create_private, mode_of


class KeyFileError(RuntimeError):
    pass


@dataclass(frozen=True)
class KeyPair:
    private: X25519PrivateKey
    path: Path
    created: bool  # made by this call

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_b64(self) -> str:
        """The public key as the platform takes it: standard base64 of its 32 raw bytes."""
        return base64.b64encode(self.public_bytes).decode("ascii")


def default_path() -> Path:
    return config_dir() / KEY_FILE


def _pem(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load(path: Path) -> X25519PrivateKey:
    mode = mode_of(path)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} is readable by other users (mode {mode:04o}); run `chmod 600 {path}`"
        )
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"{path} does not hold an X25519 private key; it is left as it is. Move it away "
            "to create a new key (the provider's public key will change)."
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an X25519 key")
    return key


def load_or_create(path: Path | None = None) -> KeyPair:
    """The key pair at `path`, created there (0600) when no file exists."""
    path = path or default_path()
    if not path.exists():
        key = X25519PrivateKey.generate()
        if create_private(path, _pem(key)):
            return KeyPair(key, path, created=True)
    return KeyPair(_load(path), path, created=False)
