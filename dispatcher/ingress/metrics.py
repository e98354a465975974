"""Prometheus metrics: counters fed by the scheduler, gauges read from its status at scrape time.

:class:`Metrics` is a scheduler :class:`~dispatcher.scheduler.handles.Observer`: every
upstream attempt and every final answer bumps a counter or a histogram.
:class:`StatusCollector` reads :meth:`Scheduler.status` when Prometheus scrapes,
so the gauges (queue depth, slots, tokens, circuit state) are never stale and
cost nothing between scrapes. Both live in a registry of their own, never the
process-global one: tests run many daemons in one process.

:func:`serve_metrics` serves ``GET /metrics`` in the Prometheus text format
(OpenMetrics when the scraper asks for it) on ``[metrics] listen`` and/or
``[metrics] socket``, for as long as its task runs. It is anonymous on a
loopback address and on the socket (its file mode guards it); on any other
address a scrape needs a ``[clients.NAME]`` token as ``Authorization: Bearer``
(Prometheus' ``authorization`` setting), and without one configured it refuses
to start. The ``metrics.listening`` line says which.

Every metric name starts with ``dispatcher_``; labels are bounded by the
configuration (providers, classes) and by our fixed code lists.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, get_args

import anyio
import structlog
from aiohttp import web
from anyio.abc import TaskStatus
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dispatcher.contract.config import ConfigError, MetricsConfig, is_loopback, parse_listen
from dispatcher.contract.errors import UpstreamKind
from dispatcher.contract.protocol import CacheStatus, Result
from dispatcher.core.circuit import CircuitState
from dispatcher.ingress.openai_errors import error_response
from dispatcher.ingress.web import ClientTokens, WebService, is_unix_connection
from dispatcher.scheduler.clients import client_name, upstream_tokens
from dispatcher.scheduler.job import Job
from dispatcher.scheduler.loop import Scheduler

log = structlog.get_logger("dispatcher.metrics")

# LLM answers take from tens of milliseconds (embeddings) to minutes (thinking models).
METRICS_NEEDS_TOKEN: Final = (
    "[metrics] listen on a non-loopback address needs at least one [clients.NAME] token "
    "for the scraper's Authorization: Bearer header; or listen on 127.0.0.1"
)
MAX_CONNECTIONS: Final = 64  # scrapers are few
LATENCY_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
CIRCUIT_STATES: Final[tuple[str, ...]] = get_args(CircuitState)
PROVIDER_STATES: Final = ("ready", "busy", "rate_limited", "disabled", *CIRCUIT_STATES[1:])
ATTEMPT_OUTCOMES: Final[tuple[str, ...]] = ("ok", *get_args(UpstreamKind))


class Metrics:
    """The scheduler's counters and histograms, in a registry of their own.

    Attach it with :meth:`attach` (it adds itself to ``scheduler.observers`` and
    registers a :class:`StatusCollector`); :meth:`detach` undoes the first.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.jobs = Counter(
            "dispatcher_jobs",
            "Jobs answered, by class and outcome (ok or the error code).",
            ["class", "outcome"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "dispatcher_upstream_attempts",
            "Upstream attempts, by provider and outcome (ok or the failure kind).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "dispatcher_upstream_rate_limited",
            "Upstream 429 answers, by provider.",
            ["provider"],
            registry=self.registry,
        )
        self.job_latency = Histogram(
            "dispatcher_job_latency_seconds",
            "Time from acceptance to the answer of successful jobs, by class.",
            ["class"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.attempt_latency = Histogram(
            "dispatcher_upstream_latency_seconds",
            "Duration of upstream attempts, by provider (failures included).",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.client_jobs = Counter(
            "dispatcher_client_jobs",
            "Jobs answered per client (its [clients] name, or uid:N), by outcome.",
            ["client", "outcome"],
            registry=self.registry,
        )
        self.client_tokens = Counter(
            "dispatcher_client_tokens",
            "Tokens spent upstream per client and provider, by kind (prompt or completion); "
            "cached and shared answers cost none.",
            ["client", "provider", "kind"],
            registry=self.registry,
        )
        self.client_cached = Counter(
            "dispatcher_client_cached_jobs",
            "Jobs per client answered from the cache or by an identical job's call.",
            ["client"],
            registry=self.registry,
        )
        self._collector: StatusCollector | None = None

    def __repr__(self) -> str:
        attached = "attached" if self._collector is not None else "detached"
        return f"<Metrics {attached}>"

    # -- Observer ----------------------------------------------------------------------

    def on_attempt(self, provider: str, outcome: str, latency_s: float) -> None:
        self.attempts.labels(provider, outcome).inc()
        self.attempt_latency.labels(provider).observe(latency_s)
        if outcome == "rate_limited":
            self.rate_limited.labels(provider).inc()

    def on_job_done(self, job: Job, outcome: object) -> None:
        """``outcome`` is a Result or anything with a wire ``code`` (an error, a replayed Error)."""
        client = client_name(job.owner)
        if isinstance(outcome, Result):
            self.jobs.labels(job.klass, "ok").inc()
            self.job_latency.labels(job.klass).observe(outcome.latency_ms / 1000)
            self.client_jobs.labels(client, "ok").inc()
            if outcome.cached or outcome.attempts == 0:
                self.client_cached.labels(client).inc()
            elif upstream_tokens(outcome):
                usage = outcome.usage
                self.client_tokens.labels(client, outcome.provider, "prompt").inc(
                    usage.prompt_tokens
                )
                self.client_tokens.labels(client, outcome.provider, "completion").inc(
                    usage.completion_tokens
                )
        else:
            code = str(getattr(outcome, "code", "internal"))
            self.jobs.labels(job.klass, code).inc()
            self.client_jobs.labels(client, code).inc()

    # -- wiring ------------------------------------------------------------------------

    def attach(self, scheduler: Scheduler) -> None:
        """Observe ``scheduler`` and expose its live status; series start at zero."""
        if self._collector is None:
            self._collector = StatusCollector(scheduler)
            self.registry.register(self._collector)
        for name in scheduler.limits:
            self.attempts.labels(name, "ok")
            self.rate_limited.labels(name)
        for klass in (*scheduler.config.classes, "embed"):
            self.jobs.labels(klass, "ok")
        if self not in scheduler.observers:
            scheduler.observers.append(self)

    def detach(self, scheduler: Scheduler) -> None:
        """Stop observing (the collector stays: a last scrape still sees the status)."""
        if self in scheduler.observers:
            scheduler.observers.remove(self)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything, as a scrape would get it."""
        return generate_latest(self.registry)


class StatusCollector:
    """Gauges read from :meth:`Scheduler.status` at scrape time."""

    def __init__(
        self, scheduler: Scheduler, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.scheduler = scheduler
        self.clock = clock

    def __repr__(self) -> str:
        return f"<StatusCollector of {self.scheduler!r}>"

    def collect(self) -> Iterable[Metric]:
        status = self.scheduler.status()
        yield _gauge("dispatcher_queue_depth", "Jobs waiting for a provider.", status.queued)
        yield _gauge("dispatcher_running_jobs", "Upstream attempts in flight.", status.running)
        yield _gauge(
            "dispatcher_uptime_seconds", "Seconds since the daemon started.", status.uptime_s
        )

        by_class = GaugeMetricFamily(
            "dispatcher_class_queue_depth", "Jobs waiting, by class.", labels=["class"]
        )
        classes = dict.fromkeys((*self.scheduler.config.classes, "embed"), 0) | status.classes
        for klass, count in classes.items():
            by_class.add_metric([klass], count)
        yield by_class

        families = {
            "queued": (
                "dispatcher_provider_queue_depth",
                "Jobs waiting that this provider may take.",
            ),
            "in_flight": ("dispatcher_provider_in_flight", "Slots in use, by provider."),
            "concurrency": ("dispatcher_provider_concurrency", "Slots, by provider."),
            "rpm": (
                "dispatcher_provider_rpm",
                "Configured requests per minute (0: none published).",
            ),
            "tokens": (
                "dispatcher_provider_tokens_available",
                "Rate tokens available now, by provider.",
            ),
            "learned_rpm": (
                "dispatcher_provider_learned_rpm",
                "Requests per minute learned from 429s.",
            ),
            "latency": (
                "dispatcher_provider_service_time_seconds",
                "Smoothed service time, by provider.",
            ),
            "blocked": (
                "dispatcher_provider_blocked_seconds",
                "Seconds until a Retry-After block ends.",
            ),
        }
        gauges = {
            key: GaugeMetricFamily(name, doc, labels=["provider"])
            for key, (name, doc) in families.items()
        }
        circuit = GaugeMetricFamily(
            "dispatcher_provider_circuit_state",
            "Circuit breaker state, by provider: 1 for the current state, 0 for the others.",
            labels=["provider", "state"],
        )
        state = GaugeMetricFamily(
            "dispatcher_provider_state",
            "Provider state as `dispatcher status` shows it: 1 for the current one.",
            labels=["provider", "state"],
        )
        for name, p in status.providers.items():
            gauges["queued"].add_metric([name], p.queued)
            gauges["in_flight"].add_metric([name], p.in_flight)
            gauges["concurrency"].add_metric([name], p.concurrency)
            gauges["rpm"].add_metric([name], p.rpm)
            if p.tokens is not None:
                gauges["tokens"].add_metric([name], p.tokens)
            if p.learned_rpm is not None:
                gauges["learned_rpm"].add_metric([name], p.learned_rpm)
            gauges["latency"].add_metric([name], p.latency_ms / 1000)
            gauges["blocked"].add_metric([name], p.blocked_for_s)
            for value in dict.fromkeys((*CIRCUIT_STATES, p.circuit)):
                circuit.add_metric([name, value], 1.0 if value == p.circuit else 0.0)
            for value in dict.fromkeys((*PROVIDER_STATES, p.state)):
                state.add_metric([name, value], 1.0 if value == p.state else 0.0)
        yield from gauges.values()
        yield circuit
        yield state
        if status.cache is not None:
            yield from cache_metrics(status.cache, texts_sent=self.scheduler.embed_texts_sent)


def cache_metrics(cache: CacheStatus, *, texts_sent: int | None = None) -> Iterable[Metric]:
    """Cache hits and misses per kind (embed: texts), the embedding cache, the batching,
    and the jobs that shared another's upstream call.

    ``texts_sent`` is the scheduler's own count: the status carries only its average
    per request, rounded, and a counter of texts must add up exactly across scrapes.
    """
    hits = CounterMetricFamily(
        "dispatcher_cache_hits",
        "Cache hits, by kind (chat: answers; embed: texts).",
        labels=["kind"],
    )
    misses = CounterMetricFamily(
        "dispatcher_cache_misses",
        "Cache misses, by kind (chat: answers; embed: texts).",
        labels=["kind"],
    )
    for kind, counts in cache.kinds.items():
        hits.add_metric([kind], counts.hits)
        misses.add_metric([kind], counts.misses)
    yield hits
    yield misses
    yield _gauge(
        "dispatcher_embed_cache_texts", "Vectors in the embedding cache.", cache.embed_texts
    )
    yield _gauge(
        "dispatcher_embed_cache_bytes", "Bytes of the embedding cache's vectors.", cache.embed_bytes
    )
    yield CounterMetricFamily(
        "dispatcher_embed_requests",
        "Embeddings requests sent upstream.",
        value=cache.embed_requests,
    )
    if texts_sent is not None:
        yield CounterMetricFamily(
            "dispatcher_embed_texts_sent",
            "Texts carried by the embeddings requests sent upstream.",
            value=texts_sent,
        )
    yield _gauge(
        "dispatcher_embed_texts_per_request",
        "Average texts per embeddings request sent upstream.",
        cache.texts_per_request,
    )
    yield CounterMetricFamily(
        "dispatcher_coalesced",
        "Jobs that shared another identical job's upstream call (chat and embeddings).",
        value=cache.coalesced,
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


async def serve_metrics(
    scheduler: Scheduler,
    config: MetricsConfig,
    *,
    socket_mode: int = 0o660,
    socket_group: str | None = None,
    metrics: Metrics | None = None,
    tokens: ClientTokens | None = None,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` for ``scheduler`` until cancelled.

    ``metrics`` lets the caller own the registry, so other parts (cache, journal)
    can register their own collectors in it; by default a fresh one is made.
    ``task_status.started`` gets the bound addresses (``http://host:port``,
    ``unix:/path``) once every listener is up. On the way out the observer is
    removed from the scheduler and the socket file is deleted. A non-loopback
    ``listen`` needs ``tokens`` (raises :class:`ConfigError` before binding otherwise).
    """
    tokens = tokens if tokens is not None else ClientTokens()
    needs_token = False
    if config.listen:
        host, _port = parse_listen(config.listen, key="metrics.listen")
        needs_token = not is_loopback(host)
    if needs_token and not tokens:
        raise ConfigError(METRICS_NEEDS_TOKEN)
    # The *_created series double the output for nothing Prometheus uses. The switch is
    # process-wide, which is fine: in the daemon no one else exports metrics.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    metrics = metrics if metrics is not None else Metrics()
    metrics.attach(scheduler)
    app = web.Application(middlewares=[_scraper_access(tokens)] if needs_token else [])
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    access = "anonymous (loopback, socket)"
    if needs_token:
        access = f"a client token on {config.listen}" + (
            "; anonymous on the socket" if config.socket else ""
        )
    service = WebService(
        app,
        name="metrics",
        listen=config.listen,
        socket_path=config.socket,
        socket_mode=socket_mode,
        socket_group=socket_group,
        max_connections=MAX_CONNECTIONS,
        access=access,
    )
    try:
        await service.run(task_status=task_status)
    finally:
        metrics.detach(scheduler)


def _scraper_access(tokens: ClientTokens) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Over TCP a scrape needs a client token; over the Unix socket it does not."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        name = tokens.match(request.headers.get("Authorization"))
        if is_unix_connection(request) or name is not None:
            return await handler(request)
        log.info("metrics.unauthorized", path=request.path)
        return error_response(
            "bad_request",
            "send Authorization: Bearer <token> with a client token of this daemon",
            status=401,
            openai_code="invalid_api_key",
        )

    return check
