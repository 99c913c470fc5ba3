"""What the platform costs on top of the engine: the same small model served three ways.

1. vLLM alone (its OpenAI server),
2. a bare Ray Serve LLM app (`build_openai_app`, stream batching off as ours),
3. this platform (`darkgpu up`: ingress with key check, admission and settlement in Redis,
   provider router, LLMServer deployment; the billing actor draining into SQLite),

each measured at concurrency 1 and 16 with the same client, one after the other in one run:
p50/p99 latency of short completions, p50/p99 time to first token when streaming, and
requests/s. Prints a table, then the ratios of the platform to the other two.

    .venv/bin/python bench/serving_overhead.py [--requests 48] [--max-tokens 8]
        [--servers vllm,serve-llm,platform] [--serve-modes default,throughput] [--profile DIR]

`--serve-modes`: the Serve-based servers (bare Serve LLM and the platform) run once per mode:
`default`, and `throughput` with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in every Ray process's
environment (Ray 2.56+: user code on the replica's own event loop, gRPC between deployments,
direct ingress, request logs buffered, GC frozen after start-up). Rows and ratios are per
mode (`platform+throughput ÷ serve-llm+throughput`, …).

`--servers platform` measures the platform alone: the bare Serve LLM step ends with
`ray stop --force`, which stops every Ray cluster on the machine, so run it only where no
one else runs one. `--profile DIR` samples the platform's processes with py-spy during its
c=16 non-streaming run (the ingress replica, the HTTP proxy, the model replica's Serve
wrapper and the billing meter, found among this cluster's raylet's children) and writes each
one's samples (py-spy's raw format: one stack and its count a line) and their CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

MODEL = "darkgpu-tiny"
BIN = Path(sys.executable).parent
PROMPT = [{"role": "user", "content": "Tell me a story about a small robot."}]


@dataclass
class Result:
    server: str
    concurrency: int
    latency_p50: float
    latency_p99: float
    ttft_p50: float
    ttft_p99: float
    rps: float


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int, stream: bool) -> float:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True}  # fmt: skip
    started = time.perf_counter()
    if not stream:
        response = await client.post(url, json=body)
        response.raise_for_status()
        # the usage billed is the ingress's count of the text it delivered (re-tokenized:
        # the tiny model's gibberish may count fewer), never more than was generated
        assert 0 < response.json()["usage"]["completion_tokens"] <= max_tokens
        return time.perf_counter() - started
    ttft = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():  # read to the end, as a client would
            if ttft is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - started
    if ttft is not None:
        return ttft
    raise RuntimeError("stream ended without a token")


async def _run(url: str, n: int, concurrency: int, max_tokens: int, stream: bool, key: str):
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    samples: list[float] = []
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                samples.append(await _one(client, url, max_tokens, stream))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return samples, n / elapsed


def measure(
    server: str,
    base: str,
    n: int,
    max_tokens: int,
    key: str = "none",
    profile: Callable[[], Callable[[], None]] | None = None,
) -> list[Result]:
    """`profile`: started before the c=16 non-streaming run; what it returns, after it."""
    url = f"{base}/v1/chat/completions"
    asyncio.run(_run(url, 8, 4, max_tokens, False, key))  # warm up
    results = []
    for concurrency in (1, 16):
        count = n if concurrency == 1 else n * 4
        stop = profile() if profile is not None and concurrency == 16 else None
        latencies, rps = asyncio.run(_run(url, count, concurrency, max_tokens, False, key))
        if stop is not None:
            stop()
        ttfts, _ = asyncio.run(_run(url, count, concurrency, max_tokens, True, key))
        results.append(
            Result(
                server,
                concurrency,
                pct(latencies, 0.5),
                pct(latencies, 0.99),
                pct(ttfts, 0.5),
                pct(ttfts, 0.99),
                rps,
            )
        )
        print(f"  {server} c={concurrency}: done", flush=True)
    return results


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


@contextmanager
def vllm_alone(model_dir: Path, port: int) -> Iterator[str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(model_dir), "--served-model-name", MODEL, "--port", str(port),
         "--max-model-len", "256", "--enforce-eager", "--dtype", "bfloat16"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


SERVE_MODES: dict[str, dict[str, str]] = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def labelled(server: str, mode: str) -> str:
    return server if mode == "default" else f"{server}+{mode}"


@contextmanager
def bare_serve_llm(model_dir: Path, port: int, mode: str = "default") -> Iterator[str]:
    code = f"""
import signal, sys, time, ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
if __name__ == "__main__":
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
    config = LLMConfig(
        model_loading_config={{"model_id": "{MODEL}", "model_source": "{model_dir}"}},
        engine_kwargs={{"max_model_len": 256, "enforce_eager": True, "dtype": "bfloat16"}},
        placement_group_config={{"bundles": [{{"CPU": 1}}]}},
        runtime_env={{"env_vars": {{"VLLM_CPU_KVCACHE_SPACE": "1"}}}},
        experimental_configs={{"stream_batching_interval_ms": 0}},
        deployment_config={{"max_ongoing_requests": 64}},
    )
    serve.run(build_openai_app({{"llm_configs": [config]}}))
    stop = lambda *_: (serve.shutdown(), sys.exit(0))  # engines stop with their replicas
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(60)
"""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **SERVE_MODES[mode]}
    proc = subprocess.Popen(
        [str(BIN / "python"), "-c", code],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


PLATFORM_RAY_PORT = 6395
# The platform's processes worth a profile, by what their command line holds.
PROFILED = {
    "ingress": "ServeReplica:darkgpu:ingress",
    "proxy": "ProxyActor",
    "model-replica": "ServeReplica:model-",
    "billing-meter": "ServeReplica:darkgpu:billing-meter",
}


def platform_processes() -> dict[str, psutil.Process]:
    """The bench platform's own processes in `PROFILED` (never another cluster's)."""
    from cluster.processes import cmdline, descendants, session_of, session_processes

    session = session_of(PLATFORM_RAY_PORT)
    if session is None:
        raise RuntimeError("the bench platform's Ray cluster is not running")
    raylets = [p for p in session_processes(session) if "raylet" in p.name()]
    found: dict[str, psutil.Process] = {}
    for child in (c for raylet in raylets for c in descendants(raylet.pid)):
        line = cmdline(child)
        for name, marker in PROFILED.items():
            if marker in line and name not in found:
                found[name] = child
    return found


def py_spy_profiler(out: Path) -> Callable[[], Callable[[], None]]:
    """Starts py-spy on each of the platform's `PROFILED` processes; the function it returns
    stops them and writes each process's CPU seconds over the run beside its samples."""

    def start() -> Callable[[], None]:
        out.mkdir(parents=True, exist_ok=True)
        procs = platform_processes()
        cpu = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
        spies = [
            subprocess.Popen(
                [
                    str(BIN / "py-spy"),
                    "record",
                    "--pid",
                    str(p.pid),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(out / f"{name}.txt"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for name, p in procs.items()
        ]

        def stop() -> None:
            spent = {name: sum(p.cpu_times()[:2]) - cpu[name] for name, p in procs.items()}
            for spy in spies:
                spy.send_signal(2)  # py-spy writes its samples on SIGINT
            for spy in spies:
                spy.wait(60)
            (out / "cpu_seconds.json").write_text(json.dumps(spent, indent=1))

        return stop

    return start


@contextmanager
def platform(data_dir: Path, port: int, mode: str = "default") -> Iterator[tuple[str, str]]:
    """The platform with billing on: a paid account with credits, and its key."""
    env = {
        **os.environ,
        # the platform sets Serve's mode in its processes itself, from its settings
        "DARKGPU_SERVE_THROUGHPUT_OPTIMIZED": "true" if mode == "throughput" else "false",
        "DARKGPU_DATA_DIR": str(data_dir),
        "DARKGPU_HTTP_PORT": str(port),
        "DARKGPU_RAY_PORT": str(PLATFORM_RAY_PORT),
        "DARKGPU_METRICS_PORT": "8095",
        "DARKGPU_DASHBOARD_PORT": "8285",
        "DARKGPU_REDIS_URL": "redis://127.0.0.1:6396/0",
    }
    darkgpu = [str(BIN / "darkgpu")]

    def admin(*args: str) -> dict:
        done = subprocess.run(
            [*darkgpu, "admin", *args], env=env, check=True, capture_output=True, text=True
        )
        return json.loads(done.stdout)

    subprocess.run([*darkgpu, "up"], env=env, check=True, capture_output=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        account = admin("account", "create", "--email", "bench@example.com", "--plan", "paid")
        admin("credits", "grant", "--account", str(account["id"]), "--usd", "100")
        admin("account", "update", "--account", str(account["id"]), "--rpm", "100000")
        key = admin("key", "create", "--account", str(account["id"]))["key"]
        yield f"http://127.0.0.1:{port}", key
    finally:
        subprocess.run([str(BIN / "darkgpu"), "down"], env=env, capture_output=True)


def table(results: list[Result]) -> str:
    ms = 1000
    header = (
        "| served by | c | latency p50 ms | latency p99 ms | TTFT p50 ms | TTFT p99 ms | req/s |"
    )
    rows = [header, "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.server} | {r.concurrency} | {r.latency_p50 * ms:.1f} | "
                    f"{r.latency_p99 * ms:.1f} | {r.ttft_p50 * ms:.1f} | {r.ttft_p99 * ms:.1f} | "
                    f"{r.rps:.1f} |")  # fmt: skip
    return "\n".join(rows)


def ratios(results: list[Result], modes: list[str]) -> str:
    by = {(r.server, r.concurrency): r for r in results}
    fields: dict[str, Callable[[Result], float]] = {
        "latency p50": lambda r: r.latency_p50, "latency p99": lambda r: r.latency_p99,
        "TTFT p50": lambda r: r.ttft_p50, "TTFT p99": lambda r: r.ttft_p99,
        "req/s": lambda r: r.rps,
    }  # fmt: skip
    rows = ["| ratio | c | " + " | ".join(fields) + " |", "|---|---|" + "---|" * len(fields)]
    for mode in modes:
        for other in ("vllm", labelled("serve-llm", mode)):
            for c in (1, 16):
                mine, theirs = by[(labelled("platform", mode), c)], by[(other, c)]
                cells = " | ".join(f"{get(mine) / get(theirs):.2f}" for get in fields.values())
                rows.append(f"| {labelled('platform', mode)} ÷ {other} | {c} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="per measurement at c=1")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--servers",
        default="vllm,serve-llm,platform",
        help="which of vllm, serve-llm, platform to measure",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy the platform's processes during its c=16 run, into DIR",
    )
    parser.add_argument(
        "--serve-modes",
        default="default",
        help=f"the Serve-based servers once per mode, of: {', '.join(SERVE_MODES)}",
    )
    args = parser.parse_args()
    servers = set(args.servers.split(","))
    modes = args.serve_modes.split(",")
    if not set(modes) <= set(SERVE_MODES):
        sys.exit(f"--serve-modes: choose among {', '.join(SERVE_MODES)}")

    from cluster.local_model import ensure_local_model

    with tempfile.TemporaryDirectory(prefix="darkgpu-bench-") as tmp:
        data_dir = Path(tmp)
        model_dir = ensure_local_model(data_dir / "models")
        results: list[Result] = []
        if "vllm" in servers:
            print("vLLM alone ...", flush=True)
            with vllm_alone(model_dir, 8101) as base:
                results += measure("vllm", base, args.requests, args.max_tokens)
        for mode in modes:
            if "serve-llm" in servers:
                name = labelled("serve-llm", mode)
                print(f"bare Ray Serve LLM ({mode}) ...", flush=True)
                with bare_serve_llm(model_dir, 8102, mode) as base:
                    results += measure(name, base, args.requests, args.max_tokens)
            if "platform" in servers:
                name = labelled("platform", mode)
                print(f"this platform ({mode}) ...", flush=True)
                profile = py_spy_profiler(args.profile / mode) if args.profile else None
                with platform(data_dir / mode, 8103, mode) as (base, key):
                    results += measure(
                        name, base, args.requests, args.max_tokens, key, profile=profile
                    )
    print(f"\n{args.max_tokens} output tokens per request, {os.cpu_count()} cores\n")
    print(table(results))
    if {"vllm", "serve-llm", "platform"} <= servers:
        print()
        print(ratios(results, modes))


if __name__ == "__main__":
    main()
