"""Rate limits as plain objects of explicit time: no clock inside, ``now`` is an argument.

* :class:`TokenBucket`: at most ``rpm`` requests in *any* sliding window: each
  token comes back ``window_s`` after it was spent, so "40 per minute" holds for
  every 60-second span, not just per calendar minute. An optional ``burst`` also
  paces requests continuously (a leaky bucket of that depth refilled at
  ``rpm / window_s``) for providers that enforce a smooth rate.
* :class:`RateLearner`: for providers with no published limit (``rpm = 0``),
  learns a safe rate from their 429s: multiplicative decrease, additive increase.
"""

from __future__ import annotations

import math
from collections import deque

UNLIMITED = 1 << 30


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


class RateLearner:
    """AIMD on the request rate of a provider whose limit is unknown.

    Starts unlimited. A lone 429 that came with a Retry-After is taken at its
    word (the caller waits it out) and teaches nothing; a second one within the
    window, or one without Retry-After, sets the rate to half of what was sent
    in the window (at least 1/min). Each success then adds ``1/rate``, so the
    rate grows by about one request per minute while nothing is refused.
    """

    __slots__ = ("_last_429", "ceiling", "rpm", "window_s")

    def __init__(self, *, ceiling: float = 10_000.0, window_s: float = 60.0) -> None:
        self.rpm: float | None = None
        self.ceiling = ceiling
        self.window_s = window_s
        self._last_429 = -math.inf

    def should_learn(self, now: float, *, had_retry_after: bool) -> bool:
        """Whether this 429 says something about the rate, not just a passing burst."""
        repeated = now - self._last_429 < self.window_s
        self._last_429 = now
        return repeated or not had_retry_after or self.rpm is not None

    def __repr__(self) -> str:
        rate = "unlimited" if self.rpm is None else f"{self.rpm:.1f}/min"
        return f"<RateLearner {rate}>"

    def on_rate_limited(self, sent_in_window: int) -> None:
        base = sent_in_window if self.rpm is None else min(self.rpm, sent_in_window)
        self.rpm = max(1.0, base / 2.0)

    def on_success(self) -> None:
        if self.rpm is not None:
            self.rpm = min(self.ceiling, self.rpm + 1.0 / self.rpm)

    @property
    def bucket_rpm(self) -> int:
        return 0 if self.rpm is None else max(1, math.floor(self.rpm))
