"""The usage ledger's hash chain: `row_hash = sha256(prev_hash + "\n" + canonical JSON)`.

The canonical form is JSON with sorted keys and no spaces over every field of the usage event
(kernel.usage_event.FIELDS: all of them matter for money or attribution); integers stay
integers, the tag may be null. The first row chains to 64 zeros. Changing any hashed field of
any row breaks its hash and every link after it.

A field added to the usage event after rows were written is hashed only where it has a value
(`ADDED_LATER`): rows written before it existed hold NULL there and keep the form, hence the
hash, they were written with, while every newer row's value is covered. So
`reported_completion_tokens` (the engine's own count beside the billed one, migration 0007)
cannot be rewritten on a new row, and old rows still verify. tests/billing/test_chain.py pins
both forms, so a change to either cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import json

from kernel.usage_event import UsageRecord

GENESIS = "0" * 64
# Fields hashed only when not None: NULL in every row written before they were added.
ADDED_LATER = ("reported_completion_tokens",)
# `json.dumps` with these arguments builds an encoder each call; one, made once, writes the same
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(record: UsageRecord) -> str:
    row = record.row()
    for name in ADDED_LATER:
        if row[name] is None:
            del row[name]
    return _CANONICAL.encode(row)


def row_hash(prev_hash: str, record: UsageRecord) -> str:
    data = prev_hash + "\n" + canonical(record)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()
