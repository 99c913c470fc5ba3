from __future__ import annotations

import os

from agent_bootstrap.idle import (
    IdleDetector,
    LinuxProcTable,
    ProcInfo,
    classify,
    is_ours,
)
from agent_bootstrap.nvml import GpuProcess
from tests.agent_bootstrap.proc_tables import StaticProcTable

AGENT = 100
PROCS = StaticProcTable(
    [
        ProcInfo(AGENT, 1, 1000, "darkgpu", "/venv/bin/python /venv/bin/darkgpu serve"),
        ProcInfo(200, 1, 1000, "raylet", "/venv/lib/ray/core/src/ray/raylet/raylet --x"),
        ProcInfo(201, 200, 1000, "ray::ServeRepli", "ray::ServeReplica:llm-qwen"),
        ProcInfo(202, 201, 1000, "VLLM::EngineCor", "VLLM::EngineCore"),  # child of a worker
        ProcInfo(300, 1, 1000, "Xorg", "/usr/lib/xorg/Xorg :0"),
        ProcInfo(400, 1, 1000, "steam", "/usr/bin/steam"),
        ProcInfo(401, 400, 1000, "game.exe", "wine game.exe"),
        ProcInfo(500, 1, 0, "python3", "python3 train.py"),  # root's training job
        ProcInfo(600, AGENT, 1000, "python", "python -m agent_bootstrap.ray_node_id"),
    ]
)


def gpu(*pids: int) -> list[GpuProcess]:
    return [GpuProcess(pid) for pid in pids]


def test_ray_workers_their_children_and_the_agents_children_are_ours() -> None:
    for pid in (200, 201, 202, 600, AGENT):
        assert is_ours(pid, PROCS, {AGENT}), pid
    for pid in (300, 400, 401, 500, 999):
        assert not is_ours(pid, PROCS, {AGENT}), pid


def test_classify_foreign_ignored_and_ours() -> None:
    seen = classify(gpu(202, 300, 401, 500, 999), PROCS, own_pids={AGENT})
    assert [p.pid for p in seen.ours] == [202]
    assert [p.pid for p in seen.ignored] == [300]  # the compositor never counts
    assert [p.pid for p, _ in seen.foreign] == [401, 500, 999]  # 999: unknown counts as foreign
    assert seen.describe_foreign() == "game.exe (pid 401), python3 (pid 500), pid 999"
    muted = classify(gpu(401), PROCS, own_pids={AGENT}, ignore_names=["game.exe"])
    assert muted.foreign == () and [p.pid for p in muted.ignored] == [401]


def test_a_parent_loop_does_not_hang() -> None:
    loop = StaticProcTable([ProcInfo(7, 8, 0, "a", "a"), ProcInfo(8, 7, 0, "b", "b")])
    assert not is_ours(7, loop, set())


def test_idle_detector_pauses_at_once_and_rejoins_after_the_quiet_time() -> None:
    idle = IdleDetector(rejoin_after_s=600)
    assert idle.update(busy=False, now=0)  # never seen busy: idle
    assert not idle.update(busy=True, now=10)
    assert idle.rejoin_in(10) is None
    assert not idle.update(busy=False, now=20)
    assert idle.rejoin_in(320) == 300
    assert not idle.update(busy=False, now=619)
    assert not idle.update(busy=True, now=500)  # busy again: the quiet time restarts
    assert not idle.update(busy=False, now=600)
    assert not idle.update(busy=False, now=1199)
    assert idle.update(busy=False, now=1200)
    assert IdleDetector(0).update(busy=False, now=5)


def test_linux_proc_table_reads_this_process() -> None:
    me = LinuxProcTable().get(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.ppid == os.getppid()
    assert me.uid == os.getuid() and "python" in me.cmdline.lower()
    assert LinuxProcTable().get(2**22 + 12345) is None
