"""What billing reads back from Redis, decoded and typed once.

redis-py answers `bytes` (or `str`, with `decode_responses`), and its annotations cover every
shape a reply may take (RESP2's list of pairs and RESP3's dict, ZRANGE with and without
scores). Billing's readers want `str`s in one known shape; these helpers give them that, so no
reader repeats the decoding or asks the type checker to look away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.typing import ZSetRangeResponse


def as_str(value: bytes | str | None) -> str:
    """A reply's text; None (a missing key or field) reads as ''."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class StreamEntry:
    stream_id: str
    fields: dict[str, str]  # empty for an entry deleted while it was pending


def stream_entries(
    items: Iterable[tuple[bytes | str | None, Mapping[bytes | str, bytes | str] | None]] | None,
) -> list[StreamEntry]:
    """The entries of an XRANGE, XREADGROUP or XAUTOCLAIM reply: (id, fields) pairs."""
    return [StreamEntry(as_str(sid), _texts(data or {})) for sid, data in items or ()]


def _texts(data: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A stream entry's fields as text: bytes decoded at once where they all are (the
    meter reads thousands of entries a second), else each by `as_str`."""
    try:
        return {k.decode(): v.decode() for k, v in data.items()}  # type: ignore[union-attr]
    except AttributeError:  # str (decode_responses) or mixed
        return {as_str(k): as_str(v) for k, v in data.items()}


def read_group_entries(reply: list[list[Any]] | Mapping[Any, Any] | None) -> list[StreamEntry]:
    """XREADGROUP's entries, of every stream read: RESP2 answers [[stream, entries], …],
    RESP3 {stream: entries}."""
    streams = reply.items() if isinstance(reply, Mapping) else reply or ()
    return [entry for _stream, items in streams for entry in stream_entries(items)]


def scored_members(reply: ZSetRangeResponse) -> list[tuple[str, float]]:
    """ZRANGE … WITHSCORES as (member, score) pairs."""
    pairs = []
    for item in reply:
        if isinstance(item, bytes | str):
            raise TypeError("a ZRANGE reply without scores")
        pairs.append((as_str(item[0]), float(item[1])))
    return pairs
