"""The source document's naive client, run against the simulator directly (no daemon).

It does what the seed's sample code does for a batch of default-class jobs:

* each job draws its provider by the static weights (hunyuan 50%, nvidia1 20%,
  nvidia2 20%, zhipu 10%), whatever the providers' load;
* per-provider semaphores (zhipu 1, hunyuan 5, nvidia1 5, nvidia2 5) and at
  most 16 jobs in flight;
* up to 3 attempts per provider with exponential backoff from 2 s (times the
  time scale); a 429 waits and retries like any other error;
* when a provider gives up, fall back along the realtime order (zhipu,
  hunyuan, nvidia2, nvidia1); a job fails only when every provider failed.

It reports completed jobs, the upstream 429s the fakes answered, the makespan,
the physical lower bound (:func:`dispatcher.tools.bench.lower_bound_s`) and
efficiency, on the same simulator ``dispatcher bench --scenario burst`` uses.

    .venv/bin/python benchmarks/seed_baseline.py --jobs 400 --time-scale 0.1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import anyio
import msgspec

from dispatcher.testing.simulator import SEED_BEHAVIOURS, Simulator
from dispatcher.tools.bench import lower_bound_s

WEIGHTS = {"hunyuan": 50.0, "nvidia1": 20.0, "nvidia2": 20.0, "zhipu": 10.0}
SEMAPHORES = {"zhipu": 1, "hunyuan": 5, "nvidia1": 5, "nvidia2": 5}
FALLBACK = ["zhipu", "hunyuan", "nvidia2", "nvidia1"]
IN_FLIGHT = 16
ATTEMPTS = 3
BACKOFF_BASE_S = 2.0
JITTER = 0.05  # the same jitter the daemon's --simulate gives the fakes


class Baseline(msgspec.Struct, kw_only=True):
    jobs: int
    completed: int
    failed: int
    upstream_429: int
    other_errors: int
    makespan_s: float
    lower_bound_s: float
    efficiency: float
    first_choice: dict[str, int]
    answered_by: dict[str, int]
    hit_wall_cap: bool


async def run(jobs: int, time_scale: float, seed: int, max_wall_s: float) -> Baseline:
    rng = random.Random(seed)
    behaviours = {
        name: msgspec.structs.replace(SEED_BEHAVIOURS[name], jitter=JITTER) for name in WEIGHTS
    }
    async with Simulator(time_scale=time_scale, behaviours=behaviours) as sim:
        limits = {name: anyio.Semaphore(n) for name, n in SEMAPHORES.items()}
        in_flight = anyio.Semaphore(IN_FLIGHT)
        first_choice: Counter[str] = Counter()
        answered_by: Counter[str] = Counter()
        other_errors = 0
        failed = 0
        last_answer = 0.0

        async def attempt(session: aiohttp.ClientSession, name: str, text: str) -> bool:
            nonlocal other_errors
            body: dict[str, Any] = {
                "model": sim.providers[name].behaviour.model,
                "messages": [{"role": "user", "content": text}],
            }
            async with limits[name], session.post(sim.urls[name], json=body) as response:
                await response.read()
                if response.status == 200:
                    return True
                if response.status != 429:
                    other_errors += 1
                return False

        async def job(session: aiohttp.ClientSession, i: int) -> None:
            nonlocal failed, last_answer
            primary = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            first_choice[primary] += 1
            chain = [primary] + [p for p in FALLBACK if p != primary]
            async with in_flight:
                for name in chain:
                    for k in range(ATTEMPTS):
                        if k:
                            await anyio.sleep(BACKOFF_BASE_S * 2 ** (k - 1) * time_scale)
                        if await attempt(session, name, f"burst job {i}"):
                            answered_by[name] += 1
                            last_answer = time.monotonic()
                            return
            failed += 1

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.monotonic()
            with anyio.move_on_after(max_wall_s) as cap:
                async with anyio.create_task_group() as tg:
                    for i in range(jobs):
                        tg.start_soon(job, session, i)
            ended = time.monotonic() if cap.cancelled_caught else last_answer
        providers = [
            (b.behaviour.concurrency, b.behaviour.latency_s, b.behaviour.rpm)
            for b in sim.providers.values()
        ]
        bound = lower_bound_s(providers, jobs)
        makespan = max(0.0, ended - started)
        return Baseline(
            jobs=jobs,
            completed=sum(answered_by.values()),
            failed=failed,
            upstream_429=sum(p.stats.rate_limited for p in sim.providers.values()),
            other_errors=other_errors,
            makespan_s=round(makespan, 4),
            lower_bound_s=round(bound, 4),
            efficiency=round(bound / makespan, 4) if makespan > 0 else 0.0,
            first_choice=dict(first_choice),
            answered_by=dict(answered_by),
            hit_wall_cap=cap.cancelled_caught,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-wall-s", type=float, default=150.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = anyio.run(
        run,
        args.jobs,
        args.time_scale,
        args.seed,
        args.max_wall_s,
        backend="asyncio",
        backend_options={"use_uvloop": True},
    )
    if args.json:
        sys.stdout.write(json.dumps(msgspec.to_builtins(result)) + "\n")
        return 0
    cut = " (cut at the wall cap)" if result.hit_wall_cap else ""
    print(
        f"seed baseline: {result.completed}/{result.jobs} completed{cut}, {result.failed} failed, "
        f"{result.upstream_429} upstream 429s, makespan {result.makespan_s:.3f} s, "
        f"lower bound {result.lower_bound_s:.3f} s, efficiency {result.efficiency:.3f}"
    )
    print(f"  drawn by the weights: {result.first_choice}")
    print(f"  answered by:          {result.answered_by}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
