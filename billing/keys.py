"""API keys: `dgpu-` + 43 base64url characters (32 random bytes from `secrets`).

Only the SHA-256 hex digest of the whole key and a display prefix are stored; the key itself
is shown once, when it is made. A fast unsalted hash is right here: the key has 256 bits of
entropy, so nothing can be guessed from the digest, and admission must look it up in one
Redis read.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "dgpu-"
KEY_BYTES = 32
DISPLAY_PREFIX_LEN = 12
_KEY_RE = re.compile(r"^dgpu-[A-Za-z0-9_-]{43,}$")


@dataclass(frozen=True)
class NewKey:
    secret: str  # shown once, never stored
    key_hash: str
    prefix: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


def looks_like_key(key: str) -> bool:
    """Well-formed (not necessarily known): lets admission refuse junk without a lookup."""
    return bool(_KEY_RE.match(key))


def generate_key() -> NewKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    return NewKey(secret=secret, key_hash=hash_key(secret), prefix=display_prefix(secret))
