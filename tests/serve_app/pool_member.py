"""What a member of the supply pool's Ray cluster finds there: run as a Ray driver with the
pool's token, as a provider's node holds it (`test_pool.py`). It prints, as JSON, every key of
the pool's key-value store with its value (Serve keeps each deployment's arguments there),
and whether the control plane's cluster let it in with the same token."""

from __future__ import annotations

import base64
import json
import logging
import sys

import ray
from ray.experimental import internal_kv


def pool_store() -> list[tuple[str, str]]:
    """Every (key, value) of the store, base64, in each namespace Ray and Serve use (a listing
    without a namespace names keys of every namespace; their values read only in their own)."""
    found = []
    for namespace in (None, b"serve", b""):
        for key in internal_kv._internal_kv_list(b"", namespace=namespace):
            value = internal_kv._internal_kv_get(key, namespace=namespace) or b""
            found.append((base64.b64encode(key).decode(), base64.b64encode(value).decode()))
    return found


if __name__ == "__main__":
    what, address = sys.argv[1], sys.argv[2]
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    print(json.dumps(pool_store() if what == "store" else {"joined": True}))
