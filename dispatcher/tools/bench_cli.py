"""The `dispatcher bench` verb: the scheduling scenarios and the limits scenarios."""

from __future__ import annotations

import argparse

from rich.console import Console

from dispatcher.tools import bench, bench_limits


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    bench.add_bench_arguments(parser, more_scenarios=bench_limits.LIMIT_SCENARIOS)
    bench_limits.add_limits_arguments(parser)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario in bench_limits.LIMIT_SCENARIOS:
        out = Console(highlight=False, soft_wrap=True)
        if not out.is_terminal:
            out.width = 160  # pipes and files: room for every column instead of 80
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        return bench_limits.cmd_limits(args, out, err)
    return bench.cmd_bench(args)
