"""The error hierarchy, grouped by who must act, each with its stable wire code.

Upstream failures are first described by an :class:`UpstreamError` (what went
wrong on one attempt, translated from aiohttp and timeout exceptions in one
place, the provider actor's HTTP boundary); the scheduler reads its ``kind`` to
decide between retry, fallback and failure, and the client finally gets one
``DispatcherError`` that names every provider tried.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "bad_request",
    "frame_too_large",
    "unknown_job",
    "no_provider",
    "context_too_long",
    "overloaded",
    "quota_exhausted",
    "upstream_failed",
    "timeout",
    "cancelled",
    "internal",
]


class DispatcherError(Exception):
    """Base of every error the daemon reports to a client."""

    code: ErrorCode = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


# -- the client must act -------------------------------------------------------------


class ClientError(DispatcherError):
    """The request itself is wrong; sending it again unchanged will fail again."""

    code: ErrorCode = "bad_request"


class FrameTooLarge(ClientError):
    code: ErrorCode = "frame_too_large"


class UnknownJob(ClientError):
    code: ErrorCode = "unknown_job"


class ContextTooLong(ClientError):
    code: ErrorCode = "context_too_long"


class NoProvider(ClientError):
    """No enabled provider may take this job (policy, pins, capability)."""

    code: ErrorCode = "no_provider"


# -- wait and try again ---------------------------------------------------------------


class Overloaded(DispatcherError):
    code: ErrorCode = "overloaded"
    retryable = True


class QuotaExhausted(DispatcherError):
    code: ErrorCode = "quota_exhausted"
    retryable = True


class LargerThanQuota(QuotaExhausted):
    """The job alone needs more than the whole quota: waiting cannot help."""

    retryable = False


class Timeout(DispatcherError):
    code: ErrorCode = "timeout"
    retryable = True


class Cancelled(DispatcherError):
    code: ErrorCode = "cancelled"


class UpstreamFailed(DispatcherError):
    """Every provider tried failed; the message names each and why."""

    code: ErrorCode = "upstream_failed"
    retryable = True


class UpstreamRejected(UpstreamFailed):
    """The provider refused the request itself (a 4xx): the same request would fail again."""

    retryable = False

    def __init__(self, message: str, *, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class InternalError(DispatcherError):
    code: ErrorCode = "internal"
    retryable = True


# -- what one upstream attempt can go wrong with ----------------------------------------

# What went wrong, as the retry rule in dispatcher.core.outcomes reads it.
UpstreamKind = Literal[
    "rate_limited",  # 429
    "server",  # 5xx
    "timeout",  # no answer in time
    "connect",  # refused, reset, DNS: the provider is unreachable
    "auth",  # 401/403: the key is wrong
    "rejected",  # 400/404/413/422 and other 4xx: the request is wrong for it
    "conflict",  # 409: a passing conflict upstream
    "bad_answer",  # 200 with a body that is not an answer
    "stream_broken",  # failed after chunks were forwarded
]


class UpstreamError(Exception):
    """One failed attempt at one provider: the input to retry and circuit decisions."""

    def __init__(
        self,
        kind: UpstreamKind,
        detail: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        # which limit a 429 hit, where the body says (zhipu: code 1302 or 1303)
        limit_kind: Literal["rate", "concurrency"] | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind: UpstreamKind = kind
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s
        self.limit_kind: Literal["rate", "concurrency"] | None = limit_kind

    def short(self) -> str:
        """A few words for the "tried X (why)" sentence."""
        if self.status is not None:
            return f"HTTP {self.status}: {self.detail}"
        return self.detail


def status_kind(status: int) -> UpstreamKind:
    """Classify a non-2xx HTTP status."""
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 409:
        return "conflict"
    if status == 408 or status >= 500:
        return "server" if status != 408 else "timeout"
    return "rejected"
