"""One provider's live limits as the planner sees them: slots, bucket, block, circuit, latency."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dispatcher.contract.config import ProviderConfig
from dispatcher.core.circuit import CircuitBreaker
from dispatcher.core.limits import DailyBudget, RateLearner, TokenBucket, WindowCounter

# A provider counts a request when it arrives, a little after we sent it; tokens come
# back a second late so a request sent the moment one returns is never early.
RPM_WINDOW_S = 61.0
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
