"""The root task group: start order, readiness, signals, drain and reload.

Start order: (simulator), provider actors under their supervisor, scheduler,
socket server; READY=1 only once all of them serve. SIGTERM/SIGINT drain:
stop accepting, let running work finish within ``daemon.drain_s``, cancel the
rest with a clear answer, remove the socket, exit 0; a second signal forces
the exit at once. SIGHUP reloads the configuration (a bad file is refused and
the old one kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import secrets
import signal
import socket
import sqlite3
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from dispatcher import logs, systemd
from dispatcher.contract.config import (
    Config,
    ConfigError,
    ProviderConfig,
    insecure_files,
    load_config,
    resolve_key,
)
from dispatcher.contract.errors import Cancelled
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.ingress.identity import Identities
from dispatcher.ingress.tokens import ClientTokens
from dispatcher.ingress.unix_server import Server
from dispatcher.providers.actor import ProviderActor
from dispatcher.providers.supervisor import ChildSpec, RestartIntensityExceeded, Supervisor
from dispatcher.scheduler import fleet, replay
from dispatcher.scheduler.loop import Scheduler
from dispatcher.store.embed_cache import EmbedCache
from dispatcher.store.journal import Journal
from dispatcher.store.local_ledger import LocalLedger
from dispatcher.store.redis_cache import RedisCache
from dispatcher.store.usage import UsageStore

if TYPE_CHECKING:  # the fakes load only under --simulate; the fronts only when configured
    from dispatcher.ingress.http_front import HttpFront
    from dispatcher.testing.simulator import Simulator

log = structlog.get_logger("dispatcher.app")

GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)

EXIT_OK = 0
EXIT_SOFTWARE = 70  # EX_SOFTWARE: an actor crashed past its restart limit
EXIT_OSERR = 71  # EX_OSERR: could not start (a port in use, a path not ours)


@dataclass(slots=True)
class Options:
    config_path: Path | None
    socket: str
    simulate: bool = False
    time_scale: float = 1.0
    handle_signals: bool = True  # tests run several daemons in one process and stop them directly
    tune_gc: bool = False  # the process is the daemon's alone (run()): tune the collector
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


class Daemon:
    """Wires the actors together and runs them under one task group."""

    def __init__(self, config: Config, options: Options) -> None:
        self.config = config
        self.options = options
        self.scheduler = Scheduler(config)
        self.supervisor = Supervisor()
        self.actors: dict[str, ProviderActor] = {}
        self.notifier = systemd.Notifier(options.environ)
        self.simulator: Simulator | None = None
        self.server: Server | None = None
        self.http: HttpFront | None = None
        self._tg: TaskGroup | None = None
        self.exit_code = EXIT_OK
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._sim_key = secrets.token_hex(16) if options.simulate else None
        self._ready = False
        self.tokens = ClientTokens()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Serve until stopped; the process exit code.

        Resource handling: one task group holds every actor, the scheduler, the
        ledgers, the journal and the fronts; files are created private (umask 077,
        ``state_dir`` 0700) before any is opened, since queued prompts sit in the
        journal's WAL. Error handling: an actor past its restart limit ends the run
        with ``EXIT_SOFTWARE``; everything else is answered to its client.
        """
        # Client tokens first (a missing or careless one is a ConfigError, before any bind).
        self.tokens = ClientTokens.load(self.config.clients, self.options.environ)
        # The journal's -wal and -shm hold prompts: nobody else may read them.
        umask = os.umask(0o077)
        _private_dir(Path(self.config.daemon.state_dir))
        async with AsyncExitStack() as stack:
            stack.callback(os.umask, umask)  # as it was, for whoever embeds the daemon
            if self.options.simulate:
                self.simulator = await stack.enter_async_context(self._make_simulator())
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await self._start_shared_ledger(tg)
                    for name, provider in self.config.providers.items():
                        await self._start_provider(name, provider)
                    await tg.start(self.scheduler.run)
                    await self._start_metrics(tg)
                    await self._open_ledger(stack, tg)
                    await self._open_embed_cache(stack, tg)
                    await self._open_usage(stack, tg)
                    await self._start_shared_cache(tg)
                    if self.config.journal.enabled:
                        await self._open_journal(stack, tg)
                    inherited = systemd.listen_fds()
                    self.server = Server(
                        self.scheduler,
                        self.config.daemon,
                        self.options.socket,
                        inherited=inherited[0] if inherited else None,
                    )
                    await tg.start(self.server.run)
                    await self._start_http(tg)
                    self._warn_unimplemented()
                    self.notifier.ready(self._summary())
                    log.info(
                        "daemon.ready",
                        socket=self.options.socket,
                        providers=[n for n, p in self.scheduler.limits.items() if p.enabled],
                        simulate=self.options.simulate,
                    )
                    self._ready = True
                    if self.options.tune_gc:
                        _tune_gc()
                    task_status.started()
                    tg.start_soon(self._watchdog)
                    await self._serve_until_stopped()
                    tg.cancel_scope.cancel()
            except* RestartIntensityExceeded as group:
                log.critical("daemon.giving_up", reason=str(group.exceptions[0]))
                self.exit_code = EXIT_SOFTWARE
            except* OSError as group:
                if self._ready:
                    raise
                # A port in use, a socket directory not ours: one line, not a traceback.
                log.critical("daemon.cannot_start", reason=str(group.exceptions[0]))
                self.exit_code = EXIT_OSERR
            finally:
                for actor in self.actors.values():
                    actor.close()
                self.notifier.close()
        log.info("daemon.stopped", exit_code=self.exit_code)
        return self.exit_code

    def _warn_unimplemented(self) -> None:
        """Say so, once, when the configuration asks for what this version does not do,
        or when its files are open to other users."""
        for warning in insecure_files(self.options.config_path, self.config, self.options.environ):
            log.warning("config.insecure", problem=warning)

    async def _start_shared_ledger(self, tg: TaskGroup) -> None:
        """With [cluster] redis_url, take every token and slot from the fleet's ledger.

        Started before the providers, reporting ready at once: a daemon starts while
        Redis is down, on a conservative share of each limit until Redis answers.
        """
        cluster = self.config.cluster
        if not cluster.redis_url:
            return
        from dispatcher.store.redis_ledger import RedisLedger  # redis loads for fleets only

        instance = cluster.instance_name or f"{socket.gethostname()}-{os.getpid()}"
        shared = RedisLedger(
            cluster.redis_url,
            instance=instance,
            key_prefix=cluster.key_prefix,
            lease_s=cluster.lease_s,
            instances_hint=cluster.expected_instances,
        )
        shared.on_freed = self.scheduler.on_freed
        self.scheduler.shared = shared
        self.scheduler.budgets.shared = shared
        shared.on_view = functools.partial(fleet.apply_view, self.scheduler)
        await tg.start(shared.run)
        log.info("ledger.cluster", instance=instance, key_prefix=cluster.key_prefix)

    async def _start_metrics(self, tg: TaskGroup) -> None:
        """Prometheus text on [metrics]; kept up during a drain so the drain is visible."""
        metrics, daemon = self.config.metrics, self.config.daemon
        if metrics.listen or metrics.socket:
            from dispatcher.ingress.metrics import serve_metrics  # only when configured: start-up

            await tg.start(
                functools.partial(
                    serve_metrics,
                    self.scheduler,
                    metrics,
                    socket_mode=int(daemon.socket_mode, 8),
                    socket_group=daemon.socket_group,
                    tokens=self.tokens,
                )
            )

    async def _start_http(self, tg: TaskGroup) -> None:
        """The OpenAI-compatible front on [http], onto the same scheduler."""
        http, daemon = self.config.http, self.config.daemon
        if http.listen or http.socket:
            from dispatcher.ingress.http_front import HttpFront  # only when configured: start-up

            self.http = HttpFront(
                self.scheduler,
                http,
                max_body_bytes=daemon.max_frame_bytes,
                socket_mode=int(daemon.socket_mode, 8),
                socket_group=daemon.socket_group,
                tokens=self.tokens,
            )
            await tg.start(self.http.run)

    async def _open_ledger(self, stack: AsyncExitStack, tg: TaskGroup) -> None:
        """Bring back the spends, quota use, blocks and learned limits of the last run.

        Before READY and before the journal replays, so no job is sent into a
        window a previous run already spent. A ledger that cannot be opened (a
        read-only state_dir) is logged once: the daemon serves, forgetting on restart.
        """
        ledger = LocalLedger(Path(self.config.daemon.state_dir) / "limits.sqlite3")
        try:
            await anyio.to_thread.run_sync(ledger.open)
            snapshot = await anyio.to_thread.run_sync(ledger.load)
        except (OSError, sqlite3.Error) as exc:
            log.error("ledger.unavailable", path=str(ledger.path), error=str(exc))
            return
        stack.callback(ledger.close)
        restored = ledger.restore(snapshot, self.scheduler.limits, now=self.scheduler.clock())
        self.scheduler.ledger = ledger
        await tg.start(ledger.run)
        if restored:
            log.info("ledger.restored", sends=restored, blocks=sorted(snapshot.blocks))

    async def _open_embed_cache(self, stack: AsyncExitStack, tg: TaskGroup) -> None:
        """Open the per-text embedding cache of earlier runs, before the journal replays.

        One that cannot be opened (a read-only state_dir) is logged, and an in-memory
        one serves instead: vectors are cached until the daemon stops.
        """
        cache = EmbedCache(
            Path(self.config.daemon.state_dir) / "embeddings.sqlite3",
            max_bytes=self.config.cache.embed_max_bytes,
        )
        try:
            await anyio.to_thread.run_sync(cache.open)
        except (OSError, sqlite3.Error) as exc:
            log.error("embed_cache.unavailable", path=str(cache.path), error=str(exc))
            cache = EmbedCache(None, max_bytes=self.config.cache.embed_max_bytes)
            cache.open()
        stack.callback(cache.close)
        self.scheduler.embed_cache = cache
        await tg.start(cache.run)

    async def _start_shared_cache(self, tg: TaskGroup) -> None:
        """[cache] redis_url: answers and vectors shared with the other hosts, behind ours."""
        cache = self.config.cache
        if cache.redis_url:
            shared = RedisCache(
                cache.redis_url,
                key_prefix=self.config.cluster.key_prefix,
                ttl_s=cache.ttl_s,
                embed_ttl_s=cache.embed_ttl_s,
            )
            await tg.start(shared.run)
            self.scheduler.shared_cache = shared

    async def _open_usage(self, stack: AsyncExitStack, tg: TaskGroup) -> None:
        """Open the usage aggregates, so today's spend per client holds across restarts.

        Before the journal replays, so replayed jobs are charged to today's budgets.
        One that cannot be opened is logged; usage is then kept in memory only.
        """
        store = UsageStore(
            Path(self.config.daemon.state_dir) / "usage.sqlite3",
            keep_days=self.config.usage.keep_days,
        )
        try:
            await anyio.to_thread.run_sync(store.open)
        except (OSError, sqlite3.Error) as exc:
            log.error("usage.unavailable", path=str(store.path), error=str(exc))
            return
        stack.callback(store.close)
        self.scheduler.budgets.usage = store
        self.scheduler.budgets.restore()
        await tg.start(store.run)

    async def _open_journal(self, stack: AsyncExitStack, tg: TaskGroup) -> None:
        """Open the journal and replay what a previous run left unfinished."""
        settings = self.config.journal
        journal = Journal(
            Path(self.config.daemon.state_dir) / "journal.sqlite3",
            keep_s=settings.keep_s,
            synchronous=settings.synchronous,
        )
        await anyio.to_thread.run_sync(journal.open)
        stack.callback(journal.close)
        self.scheduler.journal = journal
        await tg.start(journal.run)
        for uid, key, digest, job_id in await anyio.to_thread.run_sync(journal.keyed):
            self.scheduler.keys.bind(uid, key, digest, job_id)
        unfinished = await anyio.to_thread.run_sync(journal.unfinished)
        for stored in unfinished:
            replay.restore(self.scheduler, stored)
        if unfinished:
            log.info("journal.replayed", jobs=len(unfinished))

    # -- providers ---------------------------------------------------------------------

    def _make_simulator(self) -> Simulator:
        from dispatcher.testing.simulator import (
            SEED_BEHAVIOURS,
            Behaviour,
            Simulator,
            behaviour_from_config,
        )

        behaviours: dict[str, Behaviour] = {}
        for name, provider in self.config.providers.items():
            base = SEED_BEHAVIOURS.get(name) or behaviour_from_config(name, provider)
            behaviours[name] = msgspec.structs.replace(base, name=name, jitter=0.05)
        return Simulator(
            time_scale=self.options.time_scale, behaviours=behaviours, api_key=self._sim_key
        )

    def _provider_config(self, name: str, provider: ProviderConfig) -> ProviderConfig:
        """Under --simulate every provider points at its fake, with expected latencies scaled."""
        if self.simulator is None:
            return provider
        return msgspec.structs.replace(
            provider,
            url=self.simulator.urls[name],
            latency_s=provider.latency_s * self.options.time_scale,
            api_key_env=None,
            api_key_file=None,
        )

    def _key_for(self, name: str, provider: ProviderConfig) -> tuple[str | None, str | None]:
        """The key, or None with the reason the provider is disabled."""
        if self._sim_key is not None:
            return self._sim_key, None
        state = resolve_key(provider, self.options.environ)
        if state.key is None:
            return None, f"key {state.masked()}"
        if state.key:
            logs.add_secret(state.key)
        return state.key, None

    async def _start_provider(self, name: str, provider: ProviderConfig) -> None:
        assert self._tg is not None
        provider = self._provider_config(name, provider)
        key, problem = self._key_for(name, provider)
        limits = ProviderLimits.from_config(
            name,
            provider,
            failures=self.config.circuit.failures,
            cooldown_s=self.config.circuit.cooldown_s,
        )
        if problem is not None or not provider.enabled:
            limits.enabled = False
            limits.problem = problem or "disabled in the configuration"
            log.warning("provider.disabled", provider=name, problem=limits.problem)
        actor = ProviderActor(
            name, provider, key, limits, self.scheduler.on_outcome, shared=self.scheduler.shared
        )
        self.actors[name] = actor
        self.scheduler.add_provider(actor)
        await self._tg.start(
            self.supervisor.supervise, ChildSpec(name=name, child=actor, on_crash=actor.hand_back)
        )

    # -- signals -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Drain and stop, as SIGTERM does; a second request forces the exit."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def _serve_until_stopped(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.options.handle_signals:
                tg.start_soon(self._watch_signals)
            await self._stop.wait()
            await self.drain()
            tg.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("daemon.signal", signal=signal.Signals(signum).name)
                    self.request_stop()

    async def drain(self) -> None:
        """Stop accepting; let running work and unjournaled queued jobs finish within
        ``drain_s``; leave journaled queued jobs for the next start; cancel the rest."""
        scheduler = self.scheduler
        log.info("daemon.draining", queued=len(scheduler.queue), active=len(scheduler.active))
        self.notifier.stopping()
        scheduler.drain()
        if self.server is not None:
            await self.server.stop_accepting()
        if self.http is not None:
            await self.http.stop_accepting()
        with anyio.move_on_after(self.config.daemon.drain_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_when, self._force, tg.cancel_scope)
                await scheduler.wait_drained()
                tg.cancel_scope.cancel()
        left = [job for job in scheduler.active.values() if not job.durable]
        for job in left:
            scheduler.cancel(
                job,
                Cancelled("the daemon is shutting down; submit the job again after it restarts"),
            )
        if left:
            log.warning("daemon.cancelled_on_exit", jobs=len(left))
            with anyio.move_on_after(2.0):  # let the connections deliver those answers
                await scheduler.wait_drained()
        kept = len(scheduler.active) - len(left)
        if kept > 0:
            log.info("daemon.kept_in_journal", jobs=kept)

    async def reload(self) -> None:
        """Re-read the config file; apply it only if it is valid."""
        self.notifier.reloading()
        try:
            new = load_config(self.options.config_path)
        except ConfigError as exc:
            log.error("config.reload_rejected", error=str(exc))
            self.notifier.ready("reload rejected; old configuration kept")
            return
        await self.apply(new)
        log.info("config.reloaded", providers=sorted(new.providers))
        self.notifier.ready(self._summary())

    async def apply(self, new: Config) -> None:
        """Take a new configuration without dropping a queued or running job."""
        old_names = set(self.scheduler.limits)
        try:
            self.tokens.replace(ClientTokens.load(new.clients, self.options.environ))
        except ConfigError as exc:  # the old tokens keep working; the rest applies
            log.error("config.tokens_kept", error=str(exc))
        if self.server is not None:
            self.server.identities = Identities(new.clients)
        self.config = new
        self.scheduler.reconfigure(new)
        for name, provider in new.providers.items():
            if name not in old_names:
                await self._start_provider(name, provider)
                continue
            provider = self._provider_config(name, provider)
            key, problem = self._key_for(name, provider)
            actor = self.actors[name]
            actor.reconfigure(provider, key)
            actor.limits.apply(
                provider, enabled=problem is None and provider.enabled, problem=problem
            )
        for name in old_names - set(new.providers):
            self.scheduler.limits[name].apply(
                self.scheduler.limits[name].config,
                enabled=False,
                problem="removed from the configuration",
            )
        self.scheduler.after_reconfigure()

    async def _watchdog(self) -> None:
        """WATCHDOG=1 only while the scheduler loop keeps turning."""
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        last = -1
        while True:
            await anyio.sleep(interval)
            if self.scheduler.turns != last:
                last = self.scheduler.turns
                self.notifier.watchdog()
            else:
                log.error("watchdog.stalled", turns=last)

    def _summary(self) -> str:
        status = self.scheduler.status()
        ready = sum(1 for p in status.providers.values() if p.state != "disabled")
        return f"serving {ready}/{len(status.providers)} providers, {status.queued} queued"


def _tune_gc() -> None:
    """Collect young objects far less often, and never re-scan what start-up built.

    A job is freed by reference counting alone (see the scheduler's module doc), so the
    cyclic collector only finds the odd cycle; at its default threshold it ran ~90
    young collections per 1,000 jobs, 14% of the daemon's CPU under load (py-spy,
    dispatcher bench --scenario overhead), and about 0.5% at this one.
    """
    gc.freeze()  # the modules, config and actors of start-up live as long as the process
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 1000)


def _private_dir(path: Path) -> None:
    """``state_dir`` exists and only the daemon's user may enter it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # not ours (a shared mount): leave its mode alone
        if path.stat().st_uid == os.getuid():
            path.chmod(0o700)


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    log.warning("daemon.forced_exit")
    scope.cancel()


def run(options: Options, config: Config) -> int:
    """Run the daemon until a signal stops it; the process exit code."""
    logs.configure(config.daemon.log_level)

    async def main() -> int:
        return await Daemon(config, dataclasses.replace(options, tune_gc=True)).run()

    try:
        return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    except KeyboardInterrupt:
        return EXIT_OK
