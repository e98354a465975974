"""The limits ledger: where a key's spends, slots, quotas and blocks are recorded.

One daemon keeps its limits in memory (:class:`~dispatcher.core.provider_state.ProviderLimits`,
which planning reads) and in a local SQLite file, so a restart remembers the
minute's spend (:mod:`dispatcher.store.local_ledger`). Several daemons sharing
keys also take every token and slot from a shared ledger in Redis before they
send (:mod:`dispatcher.store.redis_ledger`), so the fleet never exceeds a key's
limits; this module is the contract between the scheduler and that shared ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from anyio.abc import TaskStatus

LedgerMode = Literal["local", "shared", "degraded"]
DenyReason = Literal["rate", "concurrency", "blocked"]


@dataclass(frozen=True, slots=True)
class Grant:
    """The token and the slot are ours: send the request."""


@dataclass(frozen=True, slots=True)
class Deny:
    """Not now: another host holds the capacity; try again after ``retry_after_s``."""

    reason: DenyReason
    retry_after_s: float


Decision = Grant | Deny


@dataclass(frozen=True, slots=True)
class ProviderUse:
    """How much of one provider's key the whole fleet uses, as last seen."""

    in_flight: int
    window_spent: int  # requests in the trailing rpm window
    daily_tokens: int  # tokens charged in the trailing day
    blocked_for_s: float  # a Retry-After block any host recorded
    learned_rpm: int | None = None  # a limit some host learned (0 or None: none)


class SharedLedger(Protocol):
    """Fleet-wide limits (Redis). Every call has a short deadline and never raises for an
    unreachable store: it falls back to a conservative local share (``mode == "degraded"``)."""

    mode: LedgerMode
    instances: int  # daemons seen alive, this one included
    on_freed: Callable[[str], None] | None  # a slot of this provider came free somewhere
    on_view: Callable[[dict[str, ProviderUse]], None] | None  # after each refresh of the view

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Heartbeat, renew our leases, refresh the fleet view; report started at once."""
        ...

    async def acquire(
        self, provider: str, job_id: str, *, rpm: int, concurrency: int, window_s: float
    ) -> Decision:
        """Take one token of ``rpm`` per ``window_s`` and one of ``concurrency`` slots, or neither."""
        ...

    async def release(self, provider: str, job_id: str, *, tokens: int = 0) -> None:
        """Give the slot back and charge ``tokens`` to the provider's daily quota."""
        ...

    async def block(self, provider: str, seconds: float) -> None:
        """Record a Retry-After block for every host."""
        ...

    async def learned(self, provider: str, rpm: int) -> None:
        """Record a learned request limit for every host."""
        ...

    def note_block(self, provider: str, seconds: float) -> None:
        """Record a Retry-After block (or an open circuit) for every host, in the next turn."""
        ...

    def note_learned(self, provider: str, rpm: int) -> None:
        """Record a learned request limit for every host, in the next turn."""
        ...

    def charge_client(self, client: str, tokens: int, *, day: str) -> None:
        """Add to a client's fleet-wide token count for the UTC ``day`` (no I/O)."""
        ...

    def client_tokens(self, client: str, *, day: str) -> int:
        """The fleet's tokens charged to ``client`` on ``day``, as last seen plus ours since."""
        ...

    def use(self) -> dict[str, ProviderUse]:
        """The latest fleet-wide view, refreshed by ``run`` (no I/O)."""
        ...
