"""What a member of the supply pool's Ray cluster finds there: run as a Ray driver with the
pool's token, as a provider's node holds it (`test_pool.py`). It prints, as JSON, every key of
the pool's key-value store with its value (Serve keeps each deployment's arguments there), the
environment of a worker on each node of the pool (a task pinned there), what a task pinned to
each node reaches of the control plane (`probe`: files, servers, other processes), or whether
the control plane's cluster let it in with the same token."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import sys
from pathlib import Path

import ray
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NODE_IP_VARIABLE = "POOL_MEMBER_NODE_IP"


def pool_store() -> list[tuple[str, str]]:
    """Every (key, value) of the store, base64, in each namespace Ray and Serve use (a listing
    without a namespace names keys of every namespace; their values read only in their own)."""
    found = []
    for namespace in (None, b"serve", b""):
        for key in internal_kv._internal_kv_list(b"", namespace=namespace):
            value = internal_kv._internal_kv_get(key, namespace=namespace) or b""
            found.append((base64.b64encode(key).decode(), base64.b64encode(value).decode()))
    return found


@ray.remote(num_cpus=0)
def environment() -> dict[str, str]:
    return dict(os.environ)


@ray.remote(num_cpus=0)
def probe(files: list[str], servers: list[tuple[str, int]]) -> dict[str, object]:
    """What this node reaches: each file (its first bytes, or why not), each server (what it
    answers a Redis PING with, or why not), and the environment and command line of every
    process it may read, whoever's (its own lines show it is a worker of the pool)."""
    read: dict[str, str] = {}
    for path in files:
        try:
            read[path] = Path(path).read_bytes()[:64].hex()
        except OSError as exc:
            read[path] = f"refused: {exc.strerror}"
    answered: dict[str, str] = {}
    for host, port in servers:
        try:
            with socket.create_connection((host, port), timeout=3) as conn:
                conn.settimeout(3)
                conn.sendall(b"PING\r\n")
                answered[f"{host}:{port}"] = conn.recv(64).decode(errors="replace")
        except OSError as exc:
            answered[f"{host}:{port}"] = f"refused: {exc.strerror or exc}"
    seen = []
    for proc in Path("/proc").glob("[0-9]*"):
        for part in ("environ", "cmdline"):
            try:
                text = (proc / part).read_bytes().replace(b"\0", b" ")
                seen.append(text.decode(errors="replace"))
            except OSError:
                pass
    return {"uid": os.getuid(), "read": read, "answered": answered, "processes": seen}


def _each_node(
    task: ray.remote_function.RemoteFunction, *args: object, nodes: list[str] | None = None
) -> dict[str, object]:
    """node id -> what `task` returned, run on each of `nodes` (all alive now, if None); a
    node whose task did not finish in two minutes is named in the error."""
    alive = nodes or [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    strategies = [NodeAffinitySchedulingStrategy(node, soft=False) for node in alive]
    pinned = [task.options(scheduling_strategy=s).remote(*args) for s in strategies]
    _, late = ray.wait(pinned, num_returns=len(pinned), timeout=120)
    if late:
        missing = [node for node, ref in zip(alive, pinned, strict=True) if ref in late]
        raise TimeoutError(f"no answer in two minutes from the task on {missing}")
    return dict(zip(alive, ray.get(pinned), strict=True))


def environments() -> dict[str, object]:
    """node id -> the environment a task run there finds (what the node's raylet gave its
    workers: the pool's deployments run in such workers)."""
    return _each_node(environment)


def probes() -> dict[str, object]:
    """node id -> what a task on that node reaches of what the third argument names (JSON:
    {"nodes": [node id, ...], "files": [path, ...], "servers": [[host, port], ...]})."""
    tried = json.loads(sys.argv[3])
    servers = [tuple(s) for s in tried["servers"]]
    return _each_node(probe, tried["files"], servers, nodes=tried["nodes"])


if __name__ == "__main__":
    what, address = sys.argv[1], sys.argv[2]
    # which of this machine's raylets is its own (Ray would take the head's, on this host too):
    # the node at this address, where the test names one (a node in a namespace of its own)
    here = os.environ.get(NODE_IP_VARIABLE) or None
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
             _node_ip_address=here)  # fmt: skip
    found = {"store": pool_store, "environ": environments, "probe": probes,
             "join": lambda: {"joined": True}}  # fmt: skip
    print(json.dumps(found[what]()))
