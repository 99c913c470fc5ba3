"""The processes of one local Ray cluster, found by its session name.

`ray stop` ends every Ray process on the machine, whichever cluster it belongs to; two
clusters on one machine (a developer's and a test run's) must stop only their own. Each
Ray process names its session on its command line; workers (renamed `ray::…`) and the
engines they start are the raylets' descendants.
"""

from __future__ import annotations

import signal

import psutil


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def session_of(gcs_port: int) -> str | None:
    """The Ray session name of the cluster whose GCS listens on `gcs_port`, if any."""
    for proc in psutil.process_iter():
        cmd = cmdline(proc)
        if f"--gcs_server_port={gcs_port}" in cmd and "--session-name=" in cmd:
            return cmd.split("--session-name=", 1)[1].split()[0]
    return None


def session_processes(session: str) -> list[psutil.Process]:
    """The processes whose command line names `session` (GCS, raylets, agents, dashboard),
    or the node id of one of its raylets (Ray's client server names only that)."""
    named = [p for p in psutil.process_iter() if session in cmdline(p)]
    nodes = {
        cmd.split("--node-id=", 1)[1].split()[0]
        for cmd in map(cmdline, named)
        if "raylet" in cmd and "--node-id=" in cmd
    }
    pids = {p.pid for p in named}
    others = [
        p
        for p in psutil.process_iter()
        if p.pid not in pids and any(f"--node-id={node}" in cmdline(p) for node in nodes)
    ]
    return named + others


def descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
        return children
    except psutil.NoSuchProcess:
        return []


def end(pids: list[int], sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
    """Signal `pids`, wait up to `wait_s`, then SIGKILL whatever is left."""
    procs = []
    for pid in dict.fromkeys(pids):
        try:
            proc = psutil.Process(pid)
            proc.send_signal(sig)
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def stop_session(session: str, wait_s: float = 15) -> None:
    """End one cluster: its own processes and everything its raylets started."""
    ours = session_processes(session)
    raylets = [p.pid for p in ours if "raylet" in p.name()]
    children = [d.pid for r in raylets for d in descendants(r)]
    end([*children, *(p.pid for p in ours)], wait_s=wait_s)


def forget_address(gcs_port: int) -> None:
    """Remove Ray's note of the machine's current cluster (`ray_current_cluster`, which a
    plain `ray.init()` connects to) when it names the cluster on `gcs_port`, as `ray stop`
    does; another cluster's note stays."""
    from cluster.ray_internals import ray_address_file  # imports Ray: only when needed

    note = ray_address_file()
    try:
        if note.read_text().strip().endswith(f":{gcs_port}"):
            note.unlink()
    except OSError:
        pass
