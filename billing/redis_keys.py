"""Names of everything billing keeps in Redis (the fast copy; SQL is the truth).

- `dg:ready`                    set once Redis holds billing state (rebuild or first write)
- `dg:key:<sha256>`             hash: account, key_id — present only while the key is valid
- `dg:acct:<id>`                hash: plan, status, rpm / tpd (per-account overrides), tier
                                (the trust tier its requests inherit, when set)
- `dg:bal:<id>`                 available credits, nUSD (SQL balance − open holds − undrained)
- `dg:day:<id>:<YYYYMMDD>`      tokens used or reserved that UTC day
- `dg:tagcap:<id>`              hash: customer tag (or `*`) → tokens/day
- `dg:tagday:<id>:<YYYYMMDD>`   hash: customer tag → tokens used or reserved that day
- `dg:rpm:<id>`                 GCRA theoretical arrival time (ms) for requests/min
- `dg:hold:<request_id>`        hash: one open reservation
- `dg:holds`                    sorted set: request_id by expiry (ms), for the reaper
- `dg:aholds:<id>`              set: the account's open request ids (for rebuild)
- `dg:done:<request_id>`        marker that the id was settled (refuses reuse for 15 min)
- `dg:settles:<id>`             the account's settlement count (rebuild's consistency check)
- `dg:undrained:<id>`           the account's settled events not yet written to SQL
- `dg:usage`                    stream of usage events, drained by the billing actor
- `dg:usage:dead`               stream of events the meter could not record

The admission script reads account keys it finds through the API key, so these keys are
not declared up front: billing needs a single Redis (or one primary), not Redis Cluster.
"""

from __future__ import annotations

P = "dg:"
READY = P + "ready"
HOLDS = P + "holds"
USAGE_STREAM = P + "usage"
DEAD_STREAM = P + "usage:dead"
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
