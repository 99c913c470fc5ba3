"""Secrets and ids the platform hands out, and their formats.

- API keys: `dgpu-` + 43 base64url characters (32 random bytes from `secrets`).
- Provider tokens: `dgpp-` + the same; the agent exchanges one for its credentials.
- Provider ids: `prv_` + 16 hex characters.

Only the SHA-256 hex digest of a key or token and a display prefix are stored; the secret
itself is shown once, when it is made. A fast unsalted hash is right here: each secret has
256 bits of entropy, so nothing can be guessed from the digest, and admission must look a key
up in one Redis read.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "dgpu-"
PROVIDER_TOKEN_PREFIX = "dgpp-"
PROVIDER_ID_PREFIX = "prv_"
SECRET_BYTES = 32
DISPLAY_PREFIX_LEN = 12
_KEY_RE = re.compile(r"^dgpu-[A-Za-z0-9_-]{43,}$")
_PROVIDER_TOKEN_RE = re.compile(r"^dgpp-[A-Za-z0-9_-]{43,}$")


@dataclass(frozen=True)
class NewKey:
    secret: str  # shown once, never stored
    key_hash: str
    prefix: str


def hash_key(key: str) -> str:
    """The stored form of an API key or a provider token."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


def looks_like_key(key: str) -> bool:
    """A well-formed API key (not necessarily known): refuses junk without a lookup."""
    return bool(_KEY_RE.match(key))


def looks_like_provider_token(token: str) -> bool:
    """A well-formed provider token (not necessarily known)."""
    return bool(_PROVIDER_TOKEN_RE.match(token))


def _generate(prefix: str) -> NewKey:
    secret = prefix + secrets.token_urlsafe(SECRET_BYTES)
    return NewKey(secret=secret, key_hash=hash_key(secret), prefix=display_prefix(secret))


def generate_key() -> NewKey:
    """A new API key."""
    return _generate(KEY_PREFIX)


def generate_provider_token() -> NewKey:
    """A new provider token."""
    return _generate(PROVIDER_TOKEN_PREFIX)


def new_provider_id() -> str:
    return PROVIDER_ID_PREFIX + secrets.token_hex(8)
