"""Packing embeddings: which waiting texts ride in the next upstream request, and when it goes.

An embeddings provider allows few requests (SiliconFlow: 5 a minute) but many texts per
request, so the texts of several waiting jobs share one request. :func:`pack` takes the
jobs' unsent texts in serving order (priority, then fair share) and fills one request up
to ``max_batch`` texts and ``max_request_tokens`` estimated tokens; a text already in
the request (the same text from another job, or twice in one job) is sent once. A job
whose texts do not all fit is split: the rest waits for the next request.
:func:`linger_s` says how long a request that is not full may wait for more texts: only
while the provider's request tokens are scarce, and never longer than the linger.

Pure: no clock, no I/O; the scheduler's shell (:mod:`dispatcher.scheduler.batches`)
passes ``now``-derived values in and carries the decision out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# (index in the job's input, text, estimated tokens): one unsent text of a waiting job.
Text = tuple[int, str, int]


@dataclass(slots=True)
class Pack:
    """One upstream request: its texts, and which job text each position answers."""

    texts: list[str] = field(default_factory=list)  # unique, in the order they are sent
    # per waiting job (same order as given): (index in the job's input, position in texts)
    takes: list[list[tuple[int, int]]] = field(default_factory=list)
    tokens: int = 0
    full: bool = False  # no further text fitted: the request cannot grow by waiting

    @property
    def taken(self) -> int:
        return sum(len(take) for take in self.takes)


def pack(
    waiting: Sequence[Sequence[Text]], *, max_batch: int, max_request_tokens: int | None = None
) -> Pack:
    """Fill one request from ``waiting`` (each job's unsent texts, jobs in serving order).

    Jobs are taken in order and each job's texts in input order; the first text that
    fits neither the count nor the token cap ends the request (a later, smaller text
    does not jump ahead of it). The first text always fits: a text is never too big
    for a request on its own (admission refuses those).
    """
    result = Pack()
    position: dict[str, int] = {}
    for texts in waiting:
        take: list[tuple[int, int]] = []
        result.takes.append(take)
        if result.full:
            continue
        for index, text, tokens in texts:
            at = position.get(text)
            if at is None:
                over_tokens = (
                    max_request_tokens is not None
                    and result.texts
                    and result.tokens + tokens > max_request_tokens
                )
                if len(result.texts) >= max_batch or over_tokens:
                    result.full = True
                    break
                at = position[text] = len(result.texts)
                result.texts.append(text)
                result.tokens += tokens
            take.append((index, at))
    if len(result.texts) >= max_batch:
        result.full = True
    return result


def scarce(tokens_left: int | None, concurrency: int) -> bool:
    """Whether request tokens are scarce: a rate applies and no more are left in the
    window than the provider could spend at once (at least 1).

    Counting up to the concurrency, not only the last token, matters at 5 requests a
    minute: a burst of single-text jobs would otherwise spend the first four tokens on
    one text each before any batch could form.
    """
    return tokens_left is not None and tokens_left <= max(1, concurrency)


def linger_s(
    *, texts: int, max_batch: int, full: bool, scarce: bool, waited_s: float, linger_s: float
) -> float:
    """How long to wait before sending a request of ``texts`` texts (0: send now).

    A full request goes at once; so does any request while tokens are plentiful. While
    they are scarce, a request waits until its oldest text has waited ``linger_s``.
    """
    if full or texts >= max_batch or not scarce or linger_s <= 0:
        return 0.0
    return max(0.0, linger_s - waited_s)


def oversized(tokens: Sequence[int], limit: int) -> tuple[int, int] | None:
    """The first text over ``limit`` estimated tokens, as (index, tokens), or None."""
    for index, size in enumerate(tokens):
        if size > limit:
            return index, size
    return None
