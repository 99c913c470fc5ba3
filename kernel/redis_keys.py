"""Names of what the platform keeps in its two Redis servers.

The money Redis (`Settings.redis_url`; `maxmemory-policy noeviction`, persistent): billing's
fast copy, SQL being the truth. Nothing a visitor can make grow is written there.

- `dg:ready`                    set once Redis holds billing state (rebuild or first write)
- `dg:key:<sha256>`             hash: account, key_id, tpd (the key's daily cap, if any) —
                                present only while the key is valid
- `dg:acct:<id>`                hash: plan, status, rpm / tpd (per-account overrides), tier
                                (the trust tier its requests inherit, when set)
- `dg:bal:<id>`                 available credits, nUSD (SQL balance − open holds − undrained)
- `dg:day:<id>:<YYYYMMDD>`      tokens used or reserved that UTC day
- `dg:tagcap:<id>`              hash: customer tag (or `*`) → tokens/day
- `dg:tagday:<id>:<YYYYMMDD>`   hash: customer tag → tokens used or reserved that day
- `dg:keyday:<id>:<YYYYMMDD>`   hash: API key id → tokens used or reserved that day
- `dg:rpm:<id>`                 GCRA theoretical arrival time (ms) for requests/min
- `dg:hold:<request_id>`        hash: one open reservation, and its stream's last checkpoint of
                                the usage delivered (fields: billing.lua_scripts)
- `dg:holds`                    sorted set: request_id by expiry (ms), pushed forward while the
                                request lives (extend, checkpoint), for the reaper
- `dg:aholds:<id>`              set: the account's open request ids (for rebuild)
- `dg:done:<request_id>`        marker that the id was settled (refuses reuse for 15 min)
- `dg:settles:<id>`             the account's settlement count (rebuild's consistency check)
- `dg:undrained:<id>`           the account's settled events not yet written to SQL
- `dg:usage`                    stream of usage events, drained by the billing actor
- `dg:usage:dead`               stream of events the meter could not record
- `dg:verify:<sha256>`          an email verification token (billing.email_verification), TTL
- `dg:console:secret`           the console's key: anonymous forms' CSRF tokens and the MACs
                                of stored sessions (here, in the money Redis, not the state one)

The state Redis (`Settings.state_redis_url`; bounded by `maxmemory`, `allkeys-lru`, not
persistent): every key has a TTL and may be evicted, which signs someone out or resets a
counter, and never moves money.

- `dg:console:session:<sha256>` hash: a signed-in console session (serve_app.console.sessions)
- `dg:console:acct:<id>`        set: the account's console sessions (ended on suspension)
- `dg:console:reveal:<sha256>`  a secret shown once, sealed
- `dg:console:login:<sha256>`   failed sign-ins of one (email, network)
- `dg:throttle:<action>:…`      sign-up and sign-in attempts per address and network
                                (serve_app.throttle)
- `dg:supply:plan`              the supply reconciler's plan: which models are deployed, their
                                replica bounds (serve_app.supply), refreshed every few seconds
- `dg:supply:asked`             hash: model id → when an ingress last had a request for it
- `dg:supply:load_s`            hash: model id → seconds its last replica took to come online
                                (both kept a week after their last write)

The admission script reads account keys it finds through the API key, so these keys are
not declared up front: billing needs a single Redis (or one primary), not Redis Cluster.
"""

from __future__ import annotations

P = "dg:"
READY = P + "ready"
HOLDS = P + "holds"
USAGE_STREAM = P + "usage"
DEAD_STREAM = P + "usage:dead"
SUPPLY_PLAN = P + "supply:plan"
SUPPLY_ASKED = P + "supply:asked"
SUPPLY_LOAD_S = P + "supply:load_s"
SUPPLY_REQUESTS = P + "supply:requests"  # requests per model, running totals
SUPPLY_TTL_S = 7 * 24 * 3600  # demand and load times: kept a week past their last write
METER_GROUP = "billing"
# How long a settled request id stays refused for reuse. Ids are made by the ingress, so reuse
# is a bug; SQL's unique request_id is the lasting guard. Kept short: one key per request.
DONE_TTL_MS = 15 * 60_000


def api_key(key_hash: str) -> str:
    return f"{P}key:{key_hash}"


def account(account_id: int) -> str:
    return f"{P}acct:{account_id}"


def balance(account_id: int) -> str:
    return f"{P}bal:{account_id}"


def day(account_id: int, yyyymmdd: str) -> str:
    return f"{P}day:{account_id}:{yyyymmdd}"


def tag_caps(account_id: int) -> str:
    return f"{P}tagcap:{account_id}"


def tag_day(account_id: int, yyyymmdd: str) -> str:
    return f"{P}tagday:{account_id}:{yyyymmdd}"


def key_day(account_id: int, yyyymmdd: str) -> str:
    return f"{P}keyday:{account_id}:{yyyymmdd}"


def rpm(account_id: int) -> str:
    return f"{P}rpm:{account_id}"


def hold(request_id: str) -> str:
    return f"{P}hold:{request_id}"


def account_holds(account_id: int) -> str:
    return f"{P}aholds:{account_id}"


def done(request_id: str) -> str:
    return f"{P}done:{request_id}"


def settles(account_id: int) -> str:
    return f"{P}settles:{account_id}"


def undrained(account_id: int) -> str:
    return f"{P}undrained:{account_id}"


def console_session(token_hash: str) -> str:
    return f"{P}console:session:{token_hash}"


def console_sessions(account_id: int) -> str:
    return f"{P}console:acct:{account_id}"


def console_reveal(token_hash: str) -> str:
    return f"{P}console:reveal:{token_hash}"
