"""Restart with a full journal: how long until the daemon answers ``ping``.

    .venv/bin/python benchmarks/restart.py --jobs 10000

Writes a journal holding N unfinished detached, keyed jobs (with
:func:`dispatcher.testing.journal_fill.write_unfinished`, through
:class:`dispatcher.store.journal.Journal` as a daemon would), then starts a daemon on
it, several times, each on a fresh copy of that journal:

* ``process``: ``python -m dispatcher serve`` as a subprocess, timed from the
  spawn to the first ``pong``; the same with an empty journal is the baseline
  (interpreter start and imports), so the difference is the replay;
* ``in-process``: :meth:`dispatcher.app.Daemon.run` timed from its call to
  readiness (``task_status.started()``), then to the first ``pong``.

The provider is a fake that holds every request for an hour with one slot, so
the replayed jobs stay queued and the measurement is the replay alone.
Prints ``ready in X s with N unfinished jobs`` (the median process start) and
exits non-zero when it exceeds ``--target`` (2 s, the issue's target).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import anyio

from dispatcher import logs
from dispatcher.app import Daemon, Options
from dispatcher.client.connection import answers_ping
from dispatcher.contract.config import Config, parse_config
from dispatcher.testing.journal_fill import write_unfinished
from dispatcher.testing.simulator import Behaviour, FakeProvider

KEY_ENV = "RESTART_BENCH_KEY"
READY_TIMEOUT_S = 60.0


def config_for(fake: FakeProvider, state_dir: Path, **daemon: object) -> dict[str, object]:
    """A raw config with one chat provider pointing at ``fake``."""
    return {
        "daemon": {"state_dir": str(state_dir), **daemon},
        "providers": {
            "hold": {
                "url": fake.url,
                "model": fake.behaviour.model,
                "api_key_env": KEY_ENV,
                "concurrency": 1,
                "latency_s": 1.0,
                "timeout_s": 3600.0,
            }
        },
        "classes": {
            name: {"providers": ["hold"]} for name in ("realtime", "bulk", "complex", "default")
        },
    }


def to_toml(raw: Mapping[str, object]) -> str:
    """Enough TOML for :func:`config_for`'s tables (strings, numbers, lists of strings)."""
    lines: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v)

    def table(prefix: str, body: Mapping[str, object]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in body.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{k}", v)

    for name, body in raw.items():
        assert isinstance(body, Mapping)
        table(name, body)
    return "\n".join(lines)


def fresh_state(state: Path, journal: Path | None) -> Path:
    """An empty state directory, holding a copy of ``journal`` when one is given."""
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    if journal is not None:
        shutil.copy(journal, state / "journal.sqlite3")
    return state


async def time_process(workdir: Path, journal: Path | None, env: dict[str, str]) -> float:
    """Spawn ``dispatcher serve`` on a copy of ``journal``; seconds from spawn to ``pong``."""
    state = fresh_state(workdir / "state", journal)
    socket = str(workdir / "d.sock")
    command = [
        sys.executable,
        "-m",
        "dispatcher",
        "serve",
        "--config",
        str(workdir / "config.toml"),
        "--socket",
        socket,
        "--state-dir",
        str(state),
    ]
    with (workdir / "daemon.log").open("ab") as log:
        started = time.monotonic()
        process = await anyio.open_process(command, stdout=log, stderr=log, env=env)
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            while not await answers_ping(socket):
                if process.returncode is not None:
                    raise RuntimeError(f"the daemon exited {process.returncode}; see daemon.log")
                await anyio.sleep(0.005)
        return time.monotonic() - started
    finally:
        process.kill()
        await process.wait()
        await process.aclose()


async def time_in_process(
    workdir: Path, journal: Path, config: Config, env: dict[str, str]
) -> tuple[float, float, int]:
    """Daemon.run on a copy of ``journal``: (seconds to ready, seconds to pong, jobs active)."""
    fresh_state(Path(config.daemon.state_dir), journal)
    socket = str(workdir / "in.sock")
    daemon = Daemon(
        config, Options(config_path=None, socket=socket, environ=env, handle_signals=False)
    )
    async with anyio.create_task_group() as tg:
        started = time.monotonic()
        await tg.start(daemon.run)
        ready = time.monotonic() - started
        ok = await answers_ping(socket)
        ponged = time.monotonic() - started
        active = len(daemon.scheduler.active)
        daemon.request_stop()
        daemon.request_stop()
    if not ok:
        raise RuntimeError("the in-process daemon did not answer ping")
    return ready, ponged, active


async def run(jobs: int, repeats: int, target_s: float) -> int:
    logs.configure("error", sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-restart-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env[KEY_ENV] = "restart-bench-key"
    try:
        journal = workdir / "full.sqlite3"
        t0 = time.monotonic()
        await write_unfinished(journal, jobs)
        print(f"wrote {jobs} unfinished jobs in {time.monotonic() - t0:.2f} s")
        behaviour = Behaviour(name="hold", latency_s=3600.0)
        async with FakeProvider(behaviour) as fake:
            raw = config_for(fake, workdir / "in-state", log_level="warning")
            (workdir / "config.toml").write_text(to_toml(raw))
            config = parse_config(raw, source="restart-bench")
            baseline = [await time_process(workdir, None, env) for _ in range(repeats)]
            full = [await time_process(workdir, journal, env) for _ in range(repeats)]
            inner = [await time_in_process(workdir, journal, config, env) for _ in range(repeats)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = statistics.median(full)
    print(
        f"process start to pong: empty journal median {statistics.median(baseline):.2f} s "
        f"{_fmt(baseline)}; {jobs} unfinished median {median:.2f} s {_fmt(full)}"
    )
    print(
        f"Daemon.run to ready: median {statistics.median(r for r, _, _ in inner):.3f} s "
        f"{_fmt([r for r, _, _ in inner])}; to pong {_fmt([p for _, p, _ in inner])}; "
        f"jobs replayed {[a for _, _, a in inner]}"
    )
    print(f"ready in {median:.2f} s with {jobs} unfinished jobs")
    if median > target_s:
        print(f"over the target of {target_s:g} s")
        return 1
    return 0


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time a daemon start on a journal of N jobs.")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    return anyio.run(
        run,
        args.jobs,
        args.repeats,
        args.target,
        backend="asyncio",
        backend_options={"use_uvloop": True},
    )


if __name__ == "__main__":
    sys.exit(main())
