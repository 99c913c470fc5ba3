"""Console sessions and CSRF tokens, kept in Redis (no SQL table: a session is short-lived
state, and losing Redis only signs everyone out).

A session is a random token (32 bytes from `secrets`) carried in the `dgpu_session` cookie;
Redis holds only its SHA-256 (`dg:console:session:<sha256>`), with the account it is signed
in as (none before sign-in), the account's email for the header, and a CSRF token of its own
(the synchronizer token every console form carries). Signed-in sessions last
`SIGNED_IN_TTL_S`, the anonymous ones that carry the sign-in and sign-up forms' CSRF tokens
`ANONYMOUS_TTL_S`; signing in or up ends the anonymous session and starts a new one (no
session fixation), signing out deletes it.

A secret shown once (a new API key) crosses a redirect (post/redirect/get: reloading the
page must not make another key) in a one-time stash: encrypted with a key derived from the
session token, which only the browser holds, kept `REVEAL_TTL_S`, deleted when read.

Failed sign-ins are counted per email (`dg:console:login:<sha256 of the email>`) for
`LOGIN_WINDOW_S`; past `MAX_LOGIN_FAILURES` that email is refused until the window ends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken

if TYPE_CHECKING:
    import redis

COOKIE = "dgpu_session"
SIGNED_IN_TTL_S = 12 * 3600
ANONYMOUS_TTL_S = 3600
MAX_LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 15 * 60
TOKEN_BYTES = 32
_PREFIX = "dg:console:session:"
_LOGIN_PREFIX = "dg:console:login:"
_REVEAL_PREFIX = "dg:console:reveal:"
REVEAL_TTL_S = 120


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Session:
    token_hash: str
    csrf: str
    account_id: int | None = None
    email: str | None = None

    @property
    def signed_in(self) -> bool:
        return self.account_id is not None

    def csrf_ok(self, submitted: str | None) -> bool:
        """The synchronizer check: the form's token is this session's (constant time)."""
        return bool(submitted) and hmac.compare_digest(
            self.csrf.encode("utf-8"), (submitted or "").encode("utf-8")
        )


class SessionStore:
    def __init__(self, r: redis.Redis) -> None:
        self._r = r

    def start(self, account_id: int | None = None, email: str | None = None) -> tuple[str, Session]:
        """A new session: the token for the cookie (never stored) and the session."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(digest(token), secrets.token_urlsafe(TOKEN_BYTES), account_id, email)
        fields = {"csrf": session.csrf}
        if account_id is not None:
            fields.update(account_id=str(account_id), email=email or "")
        ttl = SIGNED_IN_TTL_S if account_id is not None else ANONYMOUS_TTL_S
        key = _PREFIX + session.token_hash
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl)
        pipe.execute()
        return token, session

    def find(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        token_hash = digest(token)
        found = self._r.hgetall(_PREFIX + token_hash)
        if not found or b"csrf" not in found:
            return None
        account = found.get(b"account_id")
        return Session(
            token_hash=token_hash,
            csrf=found[b"csrf"].decode(),
            account_id=int(account) if account else None,
            email=found.get(b"email", b"").decode() or None,
        )

    def end(self, session: Session) -> None:
        self._r.delete(_PREFIX + session.token_hash, _REVEAL_PREFIX + session.token_hash)

    # --- secrets shown once ------------------------------------------------------------

    def stash(self, token: str, secret: str) -> None:
        """Keep `secret` for the next page of the session whose cookie holds `token`."""
        sealed = _sealer(token).encrypt(secret.encode("utf-8"))
        self._r.set(_REVEAL_PREFIX + digest(token), sealed, ex=REVEAL_TTL_S)

    def reveal(self, token: str | None) -> str | None:
        """The stashed secret, once."""
        if not token:
            return None
        sealed = self._r.getdel(_REVEAL_PREFIX + digest(token))
        if sealed is None:
            return None
        try:
            return _sealer(token).decrypt(sealed).decode("utf-8")
        except InvalidToken:
            return None

    # --- sign-in throttling ------------------------------------------------------------

    def login_blocked(self, email: str) -> bool:
        count = self._r.get(_LOGIN_PREFIX + digest(email.strip().lower()))
        return int(count or 0) >= MAX_LOGIN_FAILURES

    def login_failed(self, email: str) -> None:
        key = _LOGIN_PREFIX + digest(email.strip().lower())
        pipe = self._r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, LOGIN_WINDOW_S, nx=True)
        pipe.execute()

    def login_succeeded(self, email: str) -> None:
        self._r.delete(_LOGIN_PREFIX + digest(email.strip().lower()))


def _sealer(token: str) -> Fernet:
    key = hashlib.sha256(b"darkgpu console reveal\0" + token.encode("utf-8")).digest()
    return Fernet(base64.urlsafe_b64encode(key))
