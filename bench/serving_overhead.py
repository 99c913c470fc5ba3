"""What the platform costs on top of the engine: the same small model served three ways.

1. vLLM alone (its OpenAI server),
2. a bare Ray Serve LLM app (`build_openai_app`, stream batching off as ours),
3. this platform (`darkgpu up`: ingress with key check, admission and settlement in Redis,
   the hop over HTTP to the supply pool's gateway, provider router, LLMServer deployment;
   the billing actor draining into SQLite),

each measured at concurrency 1 and 16 with the same client, one after the other in one run:
p50/p99 latency of short completions, p50/p99 time to first token when streaming, and
requests/s. Prints a table, then the ratios of the platform to the other two.

    .venv/bin/python bench/serving_overhead.py [--requests 48] [--max-tokens 8]
        [--servers vllm,serve-llm,platform] [--serve-modes default,throughput] [--profile DIR]
        [--long-prompt-tokens 8192]

`--serve-modes`: the Serve-based servers (bare Serve LLM and the platform) run once per mode:
`default`, and `throughput` with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in every Ray process's
environment (Ray 2.56+: user code on the replica's own event loop, gRPC between deployments,
direct ingress, request logs buffered, GC frozen after start-up); and `haproxy`, that with
`RAY_SERVE_ENABLE_HA_PROXY=1` (HAProxy in place of Serve's Python proxy, handing each request
to the ingress replica's own HTTP server); and `direct-streaming`, that with Serve LLM's
`RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1` (Ray 2.60: the LLMServer replica is itself the HTTP
ingress, HAProxy asking an `LLMRouter` deployment which replica takes each request: no
OpenAiIngress hop). The last two for bare Serve LLM only (`NOT_FOR_THE_PLATFORM` says why).
Rows are per mode; the ratios set each platform row against vLLM and every bare Serve LLM row
(`platform+throughput ÷ serve-llm+throughput`, `platform ÷ serve-llm+haproxy`, …).

`--servers platform` measures the platform alone. Each server stops only its own processes:
the bare Serve LLM app's Ray cluster is its driver's descendants (never `ray stop`, which
would end every Ray cluster on the machine), the platform's is ended by `darkgpu down`.
`--profile DIR` samples with py-spy, during each c=16 non-streaming run,
the platform's processes (the ingress replica, the pool's gateway, the model replica's Serve
wrapper and the billing meter, found among this cluster's raylet's children; the platform runs
no Serve proxy: `serve_app.replica_http`) into `DIR/<mode>/`, and the bare Serve LLM app's (its
HTTP proxy, its OpenAI ingress replica and its model replica, found among its driver's
descendants) into `DIR/<mode>/serve-llm/`. For each process
it writes its samples (`<name>.txt`, py-spy's raw format: one stack and its count a line),
their top 25 frames by self and by inclusive share of the samples (`<name>.top.txt`), and
every process's CPU seconds over the run (`cpu_seconds.json`).

`--long-prompt-tokens N` (0, the default: off) adds a second table: each server again, at
c=1, with the short prompt and with a prompt of about N tokens (counted with the model's
tokenizer and chat template; the server's own count, its usage's `prompt_tokens`, is printed):
latency p50, TTFT p50 and, for the platform, its ingress replica's CPU milliseconds per
request (user + system, from /proc through psutil, over the non-streaming requests; also net
of what the replica spends idle over as long), and the long prompt's ratios to the short.
Each request's prompt starts with its own number, so no engine's prefix cache answers it.
With it, every server serves `tiny-llama-16k` (`cluster/local_model.py`: the same model with
16,384 tokens of context; the platform through a catalog naming it, `DARKGPU_MODELS_FILE`),
for the first table's rows too.
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
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

MODEL = "darkgpu-tiny"
BIN = Path(sys.executable).parent
PROMPT = [{"role": "user", "content": "Tell me a story about a small robot."}]
LONG_MODEL = "tiny-llama-16k"  # cluster/local_model.py: the long-context local model
Messages = list[dict[str, str]]


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


async def _one(
    client: httpx.AsyncClient, url: str, max_tokens: int, stream: bool, messages: Messages
) -> float:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True}  # fmt: skip
    started = time.perf_counter()
    if not stream:
        response = await client.post(url, json=body)
        response.raise_for_status()
        # the usage billed is the ingress's count of the text it delivered (re-tokenized:
        # the tiny model's gibberish may count fewer), never more than was generated
        usage = response.json()["usage"]
        assert 0 < usage["completion_tokens"] <= max_tokens, response.text
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


async def _run(
    url: str,
    n: int,
    concurrency: int,
    max_tokens: int,
    stream: bool,
    key: str,
    prompt: Callable[[int], Messages] = lambda i: PROMPT,
):
    """`n` requests, `concurrency` at a time; the i-th asks `prompt(i)`."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    samples: list[float] = []
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                samples.append(await _one(client, url, max_tokens, stream, prompt(i)))

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


@dataclass
class PromptResult:
    server: str
    prompt: str
    prompt_tokens: int  # the server's count (its usage's prompt_tokens)
    latency_p50: float
    ttft_p50: float
    ingress_cpu: float | None = None  # seconds per request
    ingress_cpu_net: float | None = None  # less what the replica spends idle over as long


_serial = iter(range(1 << 62))
IDLE_S = 5


def numbered(messages: Messages) -> Callable[[int], Messages]:
    """The prompt with a number of its own in front, new each request: no prefix cache hits."""
    content = messages[0]["content"]
    return lambda _: [{"role": "user", "content": f"{next(_serial)}: {content}"}]


def cpu_seconds(proc: psutil.Process) -> float:
    return float(sum(proc.cpu_times()[:2]))


def measure_prompts(
    server: str,
    base: str,
    prompts: dict[str, Messages],
    n: int,
    max_tokens: int,
    key: str = "none",
    ingress: Callable[[], psutil.Process] | None = None,
) -> list[PromptResult]:
    """Each prompt at c=1: `n` requests, then `n` streamed; the CPU time of the process
    `ingress` returns, if any, over the first `n`, and over as long idle just before."""
    url = f"{base}/v1/chat/completions"
    results = []
    for label, messages in prompts.items():
        body = {"model": MODEL, "messages": numbered(messages)(0), "max_tokens": max_tokens}
        headers = {"authorization": f"Bearer {key}"}
        answer = httpx.post(url, json=body, headers=headers, timeout=120)
        answer.raise_for_status()
        tokens = answer.json()["usage"]["prompt_tokens"]
        asyncio.run(_run(url, 4, 1, max_tokens, False, key, numbered(messages)))  # warm up
        proc = ingress() if ingress is not None else None
        if proc is not None:
            before = cpu_seconds(proc)
            time.sleep(IDLE_S)
            idle_rate = (cpu_seconds(proc) - before) / IDLE_S
            before = cpu_seconds(proc)
        started = time.perf_counter()
        latencies, _ = asyncio.run(_run(url, n, 1, max_tokens, False, key, numbered(messages)))
        result = PromptResult(server, label, tokens, pct(latencies, 0.5), 0.0)
        if proc is not None:
            spent = cpu_seconds(proc) - before
            result.ingress_cpu = spent / n
            result.ingress_cpu_net = (spent - idle_rate * (time.perf_counter() - started)) / n
        ttfts, _ = asyncio.run(_run(url, n, 1, max_tokens, True, key, numbered(messages)))
        result.ttft_p50 = pct(ttfts, 0.5)
        results.append(result)
        print(f"  {server} {label} prompt: done", flush=True)
    return results


def long_prompt(model_dir: Path, tokens: int) -> tuple[Messages, int]:
    """A user message that the model's tokenizer counts, in its chat template and with a
    request's number in front, as about `tokens` tokens; and that count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = (PROMPT[0]["content"] + " The quick brown fox jumps over the lazy dog.").split()

    def message(n: int) -> Messages:
        return [{"role": "user", "content": " ".join(words[i % len(words)] for i in range(n))}]

    def count(n: int) -> int:
        chat = [{"role": "user", "content": "1000: " + message(n)[0]["content"]}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    low, high = 1, tokens  # every word is a token at least
    while low < high:  # the most words within `tokens`
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) <= tokens else (low, mid - 1)
    return message(low), count(low)


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
def vllm_alone(model_dir: Path, port: int, context: int = 256) -> Iterator[str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(model_dir), "--served-model-name", MODEL, "--port", str(port),
         "--max-model-len", str(context), "--enforce-eager", "--dtype", "bfloat16"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
SERVE_MODES: dict[str, dict[str, str]] = {
    "default": {},
    "throughput": THROUGHPUT,
    "haproxy": HAPROXY,
    "direct-streaming": {**HAPROXY, "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"},
}


# Why the platform is not measured in a mode: what Ray 2.60 refuses or loses there.
NOT_FOR_THE_PLATFORM = {
    "haproxy": "since it runs no Serve proxy for HAProxy to replace (its ingress and its pools' "
    "gateways answer HTTP themselves: serve_app.replica_http), and under HAProxy Serve refuses "
    "a custom request router on an application's ingress deployment, routed by HTTP or not "
    "(each model's application is its LLMServer deployment, routed by serve_app.router)",
    "direct-streaming": "for the reasons of haproxy",
}


def labelled(server: str, mode: str) -> str:
    return server if mode == "default" else f"{server}+{mode}"


@contextmanager
def bare_serve_llm(
    model_dir: Path, port: int, mode: str = "default", context: int = 256
) -> Iterator[tuple[str, int]]:
    """The app's base URL, and its driver's pid (its Ray cluster's processes descend from it)."""
    code = f"""
import signal, sys, time, ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
if __name__ == "__main__":
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
    config = LLMConfig(
        model_loading_config={{"model_id": "{MODEL}", "model_source": "{model_dir}"}},
        engine_kwargs={{"max_model_len": {context}, "enforce_eager": True, "dtype": "bfloat16"}},
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
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        from cluster.processes import descendants, end

        own = [p.pid for p in descendants(proc.pid)]  # its Ray cluster, and no other
        proc.terminate()
        proc.wait(60)
        end(own)  # what the driver's shutdown left


PLATFORM_RAY_PORT = 6395
PLATFORM_POOL_RAY_PORT = 6397  # the supply pool's cluster (the gateway, the model replicas)
# The platform's processes worth a profile, by what their command line holds.
PROFILED = {
    "ingress": "ServeReplica:darkgpu:ingress",
    "pool-gateway": "ServeReplica:pool:pool-gateway",
    "model-replica": "ServeReplica:model-",
    "billing-meter": "ServeReplica:darkgpu:billing-meter",
}
# The bare Serve LLM app's (`build_openai_app`, in Serve's `default` application).
SERVE_LLM_PROFILED = {
    "proxy": "ProxyActor",
    "ingress": "ServeReplica:default:OpenAiIngress",
    "model-replica": "ServeReplica:default:LLMServer",
}


def marked(procs: Iterable[psutil.Process], markers: dict[str, str]) -> dict[str, psutil.Process]:
    """The first of `procs` whose command line holds each marker, by the marker's name."""
    from cluster.processes import cmdline

    found: dict[str, psutil.Process] = {}
    for proc in procs:
        line = cmdline(proc)
        for name, marker in markers.items():
            if marker in line and name not in found:
                found[name] = proc
    return found


def platform_processes() -> dict[str, psutil.Process]:
    """The bench platform's own processes in `PROFILED`, in its two clusters (never another
    cluster's)."""
    from cluster.processes import descendants, session_of, session_processes

    sessions = [session_of(port) for port in (PLATFORM_RAY_PORT, PLATFORM_POOL_RAY_PORT)]
    if None in sessions:
        raise RuntimeError("the bench platform's Ray clusters are not running")
    raylets = [p for s in sessions if s for p in session_processes(s) if "raylet" in p.name()]
    return marked((c for raylet in raylets for c in descendants(raylet.pid)), PROFILED)


def serve_llm_processes(driver: int) -> dict[str, psutil.Process]:
    """The bare Serve LLM app's processes in `SERVE_LLM_PROFILED`: its driver's descendants."""
    from cluster.processes import descendants

    return marked(descendants(driver), SERVE_LLM_PROFILED)


def top_frames(raw: Path, n: int = 25) -> str:
    """py-spy's raw samples (`frame;frame;… count` a line, the root first) summed per frame
    (function and file; its lines together): the top `n` by self and by inclusive share."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame
                  for frame in stack.split(";")]  # fmt: skip
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    total = sum(own.values()) or 1
    lines = [f"{raw.name}: {sum(own.values())} samples of all its threads (py-spy leaves out "
             "those it sees idle; one waiting in native code counts as active)"]  # fmt: skip
    for title, counts in (("self", own), ("inclusive", inclusive)):
        lines += ["", f"top {n} frames by {title} share of the samples:"]
        lines += [f"{100 * c / total:6.1f}%  {frame}" for frame, c in counts.most_common(n)]
    return "\n".join(lines) + "\n"


def py_spy_profiler(
    out: Path, find: Callable[[], dict[str, psutil.Process]] = platform_processes
) -> Callable[[], Callable[[], None]]:
    """Starts py-spy on each of the processes `find` returns; the function it returns stops
    them and writes each process's top frames and CPU seconds over the run beside its samples."""

    def start() -> Callable[[], None]:
        out.mkdir(parents=True, exist_ok=True)
        procs = find()
        print(f"  profiling {', '.join(f'{n} ({p.pid})' for n, p in procs.items())}", flush=True)
        cpu = {name: cpu_seconds(p) for name, p in procs.items()}
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
            spent = {name: cpu_seconds(p) - cpu[name] for name, p in procs.items()}
            for spy in spies:
                spy.send_signal(2)  # py-spy writes its samples on SIGINT
            for spy in spies:
                spy.wait(60)
            (out / "cpu_seconds.json").write_text(json.dumps(spent, indent=1))
            for name in procs:
                if (out / f"{name}.txt").exists():
                    (out / f"{name}.top.txt").write_text(top_frames(out / f"{name}.txt"))

        return stop

    return start


@contextmanager
def platform(
    data_dir: Path, port: int, mode: str = "default", models_file: Path | None = None
) -> Iterator[tuple[str, str]]:
    """The platform with billing on: a paid account with credits, and its key; its catalog
    `models_file`, else the repository's."""
    env = {
        **os.environ,
        # the platform sets Serve's mode in its processes itself, from its settings
        "DARKGPU_SERVE_THROUGHPUT_OPTIMIZED": "true" if mode == "throughput" else "false",
        "DARKGPU_DATA_DIR": str(data_dir),
        "DARKGPU_HTTP_PORT": str(port),
        "DARKGPU_RAY_PORT": str(PLATFORM_RAY_PORT),
        "DARKGPU_METRICS_PORT": "8095",
        "DARKGPU_DASHBOARD_PORT": "8285",
        "DARKGPU_POOL_RAY_PORT": str(PLATFORM_POOL_RAY_PORT),
        "DARKGPU_POOL_HTTP_PORT": str(port + 1),
        "DARKGPU_POOL_METRICS_PORT": "8096",
        "DARKGPU_POOL_DASHBOARD_PORT": "8286",
        # the verified pool (empty here: the platform row is served by the basic pool)
        "DARKGPU_VERIFIED_POOL__RAY_PORT": str(PLATFORM_POOL_RAY_PORT + 1),
        "DARKGPU_VERIFIED_POOL__HTTP_PORT": str(port + 2),
        "DARKGPU_VERIFIED_POOL__METRICS_PORT": "8097",
        "DARKGPU_VERIFIED_POOL__DASHBOARD_PORT": "8287",
        "DARKGPU_REDIS_URL": "redis://127.0.0.1:6396/0",
        **({"DARKGPU_MODELS_FILE": str(models_file)} if models_file else {}),
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


def long_context_catalog(path: Path, context: int) -> Path:
    """The repository's catalog with its local model served as `LONG_MODEL`, at `context`."""
    from core.settings import CONFIGS_DIR

    models = tomllib.loads((CONFIGS_DIR / "models.toml").read_text())["models"]
    for model in models:
        if model["id"] == MODEL:
            model.update(source=f"local:{LONG_MODEL}", context_length=context)
    entries = ("".join(f"{k} = {json.dumps(v)}\n" for k, v in m.items()) for m in models)
    path.write_text("".join(f"[[models]]\n{entry}\n" for entry in entries))
    return path


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
    served = {r.server for r in results}
    platforms = [labelled("platform", m) for m in modes if labelled("platform", m) in served]
    others = ["vllm", *(labelled("serve-llm", m) for m in modes)]
    for mine_name in platforms:
        for other in (o for o in others if o in served):
            for c in (1, 16):
                mine, theirs = by[(mine_name, c)], by[(other, c)]
                cells = " | ".join(f"{get(mine) / get(theirs):.2f}" for get in fields.values())
                rows.append(f"| {mine_name} ÷ {other} | {c} | {cells} |")
    return "\n".join(rows)


def prompt_table(results: list[PromptResult]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    def ratio(long: float | None, short: float | None) -> str:
        return "-" if long is None or not short else f"{long / short:.2f}×"

    rows = [
        "| served by | prompt | prompt tokens | latency p50 ms | TTFT p50 ms "
        "| ingress CPU ms/req | ingress CPU ms/req, net of idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r.server, r.prompt, str(r.prompt_tokens), ms(r.latency_p50), ms(r.ttft_p50),
                 ms(r.ingress_cpu), ms(r.ingress_cpu_net)]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
        if r.prompt == "long":
            s = next(x for x in results if x.server == r.server and x.prompt == "short")
            cells = [r.server, "long ÷ short", ratio(r.prompt_tokens, s.prompt_tokens),
                     ratio(r.latency_p50, s.latency_p50), ratio(r.ttft_p50, s.ttft_p50),
                     ratio(r.ingress_cpu, s.ingress_cpu),
                     ratio(r.ingress_cpu_net, s.ingress_cpu_net)]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
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
        "--long-prompt-tokens",
        type=int,
        default=0,
        metavar="N",
        help="also measure a prompt of about N tokens beside the short one (0: no)",
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

    from cluster.local_model import CONTEXTS, ensure_local_model

    long_tokens = args.long_prompt_tokens
    local_model = LONG_MODEL if long_tokens else "tiny-llama"
    context = CONTEXTS[local_model]
    if long_tokens + args.max_tokens + 16 > context:
        sys.exit(f"--long-prompt-tokens: at most {context - args.max_tokens - 16}")

    with tempfile.TemporaryDirectory(prefix="darkgpu-bench-") as tmp:
        data_dir = Path(tmp)
        model_dir = ensure_local_model(data_dir / "models", local_model)
        prompts: dict[str, Messages] = {}
        models_file = None
        if long_tokens:
            messages, counted = long_prompt(model_dir, long_tokens)
            prompts = {"short": PROMPT, "long": messages}
            models_file = long_context_catalog(data_dir / "models.toml", context)
        results: list[Result] = []
        by_prompt: list[PromptResult] = []
        n, max_tokens = args.requests, args.max_tokens
        if "vllm" in servers:
            print("vLLM alone ...", flush=True)
            with vllm_alone(model_dir, 8101, context) as base:
                results += measure("vllm", base, n, max_tokens)
                if prompts:
                    by_prompt += measure_prompts("vllm", base, prompts, n, max_tokens)
        for mode in modes:
            if "serve-llm" in servers:
                name = labelled("serve-llm", mode)
                print(f"bare Ray Serve LLM ({mode}) ...", flush=True)
                with bare_serve_llm(model_dir, 8102, mode, context) as (base, driver):
                    profile = (
                        py_spy_profiler(
                            args.profile / mode / "serve-llm", lambda: serve_llm_processes(driver)
                        )
                        if args.profile
                        else None
                    )
                    results += measure(name, base, n, max_tokens, profile=profile)
                    if prompts:
                        by_prompt += measure_prompts(name, base, prompts, n, max_tokens)
            if "platform" in servers and mode in NOT_FOR_THE_PLATFORM:
                print(f"this platform ({mode}): not run, {NOT_FOR_THE_PLATFORM[mode]}", flush=True)
            elif "platform" in servers:
                name = labelled("platform", mode)
                print(f"this platform ({mode}) ...", flush=True)
                profile = py_spy_profiler(args.profile / mode) if args.profile else None
                with platform(data_dir / mode, 8103, mode, models_file) as (base, key):
                    results += measure(name, base, n, max_tokens, key, profile=profile)
                    if prompts:
                        by_prompt += measure_prompts(
                            name, base, prompts, n, max_tokens, key,
                            ingress=lambda: platform_processes()["ingress"],
                        )  # fmt: skip
    print(f"\n{args.max_tokens} output tokens per request, {os.cpu_count()} cores\n")
    print(table(results))
    if "platform" in servers and servers & {"vllm", "serve-llm"}:
        print()
        print(ratios(results, modes))
    if by_prompt:
        print(f"\nc=1, {n} requests per prompt (and {n} streamed); {local_model} served; the long "
              f"prompt: {counted} tokens by the model's tokenizer\n")  # fmt: skip
        print(prompt_table(by_prompt))


if __name__ == "__main__":
    main()
