"""Admission: whether the daemon takes a job now, and what it is (class, size, providers).

:func:`admit` is the one gate every new job passes, whichever front it came
through; :func:`route` is the path of a replayed job, which an earlier run
already accepted and which the caps must never refuse now; :func:`describe`
only sizes a request (a finished job rebuilt from the journal).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from dispatcher.contract.config import Config
from dispatcher.contract.errors import ClientError, Overloaded
from dispatcher.contract.protocol import EmbedRequest, JobRequest
from dispatcher.core.classify import (
    Refusal,
    check_quota,
    classify_chat,
    classify_embed,
    needed_capabilities,
    weighted_pick,
)
from dispatcher.core.packing import oversized
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.core.tokens import estimate_messages, estimate_text

Kind = Literal["chat", "embed"]


@dataclass(frozen=True, slots=True)
class Admission:
    """What a job is: its kind, class, estimated prompt tokens and the providers it may use."""

    kind: Kind
    klass: str
    prompt_tokens: int
    eligible: tuple[str, ...] = ()
    pick: str | None = None  # strategy = "weighted": the provider drawn for it


@dataclass(frozen=True, slots=True)
class Room:
    """How full the daemon is when a job arrives."""

    accepting: bool
    jobs: int  # jobs accepted and not finished
    queued_bytes: int
    drain_estimate_s: float  # a retry-after hint: how long the queue takes to drain


def admit(
    request: JobRequest,
    *,
    size: int,
    room: Room,
    config: Config,
    limits: Mapping[str, ProviderLimits],
    now: float,
    rng: random.Random,
    refusal: Callable[[str, JobRequest], str | None] | None = None,
) -> Admission:
    """The job as the daemon will hold it, or the error that says why it is refused."""
    check_room(size, room, config)
    return route(request, config=config, limits=limits, now=now, rng=rng, refusal=refusal)


def check_room(size: int, room: Room, config: Config) -> None:
    """Overloaded, with a hint when to retry, past the caps on jobs and bytes."""
    if not room.accepting:
        raise Overloaded("the daemon is shutting down; try again in a moment", retry_after_s=5)
    daemon = config.daemon
    if room.jobs >= daemon.max_queued:
        raise Overloaded(
            f"{room.jobs:,} jobs are already waiting (max_queued); "
            "retry later or raise daemon.max_queued",
            retry_after_s=room.drain_estimate_s,
        )
    if size and room.queued_bytes + size > daemon.max_queued_bytes:
        raise Overloaded(
            f"the queued jobs already hold {room.queued_bytes:,} bytes (max_queued_bytes); "
            "retry later or send smaller requests",
            retry_after_s=room.drain_estimate_s,
        )


def route(
    request: JobRequest,
    *,
    config: Config,
    limits: Mapping[str, ProviderLimits],
    now: float,
    rng: random.Random,
    refusal: Callable[[str, JobRequest], str | None] | None = None,
) -> Admission:
    """Classify the job and pick the providers it may use; no cap is checked.

    ``refusal(provider, request)`` says why a provider's API would refuse the
    request as it is (the providers' adapters know); None: nothing is refused.
    """
    if isinstance(request, EmbedRequest):
        described = describe(request)
        eligible = _fitting(request, classify_embed(request.providers, config, limits), config)
        check_quota(eligible, limits, described.prompt_tokens, now)
        return Admission("embed", "embed", described.prompt_tokens, eligible)
    tokens = estimate_messages(request.messages)
    klass, eligible = classify_chat(
        task=request.task,
        thinking=request.thinking,
        pins=request.providers,
        prompt_tokens=tokens,
        max_tokens=request.max_tokens,
        config=config,
        limits=limits,
        needs=needed_capabilities(request),
        refusal=_bound(refusal, request),
    )
    pick = None
    policy = config.classes.get(klass)
    if policy is not None and policy.strategy == "weighted" and not request.providers:
        pick = weighted_pick(policy, eligible, rng)
    check_quota(eligible, limits, tokens, now)
    return Admission("chat", klass, tokens, eligible, pick)


def _fitting(request: EmbedRequest, eligible: tuple[str, ...], config: Config) -> tuple[str, ...]:
    """The providers whose ``max_input_tokens`` every text fits; none: the text too big."""
    sizes = [estimate_text(text) for text in embed_inputs(request)]
    fitting = tuple(
        p for p in eligible if oversized(sizes, config.providers[p].max_input_tokens) is None
    )
    if fitting:
        return fitting
    limit = max(config.providers[p].max_input_tokens for p in eligible)
    found = oversized(sizes, limit)
    assert found is not None
    index, size = found
    raise ClientError(
        f"input[{index}] is about {size:,} tokens, more than max_input_tokens ({limit:,}) "
        f"of {', '.join(eligible)}; shorten or split that text"
    )


def embed_inputs(request: EmbedRequest) -> list[str]:
    """An embed request's texts as a list (a single string is one text)."""
    return [request.input] if isinstance(request.input, str) else request.input


def _bound(
    refusal: Callable[[str, JobRequest], str | None] | None, request: JobRequest
) -> Refusal | None:
    if refusal is None:
        return None
    return lambda provider: refusal(provider, request)


def describe(request: JobRequest) -> Admission:
    """Kind, class and size alone, with no routing (a job that will not run again)."""
    if isinstance(request, EmbedRequest):
        return Admission(
            "embed", "embed", sum(estimate_text(text) for text in embed_inputs(request))
        )
    return Admission("chat", request.task or "default", estimate_messages(request.messages))
