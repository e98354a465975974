"""Cancellation at every await point that holds a buffer, a slot or a job.

Like httpcore's ``tests/test_cancellations.py``: cancel the task at each await,
then check that nothing is left half done: no line stranded, no slot held, no
job without its one final answer, and the daemon still serving.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiohttp
import anyio
import pytest
from anyio.abc import ByteSendStream

from dispatcher.contract.config import HttpConfig
from dispatcher.contract.errors import Cancelled, DispatcherError
from dispatcher.contract.protocol import ChatRequest, Chunk, Result
from dispatcher.ingress.http_front import HttpFront
from dispatcher.ingress.line_writer import LineWriter, PeerGone
from dispatcher.providers.actor import Outcome
from dispatcher.scheduler import probe as probes
from dispatcher.scheduler.job import Job
from dispatcher.store.journal import Journal
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import Running, build_config, chat, fakes, provider_entry, wire

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("log_output")]

WAIT_S = 5.0
LONG_PROMPT = " ".join(f"word{i}" for i in range(400))  # ~100 chunks: a stream that lasts


# -- the line writer --------------------------------------------------------------------


class BlockingStream(ByteSendStream):
    """A byte stream whose first ``send`` blocks until ``release`` is set; records what it got."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def send(self, item: bytes) -> None:
        self.entered.set()
        if not self.sends:
            await self.release.wait()
        self.sends.append(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def lines(self) -> list[bytes]:
        return b"".join(self.sends).splitlines()


class Tally:
    """An ``on_written`` callback that adds up the counted lines it is told about."""

    def __init__(self) -> None:
        self.lines = 0

    def __call__(self, counted: int) -> None:
        self.lines += counted


async def test_writer_cancelled_while_its_line_is_being_sent_strands_no_other_line() -> None:
    """A writer cancelled while its line is in ``send`` loses no line other tasks queued meanwhile."""
    stream, tally = BlockingStream(), Tally()
    writer = LineWriter(stream, on_written=tally)
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            first = anyio.CancelScope()

            async def write_first() -> None:
                with first:
                    await writer.write(b"a1\n")

            tg.start_soon(write_first)
            await stream.entered.wait()  # a1 is inside send
            for line in (b"b1\n", b"c1\n", b"b2\n", b"c2\n"):
                await writer.write(line)
            await writer.write(b"chunk\n", counted=False)
            first.cancel()
            stream.release.set()
            await writer.flush(WAIT_S)
            tg.cancel_scope.cancel()
    survivors = [line for line in stream.lines() if not line.startswith(b"a")]
    assert survivors == [b"b1", b"c1", b"b2", b"c2", b"chunk"]
    assert len(stream.sends) == 2  # the lines queued during the first send left together
    assert tally.lines == 5  # a1 included: written or not, each counted line is told once


async def test_writer_cancelled_while_waiting_for_the_peer_still_sends_its_line() -> None:
    """A writer cancelled in the backpressure wait leaves its line queued, whole, in order."""
    stream, tally = BlockingStream(), Tally()
    writer = LineWriter(stream, high_water=8, on_written=tally)
    big = b"x" * 32 + b"\n"
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            await writer.write(b"first\n")
            await stream.entered.wait()
            with anyio.CancelScope() as waiting:
                tg.start_soon(lambda: _cancel_soon(waiting))
                await writer.write(big)  # over high_water: waits for the peer
            assert waiting.cancelled_caught
            stream.release.set()
            await writer.write(b"after\n")
            await writer.flush(WAIT_S)
            tg.cancel_scope.cancel()
    assert stream.lines() == [b"first", big.strip(), b"after"]
    assert tally.lines == 3


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.lowlevel.checkpoint()
    scope.cancel()


async def test_cancelled_writer_task_reports_every_line_once_and_refuses_more() -> None:
    """When the task running the writer is cancelled mid-send, every counted line is reported
    once (sent or not) and later writes raise PeerGone."""
    stream, tally = BlockingStream(), Tally()
    writer = LineWriter(stream, on_written=tally)
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            await writer.write(b"in-send\n")
            await stream.entered.wait()
            await writer.write(b"queued\n")
            tg.cancel_scope.cancel()
    assert writer.closed
    with pytest.raises(PeerGone):
        await writer.write(b"too late\n")
    assert tally.lines == 3
    assert stream.sends == []


# -- the journal ------------------------------------------------------------------------


def journal_job(job_id: str) -> Job:
    request = ChatRequest(id=f"req-{job_id}", messages=[{"role": "user", "content": job_id}])
    return Job(
        id=job_id,
        request=request,
        kind="chat",
        klass="default",
        eligible=("p",),
        client="0:1",
        uid=0,
        prompt_tokens=1,
        accepted_at=0.0,
        durable=True,
    )


@pytest.mark.parametrize("point", ["queueing", "commit"])
async def test_journal_accept_cancelled_leaves_the_job_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """An accept whose caller is cancelled either commits the job or leaves no trace of it,
    and the writer loop goes on committing later accepts."""
    journal = Journal(tmp_path / "journal.db")
    journal.open()
    in_commit, release = anyio.Event(), threading.Event()
    commit = journal._commit

    def slow_commit(batch: Any) -> None:
        anyio.from_thread.run_sync(in_commit.set)
        release.wait(WAIT_S)
        commit(batch)

    monkeypatch.setattr(journal, "_commit", slow_commit)
    cut, later = journal_job("cut"), journal_job("later")
    try:
        with anyio.fail_after(WAIT_S):
            async with anyio.create_task_group() as tg:
                await tg.start(journal.run)
                with anyio.CancelScope() as caller:
                    if point == "queueing":
                        caller.cancel()  # cancelled at accept's first await
                    else:
                        tg.start_soon(_cancel_when_set, in_commit, caller)
                    await journal.accept(cut)
                assert caller.cancelled_caught
                release.set()
                await journal.accept(later)
                if point == "commit":
                    await cut.persisted.wait()
                tg.cancel_scope.cancel()
        stored = journal.lookup("cut")
        if point == "queueing":
            assert stored is None
            assert not cut.persisted.is_set()
        else:
            assert stored is not None
            assert stored.state == "accepted"
        assert journal.lookup("later") is not None
        assert later.persisted.is_set()
    finally:
        release.set()
        journal.close()


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# -- the socket connection --------------------------------------------------------------


async def test_client_gone_while_following_cancels_the_job_and_serving_goes_on(
    start_daemon: Any,
) -> None:
    """A client that disconnects while its job runs gets the job cancelled upstream, and the
    daemon serves the next client."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="slow", delay_s=30.0))
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running:
            scheduler = running.daemon.scheduler
            with anyio.fail_after(WAIT_S):
                async with wire(running.socket) as w:
                    await w.send(chat("left behind", id="gone"))
                    await f["a"].wait_until(lambda s: s.serving == 1)
                    [job] = scheduler.active.values()
                await job.done.wait()
                await f["a"].wait_until(lambda s: s.in_flight == 0)
                async with running.client() as client:
                    reply = await client.call(chat("next one"))
    assert isinstance(job.outcome, Cancelled)
    assert f["a"].stats.dropped == 1
    assert scheduler.limits["a"].in_flight == 0
    assert isinstance(reply, Result)


# -- the HTTP front ---------------------------------------------------------------------


async def _post_and_leave(base: str, stream: bool) -> None:
    """Post a chat; leave once the answer (or, streamed, its first event) has begun."""
    body = {"model": "a", "messages": [{"role": "user", "content": LONG_PROMPT}], "stream": stream}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{base}/v1/chat/completions", json=body)
        if stream:
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: ")
        response.close()


@pytest.mark.parametrize("where", ["mid-answer", "mid-stream"])
async def test_http_client_gone_cancels_the_job_and_frees_the_slot(
    start_daemon: Any, where: str
) -> None:
    """An HTTP client that goes away mid-answer or mid-stream gets its job cancelled, no slot
    stays held, and the front serves the next request."""
    stream = where == "mid-stream"
    async with fakes(a=Behaviour(name="a", stream_chunk_interval_s=0.05)) as f:
        if not stream:
            f["a"].script(Fault(kind="slow", delay_s=30.0))
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running, _front(running) as base:
            scheduler = running.daemon.scheduler
            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_post_and_leave, base, stream)
                    await f["a"].wait_until(lambda s: s.serving == 1)
                    [job] = scheduler.active.values()
                    if not stream:
                        tg.cancel_scope.cancel()  # the client leaves while it waits
                await job.done.wait()
                await f["a"].wait_until(lambda s: s.in_flight == 0)
                async with aiohttp.ClientSession() as session:
                    body = {"model": "a", "messages": [{"role": "user", "content": "next"}]}
                    async with session.post(f"{base}/v1/chat/completions", json=body) as answer:
                        status = answer.status
    assert isinstance(job.outcome, Cancelled)
    assert scheduler.limits["a"].in_flight == 0
    assert not scheduler.active
    assert status == 200


@asynccontextmanager
async def _front(running: Running) -> AsyncIterator[str]:
    """An HTTP front on the running daemon's scheduler; yields its address."""
    http = HttpFront(
        running.daemon.scheduler, HttpConfig(listen="127.0.0.1:0", allow_anonymous=True)
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(http.run)
        try:
            yield addresses[0]
        finally:
            tg.cancel_scope.cancel()


# -- the health probe -------------------------------------------------------------------


async def test_probe_caller_cancelled_cancels_the_probe_job(start_daemon: Any) -> None:
    """Cancelling the caller of probe cancels its job and releases the provider's slot."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running:
            scheduler = running.daemon.scheduler
            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(probes.probe, scheduler, "a", timeout_s=10.0))
                    await f["a"].wait_until(lambda s: s.serving == 1)
                    [job] = scheduler.active.values()
                    tg.cancel_scope.cancel()
                await job.done.wait()
                await f["a"].wait_until(lambda s: s.in_flight == 0)
    assert isinstance(job.outcome, Cancelled)
    assert scheduler.limits["a"].in_flight == 0
    assert not scheduler.active


# -- the provider attempt ---------------------------------------------------------------


class Finals:
    """A scheduler observer counting final answers per job."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def on_attempt(self, provider: str, outcome: str, latency_s: float) -> None:
        pass

    def on_job_done(self, job: Job, outcome: Result | DispatcherError) -> None:
        self.jobs.append(job.id)


Point = Literal["headers", "body", "sink"]


@pytest.mark.parametrize(
    ("point", "by"),
    [
        ("headers", "cancel"),
        ("body", "cancel"),
        ("sink", "cancel"),
        ("headers", "deadline"),
        ("sink", "deadline"),
        ("sink", "timeout"),  # streamed before it timed out: never retried
    ],
)
async def test_attempt_cancelled_at_each_await_point_reports_once(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch, point: Point, by: str
) -> None:
    """An attempt cancelled (by a cancel, the job's deadline or its own timeout) while it
    awaits headers, the streamed body or the chunk sink reports exactly once, frees its
    slot, and its job gets exactly one final answer."""
    async with fakes(a=Behaviour(name="a", stream_chunk_interval_s=0.1)) as f:
        if point == "headers":
            f["a"].script(Fault(kind="slow", delay_s=30.0))
        timeout_s = 0.5 if by == "timeout" else 10.0
        config = build_config({"a": provider_entry(f["a"], concurrency=1, timeout_s=timeout_s)})
        async with start_daemon(config) as running:
            scheduler = running.daemon.scheduler
            reports: list[Outcome] = []
            report = scheduler.actors["a"]._report

            def counting(job: Job, provider: str, outcome: Outcome) -> None:
                reports.append(outcome)
                report(job, provider, outcome)

            monkeypatch.setattr(scheduler.actors["a"], "_report", counting)
            finals = Finals()
            scheduler.observers.append(finals)
            reached, never = anyio.Event(), anyio.Event()

            async def sink(_chunk: Chunk) -> None:
                reached.set()
                if point == "sink":
                    await never.wait()

            request = ChatRequest(
                id="r",
                messages=[{"role": "user", "content": LONG_PROMPT}],
                stream=point != "headers",
                timeout_s=0.5 if by == "deadline" else None,
            )
            with anyio.fail_after(WAIT_S):
                job = scheduler.submit(request, client="t", uid=0, on_chunk=sink)
                if point == "headers":
                    await f["a"].wait_until(lambda s: s.serving == 1)
                else:
                    await reached.wait()
                if by == "cancel":
                    scheduler.cancel(job)
                await job.done.wait()
                await f["a"].wait_until(lambda s: s.in_flight == 0)
    assert len(reports) == 1
    assert finals.jobs == [job.id]
    if by == "cancel":
        assert isinstance(job.outcome, Cancelled)
    else:  # the job's deadline, the attempt's budget or its timeout, whichever came first
        assert isinstance(job.outcome, DispatcherError)
        assert job.outcome.code in ("timeout", "upstream_failed")
    assert scheduler.limits["a"].in_flight == 0
    assert not scheduler.active
