"""What the other hosts sharing our keys found out, applied to our planning.

The shared ledger (:mod:`dispatcher.store.redis_ledger`) refreshes its view of the
fleet about twice a second and hands it to :func:`apply_view`; verdicts hand it what
this host found (:func:`tell`). So a Retry-After block, an open circuit, a learned
limit or a spent daily quota seen by one host holds for all of them.

An open circuit travels as a block of the circuit's cooldown: the other hosts hold
off as long, then each finds out for itself (its own circuit was never opened). A
limit another host learned is taken only where this host has learned none, since
each host probes upward on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.core.limits import LearnedLimit
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.store.ledger import ProviderUse

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler

FROM_FLEET = "another host"


def apply_view(scheduler: Scheduler, view: dict[str, ProviderUse]) -> None:
    """Take the fleet's blocks, learned limits and daily quota use into our providers'."""
    now = scheduler.clock()
    changed = False
    for name, use in view.items():
        limits = scheduler.limits.get(name)
        if limits is None:
            continue
        limits.fleet_daily_used = use.daily_tokens
        if use.blocked_for_s > 0 and now + use.blocked_for_s > limits.blocked_until:
            limits.block(now + use.blocked_for_s)
            changed = True
        learned = limits.learned()
        if use.learned_rpm and not limits.config.rpm and (learned is None or not learned.rpm):
            limits.restore_learned(
                LearnedLimit(
                    rpm=use.learned_rpm,
                    concurrency=learned.concurrency if learned is not None else None,
                    source=FROM_FLEET,
                    at=now,
                    confirmed=False,
                )
            )
            changed = True
    if changed:
        scheduler.poke()


def tell(
    scheduler: Scheduler,
    limits: ProviderLimits,
    now: float,
    *,
    blocked_before: float,
    learned_before: LearnedLimit | None,
    circuit_opened: bool,
) -> None:
    """Give the fleet what this verdict found: a new block, a new learned rate, an open
    circuit (as a block of its cooldown)."""
    shared = scheduler.shared
    if shared is None:
        return
    if limits.blocked_until > blocked_before:
        shared.note_block(limits.name, limits.blocked_until - now)
    if circuit_opened:
        shared.note_block(limits.name, scheduler.config.circuit.cooldown_s)
    learned = limits.learned()
    if (
        learned is not None
        and learned.rpm
        and learned.source != FROM_FLEET
        and (learned_before is None or learned_before.rpm != learned.rpm)
    ):
        shared.note_learned(limits.name, learned.rpm)
