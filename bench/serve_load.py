"""Load test of ``tuneloop serve`` on 127.0.0.1: latency, throughput, and overload behaviour.

Starts the real server (same app, same uvicorn) in this process on a free loopback port, with a base model
and adapters given as ``NAME=RUN_DIR``, then runs two bounded phases:

0. **sequential**: ``--sequential`` requests one at a time: the latency of a request that never waits.
1. **steady**: ``--requests`` chat requests spread round-robin over every adapter and the base, at most
   ``--concurrency`` in flight; the queue is sized so nothing is refused. Reports p50/p90/p99 latency,
   requests/s and generated tokens/s, the status codes, and the mean batch size the engine formed.
2. **overload**: ``4 x (max_batch_size + max_queue)`` requests at once against a server whose queue is
   ``--max-queue``. Reports how many got 429 (with Retry-After), how many 200, any other status, and
   whether ``/health`` still answers 200 with nothing left in flight afterwards.

Only loopback is ever contacted. One JSON object per run goes to ``--out`` (JSON lines), with the machine.

    python bench/serve_load.py --base smollm2-135m-instruct --adapter a=runs/a --adapter b=runs/b \\
        --out bench/results/serve-load-cpu.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tuneloop.serve.config import ServeConfig
from tuneloop.serve.server import BackgroundServer

PROMPTS = [
    "I was charged twice for my subscription this month",
    "the export button crashes the app every time",
    "how do I invite my teammates and give them admin rights",
    "our SSO login through Okta stopped working this morning",
    "the Slack integration posts every notification twice",
    "we need a signed DPA and a security review before renewal",
]


def machine() -> dict[str, object]:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def steady(
    url: str, models: list[str], requests: int, concurrency: int, max_tokens: int
) -> dict[str, object]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    tokens = 0

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
        }
        async with gate:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
        codes[response.status_code] = codes.get(response.status_code, 0) + 1
        if response.status_code == 200:
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*[one(i, client) for i in range(requests)])
        seconds = time.perf_counter() - started
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "models": models,
        "status": codes,
        "seconds": round(seconds, 2),
        "requests_per_s": round(requests / seconds, 2),
        "completion_tokens_per_s": round(tokens / seconds, 1),
        "latency_s": {
            k: round(percentile(latencies, q), 3) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))
        }
        | {"mean": round(statistics.mean(latencies), 3)},
    }


async def overload(url: str, model: str, n: int, max_tokens: int) -> dict[str, object]:
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=n + 4)
    ) as client:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": max_tokens,
        }
        responses = await asyncio.gather(*[client.post("/v1/chat/completions", json=body) for _ in range(n)])
        await asyncio.sleep(0.2)
        health = await client.get("/health")
    codes: dict[int, int] = {}
    for r in responses:
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
    retry_after = sorted({r.headers.get("retry-after") for r in responses if r.status_code == 429} - {None})
    return {
        "sent_at_once": n,
        "status": codes,
        "retry_after_values": retry_after,
        "health_status": health.status_code,
        "health": health.json(),
        "no_5xx": all(r.status_code < 500 for r in responses),
    }


def batch_stats(metrics_text: str) -> dict[str, float]:
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics_text.splitlines()
        if line and not line.startswith("#")
    }
    count = values.get("tuneloop_batch_size_count", 0.0)
    return {
        "batches": count,
        "mean_batch_size": round(values.get("tuneloop_batch_size_sum", 0.0) / count, 2) if count else 0.0,
        "mixed_adapter_batches": values.get("tuneloop_mixed_batches_total", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--sequential", type=int, default=12, help="One-at-a-time requests: latency without a queue."
    )
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--budget-s", type=float, default=300, help="Refuse to start a phase once this much time is spent."
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    adapters = {name: Path(path) for name, _, path in (a.partition("=") for a in args.adapter)}
    base = ServeConfig(
        base=args.base,
        base_name="base",
        adapters=adapters,
        port=0,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        max_queue=max(args.requests, args.max_queue),
    )
    models = ["base", *adapters]
    result: dict[str, object] = {
        "bench": "serve_load",
        "base": args.base,
        "adapters": sorted(adapters),
        "note": args.note,
        "machine": machine(),
    }
    started = time.perf_counter()
    with BackgroundServer(base) as server:
        asyncio.run(
            steady(server.url, models, len(models) * 2, len(models), args.max_tokens)
        )  # warm-up, not reported
        result["sequential"] = asyncio.run(steady(server.url, models, args.sequential, 1, args.max_tokens))
        before = batch_stats(httpx.get(f"{server.url}/metrics").text)
        result["steady"] = asyncio.run(
            steady(server.url, models, args.requests, args.concurrency, args.max_tokens)
        )
        after = batch_stats(httpx.get(f"{server.url}/metrics").text)
        result["steady"]["batches"] = {
            k: round(after[k] - before[k], 2) for k in ("batches", "mixed_adapter_batches")
        }
        count = after["batches"] - before["batches"]
        result["steady"]["batches"]["mean_batch_size"] = (
            round(
                (after["mean_batch_size"] * after["batches"] - before["mean_batch_size"] * before["batches"])
                / count,
                2,
            )
            if count
            else 0
        )
        result["server"] = {"max_batch_size": args.max_batch_size, "device": server.server.engine.setup.name}
    if time.perf_counter() - started < args.budget_s:
        limited = base.model_copy(update={"max_queue": args.max_queue})
        with BackgroundServer(limited) as server:
            limit = args.max_batch_size + args.max_queue
            result["overload"] = {
                "queue_limit": limit,
                **asyncio.run(overload(server.url, models[-1], 4 * limit, args.max_tokens)),
            }
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
