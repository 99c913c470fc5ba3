"""Many long whole answers at once, against a running platform (`darkgpu up`): how many are
served, how many refused, and how long they took.

Each request asks for `--max-tokens` tokens with `ignore_eos` (so each answer is that long)
and is not streamed: the client sees nothing until the whole answer is written. With more
requests than a replica runs at once (`max_ongoing_requests`), the last ones wait for a slot
and then for their whole answer. Before the time a replica has to take a request became the
pool gateway's (`x-darkgpu-take-within`), the ingress's 3 s routing timeout covered the whole
answer: past 3 s each was cut and generated again, ten times, then refused.

    .venv/bin/python bench/long_answers.py --key dgpu-... [--api-url http://127.0.0.1:8000/v1]
        [--concurrency 64,128,256] [--max-tokens 240] [--model darkgpu-tiny]

The key's account needs credits and a rate limit above the concurrency
(`darkgpu admin account update --account N --rpm 100000`).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai


def one(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[float, str]:
    """How long the request took, and `served` or the refusal's code."""
    started = time.monotonic()
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=max_tokens,
            extra_body={"ignore_eos": True},
        )
        outcome = "served"
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        outcome = f"{exc.status_code} {body.get('code') or body.get('type') or ''}".strip()
    except openai.APIError as exc:
        outcome = type(exc).__name__
    return time.monotonic() - started, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="darkgpu-tiny")
    parser.add_argument("--concurrency", default="64,128,256")
    parser.add_argument("--max-tokens", type=int, default=240)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.api_url, api_key=args.key, max_retries=0, timeout=600)
    print(f"{args.max_tokens}-token whole answers of {args.model}\n")
    print("| concurrent | served | refused | wall s | p50 s | max s |")
    print("|---:|---:|---|---:|---:|---:|")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        started = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(lambda _: one(client, args.model, args.max_tokens),
                                 range(concurrency)))  # fmt: skip
        wall = time.monotonic() - started
        took = sorted(seconds for seconds, _ in done)
        outcomes = Counter(outcome for _, outcome in done)
        served = outcomes.pop("served", 0)
        refused = ", ".join(f"{n} {why}" for why, n in outcomes.items()) or "0"
        print(f"| {concurrency} | {served} | {refused} | {wall:.1f} | "
              f"{took[len(took) // 2]:.2f} | {took[-1]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
