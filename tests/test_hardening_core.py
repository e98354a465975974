"""Issue 13, the core's part: removal from the fair queue, memory kept, attempts never sent,
Retry-After caps, and attempts that raise without crashing their actor."""

from __future__ import annotations

import gc
import json
import os
import random
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.contract.config import Config, parse_config
from dispatcher.contract.errors import UpstreamError
from dispatcher.contract.protocol import ChatRequest, Error, Result, Usage
from dispatcher.core.fair_queue import FairQueue
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers.actor import Answer, NotSent, ProviderActor
from dispatcher.providers.wire import ChatAnswer
from dispatcher.scheduler.job import Job
from dispatcher.scheduler.loop import Scheduler
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import FakeClock, FakeHandle, build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio


# -- the fair queue ----------------------------------------------------------------------


class DequeFairQueue:
    """The fair queue as it was before issue 13 (``deque.remove``): the reference order."""

    def __init__(self) -> None:
        self._levels: dict[Any, dict[str, deque[Any]]] = {}
        self._order: list[Any] = []
        self._len = 0
        self._by_class: Counter[str] = Counter()
        self._by_provider: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._len

    def push(self, job: Any, *, front: bool = False) -> None:
        level = job.priority
        clients = self._levels.get(level)
        if clients is None:
            clients = self._levels[level] = {}
            self._order = sorted(self._levels, reverse=True)
        queue = clients.get(job.client)
        if queue is None:
            queue = deque()
            clients = self._levels[level] = {job.client: queue, **clients}
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        self._len += 1
        self._by_class[job.klass] += 1
        self._by_provider.update(job.eligible)

    def remove(self, job: Any, *, served: bool = False) -> bool:
        clients = self._levels.get(job.priority)
        queue = clients.get(job.client) if clients is not None else None
        if clients is None or queue is None:
            return False
        try:
            queue.remove(job)
        except ValueError:
            return False
        self._len -= 1
        self._by_class[job.klass] -= 1
        self._by_provider.subtract(job.eligible)
        if not queue:
            del clients[job.client]
            if not clients:
                del self._levels[job.priority]
                self._order = sorted(self._levels, reverse=True)
        elif served:
            clients[job.client] = clients.pop(job.client)
        return True

    def __iter__(self) -> Iterator[Any]:
        for level in list(self._order):
            clients = self._levels.get(level)
            if not clients:
                continue
            queues = list(clients.values())
            depth = 0
            while queues:
                alive = []
                for queue in queues:
                    if depth < len(queue):
                        yield queue[depth]
                        alive.append(queue)
                queues = alive
                depth += 1

    def count_provider(self, name: str) -> int:
        return self._by_provider[name]

    def classes(self) -> dict[str, int]:
        return {k: v for k, v in self._by_class.items() if v}


class QueuedJob:
    """What the fair queue reads of a job, with a count of the equality checks it costs."""

    __slots__ = ("client", "eligible", "klass", "n", "priority")
    comparisons = 0
    budget: int | None = None  # past this many comparisons, fail at once (no hour-long hang)

    def __init__(self, n: int, priority: tuple[int, int], client: str, klass: str) -> None:
        self.n, self.priority, self.client, self.klass = n, priority, client, klass
        self.eligible = ("a", "b") if n % 2 else ("a",)

    def __eq__(self, other: object) -> bool:
        cls = type(self)
        cls.comparisons += 1
        if cls.budget is not None and cls.comparisons > cls.budget:
            raise AssertionError(f"more than {cls.budget} comparisons: removal scans the queue")
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<job {self.n} {self.priority} {self.client}>"


@contextmanager
def counted(budget: int | None = None) -> Iterator[None]:
    QueuedJob.comparisons, QueuedJob.budget = 0, budget
    try:
        yield
    finally:
        QueuedJob.budget = None


operations = st.lists(
    st.tuples(
        st.sampled_from(["push", "push_front", "remove", "serve", "read"]),
        st.integers(0, 2),  # level
        st.integers(0, 3),  # client
        st.integers(0, 10**6),  # which queued job, for remove and serve
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_fair_queue_serves_in_the_order_the_deque_version_did(
    ops: list[tuple[str, int, int, int]],
) -> None:
    """Any sequence of pushes, retries, removals and serves leaves the same order and counts."""
    new, old = FairQueue(), DequeFairQueue()
    queued: list[QueuedJob] = []
    for n, (op, level, client, pick) in enumerate(ops):
        if op in ("push", "push_front"):
            job = QueuedJob(n, (level, 0), f"c{client}", f"k{level}")
            new.push(job, front=op == "push_front")  # type: ignore[arg-type]
            old.push(job, front=op == "push_front")
            queued.append(job)
        elif op in ("remove", "serve") and queued:
            job = queued.pop(pick % len(queued))
            assert new.remove(job, served=op == "serve")  # type: ignore[arg-type]
            assert old.remove(job, served=op == "serve")
            assert not new.remove(job)  # type: ignore[arg-type]
        assert list(new) == list(old)
        assert len(new) == len(old)
        assert new.classes() == old.classes()
        assert [new.count_provider(p) for p in "ab"] == [old.count_provider(p) for p in "ab"]


def test_removing_a_queued_job_compares_it_with_no_other_job() -> None:
    """Taking 2,000 jobs out of one client's queue, last first, scans nothing (the deque
    version compared each with every job ahead of it: about n²/2 comparisons)."""
    n = 2_000
    jobs = [QueuedJob(i, (1, 0), "c", "bulk") for i in range(n)]
    counts = {}
    for name, queue in (("deque", DequeFairQueue()), ("indexed", FairQueue())):
        for job in jobs:
            queue.push(job)  # type: ignore[arg-type]
        with counted():
            for job in reversed(jobs):
                assert queue.remove(job)  # type: ignore[arg-type]
            counts[name] = QueuedJob.comparisons
        assert len(queue) == 0
    print(f"comparisons to remove {n} jobs: {counts}")
    assert counts["deque"] >= n * (n - 1) // 2
    assert counts["indexed"] <= n


def test_cancelling_100000_queued_jobs_is_linear() -> None:
    """100,000 queued jobs of one client are taken out, newest first, with a bounded number of
    comparisons; the print compares the time with the deque version on a smaller queue."""
    n, n_old = 100_000, 2_000
    jobs = [QueuedJob(i, (1, 0), "flood", "bulk") for i in range(n)]
    queue = FairQueue()
    for job in jobs:
        queue.push(job)  # type: ignore[arg-type]
    started = time.perf_counter()
    with counted(budget=n):
        for job in reversed(jobs):
            assert queue.remove(job)  # type: ignore[arg-type]
    new_s = time.perf_counter() - started
    assert len(queue) == 0
    assert queue.classes() == {}

    old = DequeFairQueue()
    for job in jobs[:n_old]:
        old.push(job)
    started = time.perf_counter()
    for job in reversed(jobs[:n_old]):
        old.remove(job)
    old_s = time.perf_counter() - started
    # The deque version is quadratic: at n it would take (n / n_old)^2 times as long.
    old_at_n_s = old_s * (n / n_old) ** 2
    print(
        f"remove {n}: indexed {new_s:.3f} s; deque {n_old} took {old_s:.3f} s, "
        f"so about {old_at_n_s:.0f} s at {n}: {old_at_n_s / max(new_s, 1e-9):.0f}x"
    )


# -- the scheduler shell -----------------------------------------------------------------


def _config(
    *, hedge: bool = False, rpm: int = 0, per_provider: int = 1, **concurrency: int
) -> Config:
    providers = {
        name: {
            "url": f"http://127.0.0.1:1/{name}",
            "model": f"m-{name}",
            "concurrency": slots,
            "rpm": rpm,
        }
        for name, slots in concurrency.items()
    }
    return parse_config(
        {
            "providers": providers,
            "classes": {"default": {"providers": list(concurrency), "hedge": hedge}},
            "retry": {"backoff_base_s": 1.0, "backoff_max_s": 1.0, "per_provider": per_provider},
        }
    )


def _scheduler(config: Config, clock: FakeClock) -> tuple[Scheduler, dict[str, FakeHandle]]:
    scheduler = Scheduler(config, clock=clock, rng=random.Random(13))
    handles = {}
    for name, provider in config.providers.items():
        handle = FakeHandle(name, ProviderLimits.from_config(name, provider))
        scheduler.add_provider(handle)
        handles[name] = handle
    return scheduler, handles


def _request(n: int, **fields: Any) -> ChatRequest:
    return ChatRequest(id=f"r{n}", messages=[{"role": "user", "content": f"q {n}"}], **fields)


def _answer() -> Answer:
    usage = Usage()
    return Answer(
        ChatAnswer(content="ok", reasoning=None, usage=usage, model=None, finish_reason="stop"),
        latency_s=0.5,
        ratelimit=None,
    )


@contextmanager
def no_cycle_collection() -> Iterator[None]:
    """Only reference counting frees objects inside: a cycle keeps its members alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _raised_in_a_frame_holding(job: Job) -> UpstreamError:
    """An upstream error as the actor produces it: raised, so its traceback holds a frame
    whose locals hold the job."""
    attempt = job
    try:
        raise UpstreamError("server", f"HTTP 500 for {attempt.id}", status=500)
    except UpstreamError as exc:
        return exc


async def test_finished_jobs_are_not_kept_alive_by_their_deadlines() -> None:
    """5,000 answered jobs with a one-day timeout are freed at once, by reference counting,
    once the history forgets them: the deadline heap holds no job."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=64), clock)
    refs = []
    with no_cycle_collection():
        for i in range(5_000):
            job = scheduler.submit(_request(i, timeout_s=86_400), client="c")
            refs.append(weakref.ref(job))
            scheduler.on_outcome(job, "a", _answer())
            assert isinstance(job.outcome, Result)
        del job
        handles["a"].delivered.clear()
        assert not any(isinstance(entry[2], Job) for entry in scheduler.timers._deadlines)
        scheduler.history.finished.clear()
        assert sum(ref() is not None for ref in refs) == 0
    assert scheduler.timers.deadline_entries <= 2 * 1024 + 64  # compacted as jobs finish


async def test_a_failed_job_is_freed_by_reference_counting() -> None:
    """A job that failed with a raised upstream error is freed, with no cycle collection, once
    the scheduler forgets it: stored errors carry no traceback back to the job."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=1), clock)
    with no_cycle_collection():
        job = scheduler.submit(_request(1), client="c")
        ref = weakref.ref(job)
        scheduler.on_outcome(job, "a", _raised_in_a_frame_holding(job))
        assert isinstance(job.outcome, Exception)
        assert job.outcome.code == "upstream_failed"
        assert job.outcome.__traceback__ is None
        assert all(error.__traceback__ is None for _, error in job.history)
        del job
        handles["a"].delivered.clear()
        scheduler.history.finished.clear()
        assert ref() is None


async def test_a_finished_job_leaves_the_hedge_heap_and_its_copy() -> None:
    """A hedged job whose copy won is freed by reference counting once forgotten: it left
    the hedge heap when it finished, and the job and its copy no longer hold each other."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(hedge=True, a=4, b=4), clock)
    scheduler.attempts_sent = 1000  # room in the hedge budget
    with no_cycle_collection():
        job = scheduler.submit(_request(1), client="c")
        other = scheduler.submit(_request(2), client="c")
        assert scheduler.timers.hedged() == [job, other]
        clock.advance(5.0)
        async with anyio.create_task_group() as tg:  # one loop turn sends the copies
            await tg.start(scheduler.run)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        copy = job.hedge
        assert copy is not None
        assert copy.provider is not None
        scheduler.on_outcome(copy, copy.provider, _answer())  # the copy wins the race
        assert isinstance(job.outcome, Result)
        assert job.provider is not None
        scheduler.on_outcome(job, job.provider, None)  # the original's attempt, cancelled
        assert job not in scheduler.timers.hedged()
        refs = [weakref.ref(job), weakref.ref(copy)]
        del job, copy
        for handle in handles.values():
            handle.delivered.clear()
        scheduler.history.finished.clear()
        assert [ref() for ref in refs] == [None, None]
    assert other.outcome is None


async def test_status_shows_the_daemons_resident_memory() -> None:
    """`status` carries rss_bytes: the daemon's resident memory, as the OS counts it."""
    scheduler, _ = _scheduler(_config(a=1), FakeClock())
    rss = scheduler.status().rss_bytes
    assert rss is not None
    assert 10 * 2**20 < rss < 64 * 2**30
    statm = await anyio.Path("/proc/self/statm").read_text()  # Linux: the same, within pages
    expected = int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(rss - expected) < 16 * 2**20


# -- attempts that never reached the upstream --------------------------------------------


async def test_an_attempt_not_sent_gives_its_token_back_and_spares_the_circuit() -> None:
    """A "not sent" report returns the attempt's token, leaves the circuit alone and answers
    the job `timeout` once its deadline has passed."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=10, rpm=60), clock)
    limits = scheduler.limits["a"]
    jobs = [scheduler.submit(_request(i, timeout_s=1.0), client="c") for i in range(10)]
    assert handles["a"].delivered == jobs
    assert limits.bucket.available(clock.now) == 50
    clock.advance(2.0)
    for job in jobs:
        scheduler.on_outcome(job, "a", NotSent("no time left"))
    assert limits.bucket.available(clock.now) == 60
    assert limits.circuit.state == "closed"
    assert limits.failed == 0
    for job in jobs:
        assert isinstance(job.outcome, Exception)
        assert job.outcome.code == "timeout"
        assert job.attempts == 0


async def test_jobs_whose_deadline_passed_in_the_inbox_never_reach_the_upstream() -> None:
    """Ten jobs whose deadline passed while they waited in a provider actor's inbox send no
    request, spend no token, leave the circuit closed and are answered `timeout`."""
    clock = FakeClock()
    async with fakes(a=Behaviour(name="a")) as f:
        config = _config(a=10, rpm=60)
        scheduler = Scheduler(config, clock=clock, rng=random.Random(13))
        entry = msgspec.structs.replace(config.providers["a"], url=f["a"].url)
        limits = ProviderLimits.from_config("a", entry)
        actor = ProviderActor("a", entry, None, limits, scheduler.on_outcome, clock=clock)
        scheduler.add_provider(actor)
        jobs = [scheduler.submit(_request(i, timeout_s=1.0), client="c") for i in range(10)]
        assert all(job.state == "running" for job in jobs)  # handed over, in the inbox
        clock.advance(1.5)  # the deadlines pass before the actor takes them
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(actor.run)
                for job in jobs:
                    await job.done.wait()
                tg.cancel_scope.cancel()
        actor.close()
        assert f["a"].stats.requests == 0
    assert limits.bucket.available(clock.now) == 60
    assert limits.circuit.state == "closed"
    assert limits.failed == 0
    assert {job.outcome.code for job in jobs if isinstance(job.outcome, Exception)} == {"timeout"}


# -- Retry-After -------------------------------------------------------------------------


async def test_a_huge_retry_after_blocks_at_most_an_hour(log_output: Any) -> None:
    """Retry-After: 99999999 holds the provider and the job's retry for at most an hour, and
    says so in the log once."""
    clock = FakeClock()
    scheduler, _ = _scheduler(_config(a=2, b=1, per_provider=3), clock)
    limits = scheduler.limits["a"]
    jobs = [scheduler.submit(_request(i), client="c", uid=0) for i in range(2)]
    assert [job.provider for job in jobs] == ["a", "a"]
    for job in jobs:  # both were sent before the first 429 came back
        huge = UpstreamError("rate_limited", "slow down", status=429, retry_after_s=99_999_999)
        scheduler.on_outcome(job, "a", huge)
        assert 3000 < limits.blocked_until - clock.now <= 3600
        assert job.holds["a"] - clock.now <= 3600
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    capped = [line for line in lines if line["event"] == "provider.retry_after_capped"]
    assert len(capped) == 1
    assert capped[0]["provider"] == "a"
    assert capped[0]["retry_after_s"] == 99_999_999
    assert capped[0]["cap_s"] == 3600


def test_a_reload_ends_a_block() -> None:
    """ProviderLimits.apply (SIGHUP) clears a Retry-After block: the provider is ready."""
    config = _config(a=1).providers["a"]
    limits = ProviderLimits.from_config("a", config)
    limits.block(1000.0 + 3600)
    assert not limits.can_start(1000.0)
    limits.apply(config, enabled=True, problem=None)
    assert limits.can_start(1000.0)


async def test_retry_after_from_an_upstream_is_capped_and_cleared_by_reload(
    start_daemon: Any,
) -> None:
    """Through a real daemon: a 429 with Retry-After 99999999 blocks the provider for at most
    an hour (the job falls back), and a reload makes it ready again."""
    async with fakes(a=Behaviour(name="a"), b=Behaviour(name="b")) as f:
        f["a"].script(Fault(kind="status", status=429, retry_after=99_999_999))
        config = build_config(
            {"a": provider_entry(f["a"]), "b": provider_entry(f["b"])},
            classes={"default": ["a", "b"]},
        )
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(5):
                reply = await client.call(chat("first", providers=["a", "b"]))
                assert isinstance(reply, Result)
                assert reply.provider == "b"
                status = running.daemon.scheduler.status()
                assert 3000 < status.providers["a"].blocked_for_s <= 3600
                await running.daemon.apply(config)
                status = running.daemon.scheduler.status()
                assert status.providers["a"].state == "ready"
                assert status.providers["a"].blocked_for_s == 0
                again = await client.call(chat("second", providers=["a"]))
        assert isinstance(again, Result)
        assert again.provider == "a"


# -- an attempt that raises --------------------------------------------------------------


async def test_a_key_with_a_newline_fails_the_job_not_the_actor(start_daemon: Any) -> None:
    """A key that aiohttp refuses (a second line) fails its job with one clear error; the
    actor is not restarted and the next job, to a healthy provider, is answered."""
    async with fakes(bad=Behaviour(name="bad"), good=Behaviour(name="good")) as f:
        config = build_config(
            {"bad": provider_entry(f["bad"]), "good": provider_entry(f["good"])},
            classes={"default": ["bad", "good"]},
        )
        async with start_daemon(config) as running, running.client() as client:
            actor = running.daemon.actors["bad"]
            actor.reconfigure(actor.config, "key-line-one\n# a comment")
            with anyio.fail_after(5):
                failed = await client.call(chat("to the bad one", providers=["bad"]))
                answered = await client.call(chat("to the good one", providers=["good"]))
                fallback = await client.call(chat("either", providers=["bad", "good"]))
            restarts = dict(running.daemon.supervisor.restarts)
            circuit = running.daemon.scheduler.limits["bad"].circuit.state
    assert isinstance(failed, Error)
    assert failed.code == "upstream_failed"
    assert "ValueError" in failed.message
    assert "key-line-one" not in failed.message
    assert isinstance(answered, Result)
    assert answered.provider == "good"
    assert isinstance(fallback, Result)
    assert fallback.provider == "good"
    assert restarts.get("bad", 0) == 0
    assert circuit == "closed"
    assert f["bad"].stats.requests == 0
