"""Chaos: keyed detached jobs from many clients while the daemon is SIGKILLed and restarted.

    .venv/bin/python benchmarks/chaos.py --jobs 5000 --clients 16 --kills 10

The command line of :mod:`dispatcher.tools.chaos`, which holds the harness and
describes what it checks. Prints the report; the exit status is 1 on any violation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from dispatcher.tools.chaos import ChaosConfig, run_chaos


def main(argv: list[str] | None = None) -> int:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(
        description="SIGKILL the daemon under keyed detached jobs; check nothing is lost."
    )
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--providers", type=int, default=defaults.providers)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--latency", type=float, default=defaults.latency_s)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument(
        "--starting-kills",
        type=float,
        default=defaults.starting_kills,
        help="share of the kills aimed at a restart in progress (default 0.2)",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s)
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the workdir after a pass")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        jobs=args.jobs,
        clients=args.clients,
        kills=args.kills,
        providers=args.providers,
        concurrency=args.concurrency,
        latency_s=args.latency,
        window=args.window,
        starting_kills=args.starting_kills,
        seed=args.seed,
        timeout_s=args.timeout,
        workdir=args.workdir,
        keep=args.keep,
    )
    report = anyio.run(run_chaos, config, backend="asyncio", backend_options={"use_uvloop": True})
    print(report.summary())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
