"""Nothing lost: detached jobs, results after a restart, idempotency keys, compaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from dispatcher.contract.protocol import Accepted, ChatRequest, Error, Pending, Result
from dispatcher.core.keys import request_digest
from dispatcher.scheduler.job import Job
from dispatcher.store.journal import Journal
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio


async def test_detached_job_is_fetched_with_result(start_daemon: Any) -> None:
    """A detached submit answers `accepted` at once; `result` later returns the answer."""
    async with fakes(a=Behaviour(name="a", latency_s=0.05)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            accepted = await client.call(chat("later please", detach=True))
            assert isinstance(accepted, Accepted)
            answer = await client.call({"op": "result", "job": accepted.job})
    assert isinstance(answer, Result)
    assert answer.job == accepted.job
    assert "later please" in (answer.content or "")


async def test_result_without_wait_reports_pending(start_daemon: Any) -> None:
    """`result` with wait=false answers `pending` while the job still runs."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            accepted = await client.call(chat("slow", detach=True))
            assert isinstance(accepted, Accepted)
            with anyio.fail_after(5):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            pending = await client.call({"op": "result", "job": accepted.job, "wait": False})
    assert isinstance(pending, Pending)
    assert pending.state == "running"


async def test_same_key_returns_the_same_job(start_daemon: Any) -> None:
    """Submitting twice with one key yields one job, one upstream call and one answer."""
    async with fakes(a=Behaviour(name="a", latency_s=0.02)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            first = await client.call(chat("once", key="k-1"))
            second = await client.call(chat("once", key="k-1"))
    assert isinstance(first, Result)
    assert isinstance(second, Result)
    assert first.job == second.job
    assert first.content == second.content
    assert f["a"].stats.requests == 1


async def test_same_key_with_other_content_is_refused(start_daemon: Any) -> None:
    """Reusing a key for a different request is a client error naming the key."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            await client.call(chat("one thing", key="k-2"))
            clash = await client.call(chat("another thing", key="k-2"))
    assert isinstance(clash, Error)
    assert clash.code == "bad_request"
    assert "k-2" in clash.message


async def test_detached_jobs_survive_a_restart(start_daemon: Any, tmp_path: Path) -> None:
    """Detached jobs still queued or running when the daemon stops are answered by the next
    daemon under the same ids."""
    async with fakes(slow=Behaviour(name="slow", latency_s=60.0), fast=Behaviour(name="fast")) as f:
        stuck = build_config({"a": provider_entry(f["slow"], concurrency=1)})
        async with start_daemon(stuck) as running, running.client() as client:
            ids = []
            for i in range(5):
                accepted = await client.call(chat(f"survive {i}", detach=True))
                assert isinstance(accepted, Accepted)
                ids.append(accepted.job)
            with anyio.fail_after(5):
                await f["slow"].wait_until(lambda s: s.in_flight == 1)
        healthy = build_config({"a": provider_entry(f["fast"])})
        async with start_daemon(healthy) as running, running.client() as client:
            answers = [await client.call({"op": "result", "job": job}) for job in ids]
    for i, answer in enumerate(answers):
        assert isinstance(answer, Result), answer
        assert f"survive {i}" in (answer.content or "")
    assert f["fast"].stats.requests == 5


async def test_finished_result_is_served_from_the_journal_after_restart(
    start_daemon: Any,
) -> None:
    """A detached job finished before a restart can still be fetched after it."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            accepted = await client.call(chat("remember me", detach=True))
            assert isinstance(accepted, Accepted)
            first = await client.call({"op": "result", "job": accepted.job})
        async with start_daemon(config) as running, running.client() as client:
            again = await client.call({"op": "result", "job": accepted.job})
            keyed = await client.call(chat("remember me", key="k-3"))
    assert isinstance(first, Result)
    assert isinstance(again, Result)
    assert again.content == first.content
    assert f["a"].stats.requests == 2  # the detached job once, the keyed one once
    assert isinstance(keyed, Result)


async def test_another_user_cannot_read_a_job(start_daemon: Any) -> None:
    """`result` for a job of another uid is answered as unknown."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            accepted = await client.call(chat("mine", detach=True))
            assert isinstance(accepted, Accepted)
            job = running.daemon.scheduler.lookup(accepted.job)
            assert job is not None
            job.uid = 4242  # as if another user had submitted it
            for conn in running.daemon.server.connections:
                conn.uid = 1000  # and we are not root
            reply = await client.call({"op": "result", "job": accepted.job})
    assert isinstance(reply, Error)
    assert reply.code == "unknown_job"


def _job(i: int) -> Job:
    request = ChatRequest(id=f"r{i}", messages=[{"role": "user", "content": f"m{i}"}], detach=True)
    return Job(
        id=f"j{i}",
        request=request,
        kind="chat",
        klass="default",
        eligible=("a",),
        client="0:1",
        uid=0,
        prompt_tokens=3,
        accepted_at=0.0,
        durable=True,
    )


async def test_journal_commits_in_groups(tmp_path: Path) -> None:
    """Many concurrent accepts share transactions: fewer commits than rows."""
    journal = Journal(tmp_path / "j.sqlite3")
    journal.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(journal.run)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as writers:
                    for i in range(500):
                        writers.start_soon(journal.accept, _job(i))
            tg.cancel_scope.cancel()
        assert journal.rows_written == 500
        assert journal.commits < 100
        assert len(journal.unfinished()) == 500
    finally:
        journal.close()


async def test_compaction_drops_old_finished_rows(tmp_path: Path) -> None:
    """Finished rows older than keep_s are deleted; unfinished rows stay."""
    now = [1000.0]
    journal = Journal(tmp_path / "j.sqlite3", keep_s=60.0, clock=lambda: now[0])
    journal.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(journal.run)
            jobs = [_job(i) for i in range(4)]
            for job in jobs:
                await journal.accept(job)
            for job in jobs[:3]:
                job.finish(
                    Result(job=job.id, provider="a", model="m", class_="default"), deliver=False
                )
                journal.finish(job)
            with anyio.fail_after(5):
                for job in jobs[:3]:
                    await job.done.wait()
            tg.cancel_scope.cancel()
        now[0] += 61.0
        assert journal.compact() == 3
        assert [s.id for s in journal.unfinished()] == ["j3"]
    finally:
        journal.close()


def test_digest_ignores_id_key_and_detach() -> None:
    """Two submits that differ only in id, key or detach are the same content."""
    a = ChatRequest(id="1", messages=[{"role": "user", "content": "x"}], key="k")
    b = msgspec.structs.replace(a, id="2", detach=True, key="other")
    c = msgspec.structs.replace(a, temperature=0.5)
    assert request_digest(a) == request_digest(b)
    assert request_digest(a) != request_digest(c)


async def test_a_named_clients_job_is_still_its_after_a_replay(tmp_path: Path) -> None:
    """The journal keeps "client:NAME" (not the connection), and a journal written before
    the column existed opens with it added."""
    old = sqlite3.connect(tmp_path / "old.sqlite3")
    old.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, uid INTEGER NOT NULL, key TEXT,"
        " digest TEXT NOT NULL, request BLOB NOT NULL, state TEXT NOT NULL, outcome BLOB,"
        " accepted_at REAL NOT NULL, finished_at REAL);"
    )
    old.close()
    journal = Journal(tmp_path / "old.sqlite3")
    journal.open()
    try:
        named, plain = _job(1), _job(2)
        named.client = "client:alice"
        plain.client = "0:7"  # a connection's fairness key: not an identity to keep
        async with anyio.create_task_group() as tg:
            await tg.start(journal.run)
            with anyio.fail_after(10):
                await journal.accept(named)
                await journal.accept(plain)
            tg.cancel_scope.cancel()
        kept = {stored.id: stored.client for stored in journal.unfinished()}
    finally:
        journal.close()
    assert kept == {named.id: "client:alice", plain.id: None}
