"""Prometheus metrics: counters from the scheduler's observer hooks, gauges from its status."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.contract.config import MetricsConfig
from dispatcher.contract.protocol import CacheHits, CacheStatus, ChatRequest
from dispatcher.ingress.metrics import Metrics, cache_metrics, serve_metrics
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import Running, build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def metrics_server(running: Running, **config: Any) -> AsyncIterator[list[str]]:
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(
            serve_metrics,
            running.daemon.scheduler,
            MetricsConfig(**({"listen": "127.0.0.1:0"} | config)),
        )
        try:
            yield addresses
        finally:
            tg.cancel_scope.cancel()


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(url: str, *, socket: str | None = None) -> tuple[str, Samples]:
    connector = aiohttp.UnixConnector(path=socket) if socket else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{url}/metrics") as response,
    ):
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        text = await response.text()
    return content_type, parse_samples(text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_scrape_counts_jobs_attempts_and_latency(start_daemon: Any) -> None:
    """After one job, /metrics shows it by class and outcome, its attempt and both histograms."""
    async with fakes(a=Behaviour(name="a", latency_s=0.01)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            async with running.client() as client:
                await client.call(chat("hi", task="realtime"))
            content_type, samples = await scrape(addresses[0])
    assert content_type.startswith("text/plain")
    assert value(samples, "dispatcher_jobs_total", **{"class": "realtime", "outcome": "ok"}) == 1
    assert value(samples, "dispatcher_jobs_total", **{"class": "bulk", "outcome": "ok"}) == 0
    assert value(samples, "dispatcher_upstream_attempts_total", provider="a", outcome="ok") == 1
    assert value(samples, "dispatcher_upstream_rate_limited_total", provider="a") == 0
    assert value(samples, "dispatcher_job_latency_seconds_count", **{"class": "realtime"}) == 1
    assert value(samples, "dispatcher_upstream_latency_seconds_count", provider="a") == 1


async def test_scrape_reads_live_status_gauges(start_daemon: Any) -> None:
    """Slots, concurrency, tokens, queue depth and circuit state are read at scrape time."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0, rpm=40, concurrency=1)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=1, rpm=40)})
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            scheduler = running.daemon.scheduler
            jobs = [
                scheduler.submit(
                    ChatRequest(
                        id=f"s{i}", messages=[{"role": "user", "content": f"slow {i}"}], task="bulk"
                    ),
                    client="test",
                )
                for i in range(3)
            ]
            with anyio.fail_after(5):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            _, samples = await scrape(addresses[0])
            for job in jobs:
                scheduler.cancel(job)
    assert value(samples, "dispatcher_provider_in_flight", provider="a") == 1
    assert value(samples, "dispatcher_provider_concurrency", provider="a") == 1
    assert value(samples, "dispatcher_provider_tokens_available", provider="a") == 39
    assert value(samples, "dispatcher_queue_depth") == 2
    assert value(samples, "dispatcher_class_queue_depth", **{"class": "bulk"}) == 2
    assert value(samples, "dispatcher_class_queue_depth", **{"class": "realtime"}) == 0
    assert value(samples, "dispatcher_running_jobs") == 1
    assert value(samples, "dispatcher_provider_circuit_state", provider="a", state="closed") == 1
    assert value(samples, "dispatcher_provider_circuit_state", provider="a", state="open") == 0
    assert value(samples, "dispatcher_provider_state", provider="a", state="busy") == 1


async def test_scrape_shows_the_caches_and_embeddings_batching(start_daemon: Any) -> None:
    """Cache hits and misses per kind, the embedding cache and texts per request are scraped."""
    async with fakes(e=Behaviour(name="e", kind="embed", embed_dims=4)) as f:
        config = build_config({"e": provider_entry(f["e"])})
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            async with running.client() as client:
                await client.call({"op": "embed", "input": ["a", "b"]})
                await client.call({"op": "embed", "input": ["a"]})
            _, samples = await scrape(addresses[0])
    assert value(samples, "dispatcher_cache_hits_total", kind="embed") == 1
    assert value(samples, "dispatcher_cache_misses_total", kind="embed") == 2
    assert value(samples, "dispatcher_embed_cache_texts") == 2
    assert value(samples, "dispatcher_embed_cache_bytes") == 2 * 4 * 4
    assert value(samples, "dispatcher_embed_requests_total") == 1
    assert value(samples, "dispatcher_embed_texts_sent_total") == 2
    assert value(samples, "dispatcher_embed_texts_per_request") == 2
    assert value(samples, "dispatcher_coalesced_total") == 0


def test_cache_figures_of_a_status_become_metrics() -> None:
    """Every cache figure of a status is exported: per kind, sizes, batching, coalesced."""
    cache = CacheStatus(
        kinds={"chat": CacheHits(hits=4, misses=6), "embed": CacheHits(hits=90, misses=10)},
        embed_texts=100,
        embed_bytes=409_600,
        embed_requests=3,
        texts_per_request=3.33,
        coalesced=49,
    )

    class Collector:
        def collect(self) -> Any:
            return cache_metrics(cache, texts_sent=10)

    registry = CollectorRegistry()
    registry.register(Collector())  # a collector is anything with collect()
    samples = parse_samples(generate_latest(registry).decode())
    assert value(samples, "dispatcher_cache_hits_total", kind="chat") == 4
    assert value(samples, "dispatcher_cache_misses_total", kind="chat") == 6
    assert value(samples, "dispatcher_cache_hits_total", kind="embed") == 90
    assert value(samples, "dispatcher_cache_misses_total", kind="embed") == 10
    assert value(samples, "dispatcher_embed_cache_texts") == 100
    assert value(samples, "dispatcher_embed_cache_bytes") == 409_600
    assert value(samples, "dispatcher_embed_requests_total") == 3
    assert value(samples, "dispatcher_embed_texts_sent_total") == 10
    assert value(samples, "dispatcher_embed_texts_per_request") == 3.33
    assert value(samples, "dispatcher_coalesced_total") == 49


async def test_upstream_429_is_counted(start_daemon: Any) -> None:
    """A 429 from upstream shows in the 429 counter and as a rate_limited attempt."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="status", status=429, retry_after=0.01))
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            async with running.client() as client:
                await client.call(chat("hi"))
            _, samples = await scrape(addresses[0])
    assert value(samples, "dispatcher_upstream_rate_limited_total", provider="a") == 1
    assert (
        value(samples, "dispatcher_upstream_attempts_total", provider="a", outcome="rate_limited")
        == 1
    )
    assert value(samples, "dispatcher_upstream_attempts_total", provider="a", outcome="ok") == 1
    assert value(samples, "dispatcher_jobs_total", **{"class": "default", "outcome": "ok"}) == 1


async def test_failed_job_is_counted_by_its_code(start_daemon: Any) -> None:
    """A job that fails is counted under its error code, not in the latency histogram."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="status", status=400))
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            async with running.client() as client:
                await client.call(chat("hi"))
            _, samples = await scrape(addresses[0])
    assert (
        value(
            samples, "dispatcher_jobs_total", **{"class": "default", "outcome": "upstream_failed"}
        )
        == 1
    )
    assert (
        value(samples, "dispatcher_upstream_attempts_total", provider="a", outcome="rejected") == 1
    )
    assert value(samples, "dispatcher_job_latency_seconds_count", **{"class": "default"}) is None


async def test_serves_on_a_unix_socket_and_cleans_up(start_daemon: Any, tmp_path: Path) -> None:
    """With [metrics] socket, /metrics answers there; on exit the socket and observer are gone."""
    path = tmp_path / "metrics.sock"
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running:
            scheduler = running.daemon.scheduler
            before = list(scheduler.observers)  # the budgets observe every job anyway
            async with metrics_server(running, listen=None, socket=str(path)) as addresses:
                assert addresses == [f"unix:{path}"]
                assert len(scheduler.observers) == len(before) + 1
                _, samples = await scrape("http://metrics", socket=str(path))
            assert scheduler.observers == before
    assert value(samples, "dispatcher_provider_concurrency", provider="a") is not None
    assert not path.exists()


async def test_openmetrics_when_asked(start_daemon: Any) -> None:
    """A scraper that asks for OpenMetrics gets it."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{addresses[0]}/metrics", headers=headers) as response,
            ):
                content_type = response.headers["Content-Type"]
                text = await response.text()
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_each_metrics_has_its_own_registry() -> None:
    """Two Metrics never share series, and nothing lands in the process-global registry."""
    first, second = Metrics(), Metrics()
    first.on_attempt("a", "rate_limited", 0.5)
    assert (
        first.registry.get_sample_value("dispatcher_upstream_rate_limited_total", {"provider": "a"})
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "dispatcher_upstream_rate_limited_total", {"provider": "a"}
        )
        is None
    )
    assert (
        REGISTRY.get_sample_value("dispatcher_upstream_rate_limited_total", {"provider": "a"})
        is None
    )
    assert b"dispatcher_upstream_latency_seconds_bucket" in first.render()


async def test_usage_is_counted_per_client(start_daemon: Any) -> None:
    """Jobs, upstream tokens and cached answers per client, as the fake billed them."""
    async with fakes(a=Behaviour(name="a", latency_s=0.01)) as f:
        config = build_config(
            {"a": provider_entry(f["a"])}, clients={"me": {"uids": [os.getuid()]}}
        )
        async with start_daemon(config) as running, metrics_server(running) as addresses:
            async with running.client() as client:
                await client.call(chat("hi", temperature=0))
                await client.call(chat("hi", temperature=0))  # from the cache
            _, samples = await scrape(addresses[0])
    stats = f["a"].stats
    assert value(samples, "dispatcher_client_jobs_total", client="me", outcome="ok") == 2
    assert value(samples, "dispatcher_client_cached_jobs_total", client="me") == 1
    prompt = value(
        samples, "dispatcher_client_tokens_total", client="me", provider="a", kind="prompt"
    )
    completion = value(
        samples, "dispatcher_client_tokens_total", client="me", provider="a", kind="completion"
    )
    assert (prompt, completion) == (stats.prompt_tokens, stats.completion_tokens)
