"""Console sessions and CSRF tokens, kept in the state Redis (`Settings.state_redis_url`; no
SQL table: a session is short-lived state, and losing it, or its eviction when that Redis is
full, only signs someone out). Every key written here has a TTL.

Only someone who has signed in has a stored session. A session is a random token (32 bytes
from `secrets`) carried in the `dgpu_session` cookie; Redis holds only its SHA-256
(`dg:console:session:<sha256>`, `SIGNED_IN_TTL_S`), with the account, its email for the header
and a CSRF token of its own (the synchronizer token every console form carries). Each
account's sessions are indexed (`dg:console:acct:<id>`) so that suspending it ends them all
(`billing.accounts.set_status`); and a session is honoured only while the money Redis says
its account is not suspended (`dg:acct:<id>` status), so a suspension holds even where the
sessions were not ended. Signing in or up starts a new session (no session fixation),
signing out deletes it.

The state Redis is bounded and evicting and holds no money, so it is held to less than the
money one: whoever could write there still signs nobody in, since a session is honoured only
with its MAC (HMAC-SHA256 of its token hash, account, email and CSRF token under the
console's secret), which nobody without the secret can make. The secret lives in the money
Redis, which replicas never reach (`dg:console:secret`).

Anonymous views (the sign-in and sign-up forms) write nothing to Redis: their CSRF token is a
signed double submit — the visitor's `dgpu_csrf` cookie holds a random nonce, the form the
HMAC-SHA256 of that nonce under the console's secret. The secret is one random key shared by
every ingress replica (`dg:console:secret`, made once with SET NX, renewed every
`SECRET_TTL_S`; a form left open across a renewal is refused as stale and shown again, a
session signed in across it is signed out).

A secret shown once (a new API key) crosses a redirect (post/redirect/get: reloading the
page must not make another key) in a one-time stash: encrypted with a key derived from the
session token, which only the browser holds, kept `REVEAL_TTL_S`, deleted when read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from cryptography.fernet import Fernet, InvalidToken

from kernel import redis_keys as rk

if TYPE_CHECKING:
    import redis
    from redis.typing import EncodableT, FieldT

COOKIE = "dgpu_session"
CSRF_COOKIE = "dgpu_csrf"
SIGNED_IN_TTL_S = 12 * 3600
SECRET_TTL_S = 30 * 24 * 3600
MAX_LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 15 * 60
TOKEN_BYTES = 32
_LOGIN_PREFIX = "dg:console:login:"
_SECRET = "dg:console:secret"
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

    @property
    def stored(self) -> bool:
        """False for an anonymous visitor, whom Redis does not know."""
        return bool(self.token_hash)

    def csrf_ok(self, submitted: str | None) -> bool:
        """The synchronizer check: the form's token is this session's (constant time)."""
        return bool(submitted) and hmac.compare_digest(
            self.csrf.encode("utf-8"), (submitted or "").encode("utf-8")
        )


class SessionStore:
    def __init__(self, r: redis.Redis, accounts: redis.Redis | None = None) -> None:
        """`r`: the state Redis, which holds the sessions; `accounts`: the money Redis, which
        holds the console's secret and whose account status a session must still have
        (None: `r` holds the secret, and the status is not checked)."""
        self._r = r
        self._accounts = accounts
        self._private = accounts if accounts is not None else r

    def start(self, account_id: int, email: str) -> tuple[str, Session]:
        """A new signed-in session: the token for the cookie (never stored) and the session."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(digest(token), secrets.token_urlsafe(TOKEN_BYTES), account_id, email)
        fields: dict[FieldT, EncodableT] = {
            "csrf": session.csrf, "account_id": str(account_id), "email": email,
            "mac": self._mac(session.token_hash, str(account_id), email, session.csrf),
        }  # fmt: skip
        key = rk.console_session(session.token_hash)
        index = rk.console_sessions(account_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, SIGNED_IN_TTL_S)
        pipe.sadd(index, session.token_hash)
        pipe.expire(index, SIGNED_IN_TTL_S)  # outlives none of its sessions by much
        pipe.execute()
        return token, session

    def anonymous(self, nonce: str | None = None) -> tuple[str, Session]:
        """A visitor who has not signed in, from the nonce of its `dgpu_csrf` cookie (a new
        one when it has none): nothing is stored; its CSRF token is the nonce's HMAC."""
        if not nonce or len(nonce) > 128:
            nonce = secrets.token_urlsafe(TOKEN_BYTES)
        csrf = hmac.new(self._secret(), nonce.encode("utf-8"), hashlib.sha256).hexdigest()
        return nonce, Session(token_hash="", csrf=csrf)

    def _secret(self) -> bytes:
        found = self._private.get(_SECRET)
        if found is None:
            self._private.set(_SECRET, secrets.token_hex(32), nx=True, ex=SECRET_TTL_S)
            found = self._private.get(_SECRET)
        return bytes(cast("bytes", found))

    def _mac(self, token_hash: str, account_id: str, email: str, csrf: str) -> str:
        """A stored session's MAC, under a key of its own derived from the secret (never
        equal to an anonymous form's token, whatever nonce a visitor picks)."""
        key = hmac.new(self._secret(), b"console session", hashlib.sha256).digest()
        fields = "\0".join((token_hash, account_id, email, csrf)).encode("utf-8")
        return hmac.new(key, fields, hashlib.sha256).hexdigest()

    def find(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        token_hash = digest(token)
        # a client without decode_responses (`Services`): names and values are bytes
        found = cast("dict[bytes, bytes]", self._r.hgetall(rk.console_session(token_hash)))
        account = found.get(b"account_id")
        if not account or b"csrf" not in found:
            return None
        email = found.get(b"email", b"").decode()
        mac = self._mac(token_hash, account.decode(), email, found[b"csrf"].decode())
        if not hmac.compare_digest(mac.encode(), found.get(b"mac", b"")):
            return None  # written by someone without the secret
        if self._accounts is not None:
            status = self._accounts.hget(rk.account(int(account)), "status")
            if status is not None and status != b"active":  # suspended since signing in
                self._r.delete(rk.console_session(token_hash), rk.console_reveal(token_hash))
                return None
        return Session(
            token_hash=token_hash,
            csrf=found[b"csrf"].decode(),
            account_id=int(account),
            email=email or None,
        )

    def end(self, session: Session) -> None:
        if not session.stored:
            return
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(rk.console_session(session.token_hash), rk.console_reveal(session.token_hash))
        if session.account_id is not None:
            pipe.srem(rk.console_sessions(session.account_id), session.token_hash)
        pipe.execute()

    # --- secrets shown once ------------------------------------------------------------

    def stash(self, token: str, secret: str) -> None:
        """Keep `secret` for the next page of the session whose cookie holds `token`."""
        sealed = _sealer(token).encrypt(secret.encode("utf-8"))
        self._r.set(rk.console_reveal(digest(token)), sealed, ex=REVEAL_TTL_S)

    def reveal(self, token: str | None) -> str | None:
        """The stashed secret, once."""
        if not token:
            return None
        sealed = self._r.getdel(rk.console_reveal(digest(token)))
        if sealed is None:
            return None
        try:
            return _sealer(token).decrypt(sealed).decode("utf-8")
        except InvalidToken:
            return None

    # --- sign-in lockout -----------------------------------------------------------------

    def login_blocked(self, email: str, network: str) -> bool:
        count = self._r.get(_login_key(email, network))
        return int(count or 0) >= MAX_LOGIN_FAILURES

    def login_failed(self, email: str, network: str) -> None:
        key = _login_key(email, network)
        pipe = self._r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, LOGIN_WINDOW_S, nx=True)
        pipe.execute()

    def login_succeeded(self, email: str, network: str) -> None:
        self._r.delete(_login_key(email, network))


def _login_key(email: str, network: str) -> str:
    """One counter per (email, network): failures from one network lock that email there
    only, so nobody can lock a user out from elsewhere."""
    return _LOGIN_PREFIX + digest(email.strip().lower() + "\0" + network)


def _sealer(token: str) -> Fernet:
    key = hashlib.sha256(b"darkgpu console reveal\0" + token.encode("utf-8")).digest()
    return Fernet(base64.urlsafe_b64encode(key))
