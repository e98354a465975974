"""The `dispatcher bench` verb: the scheduling, limits, overhead and embed scenarios."""

from __future__ import annotations

import argparse

from rich.console import Console

from dispatcher.tools import bench, bench_embed, bench_limits, bench_overhead


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    bench.add_bench_arguments(
        parser,
        more_scenarios=(
            *bench_limits.LIMIT_SCENARIOS,
            *bench_overhead.OVERHEAD_SCENARIOS,
            *bench_embed.EMBED_SCENARIOS,
        ),
    )
    bench_limits.add_limits_arguments(parser)
    bench_overhead.add_overhead_arguments(parser)
    bench_embed.add_embed_arguments(parser)


def _consoles() -> tuple[Console, Console]:
    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = 160  # pipes and files: room for every column instead of 80
    return out, Console(stderr=True, highlight=False, soft_wrap=True)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario in bench_limits.LIMIT_SCENARIOS:
        return bench_limits.cmd_limits(args, *_consoles())
    if args.scenario in bench_overhead.OVERHEAD_SCENARIOS:
        return bench_overhead.cmd_overhead(args, *_consoles())
    if args.scenario in bench_embed.EMBED_SCENARIOS:
        return bench_embed.cmd_embed(args, *_consoles())
    return bench.cmd_bench(args)
