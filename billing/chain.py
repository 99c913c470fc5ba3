"""The usage ledger's hash chain: `row_hash = sha256(prev_hash + "\n" + canonical JSON)`.

The canonical form is JSON with sorted keys and no spaces over every field that matters for
money and attribution; integers stay integers, the tag may be null. The first row chains to
64 zeros. Changing any hashed field of any row breaks its hash and every link after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

GENESIS = "0" * 64
HASHED_FIELDS = (
    "request_id",
    "account_id",
    "key_id",
    "customer_tag",
    "model",
    "provider_id",
    "prompt_tokens",
    "completion_tokens",
    "input_nusd_per_token",
    "output_nusd_per_token",
    "cost_nusd",
    "provider_share_nusd",
    "platform_share_nusd",
    "outcome",
    "usage_day",
    "created_at_ms",
    "settled_at_ms",
)


def canonical(fields: Mapping[str, Any]) -> str:
    return json.dumps(
        {name: fields[name] for name in HASHED_FIELDS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def row_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    data = prev_hash + "\n" + canonical(fields)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def split_cost(cost_nusd: int) -> tuple[int, int]:
    """95% to the provider (rounded down), the rest to the platform; exact in integers."""
    provider = cost_nusd * 95 // 100
    return provider, cost_nusd - provider
