"""Where the platform's CPU goes: every process on the machine, idle and under load.

`darkgpu up` as `bench/serving_overhead.py` starts it (billing on, a paid key), then the CPU
seconds (user + system, from /proc through psutil) each process spent: over `--idle-s` with no
request, over `--requests` non-streaming requests at c=1, and over 4× as many at c=16. On 2
cores, what the platform spends idle (three Ray clusters, the supply reconciler, the billing
actor) is taken from the request path, and at c=16 the machine is saturated: the c=16 column
divided by its request count is each process's CPU per request. Run it on a quiet machine;
`py-spy record -p PID` on a process it names tells where its share goes.

    .venv/bin/python bench/platform_cpu.py [--idle-s 20] [--requests 64] [--top 18]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_overhead as bench  # noqa: E402

Reading = dict[int, tuple[float, str]]


def reading() -> Reading:
    """Each process's CPU seconds so far, and what it is (its command line, cut short)."""
    out: Reading = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or []) or proc.info["name"]
            out[proc.pid] = (bench.cpu_seconds(proc), line[:90])
        except psutil.Error:
            continue
    return out


def report(title: str, before: Reading, after: Reading, seconds: float, top: int) -> None:
    spent = sorted(
        ((after[pid][0] - cpu, pid, after[pid][1]) for pid, (cpu, _) in before.items()
         if pid in after),
        reverse=True,
    )  # fmt: skip
    total = sum(s for s, _, _ in spent)
    print(f"\n{title}: {total:.2f} CPU-s in {seconds:.1f} s ({total / seconds:.2f} cores)")
    for cpu, pid, line in spent[:top]:
        print(f"  {cpu:6.2f}  {pid:7d}  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=20)
    parser.add_argument("--requests", type=int, default=64, help="at c=1; 4x at c=16")
    parser.add_argument("--top", type=int, default=18, help="processes listed per reading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="darkgpu-bench-") as tmp:
        with bench.platform(Path(tmp), 8103) as (base, key):
            url = f"{base}/v1/chat/completions"
            asyncio.run(bench._run(url, 8, 4, 8, False, key))  # warm up
            time.sleep(5)
            before, started = reading(), time.perf_counter()
            time.sleep(args.idle_s)
            report("idle", before, reading(), time.perf_counter() - started, args.top)
            for concurrency, count in ((1, args.requests), (16, 4 * args.requests)):
                before, started = reading(), time.perf_counter()
                latencies, rps = asyncio.run(bench._run(url, count, concurrency, 8, False, key))
                p50_ms = bench.pct(latencies, 0.5) * 1000
                title = f"c={concurrency}, {count} requests (p50 {p50_ms:.1f} ms, {rps:.1f} req/s)"
                report(title, before, reading(), time.perf_counter() - started, args.top)


if __name__ == "__main__":
    main()
