"""Commands packed by hiredis's C function on the asyncio Redis clients, as redis-py's
blocking clients already pack them.

redis-py 8 packs an asyncio client's command in Python, one argument at a time (its
`Encoder`, then a join per argument), while its blocking `Connection` hands the whole command
to `hiredis.pack_command` when hiredis is installed (`redis.connection.HiredisRespSerializer`).
Admission sends 15 arguments a call: the Python packing was a third of the client's CPU per
admission (bench/billing.py, profiled). `hiredis_packing` gives an asyncio connection class
the blocking clients' serializer, with its argument rules; without hiredis it changes nothing.
"""

from __future__ import annotations

from typing import Any, cast

from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

# (as Any: redis-py 8.2 leaves its constructor unannotated, earlier releases did not)
_SERIALIZER: Any = cast(Any, HiredisRespSerializer)()


def _pack_command(self: Any, *args: Any) -> list[bytes]:
    packed: list[bytes] = _SERIALIZER.pack(*args)
    return packed


def hiredis_packing(connection_class: type) -> type:
    """`connection_class` (an asyncio Connection, SSLConnection, …) packing with hiredis."""
    if not HIREDIS_AVAILABLE or getattr(connection_class, "_packs_with_hiredis", False):
        return connection_class
    return type(
        f"Hiredis{connection_class.__name__}",
        (connection_class,),
        {"pack_command": _pack_command, "_packs_with_hiredis": True},
    )
