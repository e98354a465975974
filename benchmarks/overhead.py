"""What the daemon adds to a job: latency and throughput against a zero-latency upstream.

    .venv/bin/python benchmarks/overhead.py [--requests 2000] [--concurrency 32]

One fake provider with no latency runs in its own process (as a real upstream
would). The baseline is the raw aiohttp client in this process posting to it
directly; the measured path is the same requests through a real
`dispatcher serve` subprocess and its Unix socket. Both run in the same
session, so the result is a ratio, not an absolute. `--same-process-upstream`
runs the fake in this process instead (then the raw baseline crosses no
process boundary at all, and the daemon path crosses four).
Targets (DESIGN.md): at most 0.2 ms added at the median and 1 ms at p99;
at least 70% of the raw client's request rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio

from dispatcher.client.connection import Client, answers_ping
from dispatcher.testing.simulator import Behaviour, FakeProvider

KEY = "overhead-bench-key-0000"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def raw_latencies(url: str, n: int) -> list[float]:
    out = []
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
            start = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()
            out.append(time.perf_counter() - start)
    return out


async def raw_rate(url: str, n: int, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {KEY}"}
    limiter = anyio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            async with limiter:
                body = {"model": "m", "messages": [{"role": "user", "content": f"r{i}"}]}
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return n / (time.perf_counter() - start)


async def daemon_latencies(sock: str, n: int) -> list[float]:
    out = []
    async with Client.connect(sock) as client:
        for i in range(n):
            request = {
                "op": "chat",
                "cache": False,
                "messages": [{"role": "user", "content": f"q{i}"}],
            }
            start = time.perf_counter()
            reply = await client.call(request)
            out.append(time.perf_counter() - start)
            assert reply.__class__.__name__ == "Result", reply
    return out


async def daemon_rate(sock: str, n: int, concurrency: int) -> float:
    limiter = anyio.Semaphore(concurrency)
    async with Client.connect(sock) as client:

        async def one(i: int) -> None:
            async with limiter:
                request = {
                    "op": "chat",
                    "cache": False,
                    "messages": [{"role": "user", "content": f"r{i}"}],
                }
                await client.call(request)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return n / (time.perf_counter() - start)


async def wait_for_daemon(sock: str, daemon: anyio.abc.Process) -> None:
    with anyio.fail_after(20):
        while not await answers_ping(sock):
            if daemon.returncode is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}")
            await anyio.sleep(0.05)


_FAKE = f"""
import anyio, sys
from dispatcher.testing.simulator import Behaviour, FakeProvider
async def main():
    async with FakeProvider(Behaviour(name="zero", model="m", api_key={KEY!r})) as fake:
        print(fake.url, flush=True)
        await anyio.sleep_forever()
anyio.run(main, backend_options={{"use_uvloop": True}})
"""


@asynccontextmanager
async def upstream(same_process: bool) -> AsyncIterator[str]:
    """The fake provider's URL, served here or by a child process."""
    if same_process:
        async with FakeProvider(Behaviour(name="zero", model="m", api_key=KEY)) as fake:
            yield fake.url
        return
    process = await anyio.open_process([sys.executable, "-c", _FAKE], stderr=None)
    try:
        assert process.stdout is not None
        with anyio.fail_after(20):
            url = (await process.stdout.receive()).decode().strip()
        yield url
    finally:
        process.terminate()
        await process.aclose()


async def main(requests: int, concurrency: int, same_process: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="dispatcher-overhead-") as tmp:
        async with upstream(same_process) as url:
            config = Path(tmp) / "config.toml"
            config.write_text(
                f"""
[daemon]
log_level = "warning"
[providers.zero]
url = "{url}"
model = "m"
api_key_env = "ZERO_KEY"
concurrency = {concurrency * 2}
latency_s = 0.001
[classes.default]
providers = ["zero"]
[journal]
enabled = false
"""
            )
            sock = str(Path(tmp) / "d.sock")
            env = {**os.environ, "ZERO_KEY": KEY}
            daemon = await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    "dispatcher",
                    "serve",
                    "--config",
                    str(config),
                    "--socket",
                    sock,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
            )
            try:
                await wait_for_daemon(sock, daemon)
                warm = max(50, requests // 10)
                await raw_latencies(url, warm)
                await daemon_latencies(sock, warm)
                raw = await raw_latencies(url, requests)
                via = await daemon_latencies(sock, requests)
                raw_rps = await raw_rate(url, requests, concurrency)
                via_rps = await daemon_rate(sock, requests, concurrency)
            finally:
                daemon.terminate()
                with anyio.fail_after(30):
                    await daemon.wait()
    med = (statistics.median(via) - statistics.median(raw)) * 1000
    p99 = (_percentile(via, 0.99) - _percentile(raw, 0.99)) * 1000
    ratio = via_rps / raw_rps
    print(f"{requests} sequential requests, zero-latency upstream")
    print(
        f"  raw aiohttp   median {statistics.median(raw) * 1000:.3f} ms  p99 {_percentile(raw, 0.99) * 1000:.3f} ms"
    )
    print(
        f"  via daemon    median {statistics.median(via) * 1000:.3f} ms  p99 {_percentile(via, 0.99) * 1000:.3f} ms"
    )
    print(f"  added         median {med:.3f} ms (target <= 0.2)  p99 {p99:.3f} ms (target <= 1.0)")
    print(f"{requests} requests, {concurrency} in flight")
    print(f"  raw aiohttp   {raw_rps:,.0f} req/s")
    print(f"  via daemon    {via_rps:,.0f} req/s  = {ratio:.2f} of raw (target >= 0.70)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--same-process-upstream", action="store_true")
    args = parser.parse_args()
    raise SystemExit(
        anyio.run(
            main,
            args.requests,
            args.concurrency,
            args.same_process_upstream,
            backend_options={"use_uvloop": True},
        )
    )
