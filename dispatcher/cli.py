"""The command line: each verb a small function; ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatcher import __version__
from dispatcher.client.connection import Client, ConnectionLost, DaemonNotRunning, UntrustedDaemon
from dispatcher.contract.config import (
    Config,
    ConfigError,
    DaemonConfig,
    find_config_path,
    insecure_files,
    load_config,
    resolve_key,
    socket_path,
)
from dispatcher.contract.protocol import Chunk, Error, Health, Reply, Result, Status

EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: no daemon
EXIT_NOPERM = 77  # EX_NOPERM: the socket is served by someone we do not trust
EXIT_FAILED = 1

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except DaemonNotRunning as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_UNAVAILABLE
    except ConnectionLost as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}; check the daemon's logs")
        return EXIT_UNAVAILABLE
    except UntrustedDaemon as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_NOPERM
    except ConfigError as exc:
        err.print(f"[red]config error:[/] {escape(str(exc))}")
        return 78
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="One local socket in front of several LLM providers.",
    )
    parser.add_argument("--version", action="version", version=f"dispatcher {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
        sub.add_argument(
            "--socket", help="the daemon's socket (default: $DISPATCHER_SOCKET, then the config's)"
        )
        sub.add_argument(
            "--config",
            help="config file (default: $DISPATCHER_CONFIG, then /etc/dispatcher/config.toml)",
        )
        return sub

    serve = verb("serve", cmd_serve, "run the daemon")
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="use built-in fake providers on loopback (no keys, no network)",
    )
    serve.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="with --simulate: multiply the fakes' latencies (e.g. 0.1)",
    )
    serve.add_argument("--state-dir", help="override daemon.state_dir")

    chat = verb("chat", cmd_chat, "send one chat job and print the answer")
    chat.add_argument("text", help="the prompt (use - to read it from stdin)")
    chat.add_argument("--task", choices=["realtime", "bulk", "complex", "default"])
    chat.add_argument("--thinking", action="store_true", help="ask for reasoning")
    chat.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    chat.add_argument("--provider", action="append", help="pin to a provider (repeatable)")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument(
        "--timeout", type=float, help="deadline in seconds across queueing, retries and fallbacks"
    )
    chat.add_argument("--json", action="store_true", help="print the whole result as JSON")

    embed = verb("embed", cmd_embed, "embed one or more texts")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--provider", action="append")
    embed.add_argument("--json", action="store_true", help="print the whole result as JSON")

    batch = verb("batch", cmd_batch, "run a JSONL file of jobs with a progress bar")
    batch.add_argument(
        "input", help='JSONL: one job per line: {"prompt": ...} or a chat/embed request object'
    )
    batch.add_argument("-o", "--output", help="results in input order (default: INPUT.out.jsonl)")
    batch.add_argument(
        "--window", type=int, default=256, help="jobs in flight at once (default 256)"
    )
    batch.add_argument(
        "--task",
        choices=["realtime", "bulk", "complex", "default"],
        help="default task for lines without one",
    )

    from dispatcher.client.top import add_top_arguments, cmd_top

    top = verb("top", cmd_top, "a live view of providers, classes and totals")
    add_top_arguments(top)

    status = verb("status", cmd_status, "show every provider's live state")
    status.add_argument("--json", action="store_true")

    health = verb("health", cmd_health, "send a tiny probe to each provider and print a table")
    health.add_argument("--provider", action="append", help="probe only this provider (repeatable)")
    health.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per probe (default 30)"
    )
    health.add_argument("--json", action="store_true")

    verb(
        "check-config", cmd_check_config, "validate the configuration and print what it resolves to"
    )
    from dispatcher.client.usage_cmd import add_usage_arguments, cmd_usage

    usage = verb("usage", cmd_usage, "tokens and jobs per client, provider, class or day")
    add_usage_arguments(usage)

    from dispatcher.tools.bench_cli import add_bench_arguments, cmd_bench

    bench = verb("bench", cmd_bench, "run scheduling scenarios against the built-in simulator")
    add_bench_arguments(bench)
    return parser


# -- helpers -------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config, os.environ))


def _client_socket(args: argparse.Namespace) -> str:
    if args.socket or os.environ.get("DISPATCHER_SOCKET"):
        return socket_path(args.socket, os.environ, None)
    try:
        config = _config(args)
    except ConfigError:
        config = None
    return socket_path(None, os.environ, config)


def _print_error(reply: Error) -> None:
    hint = " (retryable)" if reply.retryable else ""
    err.print(f"[red]error[/] {escape('[' + reply.code + ']')}{hint}: {escape(reply.message)}")


def _write(text: str) -> None:
    """Answer text goes out verbatim: no markup, no wrapping."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _run(coro_fn: Callable[[], Any]) -> Any:
    return anyio.run(coro_fn, backend="asyncio", backend_options={"use_uvloop": True})


# -- verbs ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from dispatcher.app import Options, run

    config = _config(args)
    state_dir = args.state_dir
    scratch = None
    if state_dir is None and args.simulate and config.daemon.state_dir == DaemonConfig().state_dir:
        # A simulated daemon is a toy: its journal goes to a private directory of its own
        # (mkdtemp: 0700, a name no one can take first), removed when it stops.
        state_dir = scratch = tempfile.mkdtemp(prefix="dispatcher-simulate-")
    if state_dir:
        config = msgspec.structs.replace(
            config, daemon=msgspec.structs.replace(config.daemon, state_dir=state_dir)
        )
    options = Options(
        config_path=find_config_path(args.config, os.environ),
        socket=socket_path(args.socket, os.environ, config),
        simulate=args.simulate,
        time_scale=args.time_scale,
    )
    try:
        return run(options, config)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def cmd_chat(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    messages = [{"role": "user", "content": text}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    payload: dict[str, Any] = {"op": "chat", "messages": messages, "stream": args.stream}
    options = {
        "task": args.task,
        "thinking": args.thinking or None,
        "providers": args.provider,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "timeout_s": args.timeout,
    }
    payload.update({key: value for key, value in options.items() if value is not None})

    async def go() -> int:
        async with Client.connect(_client_socket(args)) as client:
            async for reply in client.request(payload):
                match reply:
                    case Chunk():
                        if not args.json:
                            if reply.reasoning:
                                err.print(reply.reasoning, end="", style="dim", markup=False)
                            _write(reply.delta)
                    case Result():
                        if args.json:
                            _write(msgspec.json.encode(reply).decode() + "\n")
                        else:
                            if not args.stream:
                                if reply.reasoning:
                                    err.print(reply.reasoning, style="dim", markup=False)
                                _write(reply.content or "")
                            _write("\n")
                            err.print(
                                f"[dim]{reply.provider} ({reply.model}), class {reply.class_}, "
                                f"{reply.latency_ms:.0f} ms, {reply.attempts} attempt(s), "
                                f"{reply.usage.total_tokens} tokens[/]"
                            )
                        return 0
                    case Error():
                        if args.stream:
                            _write("\n")
                        if args.json:
                            _write(msgspec.json.encode(reply).decode() + "\n")
                        _print_error(reply)
                        return EXIT_FAILED
                    case _:
                        pass
        return EXIT_FAILED

    result: int = _run(go)
    return result


def cmd_embed(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"op": "embed", "input": list(args.texts)}
    if args.provider:
        payload["providers"] = args.provider

    reply = _ask(args, payload)
    if reply is None:
        return EXIT_FAILED
    assert isinstance(reply, Result)
    if args.json:
        _write(msgspec.json.encode(reply).decode() + "\n")
        return 0
    for text, vector in zip(args.texts, reply.embeddings or [], strict=False):
        head = ", ".join(f"{x:.4f}" for x in vector[:4])
        _write(f"{len(vector)} dims  [{head}, ...]  {text[:60]}\n")
    err.print(f"[dim]{reply.provider} ({reply.model}), {reply.latency_ms:.0f} ms[/]")
    return 0


def _ask(args: argparse.Namespace, payload: dict[str, Any]) -> Reply | None:
    """One request, its final reply; None (the error printed) when the daemon refused it."""

    async def go() -> Reply:
        async with Client.connect(_client_socket(args)) as client:
            return await client.call(payload)

    reply: Reply = _run(go)
    if isinstance(reply, Error):
        _print_error(reply)
        return None
    return reply


def cmd_status(args: argparse.Namespace) -> int:
    reply = _ask(args, {"op": "status"})
    if reply is None:
        return EXIT_FAILED
    assert isinstance(reply, Status)
    if args.json:
        _write(msgspec.json.encode(reply).decode() + "\n")
    else:
        out.print(status_table(reply))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"op": "health", "timeout_s": args.timeout}
    if args.provider:
        payload["providers"] = args.provider

    reply = _ask(args, payload)
    if reply is None:
        return EXIT_FAILED
    assert isinstance(reply, Health)
    if args.json:
        _write(msgspec.json.encode(reply).decode() + "\n")
    else:
        table = Table(title="health (one tiny request per provider)", title_justify="left")
        for column in ("provider", "ok", "latency", "model / error"):
            table.add_column(column)
        for name, probe in reply.providers.items():
            table.add_row(
                name,
                "[green]yes[/]" if probe.ok else "[red]no[/]",
                f"{probe.latency_ms:.0f} ms" if probe.latency_ms is not None else "-",
                escape(probe.model or "") if probe.ok else escape(probe.error or ""),
            )
        out.print(table)
    return 0 if all(p.ok for p in reply.providers.values()) else EXIT_FAILED


def status_table(status: Status) -> Table:
    table = Table(
        title=(
            f"dispatcher: {status.queued} queued, {status.running} running, "
            f"{status.jobs_done} done, {status.jobs_failed} failed, up {status.uptime_s:.0f} s"
        ),
        title_justify="left",
    )
    table.add_column("provider", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for column in ("slots", "queue", "rpm", "tokens", "ms", "ok", "fail", "429"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, p in status.providers.items():
        style = {
            "disabled": "red",
            "open": "red",
            "rate_limited": "yellow",
            "half_open": "yellow",
        }.get(p.state, "")
        rpm = str(p.rpm) if p.rpm else (f"~{p.learned_rpm:.0f}" if p.learned_rpm else "-")
        table.add_row(
            name,
            f"[{style}]{p.state}[/]" if style else p.state,
            f"{p.in_flight}/{p.concurrency}",
            str(p.queued),
            rpm,
            "-" if p.tokens is None else str(p.tokens),
            f"{p.latency_ms:.0f}",
            str(p.ok),
            str(p.failed),
            str(p.rate_limited),
        )
    lines = [f"{n}: {p.problem}" for n, p in status.providers.items() if p.problem]
    cache = status.cache
    if cache is not None:
        kinds = ", ".join(
            f"{kind} {c.hits:,}/{c.hits + c.misses:,} hits" for kind, c in cache.kinds.items()
        )
        lines.append(
            f"cache: {kinds}; {cache.embed_texts:,} vectors ({cache.embed_bytes / 1e6:.1f} MB); "
            f"{cache.texts_per_request:g} texts per embeddings request"
        )
    if lines:
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
    return table


def cmd_check_config(args: argparse.Namespace) -> int:
    path = find_config_path(args.config, os.environ)
    config = load_config(path)
    out.print(f"config: {path or 'built-in table (no file found)'}")
    table = Table(title="providers", title_justify="left")
    columns = ("name", "kind", "adapter", "model", "slots", "rpm", "window", "thinking", "accepts")
    for column in columns:
        table.add_column(column, no_wrap=column in ("name", "model", "rpm", "slots"))
    keys: list[str] = []
    problems = 0
    for name, provider in config.providers.items():
        key = resolve_key(provider, os.environ)
        problems += key.key is None
        table.add_row(
            name,
            provider.kind,
            provider.adapter,
            provider.model,
            str(provider.concurrency),
            str(provider.rpm or "-"),
            f"{provider.context_window:,}",
            "yes" if provider.thinking else "no",
            ", ".join(provider.capabilities) or "-",
        )
        state = "" if key.key is not None else " [yellow](provider disabled)[/]"
        keys.append(f"  {name}: {escape(key.masked())}{state}")
    out.print(table)
    out.print("keys (never shown, only where they come from):")
    for line in keys:
        out.print(line)
    classes = Table(title="classes", title_justify="left")
    for column in ("class", "strategy", "providers (preference order)"):
        classes.add_column(column)
    for name, policy in config.classes.items():
        classes.add_row(name, policy.strategy, " > ".join(policy.providers))
    out.print(classes)
    out.print(f"socket: {socket_path(args.socket, os.environ, config)}")
    for warning in insecure_files(path, config, os.environ):
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if problems:
        err.print(
            f"[yellow]{problems} provider(s) have no key and will be disabled[/]; "
            "set the variables above or use --simulate"
        )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from dispatcher.client.batch import run_batch

    output = Path(args.output) if args.output else Path(f"{args.input}.out.jsonl")
    return run_batch(
        socket=_client_socket(args),
        input_path=Path(args.input),
        output_path=output,
        window=args.window,
        task=args.task,
        console=err,
    )


if __name__ == "__main__":
    raise SystemExit(main())
