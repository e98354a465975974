"""One provider's live limits as the planner sees them: slots, bucket, block, circuit, latency."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from dispatcher.contract.config import ProviderConfig
from dispatcher.core.circuit import CircuitBreaker
from dispatcher.core.limits import (
    DailyBudget,
    LearnedLimit,
    LimitKind,
    LimitLearner,
    TokenBucket,
    WindowCounter,
)

# A provider counts a request when it arrives, a little after we sent it; tokens come
# back a second late so a request sent the moment one returns is never early.
RPM_WINDOW_S = 61.0
LATENCY_ALPHA = 0.2  # weight of a new observation in the latency average
# The window a provider counts its requests in, for reading a 429: the admitted sends in
# the 60 s before the refused one (the bucket's 61 s would count one too many at the edge;
# the sends are kept for 61 s, to seed the bucket when a limit is first learned).
UPSTREAM_WINDOW_S = 60.0
ENDED_KEPT = 64  # ended attempts remembered for the 429 that may follow their release


@dataclass(slots=True)
class _Send:
    """One request sent, as a 429 is read: when, in which order, and what it saw."""

    at: float
    seq: int
    in_flight: int  # attempts running once it started, itself included
    refused: bool = False


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
    learner: LimitLearner = field(default_factory=lambda: LimitLearner(window_s=RPM_WINDOW_S))
    enabled: bool = True
    problem: str | None = None  # why it is disabled, for status and errors
    latency_s: float = 1.0
    blocked_until: float = 0.0  # a Retry-After (or x-ratelimit reset) block
    deferred_until: float = 0.0  # a hold that is no failure: another host has the capacity
    retry_after_capped: bool = False  # an upstream's wait was cut to the cap (logged once)
    running: dict[str, float] = field(default_factory=dict)  # job id -> when it started
    ok: int = 0
    failed: int = 0
    rate_limited: int = 0
    sent: WindowCounter = field(default_factory=WindowCounter)  # requests in the last minute
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=200))  # service times
    daily: DailyBudget | None = None  # the provider's daily token quota, when it has one
    fleet_daily_used: int = 0  # tokens every host sharing the key charged in the last day
    # What a 429 is read against: the sends of the window (kept only while the rate is
    # learned) and each attempt's send, kept a little past its release for its verdict.
    _window: deque[_Send] = field(default_factory=deque, init=False, repr=False)
    _attempts: OrderedDict[str, _Send] = field(default_factory=OrderedDict, init=False, repr=False)
    _seq: int = field(default=0, init=False, repr=False)

    @classmethod
    def from_config(
        cls, name: str, config: ProviderConfig, *, failures: int = 5, cooldown_s: float = 30.0
    ) -> ProviderLimits:
        return cls(
            name=name,
            config=config,
            bucket=TokenBucket(config.rpm, window_s=RPM_WINDOW_S, burst=config.burst),
            circuit=CircuitBreaker(threshold=failures, cooldown_s=cooldown_s),
            learner=LimitLearner(learn_rate=config.rpm == 0, window_s=RPM_WINDOW_S),
            latency_s=config.latency_s,
            daily=DailyBudget(config.daily_tokens) if config.daily_tokens else None,
        )

    def __repr__(self) -> str:
        return (
            f"<ProviderLimits {self.name} slots {len(self.running)}/{self.concurrency} "
            f"{self.bucket!r} {self.circuit.state} {self.learner!r}>"
        )

    def apply(self, config: ProviderConfig, *, enabled: bool, problem: str | None) -> None:
        """New settings from a reload; running attempts and spent tokens keep counting.

        A Retry-After block ends: a reload is how an admin says "try it again now" (a new
        key, a raised quota), and the next 429 sets a new block if one is still meant.
        """
        self.config = config
        self.blocked_until = 0.0
        learner = self.learner
        learner.learn_rate = not config.rpm
        if config.rpm:  # a published rate always wins over a learned one
            learner.held, learner.probing_since = None, None
            self._window.clear()
        if learner.concurrency is not None:
            learner.concurrency = min(learner.concurrency, config.concurrency)
        self.bucket.set_rpm(config.rpm or learner.rpm or 0, burst=config.burst)
        self.enabled, self.problem = enabled, problem

    @property
    def in_flight(self) -> int:
        return len(self.running)

    @property
    def held_until(self) -> float:
        """Nothing starts before this: a Retry-After block or a deferral, whichever ends later."""
        return max(self.blocked_until, self.deferred_until)

    @property
    def concurrency(self) -> int:
        """The slots the key allows: the config's, or fewer where a lower limit was learned."""
        learned = self.learner.concurrency
        return self.config.concurrency if learned is None else min(learned, self.config.concurrency)

    def usable_slots(self, now: float) -> int:
        if not self.enabled:
            return 0
        return self.circuit.allowed_slots(now, self.concurrency)

    def free_now(self, now: float, *, probe: bool = False) -> int:
        """How many attempts could start at ``now``: free slots, tokens, no block.

        ``probe``: the caller has a job waiting for this provider, so when only the
        learned rate stops it, one probe above that rate may go (see :meth:`may_probe`).
        """
        self._settle(now)
        if now < self.held_until:
            return 0
        slots = self.usable_slots(now) - self.in_flight
        if slots <= 0:
            return 0
        tokens = self.bucket.available(now)
        if not tokens and probe and self.may_probe(now):
            tokens = 1
        return min(slots, tokens)

    def can_start(self, now: float) -> bool:
        return self.free_now(now) > 0

    def may_probe(self, now: float) -> bool:
        """Whether one request above the learned rate may go now, to find a higher limit.

        Only when the learned rate is what holds jobs back (no token left), at most once a
        window, never right after a 429. The planner asks only for providers with demand.
        """
        return (
            bool(self.bucket.rpm) and not self.bucket.available(now) and self.learner.may_probe(now)
        )

    def on_probe_sent(self, now: float) -> None:
        """One probe goes now: the bucket allows one more request per window until it settles."""
        self.learner.on_probe_sent(now)
        self._sync_rate()

    def probe_opens_at(self) -> float | None:
        """When a probe may next go, if jobs wait for this provider's tokens then."""
        return self.learner.probe_opens_at()

    def reserve(self, job_id: str, now: float, tokens: int = 0) -> None:
        self._settle(now)
        if self.may_probe(now):  # planned on the probe's token (free_now(probe=True))
            self.on_probe_sent(now)
        self.bucket.take(now)
        self.sent.add(now)
        if self.daily is not None:
            self.daily.spend(now, tokens)
        self.running[job_id] = now
        self._seq += 1
        send = _Send(now, self._seq, len(self.running))
        self._attempts[job_id] = send
        self._attempts.move_to_end(job_id)
        while len(self._attempts) > max(ENDED_KEPT, 2 * len(self.running)):
            self._attempts.popitem(last=False)
        if self.learner.learn_rate:
            self._window.append(send)
            while self._window and self._window[0].at + self.bucket.window_s <= now:
                self._window.popleft()

    def give_back(self, job_id: str) -> None:
        """The attempt reserved for ``job_id`` never went out (the fleet's ledger said no):
        its token comes back and a later 429 is not read as if it had been sent."""
        send = self._attempts.pop(job_id, None)
        if send is None:
            return
        self.bucket.give_back(send.at)
        if send in self._window:
            self._window.remove(send)

    def fits_today(self, tokens: int, now: float) -> bool:
        """Room in the daily quota: by this daemon's count and by the fleet's, if shared."""
        if self.daily is None:
            return True
        fleet_left = self.daily.limit - self.fleet_daily_used
        return min(self.daily.remaining(now), fleet_left) >= tokens

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

    def defer(self, until: float) -> None:
        """Hold the whole provider until ``until`` without calling it a failure or a block."""
        self.deferred_until = max(self.deferred_until, until)

    def undefer(self) -> None:
        self.deferred_until = 0.0

    def learn_from_429(
        self, now: float, *, job_id: str | None = None, limit_kind: LimitKind | None = None
    ) -> None:
        """Read a 429 for ``job_id``'s attempt: a concurrency limit when the body says so,
        else (with no published rpm) a rate: the sends the provider admitted in the window
        before the refused one."""
        send = self._attempts.get(job_id) if job_id is not None else None
        if send is not None:
            send.refused = True
        learner = self.learner
        if limit_kind == "concurrency":
            in_flight = send.in_flight if send is not None else self.in_flight + 1
            learner.on_concurrency_429(
                in_flight, self.config.concurrency, now, source="a concurrency 429"
            )
            return
        if not learner.learn_rate:
            return
        horizon = (send.at if send is not None else now) - UPSTREAM_WINDOW_S
        before = send.seq if send is not None else self._seq + 1
        admitted = sum(
            1 for s in self._window if s.at > horizon and s.seq < before and not s.refused
        )
        if send is None:
            admitted -= 1  # the refused one is among the sends counted
        source = "a rate 429" if limit_kind == "rate" else "a 429"
        if learner.on_rate_429(admitted, now, source=source):
            self._sync_rate()

    def learn_from_headers(self, limit: int | None, reset_s: float | None, now: float) -> None:
        """``x-ratelimit-limit-requests``, where sent, states the rate before any 429. A reset
        longer than the window means a longer period (Groq's counts per day): not a rate."""
        if limit is None or (reset_s is not None and reset_s > self.bucket.window_s):
            return
        if self.learner.on_headers(limit, now):
            self._sync_rate()

    def learned(self) -> LearnedLimit | None:
        """What was learned about this key, for status, persistence and other hosts."""
        return self.learner.snapshot()

    def restore_learned(self, learned: LearnedLimit) -> None:
        """Apply a limit learned earlier (before a restart, or by another host) as if just
        learned here; a published rpm still wins, a concurrency never exceeds the config."""
        self.learner.restore(learned, self.config.concurrency)
        self._sync_rate()

    def _settle(self, now: float) -> None:
        if self.learner.settle(now):
            self._sync_rate()

    def _sync_rate(self) -> None:
        if not self.learner.learn_rate:
            return
        was_unlimited = not self.bucket.rpm
        self.bucket.set_rpm(self.learner.rpm or 0)
        if was_unlimited:  # the sends made while nothing was known count against the limit
            self.bucket.spent_before([s.at for s in self._window])
