"""Throttles in front of password hashing: sign-up and sign-in attempts counted per client IP
and per network, in Redis counters that expire.

Each argon2id hash costs 64 MiB and tens of milliseconds, so every route that hashes a
password (`POST /v1/auth/signup`, the console's sign-up and sign-in) asks `Throttle.check`
first; past a limit it raises `RateLimited` (429 `rate_limit`, `Retry-After` the seconds left
in the window) and no password is hashed. A network is the client's /24 (IPv4) or /64 (IPv6):
one machine changing its address inside its own allocation still counts as one.

Counters are fixed windows: `dg:throttle:<action>:ip:<address>` and
`dg:throttle:<action>:net:<network>`, checked and counted by one Lua script: INCR, and their
window's TTL when first counted (`EXPIRE … NX`), so every key expires. They live in the state
Redis (`Settings.state_redis_url`, given as `Services.state`), never beside balances: a
visitor with many addresses makes them grow, and that Redis, at its `maxmemory`, evicts its
least recently used keys (a counter evicted early gives its address its allowance back).
A refused attempt is not counted: it neither extends a window nor uses up the network's
allowance.

The client is the socket peer. `X-Forwarded-For` is believed only when the peer is one of the
configured proxies (`Settings.trusted_proxies`, addresses or networks; none by default): then
the client is the rightmost address in it that is not itself a trusted proxy. The peer is
what the ingress's own HTTP server (uvicorn, `serve_app.replica_http`) puts in the ASGI
scope, its own `X-Forwarded-For` handling off: no client, local or not, names its address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kernel.errors import RateLimited

if TYPE_CHECKING:
    import redis
    from fastapi import Request

    from core.settings import Settings

PREFIX = "dg:throttle:"
IPv4_PREFIX = 24
IPv6_PREFIX = 64
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Limit:
    """At most `per_ip` attempts per address and `per_network` per network in `window_s`."""

    action: str
    per_ip: int
    per_network: int
    window_s: int


def limits(settings: Settings) -> tuple[Limit, Limit]:
    """The sign-up and the sign-in limits of these settings."""
    return (
        Limit("signup", settings.signup_limit_per_ip, settings.signup_limit_per_network,
              settings.signup_window_s),
        Limit("signin", settings.signin_limit_per_ip, settings.signin_limit_per_network,
              settings.signin_window_s),
    )  # fmt: skip


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def client_ip(request: Request, trusted: tuple[Network, ...] = ()) -> str:
    """The client's address: the socket peer, or, when the peer is a trusted proxy, the
    rightmost untrusted address of `X-Forwarded-For`."""
    peer = request.client.host if request.client else ""
    address = _address(peer)
    if address is None or not trusted or not any(address in net for net in trusted):
        return str(address) if address is not None else peer
    hops = [h for h in ",".join(request.headers.getlist("x-forwarded-for")).split(",") if h]
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            break  # a hop we cannot read: stop at the last proxy we trust
        if not any(found in net for net in trusted):
            return str(found)
        address = found
    return str(address)


def network_of(ip: str) -> str:
    """The /24 or /64 that holds `ip` (anything that is not an address is its own network)."""
    address = _address(ip)
    if address is None:
        return ip
    bits = IPv4_PREFIX if address.version == 4 else IPv6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


class Throttle:
    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self._r = r
        self.signup, self.signin = limits(settings)
        self.trusted = parse_networks(settings.trusted_proxies)

    def client(self, request: Request) -> str:
        return client_ip(request, self.trusted)

    def check_signin(self, request: Request) -> None:
        """One attempt at a password from the request's client (sign-in, a password change
        or reset, deleting the account): `check` of the sign-in limit, before argon2."""
        self.check(self.signin, self.client(request))

    def check(self, limit: Limit, ip: str) -> None:
        """Count one attempt from `ip`; past either limit raise `RateLimited` with
        `Retry-After` (and nothing is hashed)."""
        keys = [f"{PREFIX}{limit.action}:ip:{ip}", f"{PREFIX}{limit.action}:net:{network_of(ip)}"]
        wait = int(self._r.eval(_CHECK, 2, *keys, limit.per_ip, limit.per_network, limit.window_s))
        if wait:
            retry = max(1, wait)
            raise RateLimited(
                f"Too many {_WORDS[limit.action]} from your network. "
                f"Try again in {_duration(retry)}.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )


# Refuse (the seconds left in the window) when a counter is at its limit, else count the
# attempt in both: a refused attempt counts nowhere, so one address hammering past its own
# limit does not use up its neighbours' network allowance.
_CHECK = """
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[i]) then
    local ttl = redis.call('TTL', KEYS[i])
    if ttl > 0 then return ttl end
    return 1
  end
end
for i = 1, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[#KEYS + 1], 'NX')
end
return 0
"""
_WORDS = {"signup": "sign-ups", "signin": "sign-in attempts", "enterprise": "messages"}


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{(seconds + 59) // 60} minutes"
