"""How fast supply follows the providers: seconds from a provider's node joining to the first
request it serves, split into join, schedule and load, and from its leave to the last
request moved to another provider.

On this machine: `darkgpu up` on ports of its own, with a catalog of the tiny model needing
16 GiB of VRAM, which the head does not offer (so nothing is deployed at first), and two
providers registered and approved, each standing for an RTX 4090 (24 GiB, one replica). Each
node joins as the agent joins it (a join ticket, the agent's `ray start`, the ticket
redeemed with the node's id):

1. p1 joins. join: until its node is bound; schedule: until the supply reconciler has
   deployed the model and Ray has placed its replica on p1's node (the GCS's actor table);
   load: until a request is answered by p1 (the engine loaded and routable).
2. p2 joins; then p1 leaves as its agent leaves (`ray drain-node` with the agent's default
   `drain_timeout_s`, then its processes end).
   moved: from the drain to the first request answered by p2 after which none is answered
   by p1; a client calls throughout, and every failed request is counted.
3. Nobody asks: after `DARKGPU_SCALE_TO_ZERO_AFTER_S` (60 s here) the model keeps no
   replica; the next request is answered 503 `model_warming` with a `Retry-After` from the
   load measured in step 1, and the seconds until it is served are measured against it.

The platform scales to zero here, so a model nobody asked for has no replica: in step 1 a
consumer asks every half second from the join on, as one waiting for the model would.

    .venv/bin/python bench/supply.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

# Run as a script, this folder comes first on the path, and its billing.py would stand for the
# `billing` package: the repository's root instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
# The cluster's data directory, and its Ray token named before Ray is imported (Ray reads the
# authentication mode once, at import).
DATA = Path(tempfile.mkdtemp(prefix="darkgpu-supply-"))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(DATA / "ray_auth_token"))

from agent_bootstrap.agent import RayCli, node_spec  # noqa: E402
from agent_bootstrap.api import PlatformClient  # noqa: E402
from agent_bootstrap.config import ProviderConfig  # noqa: E402
from agent_bootstrap.nvml import RecordedReader, detect  # noqa: E402
from billing import accounts  # noqa: E402
from billing.plans import load_plans  # noqa: E402
from cluster import registry  # noqa: E402
from cluster.local import LocalCluster  # noqa: E402
from cluster.processes import cmdline, descendants, end, session_of, session_processes  # noqa: E402
from cluster.ray_internals import SERVE_REPLICA_ACTOR_PREFIX, alive_actor_nodes  # noqa: E402
from core.db import make_engine, migrate  # noqa: E402
from core.schema import ProviderReview, ProviderStatus  # noqa: E402
from core.settings import CONFIGS_DIR, Settings  # noqa: E402
from kernel.labels import PROVIDER_ID_LABEL, TrustTier  # noqa: E402
from serve_app.models import MODEL_APP_PREFIX  # noqa: E402
from tests.cluster.nvml_readings import RTX_4090  # noqa: E402

MODEL = "darkgpu-tiny"
BIN = Path(sys.executable).parent
PORTS = {"RAY_PORT": 6410, "HTTP_PORT": 8030, "METRICS_PORT": 8110, "DASHBOARD_PORT": 8295,
         "POOL_RAY_PORT": 6414, "POOL_HTTP_PORT": 8031, "POOL_METRICS_PORT": 8111,
         "POOL_DASHBOARD_PORT": 8296}  # fmt: skip
# the verified pool's (empty here: every bench provider is basic)
VERIFIED = {"RAY_PORT": 6415, "HTTP_PORT": 8032, "METRICS_PORT": 8112, "DASHBOARD_PORT": 8297}
REDIS = {"DARKGPU_REDIS_URL": "redis://127.0.0.1:6412/0",
         "DARKGPU_STATE_REDIS_URL": "redis://127.0.0.1:6413/0"}  # fmt: skip
GPU = detect(RecordedReader(RTX_4090))
NODE_ENV = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 4})}
COOL_AFTER_S = 60  # silence after which the model keeps no replica


def wait(check: Callable[[], object], timeout_s: float = 600, every_s: float = 0.2) -> float:
    """Seconds until `check()` is truthy."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError("timed out")
        time.sleep(every_s)
    return time.monotonic() - start


class Bench:
    def __init__(self, data: Path) -> None:
        models = data / "models.toml"
        catalog = (CONFIGS_DIR / "models.toml").read_text()
        tiny = catalog[catalog.index(f'[[models]]\nid = "{MODEL}"') :]
        models.write_text(tiny.replace("min_vram_gb = 0", "min_vram_gb = 16"))
        verified = {k.lower(): v for k, v in VERIFIED.items()}
        self.env = {**os.environ, "DARKGPU_DATA_DIR": str(data),
                    "DARKGPU_MODELS_FILE": str(models), **REDIS,
                    "DARKGPU_SCALE_TO_ZERO_AFTER_S": str(COOL_AFTER_S),
                    **{f"DARKGPU_{k}": str(v) for k, v in PORTS.items()},
                    "DARKGPU_VERIFIED_POOL": json.dumps(verified)}  # fmt: skip
        self.env.pop("DARKGPU_DATABASE_URL", None)
        ports = {k.lower(): v for k, v in PORTS.items()}
        self.settings = Settings(data_dir=data, verified_pool=verified, **ports)
        # the supply pool's cluster, which providers' nodes join (`darkgpu up` starts the
        # control plane's)
        self.local = LocalCluster.pool(self.settings)
        self.api = f"http://127.0.0.1:{PORTS['HTTP_PORT']}"
        self.ids: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.nodes: dict[str, RayCli] = {}
        self.key = ""
        self.refusals: Counter[str] = Counter()  # requests refused, by error code

    def register(self) -> None:
        migrate(self.settings.database_url)
        engine = make_engine(self.settings.database_url)
        owner = accounts.create_account(
            engine, None, load_plans(self.settings.plans_file), email="gpus@example.com"
        )
        for name in ("p1", "p2"):
            new = registry.create_provider(engine, account_id=owner.id, name=name)
            self.ids[name], self.tokens[name] = new.provider.id, new.token
            registry.review(engine, new.provider.id, ProviderReview.approved)
            registry.heartbeat(engine, new.provider.id, ProviderStatus.online)
        engine.dispose()

    def darkgpu(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "darkgpu"), *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        return done.stdout

    def new_key(self) -> None:
        admin = lambda *a: json.loads(self.darkgpu("admin", *a))  # noqa: E731
        account = admin("account", "create", "--email", "bench@example.com", "--plan", "paid")
        admin("credits", "grant", "--account", str(account["id"]), "--usd", "100")
        admin("account", "update", "--account", str(account["id"]), "--rpm", "100000")
        self.key = admin("key", "create", "--account", str(account["id"]))["key"]

    def raylets(self, name: str) -> list[int]:
        """The provider's raylet, none once it has ended (Ray ends a node drained idle)."""
        session = session_of(PORTS["POOL_RAY_PORT"]) or ""
        label = f'"{PROVIDER_ID_LABEL}": "{self.ids[name]}"'
        return [p.pid for p in session_processes(session)
                if "raylet" in p.name() and label in cmdline(p)]  # fmt: skip

    def join(self, name: str) -> str:
        """As the agent joins: a ticket, `ray start`, the ticket redeemed; the node's id."""
        agent = PlatformClient(self.api, self.tokens[name])
        ticket = agent.join_ticket()
        ray_env = {**self.env, **self.local.env()}
        ray_env.pop("RAY_ADDRESS")

        def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            if command[1:] == ["-m", "agent_bootstrap.ray_node_id"]:  # this machine's raylets
                [raylet] = self.raylets(name)
                node_id = cmdline_node_id(raylet)
                return subprocess.CompletedProcess(command, 0, node_id + "\n", "")
            return subprocess.run(command, env={**ray_env, **env, **NODE_ENV},
                                  capture_output=True, text=True, timeout=120)  # fmt: skip

        ray = RayCli(self.local.token_path, run=run)
        spec = node_spec(self.local.address, self.ids[name], TrustTier.basic, GPU, "127.0.0.1",
                         [MODEL])  # fmt: skip
        ray.join(spec)
        self.nodes[name] = ray
        agent.bind_node(ticket, ray.node_id(), [MODEL])
        return ray.node_id()

    def ask(self) -> httpx.Response:
        return httpx.post(f"{self.api}/v1/chat/completions", timeout=120,
                          headers={"authorization": f"Bearer {self.key}"},
                          json={"model": MODEL, "max_tokens": 2, "messages": [
                              {"role": "user", "content": "hello"}]})  # fmt: skip

    def served_by(self) -> str | None:
        """Who answered one request (None: refused, e.g. 503 while no replica is up)."""
        got = self.ask()
        if got.status_code != 200:
            self.refusals[got.json()["error"].get("code") or str(got.status_code)] += 1
            return None
        provider = got.headers["x-darkgpu-provider"]
        return {v: k for k, v in self.ids.items()}.get(provider, provider)


def cmdline_node_id(pid: int) -> str:
    import psutil

    return cmdline(psutil.Process(pid)).split("--node-id=", 1)[1].split()[0]


def main() -> None:
    try:
        run(Bench(DATA))
    finally:
        shutil.rmtree(DATA, ignore_errors=True)


def run(bench: Bench) -> None:
    bench.register()
    bench.local.start_head()
    try:
        bench.darkgpu("up")
        bench.new_key()
        assert bench.served_by() is None  # nothing deployed: the head has no VRAM
        os.environ.update(bench.local.env())
        import ray

        ray.init(address=bench.local.address, logging_level="ERROR", log_to_driver=False)
        start = time.monotonic()
        node = bench.join("p1")
        joined = time.monotonic() - start
        # the model's replicas (not the platform application's own)
        replicas = lambda: alive_actor_nodes(SERVE_REPLICA_ACTOR_PREFIX + MODEL_APP_PREFIX)  # noqa: E731
        scheduled = wait(lambda: bench.served_by() or node in replicas().values(), every_s=0.5)
        loaded = wait(lambda: bench.served_by() == "p1", every_s=0.5)
        total = time.monotonic() - start
        split = f"join {joined:.1f} s, schedule {scheduled:.1f} s, load {loaded:.1f} s"
        print(f"p1 join → first request served: {total:.1f} s ({split})")

        bench.join("p2")
        bench.refusals.clear()
        served: list[tuple[float, str | None]] = []
        stop = threading.Event()

        def keep_calling() -> None:
            while not stop.is_set():
                served.append((time.monotonic(), bench.served_by()))

        caller = threading.Thread(target=keep_calling)
        caller.start()
        time.sleep(2)
        left = time.monotonic()
        bench.nodes["p1"].drain("darkgpu agent: leaving", ProviderConfig().drain_timeout_s)

        def moved_away() -> bool:
            recent = {who for t, who in served if t > time.monotonic() - 5}
            return "p1" not in recent and any(who == "p2" for t, who in served if t > left)

        try:
            wait(moved_away, every_s=0.5)
        finally:
            stop.set()
            caller.join()
        quiet_since = time.monotonic()  # the last request
        by_p1 = [t for t, who in served if who == "p1"]
        moved = (max(by_p1) - left) if by_p1 else 0.0
        since = [who for t, who in served if t > left]
        failed = since.count(None)
        refused = dict(bench.refusals)  # by error code
        print(f"p1 leave → last request moved: {moved:.1f} s "
              f"({len(since)} requests meanwhile, {failed} refused: {refused})")  # fmt: skip
        for raylet in bench.raylets("p1"):  # as its agent leaves
            end([raylet, *(p.pid for p in descendants(raylet))], signal.SIGTERM, wait_s=30)

        wait(lambda: not replicas(), timeout_s=COOL_AFTER_S + 300, every_s=1)
        cold = time.monotonic() - quiet_since
        warming = bench.ask()
        back = wait(lambda: bench.served_by() == "p2", every_s=0.5)
        code = warming.json()["error"]["code"] if warming.status_code != 200 else "served"
        print(f"nobody asks → no replica: {cold:.1f} s after the last request "
              f"({COOL_AFTER_S} s window); the next request: {warming.status_code} {code}, "
              f"Retry-After {warming.headers.get('retry-after')} s; "
              f"served {back:.1f} s later")  # fmt: skip
        ray.shutdown()
    finally:  # Serve stopped gracefully in both clusters, then their processes, the Redis
        subprocess.run([str(BIN / "darkgpu"), "down"], env=bench.env, capture_output=True)
        bench.local.stop()  # what is left of the pool's session: the providers' raylets


if __name__ == "__main__":
    main()
