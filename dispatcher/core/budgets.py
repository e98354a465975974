"""Per-client budgets (``[clients.NAME]``): what one client may still ask for and spend.

Pure: no clock, no I/O; ``now`` (monotonic, for the per-minute window) and ``wall``
(epoch seconds, for the UTC day) are arguments. The scheduler shell
(:mod:`dispatcher.scheduler.clients`) keeps one :class:`ClientState` per client that
has a budget, asks :func:`refusal` when a job is submitted, takes a send from
:attr:`ClientState.bucket` before a job joins the queue, and charges tokens as jobs end.

A budget only ever narrows: a job of a client with room left still waits for the
providers' own limits like everyone else's.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from dispatcher.contract.config import ClientConfig
from dispatcher.contract.errors import (
    ClientError,
    DispatcherError,
    NoProvider,
    Overloaded,
    QuotaExhausted,
)
from dispatcher.core.limits import TokenBucket

RPM_WINDOW_S = 60.0
DAY_S = 86_400.0


def utc_day(wall: float) -> str:
    """The UTC day of ``wall`` as YYYY-MM-DD: the day a daily budget and a usage row count."""
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).date().isoformat()


def next_midnight(wall: float) -> float:
    """When the UTC day of ``wall`` ends, in epoch seconds."""
    return (wall // DAY_S + 1) * DAY_S


@dataclass(slots=True)
class ClientState:
    """One client's spend so far: its sends of the last minute, today's tokens, its jobs."""

    name: str
    policy: ClientConfig
    bucket: TokenBucket
    day: str = ""
    tokens: int = 0  # today's: real counts of finished jobs, estimates of the others
    jobs: set[str] = field(default_factory=set)  # its jobs waiting or running

    @classmethod
    def of(cls, name: str, policy: ClientConfig) -> ClientState:
        return cls(name=name, policy=policy, bucket=TokenBucket(policy.rpm, window_s=RPM_WINDOW_S))

    def reconfigure(self, policy: ClientConfig) -> None:
        """A new budget (SIGHUP): what was spent keeps counting."""
        self.policy = policy
        self.bucket.set_rpm(policy.rpm)

    def tokens_today(self, wall: float) -> int:
        self._roll(wall)
        return self.tokens

    def charge(self, wall: float, tokens: int) -> None:
        """Count ``tokens`` today (negative: an estimate corrected or refunded)."""
        self._roll(wall)
        self.tokens = max(0, self.tokens + tokens)

    def restore(self, wall: float, tokens: int) -> None:
        """Today's tokens as the usage store remembers them (a restart)."""
        self.day, self.tokens = utc_day(wall), tokens

    def _roll(self, wall: float) -> None:
        day = utc_day(wall)
        if day != self.day:
            self.day, self.tokens = day, 0


def refusal(
    state: ClientState,
    *,
    klass: str,
    eligible: tuple[str, ...],
    priority: int,
    prompt_tokens: int,
    wall: float,
    fleet_tokens: int = 0,
) -> DispatcherError | tuple[str, ...]:
    """Why this client may not submit the job now, or the providers it may use for it.

    ``fleet_tokens``: what every daemon sharing this client's budget charged it today
    (Redis), when that is known; the larger of it and this daemon's own count holds."""
    policy, who = state.policy, f"client {state.name}"
    if policy.classes is not None and klass not in policy.classes:
        allowed = ", ".join(policy.classes) or "none"
        return ClientError(
            f"{who} may not use the {klass!r} class (its classes: {allowed}); "
            "ask for one of those, or have its [clients] entry changed"
        )
    if policy.max_priority is not None and priority > policy.max_priority:
        return ClientError(
            f"priority {priority} is above {who}'s max_priority {policy.max_priority}; "
            f"send it with priority {policy.max_priority} or less"
        )
    if policy.providers is not None:
        allowed_providers = set(policy.providers)
        mine = tuple(p for p in eligible if p in allowed_providers)
        if not mine:
            return NoProvider(
                f"{who} may use only {', '.join(policy.providers) or 'no provider'}, and none "
                f"of them can take this job (it could go to {', '.join(eligible) or 'none'})"
            )
        eligible = mine
    if policy.max_queued and len(state.jobs) >= policy.max_queued:
        return Overloaded(
            f"{who} already has {len(state.jobs):,} jobs waiting or running "
            f"(max_queued {policy.max_queued:,}); wait for some to finish",
            retry_after_s=1.0,
        )
    if policy.daily_tokens:
        used = max(state.tokens_today(wall), fleet_tokens)
        if used + prompt_tokens > policy.daily_tokens:
            frees = next_midnight(wall)
            at = datetime.datetime.fromtimestamp(frees, datetime.UTC).strftime("%Y-%m-%d %H:%M")
            return QuotaExhausted(
                f"{who} has used {used:,} of its {policy.daily_tokens:,} daily tokens and "
                f"this job needs about {prompt_tokens:,} more; its budget frees at {at} UTC",
                retry_after_s=round(frees - wall, 3),
            )
    return eligible
