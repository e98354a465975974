"""``dispatcher batch``: a JSONL file of jobs through the daemon, resumable, in input order.

Each input line is a job: ``{"prompt": "..."}`` as a shorthand, or a full
``chat``/``embed`` request object (``op`` defaults to ``chat``). Every line is
submitted detached, keyed by the file, the line number and the line's text, so
the daemon journals it and a second submit of the same line returns the same
job. Answers are appended to ``OUTPUT.partial`` as they arrive, each tagged with
its input line. A run that stops halfway (Ctrl-C, a crash of this client or of
the daemon) is resumed by running the same command again: lines already
answered are skipped, lines submitted before are picked up by key, and no
line's job runs twice. When every line has an answer, OUTPUT is written in
input order and the partial file removed. ``overloaded`` answers are retried
with backoff (stamina), waiting as long as the daemon's hint says.
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import msgspec
import stamina
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dispatcher.client.connection import Client, ConnectionLost
from dispatcher.contract.protocol import Accepted, Error, Reply, Result

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


SUBMIT_PATIENCE_S = 3600.0  # how long to keep retrying `overloaded` before giving up


class BatchLineError(ValueError):
    pass


class Busy(Exception):
    """The daemon answered ``overloaded``; retry after its hint."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__(f"overloaded (retry after {retry_after_s} s)")
        self.retry_after_s = retry_after_s


def _busy_backoff(exc: Exception) -> bool | float:
    if isinstance(exc, Busy):
        return exc.retry_after_s if exc.retry_after_s else True
    return False


def line_key(path: Path, number: int, text: str) -> str:
    """The idempotency key of one input line: same file, line and text -> same job."""
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    what = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"batch-{where}-{number}-{what}"


async def run_line(client: Client, payload: dict[str, Any]) -> Reply:
    """Submit one line detached (retrying while the daemon is overloaded) and wait for it."""
    accepted: Reply | None = None
    async for attempt in stamina.retry_context(
        on=_busy_backoff, attempts=None, timeout=SUBMIT_PATIENCE_S, wait_max=30.0
    ):
        with attempt:
            accepted = await client.call({**payload, "detach": True})
            if isinstance(accepted, Error) and accepted.code == "overloaded":
                raise Busy(accepted.retry_after_s)
    assert accepted is not None
    if not isinstance(accepted, Accepted):
        return accepted
    return await client.call({"op": "result", "job": accepted.job})


def parse_line(text: str, number: int, task: str | None) -> dict[str, Any]:
    """One input line as a request payload, or a BatchLineError saying what is wrong."""
    try:
        value = _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise BatchLineError(f"line {number}: not valid JSON ({exc})") from None
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise BatchLineError(f"line {number}: expected a JSON object or string")
    payload = dict(value)
    payload.pop("id", None)
    prompt = payload.pop("prompt", None)
    if prompt is not None:
        payload["messages"] = [{"role": "user", "content": str(prompt)}]
    payload.setdefault(
        "op", "embed" if "input" in payload and "messages" not in payload else "chat"
    )
    if payload["op"] == "chat" and task and "task" not in payload:
        payload["task"] = task
    return payload


def load_partial(path: Path) -> dict[int, dict[str, Any]]:
    """Answers already received by an earlier run: line number -> record (results only)."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open("rb") as fh:
        for raw in fh:
            try:
                record = _decoder.decode(raw)
            except msgspec.DecodeError:
                continue  # a line torn by a crash: ask again
            if isinstance(record, dict) and record.get("event") == "result":
                done[int(record["line"])] = record
    return done


def run_batch(
    *,
    socket: str,
    input_path: Path,
    output_path: Path,
    window: int,
    task: str | None,
    console: Console,
) -> int:
    try:
        lines = input_path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        console.print(
            f"[red]error:[/] cannot read {escape(str(input_path))} ({exc.strerror or exc}); "
            "give the path of a JSONL file with one request per line",
            highlight=False,
        )
        return 2
    except UnicodeDecodeError:
        console.print(
            f"[red]error:[/] {escape(str(input_path))} is not UTF-8 text; "
            "give a JSONL file with one request per line",
            highlight=False,
        )
        return 2
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    partial = output_path.with_name(output_path.name + ".partial")
    done = load_partial(partial)
    failed: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, dict[str, Any]]] = []
    for number, line in numbered:
        if number in done:
            continue
        try:
            payload = parse_line(line, number, task)
            payload.setdefault("key", line_key(input_path, number, line))
            todo.append((number, payload))
        except BatchLineError as exc:
            failed[number] = {
                "line": number,
                "event": "error",
                "code": "bad_request",
                "message": str(exc),
            }
    if done:
        console.print(f"resuming: {len(done)} of {len(numbered)} lines already answered")

    async def go() -> None:
        limiter = anyio.Semaphore(max(1, window))
        progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]:>7.1f} jobs/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        bar = progress.add_task("batch", total=len(numbered), completed=len(done), rate=0.0)
        started = anyio.current_time()
        finished = 0
        with partial.open("ab") as sink, progress:
            async with Client.connect(socket) as client, anyio.create_task_group() as tg:

                async def one(number: int, payload: dict[str, Any]) -> None:
                    nonlocal finished
                    async with limiter:
                        reply = await run_line(client, payload)
                    record = msgspec.to_builtins(reply)
                    record["line"] = number
                    record.pop("id", None)
                    if isinstance(reply, Result):
                        done[number] = record
                        sink.write(_encoder.encode(record) + b"\n")
                        sink.flush()
                    else:
                        failed[number] = record
                    finished += 1
                    elapsed = max(1e-9, anyio.current_time() - started)
                    progress.update(bar, advance=1, rate=finished / elapsed)

                for number, payload in todo:
                    tg.start_soon(one, number, payload)

    lost = False
    try:
        anyio.run(go, backend="asyncio", backend_options={"use_uvloop": True})
    except* ConnectionLost:
        lost = True
    if lost:
        console.print(
            f"[red]the daemon went away[/] after {len(done)} answers (kept in {partial}); "
            "run the same command again to resume"
        )
        return 75  # EX_TEMPFAIL
    with output_path.open("wb") as fh:
        for number, _line in numbered:
            record = done.get(number) or failed.get(number)
            if record is not None:
                fh.write(_encoder.encode(record) + b"\n")
    if not failed:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    console.print(summary_table(done, failed))
    console.print(f"wrote {len(done) + len(failed)} answers to {output_path}")
    if failed:
        console.print(
            f"[yellow]{len(failed)} line(s) failed; run the same command again to retry them[/]"
        )
        return 1
    return 0


def summary_table(done: dict[int, dict[str, Any]], failed: dict[int, dict[str, Any]]) -> Table:
    latencies: dict[str, list[float]] = defaultdict(list)
    tokens: Counter[str] = Counter()
    for record in done.values():
        provider = str(record.get("provider", "?"))
        latencies[provider].append(float(record.get("latency_ms", 0.0)))
        tokens[provider] += int(record.get("usage", {}).get("total_tokens", 0))
    table = Table(title="by provider", title_justify="left")
    for column in ("provider", "jobs", "median latency", "tokens"):
        table.add_column(column, justify="left" if column == "provider" else "right")
    for provider in sorted(latencies):
        values = latencies[provider]
        table.add_row(
            provider, str(len(values)), f"{statistics.median(values):.0f} ms", str(tokens[provider])
        )
    if failed:
        codes = Counter(str(r.get("code")) for r in failed.values())
        table.add_row(
            "[red]failed[/]", str(len(failed)), ", ".join(f"{c} {n}" for c, n in codes.items()), ""
        )
    return table
