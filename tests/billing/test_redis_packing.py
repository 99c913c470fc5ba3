"""The asyncio clients billing makes pack their commands with hiredis, byte for byte as
redis-py's own packer, and every kind of argument billing sends arrives intact."""

import redis
import redis.asyncio as aredis

from billing.admission import connect
from billing.redis_packing import hiredis_packing
from tests.billing.conftest import REDIS_URL

ARGUMENTS = ("EVALSHA", "abc", 0, 1_730_000_000_123, 2.5, -7, b"\x00\xffbytes", "é ü 名", "")


def test_packed_as_redis_py_packs_them() -> None:
    plain = aredis.Connection()
    packed = hiredis_packing(aredis.Connection)()
    assert b"".join(packed.pack_command(*ARGUMENTS)) == b"".join(plain.pack_command(*ARGUMENTS))
    # a command name with a space is sent as separate words, as redis-py does
    assert b"".join(packed.pack_command("CLIENT SETNAME", "x")) == b"".join(
        plain.pack_command("CLIENT SETNAME", "x")
    )


async def test_the_admission_client_packs_with_hiredis(r: redis.Redis) -> None:
    client = connect(REDIS_URL)
    try:
        assert getattr(client.connection_pool.connection_class, "_packs_with_hiredis", False)
        echo = client.register_script("return ARGV")
        values = ["x" * 100_000, 7, "é ü 名", "", 2.5]
        assert await echo(keys=[], args=values) == [b"x" * 100_000, b"7", "é ü 名".encode(),
                                                    b"", b"2.5"]  # fmt: skip
        await client.set("dg:test:packing", "名")
        assert await client.get("dg:test:packing") == "名".encode()
    finally:
        await client.aclose()
