"""Supervision: restart with backoff, readiness once, restart intensity, jobs handed back."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from dispatcher.contract.config import ProviderConfig
from dispatcher.contract.errors import Cancelled
from dispatcher.contract.protocol import ChatRequest, Chunk
from dispatcher.core.outcomes import AttemptCrashed
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers.actor import Answer, Outcome, ProviderActor
from dispatcher.providers.supervisor import ChildSpec, RestartIntensityExceeded, Supervisor
from dispatcher.scheduler.job import Job
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import fakes

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("log_output")]  # quiet, fast logs


class Crash(Exception):
    """What the flaky child raises."""


class FlakyChild:
    """Reports ready, then crashes its first ``crashes`` runs; the next run returns."""

    def __init__(self, crashes: int, *, ready_first: bool = True) -> None:
        self.crashes = crashes
        self.ready_first = ready_first
        self.runs = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        if self.ready_first or self.runs > self.crashes:
            task_status.started()
        if self.runs <= self.crashes:
            raise Crash(f"run {self.runs} crashed")


class Readiness:
    """A task status that counts how often readiness is reported."""

    def __init__(self) -> None:
        self.reports = 0

    def started(self, value: None = None) -> None:
        self.reports += 1


class FakeTime:
    """A clock that only moves when told to, and a sleep that records and advances it."""

    def __init__(self, step_per_sleep: float = 0.0) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.step = step_per_sleep
        self.slept = anyio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.step
        self.slept.set()


def supervisor(time: FakeTime, **kwargs: Any) -> Supervisor:
    return Supervisor(clock=time.clock, sleep=time.sleep, **kwargs)


async def test_crashed_child_is_restarted_until_it_runs_clean() -> None:
    """A child that crashes twice is started a third time and its clean return ends supervision."""
    time = FakeTime()
    child = FlakyChild(crashes=2)
    sup = supervisor(time)
    with anyio.fail_after(5):
        await sup.supervise(ChildSpec(name="flaky", child=child))
    assert child.runs == 3
    assert sup.restarts["flaky"] == 2
    assert len(time.sleeps) == 2


async def test_readiness_is_reported_once_across_restarts() -> None:
    """Readiness reaches the parent once, even though each restarted run reports it again."""
    time = FakeTime()
    ready = Readiness()
    with anyio.fail_after(5):
        await supervisor(time).supervise(
            ChildSpec(name="flaky", child=FlakyChild(crashes=3)), task_status=ready
        )
    assert ready.reports == 1


async def test_readiness_waits_for_a_restart_when_the_first_run_crashed_early() -> None:
    """A child that crashes before it is ready is reported ready once a restart gets there."""
    time = FakeTime()
    child = FlakyChild(crashes=1, ready_first=False)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor(time).supervise, ChildSpec(name="late", child=child))
            assert child.runs == 2


async def test_backoff_grows_between_restarts() -> None:
    """Each restart within the window waits longer, jittered within [delay/2, delay]."""
    time = FakeTime()
    sup = supervisor(time, max_restarts=10, backoff_base_s=0.1, backoff_max_s=0.5)
    with anyio.fail_after(5):
        await sup.supervise(ChildSpec(name="flaky", child=FlakyChild(crashes=4)))
    ceilings = [0.1, 0.2, 0.4, 0.5]
    assert len(time.sleeps) == 4
    for slept, ceiling in zip(time.sleeps, ceilings, strict=True):
        assert ceiling / 2 <= slept <= ceiling


async def test_restart_intensity_exceeded_raises() -> None:
    """More crashes than max_restarts within the window raise RestartIntensityExceeded."""
    time = FakeTime()
    child = FlakyChild(crashes=1000)
    handed_back: list[int] = []
    spec = ChildSpec(name="doomed", child=child, on_crash=lambda: handed_back.append(child.runs))
    with anyio.fail_after(5), pytest.raises(RestartIntensityExceeded, match="doomed"):
        await supervisor(time, max_restarts=3, window_s=60.0).supervise(spec)
    assert child.runs == 4
    assert handed_back == [1, 2, 3, 4]  # every crash handed its jobs back, the last one too


async def test_crashes_spread_beyond_the_window_do_not_add_up() -> None:
    """Crashes further apart than window_s never reach the restart limit."""
    time = FakeTime(step_per_sleep=100.0)
    child = FlakyChild(crashes=8)
    with anyio.fail_after(5):
        await supervisor(time, max_restarts=3, window_s=60.0).supervise(
            ChildSpec(name="rare", child=child)
        )
    assert child.runs == 9


# -- the provider actor hands its jobs back ----------------------------------------------


def make_job(job_id: str, *, stream: bool = False) -> Job:
    request = ChatRequest(
        id=f"req-{job_id}", messages=[{"role": "user", "content": f"text {job_id}"}], stream=stream
    )
    return Job(
        id=job_id,
        request=request,
        kind="chat",
        klass="default",
        eligible=("p",),
        client="0:1",
        uid=0,
        prompt_tokens=5,
        accepted_at=0.0,
    )


class Reports:
    """The actor's report callback: records (job id, outcome) and wakes waiters."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Outcome]] = []
        self._changed = anyio.Event()

    def __call__(self, job: Job, provider: str, outcome: Outcome) -> None:
        self.seen.append((job.id, outcome))
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.seen) < count:
            await self._changed.wait()


def make_actor(url: str, reports: Reports) -> ProviderActor:
    config = ProviderConfig(url=url, model="m", concurrency=4)
    return ProviderActor("p", config, None, ProviderLimits.from_config("p", config), reports)


def test_hand_back_returns_every_job_waiting_in_the_inbox() -> None:
    """After a crash, jobs still in the actor's inbox go back with no outcome, none dropped."""
    reports = Reports()
    actor = make_actor("http://127.0.0.1:9/v1/chat/completions", reports)
    jobs = [make_job(f"j{i}") for i in range(3)]
    for job in jobs:
        assert actor.deliver(job)
    actor.hand_back()
    actor.close()
    assert reports.seen == [("j0", None), ("j1", None), ("j2", None)]


async def test_an_attempt_that_raises_fails_its_job_and_the_actor_keeps_serving() -> None:
    """An exception from an attempt (here the chunk sink) is that job's failure: the actor is
    not restarted and serves the next job."""
    reports = Reports()
    time = FakeTime()
    async with fakes(p=Behaviour(name="p", latency_s=0.05, stream_chunk_interval_s=0.01)) as f:
        actor = make_actor(f["p"].url, reports)
        crashing = make_job("crasher", stream=True)

        async def explode(_chunk: Chunk) -> None:
            raise Crash("the chunk sink broke")

        crashing.on_chunk = explode
        spec = ChildSpec(name="p", child=actor, on_crash=actor.hand_back)
        sup = supervisor(time)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(sup.supervise, spec)
                assert actor.deliver(crashing)
                await reports.wait_for(1)
                assert actor.deliver(make_job("after"))
                await reports.wait_for(2)
                tg.cancel_scope.cancel()
        actor.close()
    crasher, failure = reports.seen[0]
    assert crasher == "crasher"
    assert isinstance(failure, AttemptCrashed)
    assert "Crash: the chunk sink broke" in failure.detail
    assert reports.seen[1][0] == "after"
    assert isinstance(reports.seen[1][1], Answer)
    assert sup.restarts.get("p", 0) == 0
    assert not time.sleeps


async def test_actor_crash_hands_back_the_running_job_and_restarts() -> None:
    """When the actor itself crashes (here its report callback raises), a job still running
    comes back with no outcome and the restarted actor serves the next job."""
    reports = Reports()
    time = FakeTime()

    def report(job: Job, provider: str, outcome: Outcome) -> None:
        reports(job, provider, outcome)
        if job.id == "bomb":
            raise Crash("the report callback broke")

    async with fakes(p=Behaviour(name="p", latency_s=0.05)) as f:
        actor = make_actor(f["p"].url, reports)
        actor._report = report
        spec = ChildSpec(name="p", child=actor, on_crash=actor.hand_back)
        sup = supervisor(time)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(sup.supervise, spec)
                f["p"].script(Fault(kind="hang"))
                assert actor.deliver(make_job("slow"))
                await f["p"].wait_until(lambda s: s.requests == 1)
                bomb = make_job("bomb")
                bomb.stop = Cancelled("stopped before it was sent")  # reports at once
                assert actor.deliver(bomb)
                await reports.wait_for(2)
                await time.slept.wait()  # crashed, handed back, backed off: now restarting
                assert actor.deliver(make_job("after"))
                await reports.wait_for(3)
                tg.cancel_scope.cancel()
        actor.close()
    assert reports.seen[0][0] == "bomb"
    assert reports.seen[1] == ("slow", None)
    assert reports.seen[2][0] == "after"
    assert isinstance(reports.seen[2][1], Answer)
    assert sup.restarts["p"] == 1
