"""Embeddings in shared requests: the shell around :mod:`dispatcher.core.packing`.

An embed job's texts are first looked up in the per-text cache (:func:`accept`); the
rest wait in the fair queue like any job. When the planner gives an embed job a
provider, :func:`start` packs the unsent texts of as many waiting embed jobs as fit
into one upstream request, in the queue's serving order, and sends it as one
*carrier* job: one slot, one request token. When it ends, :func:`after_outcome`
gives every member its vectors, or its own fate for a failure, and answers each
member once all its texts have vectors, in input order.

Resource handling: a carrier is not in the queue or in ``Scheduler.active``; its
members are, until each is answered. A member cancelled while its texts are in
flight is answered ``cancelled`` at once (:func:`stop`); the request carries on for
the others, and the vectors it brings back for the cancelled member still go into
the cache.

Error handling: the carrier's outcome is judged once for the provider
(:func:`verdicts.judged`: circuit, blocks, learned limits, a refused key), and then
once per member for the job's side alone (:func:`outcomes.judge_failure`): each
member retries, falls back or gets its final error by the same rule as a job sent
alone. Nothing reached the upstream (a fleet deferral, stopped, handed back): the
token comes back and the members wait again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from dispatcher.contract.errors import DispatcherError, InternalError, UpstreamError
from dispatcher.contract.protocol import EmbedRequest, Result, Usage
from dispatcher.core import outcomes, packing
from dispatcher.core.admission import embed_inputs
from dispatcher.core.tokens import estimate_text
from dispatcher.providers.actor import Answer, NotSent, Outcome
from dispatcher.scheduler import results, verdicts
from dispatcher.scheduler.job import Batch, EmbedWork, Job, new_job_id
from dispatcher.store.cache import cache_key
from dispatcher.store.embed_cache import as_stored, text_key
from dispatcher.store.ledger import Deny

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler

log = structlog.get_logger("dispatcher.scheduler")

MAX_SCAN = 4096  # queued jobs read to fill one request: a deep chat queue costs no more


def from_caches(scheduler: Scheduler, job: Job, now: float) -> Result | None:
    """The job's answer if the caches hold all of it: per text for embeddings, per
    request for chat (partitioned by owner unless ``[cache] shared``)."""
    if isinstance(job.request, EmbedRequest):
        return accept(scheduler, job)
    owner = None if scheduler.config.cache.shared else job.owner
    job.cache_key = cache_key(job.request, job.klass, owner=owner)
    cached = scheduler.cache.get(job.cache_key) if job.cache_key else None
    if cached is None:
        return None
    return results.from_cache(job, cached, scheduler.clock() - now)


def start_all(
    scheduler: Scheduler, assigned: list[tuple[Job, str]], now: float, wake_at: float | None
) -> float | None:
    """Start the packed requests the plan allows; when to plan again (a linger ends, or
    texts are left after a request went)."""
    lingering: set[str] = set()
    for job, name in assigned:
        if name in lingering:
            continue
        sent_before = scheduler.embed_requests
        later = start(scheduler, job, name, now)
        if later is not None:  # the request waits to fill while tokens are scarce
            lingering.add(name)
        elif scheduler.embed_requests > sent_before:
            later = now  # a request went: plan again at once for the texts left
        if later is not None:
            wake_at = later if wake_at is None else min(wake_at, later)
    return wake_at


def accept(scheduler: Scheduler, job: Job) -> Result | None:
    """Set up an embed job's texts and answer what the cache knows; the whole result
    when every text was known, else None (the rest waits in the queue)."""
    assert isinstance(job.request, EmbedRequest)
    texts = embed_inputs(job.request)
    keys = None
    # Vectors of one job come from one model: the cache is read for the first eligible
    # provider's, and a job that took any vector from it stays with that model.
    model = scheduler.config.providers[job.eligible[0]].model if job.eligible else ""
    owner = None if scheduler.config.cache.shared else job.owner
    if job.request.cache is not False and job.eligible:
        keys = [text_key(model, owner, text) for text in texts]
    work = EmbedWork(
        texts=texts,
        tokens=[estimate_text(text) for text in texts],
        keys=keys,
        vectors=[None] * len(texts),
        unsent=[],
        owner=owner,
        model=model,
    )
    job.embed = work
    work.unsent = list(range(len(texts)))
    if keys is not None:
        known = scheduler.embed_cache.get(keys)
        take_vectors(scheduler, job, {i: known[key] for i, key in enumerate(keys) if key in known})
    if keys is not None and scheduler.config.cache.coalesce:
        _await_in_flight(scheduler, job, work, keys)
    return answered(scheduler, job)


def take_vectors(scheduler: Scheduler, job: Job, found: dict[int, list[float]]) -> None:
    """Cached vectors for some of a job's unsent texts (by index); from then on the job
    keeps to the model they came from."""
    work = job.embed
    assert work is not None
    if not found:
        return
    for index, vector in found.items():
        work.vectors[index] = vector
    work.cached += len(found)
    work.unsent = [i for i in work.unsent if i not in found]
    same = tuple(p for p in job.eligible if scheduler.config.providers[p].model == work.model)
    job.eligible = same
    if job.pick is not None and job.pick not in same:
        job.pick = None


def answered(scheduler: Scheduler, job: Job) -> Result | None:
    """The whole result of an embed job none of whose texts is left to send or await."""
    work = job.embed
    assert work is not None
    if work.unsent or work.in_flight:
        return None
    work.provider = work.provider or (job.eligible[0] if job.eligible else "")
    return _result(scheduler, job)


def _await_in_flight(scheduler: Scheduler, job: Job, work: EmbedWork, keys: list[bytes]) -> None:
    """Texts already on the wire in another job's request are awaited, not sent again."""
    in_the_air = scheduler.flights.texts
    if not in_the_air:
        return
    unsent = []
    for index in work.unsent:
        waiters = in_the_air.get(keys[index])
        if waiters is None:
            unsent.append(index)
        else:
            waiters.append((job, index))
            work.in_flight += 1
    if len(unsent) < len(work.unsent):
        scheduler.flights.coalesced += 1
    work.unsent = unsent


def start(scheduler: Scheduler, job: Job, name: str, now: float) -> float | None:
    """Pack and send one request for ``name``, led by ``job``; the time to look again when
    the request lingers to fill, else None."""
    limits = scheduler.limits[name]
    config = limits.config
    work = job.embed
    if work is None or not work.unsent or job.outcome is not None:
        return None  # its texts already went in a request packed earlier in this round
    members = _waiting(scheduler, job, name, now, config.max_batch)
    decided = packing.pack(
        [[(i, w.texts[i], w.tokens[i]) for i in w.unsent] for _, w in members],
        max_batch=config.max_batch,
        max_request_tokens=config.max_request_tokens,
    )
    taken = [(m, take) for (m, _), take in zip(members, decided.takes, strict=True) if take]
    tokens_left = limits.bucket.available(now) if limits.bucket.rpm else None
    oldest = min(m.accepted_at for m, _ in taken)
    wait = packing.linger_s(
        texts=len(decided.texts),
        max_batch=config.max_batch,
        full=decided.full,
        scarce=packing.scarce(tokens_left, limits.concurrency),
        waited_s=now - oldest,
        linger_s=config.batch_linger_ms / 1000,
    )
    if wait > 0:
        return now + wait
    carrier = _carrier(job, name, decided, taken, now)
    for member, take in taken:
        assert member.embed is not None
        sent = {index for index, _ in take}
        member.embed.unsent = [i for i in member.embed.unsent if i not in sent]
        member.embed.in_flight += len(take)
        member.attempts += 1
        member.provider = name
        scheduler.queue.remove(member, served=True)
        _keep_to_model(scheduler, member, member.embed, name)  # out of the queue: its counts
        if member.embed.unsent:
            scheduler.queue.push(member, front=True)  # the rest of a split job goes next
        else:
            member.state = "running"
    _announce(scheduler, carrier)
    limits.reserve(carrier.id, now, carrier.prompt_tokens)
    if scheduler.ledger is not None:
        scheduler.ledger.spent(name)
        if limits.daily is not None:
            scheduler.ledger.charged(name, carrier.prompt_tokens)
    if not scheduler.actors[name].deliver(carrier):
        limits.release(carrier.id)
        limits.give_back(carrier.id)
        _put_back(scheduler, carrier, attempted=False)
        return None
    scheduler.attempts_sent += 1
    scheduler.embed_requests += 1
    scheduler.embed_texts_sent += len(decided.texts)
    log.debug(
        "embed.batch", provider=name, batch=carrier.id, texts=len(decided.texts), jobs=len(taken)
    )
    return None


def _announce(scheduler: Scheduler, carrier: Job) -> None:
    """Make the carrier's texts known as on the wire, so identical texts await them."""
    assert carrier.batch is not None
    if not scheduler.config.cache.coalesce:
        return
    in_the_air = scheduler.flights.texts
    for member, take in carrier.batch.members:
        keys = member.embed.keys if member.embed is not None else None
        if keys is None:
            continue  # asked not to use the cache: nothing of it is shared
        for index, _ in take:
            key = keys[index]
            if key not in in_the_air:
                in_the_air[key] = []
                carrier.batch.keys.append(key)


def _land(scheduler: Scheduler, carrier: Job, vectors: dict[bytes, list[float]]) -> None:
    """The carrier's texts are off the wire: their vectors to whoever awaited them, or, for
    a request that brought none, the texts back to their jobs' unsent lists."""
    assert carrier.batch is not None
    for key in carrier.batch.keys:
        for job, index in scheduler.flights.texts.pop(key, ()):
            work = job.embed
            assert work is not None
            work.in_flight -= 1
            if job.outcome is not None:
                continue
            vector = vectors.get(key)
            if vector is not None:
                work.vectors[index] = vector
                work.provider = work.provider or carrier.provider or ""
                if not work.unsent and not work.in_flight:
                    scheduler.queue.remove(job)
                    scheduler.finish(job, _result(scheduler, job))
            else:
                was_queued = bool(work.unsent)
                work.unsent = sorted({*work.unsent, index})
                if not was_queued:  # a job with texts to send waits in the queue
                    job.provider = None
                    scheduler.requeue(job)
    carrier.batch.keys = []


def _keep_to_model(scheduler: Scheduler, job: Job, work: EmbedWork, name: str) -> None:
    """From its first request on, a job's texts go only where ``name``'s model is served."""
    model = scheduler.config.providers[name].model
    # A job with cached vectors already keeps to their model, so a new model here means
    # none came from the cache: its keys are those of the model that answers it.
    if work.model != model and work.keys is not None:
        work.keys = [text_key(model, work.owner, text) for text in work.texts]
    work.model = model
    job.eligible = tuple(p for p in job.eligible if scheduler.config.providers[p].model == model)


def _waiting(
    scheduler: Scheduler, lead: Job, name: str, now: float, max_batch: int
) -> list[tuple[Job, EmbedWork]]:
    """``lead`` and the queued embed jobs that may ride with it to ``name``, in serving
    order, until they hold enough texts to fill a request."""
    per_provider = scheduler.config.retry.per_provider
    assert lead.embed is not None
    found = [(lead, lead.embed)]
    texts = len(lead.embed.unsent)
    for scanned, job in enumerate(scheduler.queue):
        if texts >= max_batch or scanned >= MAX_SCAN:
            break
        work = job.embed
        if (
            job is lead
            or work is None
            or not work.unsent
            or job.stop is not None
            or (scheduler.draining and job.durable)
            or job.holds.get(name, now) > now
            or name not in job.candidates(per_provider)
        ):
            continue
        found.append((job, work))
        texts += len(work.unsent)
    return found


def _carrier(
    lead: Job,
    name: str,
    decided: packing.Pack,
    taken: list[tuple[Job, list[tuple[int, int]]]],
    now: float,
) -> Job:
    """The job that carries one packed request through the actor and the outcome rule."""
    deadlines = [m.deadline for m, _ in taken if m.deadline is not None]
    carrier_id = new_job_id()
    carrier = Job(
        id=carrier_id,
        request=EmbedRequest(id=f"batch-{carrier_id}", input=decided.texts, cache=False),
        kind="embed",
        klass="embed",
        eligible=lead.eligible,
        client="batch",
        uid=-1,
        prompt_tokens=decided.tokens,
        accepted_at=now,
        deadline=max(deadlines) if deadlines else None,
    )
    carrier.state, carrier.provider, carrier.attempts = "running", name, 1
    carrier.batch = Batch(members=taken)
    return carrier


def after_outcome(
    scheduler: Scheduler, carrier: Job, provider: str, outcome: Outcome, now: float, started: float
) -> None:
    """A packed request ended: vectors to every member, or each member's own fate."""
    limits = scheduler.limits[provider]
    if outcome is None or isinstance(outcome, (Deny, NotSent)):  # nothing was answered
        if outcome is None:  # handed back: it may have been sent, so its token stays spent
            _put_back(scheduler, carrier, attempted=False, handed_back=True, provider=provider)
            return
        limits.give_back(carrier.id)
        if isinstance(outcome, Deny):
            limits.defer(now + outcome.retry_after_s)
        if limits.daily is not None and carrier.prompt_tokens:
            limits.daily.spend(now, -carrier.prompt_tokens)
            if scheduler.ledger is not None:
                scheduler.ledger.charged(provider, -carrier.prompt_tokens)
        _put_back(scheduler, carrier, attempted=False)
        return
    verdict = verdicts.judged(scheduler, carrier, provider, outcome, now, started)
    if isinstance(outcome, Answer) and isinstance(verdict, outcomes.Success):
        verdicts.correct_charge(scheduler, limits, outcome, carrier.prompt_tokens, now)
        _deliver(scheduler, carrier, provider, outcome)
        return
    error = outcome if isinstance(outcome, UpstreamError) else None
    final = verdict.error if isinstance(verdict, outcomes.Final) else None
    _put_back(
        scheduler, carrier, attempted=True, error=error, final=final, now=now, provider=provider
    )


def _deliver(scheduler: Scheduler, carrier: Job, provider: str, answer: Answer) -> None:
    """Each member's vectors from one answered request; members complete are answered."""
    assert carrier.batch is not None
    vectors = getattr(answer.answer, "embeddings", [])
    usage = answer.answer.usage
    total = sum(len(take) for _, take in carrier.batch.members) or 1
    got: dict[bytes, list[float]] = {}
    done = 0  # texts whose share of the usage is given out
    for member, take in carrier.batch.members:
        work = member.embed
        assert work is not None
        work.in_flight -= len(take)
        for index, position in take:
            vector = vectors[position]
            if work.keys is not None:
                vector = got[work.keys[index]] = as_stored(vector)
                scheduler.embed_cache.put(work.keys[index], vector)
                if scheduler.shared_cache is not None:
                    scheduler.shared_cache.put_vector(work.keys[index], vector)
            work.vectors[index] = vector
        # The request's usage split by each member's share of texts, cumulatively rounded
        # so the shares add up to what the provider billed, to the token.
        before, done = done, done + len(take)
        work.usage.prompt_tokens += _share(usage.prompt_tokens, before, done, total)
        work.usage.total_tokens += _share(usage.total_tokens, before, done, total)
        work.provider = provider
        work.answered_model = answer.answer.model or work.model
        if member.outcome is None and not work.unsent and not work.in_flight:
            scheduler.finish(member, _result(scheduler, member))
    _land(scheduler, carrier, got)
    carrier.batch = None


def _share(tokens: int, before: int, upto: int, total: int) -> int:
    return round(tokens * upto / total) - round(tokens * before / total)


def _put_back(
    scheduler: Scheduler,
    carrier: Job,
    *,
    attempted: bool,
    handed_back: bool = False,
    error: UpstreamError | None = None,
    final: DispatcherError | None = None,
    now: float = 0.0,
    provider: str = "",
) -> None:
    """A request that brought no vectors: each member's texts wait again, or it is over."""
    assert carrier.batch is not None
    provider = provider or carrier.provider or ""
    retry = scheduler.config.retry
    for member, take in carrier.batch.members:
        work = member.embed
        assert work is not None
        work.in_flight -= len(take)
        if member.outcome is not None:
            continue
        if not attempted:
            member.attempts -= 1
        reason: DispatcherError | None = member.stop
        if reason is None and handed_back:
            member.handbacks += 1
            if member.handbacks > outcomes.MAX_HANDBACKS:
                reason = InternalError(f"{provider} crashed {member.handbacks} times on this job")
        if reason is None and error is not None:
            # The retry rule counts this member's failed requests, not every request that
            # carried a part of it (a split job takes several).
            counted, member.attempts = member.attempts, len(member.history) + 1
            reason = outcomes.judge_failure(member, provider, error, now, retry, scheduler.rng)
            member.attempts = counted
        if reason is None and final is not None and error is None:
            reason = final
        if reason is not None:
            scheduler.queue.remove(member)
            scheduler.finish(member, reason)
            continue
        was_queued = bool(work.unsent)
        work.unsent = sorted({*work.unsent, *(index for index, _ in take)})
        if not was_queued:
            member.provider = None
            scheduler.requeue(member)
    _land(scheduler, carrier, {})
    carrier.batch = None


def stop(scheduler: Scheduler, job: Job, reason: DispatcherError) -> None:
    """Answer a stopped embed job now; requests carrying its texts go on for the others."""
    scheduler.queue.remove(job)
    scheduler.finish(job, reason)


def _result(scheduler: Scheduler, job: Job) -> Result:
    work = job.embed
    assert work is not None
    provider = work.provider or (job.eligible[0] if job.eligible else "")
    model = work.answered_model or work.model
    return Result(
        id=job.request.id,
        job=job.id,
        provider=provider,
        model=model,
        class_=job.klass,
        embeddings=[vector or [] for vector in work.vectors],
        usage=Usage(prompt_tokens=work.usage.prompt_tokens, total_tokens=work.usage.total_tokens),
        latency_ms=round((scheduler.clock() - job.accepted_at) * 1000, 3),
        attempts=job.attempts,
        cached=work.cached == len(work.texts),
        cached_texts=work.cached,
    )
