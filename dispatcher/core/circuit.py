"""A per-provider circuit breaker: a pure state machine of explicit time.

closed -> open after ``threshold`` consecutive failures that say the provider
is sick; open -> half_open after ``cooldown_s``, when one probe may go; a good
probe starts a ramp that doubles the usable slots per success instead of
releasing every waiting job at once; a bad probe reopens it.
"""

from __future__ import annotations

from typing import Literal

CircuitState = Literal["closed", "open", "half_open", "ramping"]


class CircuitBreaker:
    __slots__ = ("_failures", "_opened_at", "_ramp", "cooldown_s", "state", "threshold")

    def __init__(self, *, threshold: int = 5, cooldown_s: float = 30.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state: CircuitState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._ramp = 1

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures {self._failures}/{self.threshold}>"

    def allowed_slots(self, now: float, concurrency: int) -> int:
        """How many attempts may be in flight at ``now``."""
        if self.state == "open":
            if now - self._opened_at < self.cooldown_s:
                return 0
            self.state = "half_open"
        if self.state == "half_open":
            return 1
        if self.state == "ramping":
            return min(concurrency, self._ramp)
        return concurrency

    def reopens_at(self) -> float | None:
        return self._opened_at + self.cooldown_s if self.state == "open" else None

    def on_success(self, concurrency: int) -> None:
        self._failures = 0
        if self.state == "half_open":
            self.state, self._ramp = "ramping", 2
        elif self.state == "ramping":
            self._ramp *= 2
            if self._ramp >= concurrency:
                self.state = "closed"

    def on_failure(self, now: float) -> bool:
        """Record a failure that says the provider is sick; True when this opened the circuit."""
        self._failures += 1
        if self.state in ("half_open", "ramping") or (
            self.state == "closed" and self._failures >= self.threshold
        ):
            self.state, self._opened_at = "open", now
            return True
        return False
