"""Rate limits as plain objects of explicit time: no clock inside, ``now`` is an argument.

* :class:`TokenBucket`: at most ``rpm`` requests in *any* sliding window: each
  token comes back ``window_s`` after it was spent, so "40 per minute" holds for
  every 60-second span, not just per calendar minute. An optional ``burst`` also
  paces requests continuously (a leaky bucket of that depth refilled at
  ``rpm / window_s``) for providers that enforce a smooth rate.
* :class:`LimitLearner`: for limits nobody published (``rpm = 0``, or a concurrency
  the config overstates), learns them from 429s and ``x-ratelimit-*`` headers; what it
  learned travels as a :class:`LearnedLimit` (status, persistence, other hosts).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

UNLIMITED = 1 << 30
LimitKind = Literal["rate", "concurrency"]  # which limit a 429 says was hit


class TokenBucket:
    """Tokens that return ``window_s`` after use, optionally paced by a leaky bucket."""

    __slots__ = ("_level", "_level_at", "_spent", "burst", "rpm", "window_s")

    def __init__(self, rpm: int, *, window_s: float = 60.0, burst: int = 0) -> None:
        self.rpm = rpm
        self.window_s = window_s
        self.burst = burst
        self._spent: deque[float] = deque()
        self._level = float(burst)  # pacing tokens left, when burst > 0
        self._level_at = -math.inf

    def __repr__(self) -> str:
        limit = "unlimited" if not self.rpm else f"{len(self._spent)}/{self.rpm} spent"
        pace = f" burst {self.burst}" if self.burst else ""
        return f"<TokenBucket {limit} per {self.window_s:g}s{pace}>"

    def copy(self) -> TokenBucket:
        clone = TokenBucket(self.rpm, window_s=self.window_s, burst=self.burst)
        clone._spent = self._spent.copy()
        clone._level, clone._level_at = self._level, self._level_at
        return clone

    def set_rpm(self, rpm: int, *, burst: int | None = None) -> None:
        """Change the limit in place; tokens already spent keep counting (reload, learning)."""
        self.rpm = rpm
        if burst is not None:
            self.burst = burst
            self._level = min(self._level, float(burst))

    def _expire(self, now: float) -> None:
        # ``t + window <= now``, the same sum next_free() reports, so a token is back
        # exactly when next_free() said (``t <= now - window`` can differ by rounding).
        spent, window = self._spent, self.window_s
        while spent and spent[0] + window <= now:
            spent.popleft()

    def _paced_level(self, now: float) -> float:
        if self._level_at == -math.inf:
            return float(self.burst)
        rate = self.rpm / self.window_s
        return min(float(self.burst), self._level + (now - self._level_at) * rate)

    def available(self, now: float) -> int:
        """Tokens that may be spent right now."""
        if not self.rpm:
            return UNLIMITED
        self._expire(now)
        free = self.rpm - len(self._spent)
        if self.burst:
            free = min(free, int(self._paced_level(now)))
        return max(free, 0)

    def next_free(self, now: float) -> float:
        """The earliest time at or after ``now`` when one token is available."""
        if not self.rpm:
            return now
        self._expire(now)
        at = now
        if len(self._spent) >= self.rpm:
            at = self._spent[len(self._spent) - self.rpm] + self.window_s
        if self.burst:
            level = self._paced_level(now)
            if level < 1.0:
                at = max(at, now + (1.0 - level) * self.window_s / self.rpm)
        return at

    def take(self, now: float) -> None:
        """Spend one token at ``now`` (the caller checked :meth:`available`)."""
        if not self.rpm:
            return
        self._spent.append(now)
        if self.burst:
            self._level = self._paced_level(now) - 1.0
            self._level_at = now

    def give_back(self, at: float) -> None:
        """Return the token spent at ``at``: its request never went out (a fleet denial)."""
        spent = self._spent
        for i in range(len(spent) - 1, -1, -1):  # the spend is recent: search from the end
            if spent[i] == at:
                del spent[i]
                if self.burst:
                    self._level = min(float(self.burst), self._level + 1.0)
                return

    def spent_before(self, times: list[float]) -> None:
        """Count spends made while the bucket was unlimited (a limit just learned), oldest
        first, so the new limit already sees the window's traffic."""
        if self.rpm and not self._spent:
            self._spent.extend(times)

    def return_times(self, now: float) -> list[float]:
        """When the tokens spent in the current window come back, earliest first."""
        self._expire(now)
        return [t + self.window_s for t in self._spent]


class DailyBudget:
    """Tokens per rolling day (``daily_tokens``): each use comes back ``window_s`` later."""

    __slots__ = ("_total", "_used", "limit", "window_s")

    def __init__(self, limit: int, *, window_s: float = 86_400.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._used: deque[tuple[float, int]] = deque()
        self._total = 0

    def __repr__(self) -> str:
        return f"<DailyBudget {self._total}/{self.limit} tokens>"

    def _expire(self, now: float) -> None:
        used = self._used
        while used and used[0][0] + self.window_s <= now:
            self._total -= used.popleft()[1]

    def remaining(self, now: float) -> int:
        self._expire(now)
        return max(0, self.limit - self._total)

    def spend(self, now: float, tokens: int) -> None:
        """Record a use (negative: a correction once the real count is known)."""
        self._used.append((now, tokens))
        self._total += tokens

    def frees_at(self, now: float, tokens: int) -> float:
        """When ``tokens`` more will fit, if nothing else is spent meanwhile."""
        missing = tokens - self.remaining(now)
        for at, spent in self._used:
            if missing <= 0:
                break
            missing -= spent
            now = at + self.window_s
        return now


class WindowCounter:
    """Events in the last ``window_s``, in one-second bins: bounded memory at any rate."""

    __slots__ = ("_bins", "window_s")

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._bins: deque[list[float]] = deque()  # [second, count]

    def __repr__(self) -> str:
        return f"<WindowCounter {self.count(self._bins[-1][0] if self._bins else 0.0)}>"

    def add(self, now: float) -> None:
        second = math.floor(now)
        if self._bins and self._bins[-1][0] == second:
            self._bins[-1][1] += 1
        else:
            self._bins.append([second, 1])

    def count(self, now: float) -> int:
        bins = self._bins
        while bins and bins[0][0] + 1 + self.window_s <= now:
            bins.popleft()
        return int(sum(c for _, c in bins))


@dataclass(frozen=True, slots=True)
class LearnedLimit:
    """What a provider's key was found to allow, and from what: one observation's worth."""

    rpm: int | None  # requests per window; None: the rate is not learned
    concurrency: int | None  # attempts at once; None: not learned (the config holds)
    source: str  # a few words: "a 429", "x-ratelimit headers", "a concurrency 429"
    at: float  # the ``now`` of the observation (monotonic within one process)
    confirmed: bool  # a second observation agreed (the rate's, when one is learned)


HEADERS_SOURCE = "x-ratelimit headers"  # a limit the provider stated: no probing above it
PROBE_BACKOFF_MAX = 16  # windows between probes after repeated refusals, at most


class LimitLearner:
    """Learns the limits of a key that nobody published, from what the provider says.

    The model is a fixed sliding-window quota, which refuses the first request past
    it: so the first 429 says where the wall is, namely the requests the provider
    admitted in the trailing window (:meth:`on_rate_429` takes that count). The
    learner holds it as the rate at once; a second refusal at that count or lower
    confirms it. While jobs wait for tokens the caller may probe upward, one extra
    request per window at most (:meth:`may_probe`, :meth:`on_probe_sent`): a window
    that passes with no 429 raises the held rate by one, a 429 puts it back and
    doubles the wait before the next probe. ``x-ratelimit-*`` headers state the
    rate outright (no probing then). A 429 whose body says "concurrency" teaches a
    slot limit instead and leaves the rate alone. With ``learn_rate`` off (the
    config publishes an rpm, which always wins) only concurrency is learned.
    """

    __slots__ = (
        "_last_429",
        "_next_probe_at",
        "_probe_wait",
        "concurrency",
        "concurrency_confirmed",
        "concurrency_seen",
        "confirmed",
        "held",
        "learn_rate",
        "probing_since",
        "rate_seen",
        "window_s",
    )

    def __init__(self, *, learn_rate: bool = True, window_s: float = 60.0) -> None:
        self.learn_rate = learn_rate
        self.window_s = window_s
        self.held: int | None = None  # the rate the evidence supports
        self.confirmed = False
        self.probing_since: float | None = None  # one extra request per window since then
        self.concurrency: int | None = None
        self.concurrency_confirmed = False
        # (source, at) of the observation behind each limit, for status and hand-over
        self.rate_seen: tuple[str, float] | None = None
        self.concurrency_seen: tuple[str, float] | None = None
        self._last_429 = -math.inf
        self._next_probe_at = math.inf
        self._probe_wait = 1  # windows to wait before the next probe

    def __repr__(self) -> str:
        if self.held is None:
            rate = "rate unknown" if self.learn_rate else "rate published"
        else:
            state = "confirmed" if self.confirmed else "unconfirmed"
            probe = " probing +1" if self.probing_since is not None else ""
            rate = f"{self.held}/min {state}{probe}"
        slots = "" if self.concurrency is None else f" concurrency {self.concurrency}"
        source = f" from {self.source}" if self.source else ""
        return f"<LimitLearner {rate}{slots}{source}>"

    @property
    def rpm(self) -> int | None:
        """The rate the bucket may use now: the held one, plus one while a probe runs."""
        if self.held is None:
            return None
        return self.held + (self.probing_since is not None)

    @property
    def tentative(self) -> bool:
        """A learned rate that no second observation backs yet: too weak to fail a job on."""
        return self.held is not None and not self.confirmed

    @property
    def source(self) -> str:
        """What the latest observation was ("a 429", "x-ratelimit headers"); "" before any."""
        return self._latest()[0]

    @property
    def at(self) -> float:
        return self._latest()[1]

    def _latest(self) -> tuple[str, float]:
        seen = [x for x in (self.rate_seen, self.concurrency_seen) if x is not None]
        return max(seen, key=lambda x: x[1]) if seen else ("", -math.inf)

    def _from_headers(self) -> bool:
        return self.rate_seen is not None and self.rate_seen[0] == HEADERS_SOURCE

    def on_rate_429(self, admitted: int, now: float, *, source: str = "a 429") -> bool:
        """A rate refusal after ``admitted`` requests in the window; whether the rate changed."""
        self._last_429 = now
        if not self.learn_rate or admitted < 1:
            return False  # nothing admitted: a passing block, or someone else's traffic
        if self.held is None:
            self.held, self.confirmed = admitted, False
            self._next_probe_at = now + self.window_s  # hold it one window first
            self.rate_seen = (source, now)
            return True
        before = self.rpm
        if self.probing_since is not None:  # the probe found the wall: back to the held rate
            self.probing_since = None
            self._probe_wait = min(PROBE_BACKOFF_MAX, 2 * self._probe_wait)
        if not self._from_headers():
            self._next_probe_at = now + self._probe_wait * self.window_s
        if admitted <= self.held:
            if admitted < self.held or not self.confirmed:
                self.rate_seen = (source, now)
            self.held, self.confirmed = admitted, True
        return self.rpm != before

    def on_headers(self, limit: int, now: float) -> bool:
        """The provider stated its limit; whether the rate changed."""
        if not self.learn_rate or limit < 1:
            return False
        if self.held == limit and self._from_headers():
            return False
        self.held, self.confirmed, self.probing_since = limit, True, None
        self._next_probe_at = math.inf  # the provider said so: nothing to find out
        self.rate_seen = (HEADERS_SOURCE, now)
        return True

    def on_concurrency_429(self, in_flight: int, ceiling: int, now: float, *, source: str) -> bool:
        """A concurrency refusal with ``in_flight`` attempts running (the refused one
        included): the limit is one less, never above ``ceiling``; whether it changed."""
        seen = max(1, min(ceiling, in_flight - 1))
        if self.concurrency is not None and seen > self.concurrency:
            return False
        changed = seen != self.concurrency
        self.concurrency_confirmed = self.concurrency is not None
        self.concurrency = seen
        self.concurrency_seen = (source, now)
        return changed

    def settle(self, now: float) -> bool:
        """A probe that saw a whole window pass without a 429 raises the held rate by one."""
        since = self.probing_since
        if since is None or now < since + self.window_s or self.held is None:
            return False
        self.probing_since = None
        if self._last_429 >= since:
            return False
        # The limit is above what was held: the estimate is a floor again, not confirmed.
        self.held, self.confirmed, self._probe_wait = self.held + 1, False, 1
        self._next_probe_at = now
        self.rate_seen = ("probing", now)
        return True

    def may_probe(self, now: float) -> bool:
        """Whether one extra request may go out now (the caller knows there is demand)."""
        return (
            self.learn_rate
            and self.held is not None
            and self.probing_since is None
            and now >= self._next_probe_at
        )

    def on_probe_sent(self, now: float) -> None:
        self.probing_since = now

    def probe_opens_at(self) -> float | None:
        """When :meth:`may_probe` turns true, if nothing else happens first."""
        if not self.learn_rate or self.held is None or self.probing_since is not None:
            return None
        return self._next_probe_at if math.isfinite(self._next_probe_at) else None

    def snapshot(self) -> LearnedLimit | None:
        """Both limits in one record: its source and time are the latest observation's,
        ``confirmed`` the rate's when a rate is learned, else the concurrency's."""
        if self.held is None and self.concurrency is None:
            return None
        confirmed = self.confirmed if self.held is not None else self.concurrency_confirmed
        source, at = self._latest()
        return LearnedLimit(self.held, self.concurrency, source, at, confirmed)

    def restore(self, learned: LearnedLimit, ceiling: int) -> None:
        """Take ``learned`` as if it had just been observed (after a restart, from a peer);
        ``learned.at`` must be on this process's clock. A published rate ignores its rpm."""
        seen = (learned.source, learned.at)
        if learned.rpm is not None and self.learn_rate:
            self.held, self.confirmed, self.probing_since = learned.rpm, learned.confirmed, None
            self.rate_seen = seen
            self._next_probe_at = math.inf if self._from_headers() else learned.at + self.window_s
        if learned.concurrency is not None:
            self.concurrency = max(1, min(ceiling, learned.concurrency))
            self.concurrency_confirmed = learned.confirmed
            self.concurrency_seen = seen
