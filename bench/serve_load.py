"""Bench: the server under load - 16 concurrent clients, 200 chat requests over loopback HTTP.

Runs the same load twice in one process: with batching (serve.max_batch_size=8) and without (=1).
Prints requests/s, tokens/s, p50/p95 latency and errors for each.
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py [--model NAME] [--clients 16] [--requests 200]
Default model: a ~20M GPT-NeoX from config (random weights, so answers run to max_tokens); --model takes
anything tunesmith can load (e.g. smollm2-135m-instruct).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: tests/, bench/

from bench.generate import QUESTIONS, load  # noqa: E402

from tunesmith.config import Config, GenerateConfig, ServeConfig  # noqa: E402
from tunesmith.data.formats import get_template  # noqa: E402
from tunesmith.serve.app import create_app  # noqa: E402
from tunesmith.serve.scheduler import LoadedModel  # noqa: E402


@contextlib.contextmanager
def running_server(app):
    """uvicorn serving `app` in a thread on 127.0.0.1 and a free port -> base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


async def load_test(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` workers send `requests` in all; -> figures."""
    latencies, tokens, errors = [], 0, 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for i in counter:
            q = QUESTIONS[i % len(QUESTIONS)] + f" (#{i})"
            body = {"model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError as e:
                errors += 1
                print(f"  error: {e}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
    wall = time.perf_counter() - t0
    lat = sorted(latencies) or [float("nan")]
    return {
        "wall_s": wall,
        "req_s": len(latencies) / wall,
        "tok_s": tokens / wall,
        "tokens": tokens,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="serve.max_batch_size of the batched run")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, label = load(args.model, device)
    lm = LoadedModel("m", model, tok, get_template("chat" if tok.chat_template else "qa", "qa"))
    print(
        f"model: {label} on {device}; {args.clients} clients, {args.requests} requests, "
        f"max_tokens={args.max_tokens}"
    )
    rows = []
    for batch in (args.batch, 1):
        cfg = Config(
            generate=GenerateConfig(max_new_tokens=args.max_tokens),
            serve=ServeConfig(max_batch_size=batch, max_wait_ms=10 if batch > 1 else 0),
        )
        app = create_app(cfg, {"m": lm})
        with running_server(app) as url:
            r = asyncio.run(load_test(url, args.clients, args.requests, args.max_tokens))
        r["batches"] = app.state.scheduler.batches
        rows.append((f"max_batch_size={batch}", r))
    print(
        f"{'':18s} {'req/s':>7s} {'tokens/s':>9s} {'p50 s':>7s} {'p95 s':>7s} {'errors':>6s} "
        f"{'batches':>7s} {'wall s':>7s}"
    )
    for name, r in rows:
        print(
            f"{name:18s} {r['req_s']:7.2f} {r['tok_s']:9.1f} {r['p50_s']:7.2f} {r['p95_s']:7.2f} "
            f"{r['errors']:6d} {r['batches']:7d} {r['wall_s']:7.1f}"
        )
    print(f"batching speed-up (tokens/s): {rows[0][1]['tok_s'] / rows[1][1]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
