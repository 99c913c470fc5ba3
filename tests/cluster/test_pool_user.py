"""The local pool's head as an unprivileged user: what it is given, and what it is refused.
Run as root, as the tests are (the user is made if missing, as the multi-node suite makes it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from cluster.pool_user import PoolUser, PoolUserError
from cluster.pools import pools
from core.settings import ENV_PREFIX, Settings
from kernel.labels import TrustTier


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder every user may enter (pytest's own is root's alone), as the temporary
    directory the pool's user's home lies in."""
    made = Path(tempfile.mkdtemp(prefix="darkgpu-pool-user-"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made)


@pytest.fixture
def user(base: Path, pool_user: str) -> PoolUser:
    named = PoolUser.named(pool_user, 1)
    return PoolUser(named.name, named.uid, named.gid, base / "home")


def _read_as(user: PoolUser, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; print(open(sys.argv[1]).read())", str(path)],
        capture_output=True, text=True, env=user.env(), timeout=60, **user.process_options(),
    )  # fmt: skip


def test_a_missing_user_or_root_is_refused_with_what_to_do() -> None:
    with pytest.raises(PoolUserError, match="useradd --system"):
        PoolUser.named("darkgpu-no-such-user", 6383)
    with pytest.raises(PoolUserError, match="is root"):
        PoolUser.named("root", 6383)


def test_its_home_and_token_are_its_own_and_it_reads_nothing_of_roots(
    user: PoolUser, base: Path
) -> None:
    data = base / "data"  # as the platform's data directory: root's, mode 0700
    data.mkdir(mode=0o700)
    (data / "control_ray_auth_token").write_text("control secret")
    token = data / "ray_auth_token"
    token.write_text("pool token")
    user.prepare(token)
    home = os.stat(user.home)
    assert (home.st_uid, home.st_mode & 0o777) == (user.uid, 0o700)
    copy = os.stat(user.token_path)
    assert (copy.st_uid, copy.st_mode & 0o777) == (user.uid, 0o600)
    own = _read_as(user, user.token_path)
    assert (own.returncode, own.stdout.strip()) == (0, "pool token")
    read = _read_as(user, data / "control_ray_auth_token")
    assert read.returncode != 0 and "Permission denied" in read.stderr


def test_a_home_someone_else_made_first_is_refused(user: PoolUser, base: Path) -> None:
    token = base / "token"
    token.write_text("pool token")
    (base / "elsewhere").mkdir()
    user.home.symlink_to(base / "elsewhere")  # made first, in a shared temporary directory
    with pytest.raises(PoolUserError, match="not a directory of root's"):
        user.prepare(token)
    user.home.unlink()
    user.home.mkdir()
    os.chown(user.home, 65534, 65534)  # nobody's
    with pytest.raises(PoolUserError, match="not a directory of root's"):
        user.prepare(token)


def test_what_it_left_in_its_home_is_never_written_through(user: PoolUser, base: Path) -> None:
    """Every member of the pool runs code as this user, who owns the home: before a restart it
    puts, at the token's name, a hard link to a file of root's (which a kernel without
    protected_hardlinks lets it make) or a symbolic link. Root's file is neither truncated,
    written nor given away."""
    token = base / "token"
    token.write_text("pool token")
    victim = base / "root-only"
    victim.write_text("root's own")
    user.prepare(token)
    for link in (os.link, os.symlink):
        user.token_path.unlink()
        link(victim, user.token_path)
        user.prepare(token)
        assert victim.read_text() == "root's own" and victim.stat().st_uid == 0
        assert user.token_path.read_text() == "pool token" and not user.token_path.is_symlink()


def test_an_interpreter_it_cannot_run_is_refused_with_what_to_do(
    user: PoolUser, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden = base / "root-only"  # as /root, where pyenv's interpreter lies
    hidden.mkdir(mode=0o700)
    (hidden / "python").symlink_to(sys.executable)
    token = base / "token"
    token.write_text("pool token")
    monkeypatch.setattr(sys, "executable", str(hidden / "python"))
    with pytest.raises(PoolUserError, match="cannot run .*make install PYTHON="):
        user.prepare(token)


def test_the_pools_head_is_started_as_its_user_with_none_of_the_platforms_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool_user: str
) -> None:
    monkeypatch.setenv("DARKGPU_STRIPE_SECRET_KEY", "sk_live_operator")
    settings = Settings(data_dir=tmp_path, pool_user=pool_user, pool_node_ip="10.9.0.1")
    pool, control = LocalCluster.pool(settings), LocalCluster.control(settings)
    assert pool.user is not None and control.user is None
    env = pool.process_env()
    assert env["HOME"] == str(pool.user.home) and env["USER"] == pool_user
    assert env["RAY_AUTH_TOKEN_PATH"] == str(pool.user.token_path)  # its copy, not root's
    assert not [name for name in env if name.startswith(ENV_PREFIX)]
    assert pool.process_options()["user"] == pool.user.uid
    basic = pools(settings)[TrustTier.basic]
    assert pool.address == "10.9.0.1:6383" == basic.agent_address
    # what root's own processes use to reach the pool: root's token, never the user's copy
    assert pool.env()["RAY_AUTH_TOKEN_PATH"] == str(basic.ray_token_path)
    assert control.process_options() == {} and control.address.startswith("127.0.0.1:")
