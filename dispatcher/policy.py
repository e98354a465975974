"""The pure decision core: classify a job, plan who runs what now, judge a failure.

Nothing here awaits or reads a clock; every function takes ``now``. The
scheduler's async shell carries out what these functions return.

Planning is earliest-expected-completion: jobs are taken in priority and
fairness order, and each goes, on paper, to the eligible provider where it
would finish first given that provider's free slots, tokens (returning 60 s
after use), Retry-After block, circuit and observed latency. Only the jobs whose
best start is *now* are sent; the rest stay queued in the daemon. So every
provider is kept busy up to its limits, and a slow provider takes a job only
when the fast ones could not finish it sooner.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from dispatcher.circuit import CircuitBreaker
from dispatcher.config import ClassPolicy, Config, ProviderConfig, RetryConfig
from dispatcher.errors import (
    ContextTooLong,
    DispatcherError,
    NoProvider,
    QuotaExhausted,
    Timeout,
    UpstreamError,
    UpstreamFailed,
)
from dispatcher.jobs import Job
from dispatcher.limits import DailyBudget, RateLearner, TokenBucket, WindowCounter

EPSILON = 1e-6
# A provider counts a request when it arrives, a little after we sent it; tokens come
# back a second late so a request sent the moment one returns is never early.
RPM_WINDOW_S = 61.0
EXPIRY_SCAN = 64  # queued jobs checked for a hopeless deadline when nothing can start
LATENCY_ALPHA = 0.2  # weight of a new observation in the latency average


@dataclass(eq=False, slots=True)
class ProviderLimits:
    """The live limits of one provider: slots, bucket, block, circuit, latency.

    Owned by its provider actor; read by the planner. ``reserve`` and
    ``release`` are called synchronously when a job is handed over and when its
    attempt ends, so the planner never sees a slot or token twice.
    """

    name: str
    config: ProviderConfig
    bucket: TokenBucket
    circuit: CircuitBreaker
    learner: RateLearner | None = None
    enabled: bool = True
    problem: str | None = None  # why it is disabled, for status and errors
    latency_s: float = 1.0
    blocked_until: float = 0.0
    running: dict[str, float] = field(default_factory=dict)  # job id -> when it started
    ok: int = 0
    failed: int = 0
    rate_limited: int = 0
    sent: WindowCounter = field(default_factory=WindowCounter)  # requests in the last minute
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=200))  # service times
    daily: DailyBudget | None = None  # the provider's daily token quota, when it has one

    @classmethod
    def from_config(
        cls, name: str, config: ProviderConfig, *, failures: int = 5, cooldown_s: float = 30.0
    ) -> ProviderLimits:
        return cls(
            name=name,
            config=config,
            bucket=TokenBucket(config.rpm, window_s=RPM_WINDOW_S, burst=config.burst),
            circuit=CircuitBreaker(threshold=failures, cooldown_s=cooldown_s),
            learner=RateLearner() if config.rpm == 0 else None,
            latency_s=config.latency_s,
            daily=DailyBudget(config.daily_tokens) if config.daily_tokens else None,
        )

    def __repr__(self) -> str:
        return (
            f"<ProviderLimits {self.name} slots {len(self.running)}/{self.config.concurrency} "
            f"{self.bucket!r} {self.circuit.state}>"
        )

    def apply(self, config: ProviderConfig, *, enabled: bool, problem: str | None) -> None:
        """New settings from a reload; running attempts and spent tokens keep counting."""
        self.config = config
        self.bucket.set_rpm(config.rpm if config.rpm else self.bucket.rpm, burst=config.burst)
        if config.rpm:
            self.learner = None
        elif self.learner is None:
            self.learner = RateLearner()
            self.bucket.set_rpm(0)
        self.enabled, self.problem = enabled, problem

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def usable_slots(self, now: float) -> int:
        if not self.enabled:
            return 0
        return self.circuit.allowed_slots(now, self.config.concurrency)

    def free_now(self, now: float) -> int:
        """How many attempts could start at ``now``: free slots, tokens, no block."""
        if now < self.blocked_until:
            return 0
        slots = self.usable_slots(now) - self.in_flight
        return max(0, min(slots, self.bucket.available(now))) if slots > 0 else 0

    def can_start(self, now: float) -> bool:
        return self.free_now(now) > 0

    def reserve(self, job_id: str, now: float, tokens: int = 0) -> None:
        self.bucket.take(now)
        self.sent.add(now)
        if self.daily is not None:
            self.daily.spend(now, tokens)
        self.running[job_id] = now

    def fits_today(self, tokens: int, now: float) -> bool:
        return self.daily is None or self.daily.remaining(now) >= tokens

    def release(self, job_id: str) -> None:
        self.running.pop(job_id, None)

    def observe_latency(self, seconds: float) -> None:
        self.latency_s += LATENCY_ALPHA * (seconds - self.latency_s)
        self.recent.append(seconds)

    def hedge_after_s(self) -> float:
        """How long an attempt may run before it counts as slow: the 95th percentile of
        recent service times, and at least 1.2x the mean (twice it until 20 are known),
        so a tight distribution does not turn every small delay into a hedge."""
        if len(self.recent) < 20:
            return 2.0 * self.latency_s
        ordered = sorted(self.recent)
        return max(ordered[int(0.95 * (len(ordered) - 1))], 1.2 * self.latency_s)

    def block(self, until: float) -> None:
        self.blocked_until = max(self.blocked_until, until)

    def learn_from_429(self, now: float, *, had_retry_after: bool) -> None:
        """For a provider with no published limit, halve the rate it may use."""
        learner = self.learner
        if learner is not None and learner.should_learn(now, had_retry_after=had_retry_after):
            learner.on_rate_limited(max(self.sent.count(now), self.in_flight, 1))
            self.bucket.set_rpm(learner.bucket_rpm)

    def learn_from_success(self) -> None:
        if self.learner is not None and self.learner.rpm is not None:
            self.learner.on_success()
            self.bucket.set_rpm(self.learner.bucket_rpm)


# -- classification ------------------------------------------------------------------


def classify_chat(
    *,
    task: str | None,
    thinking: bool,
    pins: list[str] | None,
    prompt_tokens: int,
    max_tokens: int | None,
    config: Config,
    limits: Mapping[str, ProviderLimits],
) -> tuple[str, tuple[str, ...]]:
    """The job's class and the providers it may use, best first; or the client error why none."""
    klass = task or ("complex" if thinking else "default")
    policy: ClassPolicy | None = config.classes.get(klass)
    if pins:
        unknown = [p for p in pins if p not in config.providers]
        if unknown:
            raise NoProvider(
                f"unknown provider {', '.join(unknown)}; known providers: "
                f"{', '.join(sorted(config.providers))}"
            )
        names = list(dict.fromkeys(pins))
        wrong_kind = [p for p in names if config.providers[p].kind != "chat"]
        if wrong_kind:
            raise NoProvider(f"{', '.join(wrong_kind)} cannot take chat jobs (embeddings only)")
    elif policy is None:
        raise NoProvider(
            f"no class {klass!r} in the configuration; use one of {', '.join(config.classes)}"
        )
    else:
        names = list(policy.providers)

    enabled = [p for p in names if p in limits and limits[p].enabled]
    if not enabled:
        reasons = "; ".join(f"{p}: {_why_disabled(p, limits)}" for p in names)
        raise NoProvider(f"no enabled provider for class {klass!r} ({reasons})")
    if thinking:
        enabled = [p for p in enabled if config.providers[p].thinking]
        if not enabled:
            raise NoProvider(
                f"no enabled provider of class {klass!r} supports thinking; "
                "drop 'thinking' or pin a provider that has it"
            )
    needed = prompt_tokens + (max_tokens or 0)
    fitting = tuple(p for p in enabled if config.providers[p].context_window >= needed)
    if not fitting:
        largest = max(enabled, key=lambda p: config.providers[p].context_window)
        window = config.providers[largest].context_window
        raise ContextTooLong(
            f"the prompt needs about {needed:,} tokens but the largest window among "
            f"{', '.join(enabled)} is {window:,} ({largest}); shorten the prompt"
        )
    return klass, fitting


def classify_embed(
    pins: list[str] | None, config: Config, limits: Mapping[str, ProviderLimits]
) -> tuple[str, ...]:
    names = pins or [n for n, p in config.providers.items() if p.kind == "embed"]
    wrong = [p for p in names if p not in config.providers or config.providers[p].kind != "embed"]
    if wrong:
        raise NoProvider(f"{', '.join(wrong)} is not an embeddings provider")
    enabled = tuple(p for p in names if limits[p].enabled)
    if not enabled:
        reasons = "; ".join(f"{p}: {_why_disabled(p, limits)}" for p in names) or "none configured"
        raise NoProvider(f"no enabled embeddings provider ({reasons})")
    return enabled


def check_quota(
    eligible: tuple[str, ...], limits: Mapping[str, ProviderLimits], tokens: int, now: float
) -> None:
    """QuotaExhausted when no eligible provider has ``tokens`` left of its daily quota."""
    if any(limits[name].fits_today(tokens, now) for name in eligible):
        return
    soonest = min(eligible, key=lambda n: _frees_at(limits[n], tokens, now))
    wait = _frees_at(limits[soonest], tokens, now) - now
    raise QuotaExhausted(
        f"the daily token quota of {', '.join(eligible)} is used up; {soonest} has room for "
        f"this job again in {wait / 3600:.1f} h",
        retry_after_s=round(wait, 1),
    )


def _frees_at(state: ProviderLimits, tokens: int, now: float) -> float:
    return state.daily.frees_at(now, tokens) if state.daily is not None else now


def _why_disabled(name: str, limits: Mapping[str, ProviderLimits]) -> str:
    state = limits.get(name)
    return (state.problem if state else None) or "disabled"


def weighted_pick(policy: ClassPolicy, eligible: tuple[str, ...], rng: random.Random) -> str:
    """The seed's static weights: draw a provider regardless of how busy it is."""
    names = [p for p in eligible if policy.weights.get(p, 0) > 0] or list(eligible)
    weights = [policy.weights.get(p, 1.0) for p in names]
    return rng.choices(names, weights=weights)[0]


# -- planning ------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    assign: list[tuple[Job, str]] = field(default_factory=list)
    expired: list[Job] = field(default_factory=list)  # cannot start before their deadline
    wake_at: float | None = None  # replan then even if nothing happens


class _Paper:
    """A provider's future on paper: when its slots and tokens free up."""

    __slots__ = ("blocked", "latency", "limits", "slots", "tokens")

    def __init__(self, limits: ProviderLimits, now: float) -> None:
        self.limits = limits
        self.latency = limits.latency_s
        self.blocked = limits.blocked_until
        usable = limits.usable_slots(now)
        reopen = limits.circuit.reopens_at()
        if usable == 0 and reopen is not None:
            usable, self.blocked = 1, max(self.blocked, reopen)
        # An attempt past its expected end is assumed to need as long again as it has run
        # (at least a quarter of a service time): a hanging provider must not look almost free.
        ends = sorted(
            max(start + self.latency, now + max(0.25 * self.latency, now - start))
            for start in limits.running.values()
        )
        free = max(0, usable - len(ends))
        self.slots = [now] * free + ends[: max(0, usable - free)]
        heapq.heapify(self.slots)
        self.tokens: list[float] | None = None
        bucket = limits.bucket
        if bucket.rpm:
            ready = bucket.available(now)
            returning = bucket.return_times(now)
            first = bucket.next_free(now)  # later than now only under burst pacing
            self.tokens = [first] * min(ready, 1024) + [max(first, t) for t in returning]
            heapq.heapify(self.tokens)

    def start(self, now: float) -> float:
        if not self.slots:
            return math.inf
        at = max(now, self.slots[0], self.blocked)
        if self.tokens is not None:
            at = max(at, self.tokens[0]) if self.tokens else math.inf
        return at

    def commit(self, at: float) -> None:
        heapq.heapreplace(self.slots, at + self.latency)
        if self.tokens is not None and self.tokens:
            heapq.heapreplace(self.tokens, at + self.limits.bucket.window_s)


def plan(
    jobs: Iterable[Job],
    limits: Mapping[str, ProviderLimits],
    now: float,
    *,
    per_provider: int,
    retry_budget: int | None = None,
    wanted: Collection[str] | None = None,
    expiry_scan: int = EXPIRY_SCAN,
    max_scan: int = 4096,
) -> Plan:
    """Decide which queued jobs start now and where.

    ``jobs`` must come in the order they should be served (priority, then fair
    share). Stops as soon as no provider can start anything now, so a deep
    queue costs nothing while every provider is busy. ``retry_budget`` caps how
    many jobs that already had an attempt may start now (None: no cap), so a
    failing provider cannot multiply the load on the others. ``wanted`` names the
    providers some queued job may use: an idle provider nobody can use (the
    embeddings one during chat work) must not make every call read the queue.
    ``expiry_scan`` is how many jobs to check for a hopeless deadline when
    nothing can start (0: none; the deadline heap enforces deadlines anyway).
    """
    result = Plan()
    startable = {
        name: free
        for name, p in limits.items()
        if (wanted is None or name in wanted) and (free := p.free_now(now))
    }
    wake = _next_change(limits, now)
    # With nothing startable only the head of the queue is read, to fail fast the
    # jobs that cannot start before their deadline; a deep queue costs nothing then.
    limit = max_scan if startable else expiry_scan
    paper: dict[str, _Paper] = {}
    for scanned, job in enumerate(jobs):
        if scanned >= limit:
            break
        if not startable:
            limit = min(limit, scanned + expiry_scan)
            if job.deadline is None:
                continue
        is_retry = job.attempts > 0
        if is_retry and retry_budget is not None and retry_budget <= 0:
            continue
        best_name, best_at, best_end = None, math.inf, math.inf
        for name in job.candidates(per_provider):
            state = limits.get(name)
            if state is None or not state.enabled or not state.fits_today(job.prompt_tokens, now):
                continue
            sheet = paper.get(name)
            if sheet is None:
                sheet = paper[name] = _Paper(state, now)
            at = max(sheet.start(now), job.holds.get(name, now))
            end = at + sheet.latency
            if end < best_end - EPSILON:
                best_name, best_at, best_end = name, at, end
        if best_name is None:
            continue  # nothing can ever take it now; the scheduler fails it on its own check
        if job.deadline is not None and best_at > job.deadline:
            result.expired.append(job)
            continue
        hold = job.holds.get(best_name)
        if hold is not None and hold > now:
            wake = hold if wake is None else min(wake, hold)
        paper[best_name].commit(best_at)
        if best_at <= now + EPSILON and best_name in startable:
            result.assign.append((job, best_name))
            if is_retry and retry_budget is not None:
                retry_budget -= 1
            startable[best_name] -= 1
            if not startable[best_name]:
                del startable[best_name]
    result.wake_at = wake
    return result


def _next_change(limits: Mapping[str, ProviderLimits], now: float) -> float | None:
    """When a provider with a free slot next gets a token, its block lifts or its circuit reopens."""
    times: list[float] = []
    for state in limits.values():
        if not state.enabled:
            continue
        reopen = state.circuit.reopens_at()
        if reopen is not None:
            times.append(reopen)
            continue
        if state.in_flight < state.usable_slots(now):
            at = max(state.blocked_until, state.bucket.next_free(now))
            if at > now:
                times.append(at)
    return min(times) if times else None


# -- failures ------------------------------------------------------------------------


def backoff_s(failures: int, retry: RetryConfig, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, base * 2^(n-1)], capped."""
    ceiling = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** max(0, failures - 1))
    return rng.uniform(0.0, ceiling)


def judge_failure(
    job: Job,
    provider: str,
    error: UpstreamError,
    now: float,
    retry: RetryConfig,
    rng: random.Random,
) -> DispatcherError | None:
    """Update the job after a failed attempt; the final error, or None to queue it again."""
    job.history.append((provider, error))
    if error.kind == "stream_broken":
        return UpstreamFailed(
            f"{provider} broke the stream after it had started ({error.short()}); "
            "the partial answer above is all there is: send the request again"
        )
    count = job.failures[provider] = job.failures.get(provider, 0) + 1
    if not error.retryable or count >= retry.per_provider:
        job.excluded.add(provider)
    elif error.retry_after_s is not None:
        job.holds[provider] = now + error.retry_after_s
    else:
        job.holds[provider] = now + backoff_s(count, retry, rng)
    if job.deadline is not None and now >= job.deadline:
        return Timeout(
            f"the job's deadline passed after {describe_attempts(job)}; "
            "allow more time with timeout_s"
        )
    if job.attempts >= retry.max_attempts:
        return UpstreamFailed(f"gave up after {describe_attempts(job)}")
    if not job.candidates(retry.per_provider):
        return UpstreamFailed(f"every eligible provider failed: {describe_attempts(job)}")
    return None


def describe_attempts(job: Job) -> str:
    """One sentence naming every provider tried, how often and why: "hunyuan 3x (HTTP 500: ...)"."""
    if not job.history:
        return "no attempt"
    order: dict[str, list[UpstreamError]] = {}
    for name, error in job.history:
        order.setdefault(name, []).append(error)
    parts = []
    for name, errors in order.items():
        reasons = list(dict.fromkeys(e.short() for e in errors))
        parts.append(f"{name} {len(errors)}x ({'; '.join(reasons[-2:])})")
    total = len(job.history)
    return f"{total} attempt{'s' if total != 1 else ''}: " + ", ".join(parts)
