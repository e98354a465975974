"""The shared limits ledger in Redis: one fleet, one window and one set of slots per key.

Keys. Everything lives under ``{prefix}:`` and each provider's keys share one
hash tag, ``{prefix}:{<provider>}:...``, so in a cluster they sit in one slot and
one script may touch them all:

* ``window`` ZSET: one entry per send, scored by the server time (ms) it was granted;
* ``slots`` ZSET: one lease per attempt in flight, member ``<instance>/<job id>``,
  scored by its expiry (server ms);
* ``block`` string with a PX expiry: a fleet-wide Retry-After block;
* ``learned`` hash: ``rpm``, a limit some host learned;
* ``tokens`` hash: tokens charged per hour (field = hours since the epoch), summed
  over the trailing 24 hours; the hash expires 25 h after the last charge.

Per client with a daily budget, ``{prefix}:client:{<name>}:<YYYY-MM-DD>`` counts the
tokens the whole fleet charged it on that UTC day (a string, INCRBY, expiring after two
days); each host adds its charges in the next refresh's pipeline and reads the others'.

Beside them, ``{prefix}:instances`` is a ZSET of heartbeats (member = instance
name, score = server time) and ``{prefix}:freed`` the Pub/Sub channel on which a
release announces the provider whose slot came free.

Scripts. Every decision that reads and writes runs as one Lua script, registered
once and sent by EVALSHA, clocked by the server's ``TIME`` so the hosts' clocks
never meet. ``acquire`` is one round trip: drop window entries and leases that
expired, then refuse ("blocked", "rate", "concurrency", in that order) or add one
window entry and one lease; it returns the fleet's window and slot counts, kept
as the fleet view. ``release`` is one round trip too: drop our lease, charge the
tokens, publish "freed". ``run`` batches the rest into one pipeline per turn
(every ``REFRESH_S`` at most): our heartbeat, the renewal of all our leases
(every ``lease_s / 3``) and a read-only view of every provider this ledger knows.

Leases. A lease expires ``lease_s`` after its last renewal, so a host that dies
frees its slots within ``lease_s`` without anyone's help. Renewal re-adds every
attempt this host still runs (it does not skip leases that lapsed): the set of
live attempts in our memory is the truth, and a lease that expired during a
partition belongs to a request that really is in flight.

Degraded mode. When a call fails or takes longer than ``timeout_s``, the ledger
turns "degraded" (logged once) and decides alone, with :class:`LocalShare`: at
most ``max(1, rpm // n)`` sends per window and ``max(1, concurrency // n)``
slots, where ``n`` is the number of instances last seen alive. Nothing waits on
Redis while degraded; ``run`` probes every ``PROBE_S`` and, once Redis answers,
first writes back what happened meanwhile (sends, releases, tokens, blocks,
learned limits, leases), then turns "shared" again.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from dispatcher.store.ledger import Decision, Deny, Grant, LedgerMode, ProviderUse

log = structlog.get_logger("dispatcher.ledger")

REFRESH_S = 0.5  # the fleet view is at most this old while shared
PROBE_S = 0.5  # while degraded, how often run() asks Redis again
ALIVE_S = 3.0  # an instance counts as alive this long after its last heartbeat
FORGET_INSTANCE_S = 3600.0  # heartbeats older than this are deleted
CONCURRENCY_HINT_S = 1.0  # the longest retry_after of a "concurrency" refusal
LISTEN_POLL_S = 1.0  # the freed listener wakes this often even when nothing comes
KEY_GRACE_MS = 1000  # a window or slots key outlives its newest member by this much
CLIENT_DAY_KEEP_S = 2 * 86_400  # a client's day count outlives its day by a day

# Errors that mean "Redis is unreachable, slow or confused": all turn into degraded mode.
# TimeoutError is also what anyio.fail_after raises.
_UNAVAILABLE = (RedisError, OSError, TimeoutError)

# The shared preamble: the server's clock in integer milliseconds (integers print
# exactly in Lua string concatenation, fractions of 13-digit numbers do not), and a
# PEXPIRE that only ever lengthens, so hosts with a shorter lease_s never cut others'.
_LUA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: window, slots, block. ARGV: rpm, concurrency, window_ms, lease_ms, entry, lease.
# Returns {code, retry_after_ms, window count, slot count}; code 0 grant, 1 blocked,
# 2 rate, 3 concurrency.
_ACQUIRE = (
    _LUA_PRELUDE
    + """
local rpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local spent = redis.call('ZCARD', KEYS[1])
local held = redis.call('ZCARD', KEYS[2])
local blocked = redis.call('PTTL', KEYS[3])
if blocked > 0 then return {1, blocked, spent, held} end
if rpm > 0 and spent >= rpm then
  -- the send whose leaving brings the count under rpm (more than rpm entries can
  -- exist after degraded hosts wrote their sends back)
  local e = redis.call('ZRANGE', KEYS[1], spent - rpm, spent - rpm, 'WITHSCORES')
  return {2, tonumber(e[2]) + window - now, spent, held}
end
if conc > 0 and held >= conc then
  local e = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {3, math.min(tonumber(e[2]) - now, tonumber(ARGV[7])), spent, held}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now + lease, ARGV[6])
keep(KEYS[1], window + 1000)
keep(KEYS[2], lease + 1000)
return {0, 0, spent + 1, redis.call('ZCARD', KEYS[2])}
"""
)

# KEYS: slots, tokens. ARGV: lease member ('' for none), tokens, channel, provider.
_RELEASE = (
    _LUA_PRELUDE
    + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  local hour = math.floor(tonumber(t[1]) / 3600)
  redis.call('HINCRBY', KEYS[2], tostring(hour), tokens)
  for _, h in ipairs(redis.call('HKEYS', KEYS[2])) do
    if tonumber(h) <= hour - 24 then redis.call('HDEL', KEYS[2], h) end
  end
  redis.call('EXPIRE', KEYS[2], 90000)
end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 0
"""
)

# KEYS: slots. ARGV: lease_ms, members... Re-adds lapsed leases on purpose (module doc).
_RENEW = (
    _LUA_PRELUDE
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
keep(KEYS[1], lease + 1000)
return #ARGV - 1
"""
)

# KEYS: window. ARGV: window_ms, then (entry, age_ms) pairs: sends granted while degraded.
_RESTORE = (
    _LUA_PRELUDE
    + """
local window = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local at = now - tonumber(ARGV[i + 1])
  if at > now - window then redis.call('ZADD', KEYS[1], at, ARGV[i]) end
end
keep(KEYS[1], window + 1000)
return 0
"""
)

# KEYS: block. ARGV: ms. The later of two blocks wins.
_BLOCK = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 0
"""

# KEYS: instances. ARGV: instance, alive_ms, forget_ms. Returns the instances alive.
_HEARTBEAT = (
    _LUA_PRELUDE
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[2]), '+inf')
"""
)

# KEYS: window, slots, block, learned, tokens. ARGV: window_ms. Read-only.
# Returns {window count, live slots, block ms left, learned rpm, tokens in 24 h}.
_VIEW = (
    _LUA_PRELUDE
    + """
local spent = redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')
local held = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local blocked = redis.call('PTTL', KEYS[3])
local learned = tonumber(redis.call('HGET', KEYS[4], 'rpm') or '0') or 0
local hour = math.floor(tonumber(t[1]) / 3600)
local tokens = 0
local all = redis.call('HGETALL', KEYS[5])
for i = 1, #all, 2 do
  if tonumber(all[i]) > hour - 24 then tokens = tokens + tonumber(all[i + 1]) end
end
return {spent, held, math.max(blocked, 0), learned, tokens}
"""
)

_SCRIPTS = (_ACQUIRE, _RELEASE, _RENEW, _RESTORE, _BLOCK, _HEARTBEAT, _VIEW)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class LocalShare:
    """One provider's conservative share of the fleet's limits, decided alone: ``now`` is an argument.

    It records every send and every slot of this host in both modes, because in
    degraded mode our own sends of the current window still count. What the other
    hosts used is known only as the fleet counts last seen; :meth:`seed` counts them
    as "ghosts" for as long as they may still matter (a window for sends, a lease
    for slots), which errs on fewer sends: for any window the fleet then sends at
    most ``max(last seen count, n * share) <= rpm``.
    """

    __slots__ = ("_ghost_held", "_ghost_sent", "blocked_until", "held", "sent", "window_s")

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.sent: deque[float] = deque()  # our grants' times, oldest first
        self.held: set[str] = set()  # job ids of our attempts in flight
        self.blocked_until = -math.inf
        self._ghost_sent: deque[float] = deque()  # others' sends, stamped when we degraded
        self._ghost_held: deque[float] = deque()  # expiry of others' slots, as last seen

    def __repr__(self) -> str:
        return (
            f"<LocalShare sent {len(self.sent)}+{len(self._ghost_sent)} per {self.window_s:g}s "
            f"held {len(self.held)}+{len(self._ghost_held)}>"
        )

    def _expire(self, now: float) -> None:
        for spent in (self.sent, self._ghost_sent):
            while spent and spent[0] + self.window_s <= now:
                spent.popleft()
        while self._ghost_held and self._ghost_held[0] <= now:
            self._ghost_held.popleft()

    def decide(self, now: float, *, rpm: int, concurrency: int, instances: int) -> Decision:
        """Grant or refuse one send under ``1 / instances`` of the limits (0 means unlimited)."""
        self._expire(now)
        if self.blocked_until > now:
            return Deny("blocked", self.blocked_until - now)
        n = max(1, instances)
        if rpm > 0:
            share = max(1, rpm // n)
            spent = len(self.sent) + len(self._ghost_sent)
            if spent >= share:
                times = sorted(itertools.chain(self.sent, self._ghost_sent))
                return Deny("rate", times[spent - share] + self.window_s - now)
        if concurrency > 0:
            share = max(1, concurrency // n)
            if len(self.held) + len(self._ghost_held) >= share:
                first = self._ghost_held[0] - now if self._ghost_held else CONCURRENCY_HINT_S
                return Deny("concurrency", min(first, CONCURRENCY_HINT_S))
        return Grant()

    def take(self, now: float, job_id: str) -> None:
        """Record a granted send and its slot (in either mode)."""
        self._expire(now)  # bounded in shared mode too, where nothing else trims
        self.sent.append(now)
        self.held.add(job_id)

    def free(self, job_id: str) -> None:
        self.held.discard(job_id)

    def seed(self, now: float, *, fleet_spent: int, fleet_held: int, lease_s: float) -> None:
        """Count the other hosts' last-seen use as ghosts: sends for a window, slots for a lease."""
        self._expire(now)
        self._ghost_sent.extend([now] * max(0, fleet_spent - len(self.sent)))
        self._ghost_held.extend([now + lease_s] * max(0, fleet_held - len(self.held)))

    def forget_ghosts(self) -> None:
        """The fleet counts again: drop what :meth:`seed` guessed."""
        self._ghost_sent.clear()
        self._ghost_held.clear()


@dataclass(slots=True, eq=False)
class _Provider:
    """What this ledger knows of one provider: keys, the local share, the fleet as last seen."""

    name: str
    window: str
    slots: str
    block: str
    learned: str
    tokens: str
    local: LocalShare = field(default_factory=LocalShare)
    # the fleet as last seen (an acquire reply or a refresh)
    spent_seen: int = 0
    held_seen: int = 0
    tokens_seen: int = 0
    learned_rpm: int = 0
    # what happened while degraded, written back before shared mode resumes
    unsynced_sends: list[tuple[float, str]] = field(default_factory=list)  # (time, entry)
    unsynced_releases: set[str] = field(default_factory=set)  # job ids
    unsynced_tokens: int = 0
    unsynced_block: bool = False
    unsynced_learned: bool = False

    def has_unsynced(self) -> bool:
        return bool(
            self.unsynced_sends
            or self.unsynced_releases
            or self.unsynced_tokens
            or self.unsynced_block
            or self.unsynced_learned
        )


class RedisLedger:
    """The fleet's limits in Redis, with a conservative local share when Redis is away.

    Satisfies :class:`~dispatcher.store.ledger.SharedLedger`. ``__init__`` does no
    I/O; :meth:`run` owns the connection, and until it has reached Redis the ledger
    is "degraded" and decides alone (``instances_hint`` stands for the fleet size).
    """

    def __init__(
        self,
        url: str,
        *,
        instance: str,
        key_prefix: str = "dispatcher",
        lease_s: float = 30.0,
        instances_hint: int = 1,
        timeout_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode: LedgerMode = "degraded"
        self.instances = max(1, instances_hint)  # the hint until a heartbeat counts them
        self.on_freed: Callable[[str], None] | None = None
        self.on_view: Callable[[dict[str, ProviderUse]], None] | None = None
        self._url = url
        self._instance = instance
        self._prefix = key_prefix
        self._lease_s = lease_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._channel = f"{key_prefix}:freed"
        self._instances_key = f"{key_prefix}:instances"
        self._providers: dict[str, _Provider] = {}
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._degraded_logged = False
        self._renewed_at = -math.inf
        self._sends = itertools.count()
        # client -> [fleet tokens today as last seen, our charges not yet written]
        self._clients: dict[str, list[int]] = {}
        self._client_day = ""

    def __repr__(self) -> str:
        held = sum(len(p.local.held) for p in self._providers.values())
        return (
            f"<RedisLedger {self._instance} {self.mode} instances {self.instances} "
            f"providers {len(self._providers)} held {held}>"
        )

    # -- the contract ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep in touch with Redis until cancelled; report started at once.

        One task heartbeats, renews our leases, refreshes the fleet view and, while
        degraded, probes Redis and writes back what happened meanwhile; another
        listens on the "freed" channel and calls :attr:`on_freed` per message.

        Resource handling: the Redis client (a connection pool) is created here and
        closed on the way out, with a short shielded deadline; on a clean stop our
        heartbeat is removed so the others count one instance fewer at once. Leases
        are left to expire: attempts still running belong to the owner, and a
        cancelled ledger must look exactly like a host that died.

        Error handling: started is reported before any I/O, so the daemon starts
        while Redis is down. A lost, refused or slow connection never escapes: it
        turns the mode "degraded" and each task retries every ``PROBE_S``. Only a
        malformed ``url`` (``ValueError``, before started) or an exception raised by
        ``on_freed`` itself propagates.
        """
        client = Redis.from_url(
            self._url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),  # our own deadline decides; no hidden retries
        )
        self._scripts = {lua: client.register_script(lua) for lua in _SCRIPTS}
        self._client = client
        try:
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_in_touch, client)
                tg.start_soon(self._listen_freed, client)
        finally:
            self._client = None
            was_shared, self.mode = self.mode == "shared", "degraded"  # alone from now on
            with anyio.CancelScope(shield=True):
                if was_shared:
                    with anyio.move_on_after(self._timeout_s), contextlib.suppress(*_UNAVAILABLE):
                        await client.zrem(self._instances_key, self._instance)
                with anyio.move_on_after(self._timeout_s):
                    await client.aclose()

    async def acquire(
        self, provider: str, job_id: str, *, rpm: int, concurrency: int, window_s: float
    ) -> Decision:
        """Take one token of ``rpm`` per ``window_s`` and one of ``concurrency`` slots, or neither.

        One EVALSHA while shared; decided locally, without I/O, while degraded. If
        the call is cancelled or times out after the script ran, the window entry
        stays (a send counted that never happened: safe) and the lease, renewed by
        no one, expires within ``lease_s``.
        """
        p = self._provider(provider)
        p.local.window_s = window_s
        client = self._client
        if self.mode == "shared" and client is not None:
            entry = f"{self._instance}/{job_id}/{next(self._sends)}"
            try:
                with anyio.fail_after(self._timeout_s):
                    reply = await self._scripts[_ACQUIRE](
                        keys=[p.window, p.slots, p.block],
                        args=[
                            rpm,
                            concurrency,
                            _ms(window_s),
                            _ms(self._lease_s),
                            entry,
                            self._lease_member(job_id),
                            _ms(CONCURRENCY_HINT_S),
                        ],
                        client=client,
                    )
            except _UNAVAILABLE as exc:
                self._degrade(exc)
            else:
                return self._settle(p, job_id, [int(x) for x in reply])
        return self._acquire_locally(p, job_id, rpm=rpm, concurrency=concurrency)

    async def release(self, provider: str, job_id: str, *, tokens: int = 0) -> None:
        """Give the slot back and charge ``tokens``; never raises, never waits past ``timeout_s``."""
        p = self._provider(provider)
        p.local.free(job_id)
        client = self._client
        if self.mode == "shared" and client is not None:
            try:
                with anyio.fail_after(self._timeout_s):
                    await self._scripts[_RELEASE](
                        keys=[p.slots, p.tokens],
                        args=[self._lease_member(job_id), tokens, self._channel, provider],
                        client=client,
                    )
            except _UNAVAILABLE as exc:
                self._degrade(exc)
            else:
                return
        # Written back on resume; a release that did reach Redis before it timed out
        # charges its tokens twice, which errs on the side of the quota.
        p.unsynced_releases.add(job_id)
        p.unsynced_tokens += tokens

    async def block(self, provider: str, seconds: float) -> None:
        """Record a Retry-After block for every host (the later of two blocks wins)."""
        p = self._provider(provider)
        p.local.blocked_until = max(p.local.blocked_until, self._clock() + seconds)
        client = self._client
        if self.mode == "shared" and client is not None:
            try:
                with anyio.fail_after(self._timeout_s):
                    await self._scripts[_BLOCK](keys=[p.block], args=[_ms(seconds)], client=client)
            except _UNAVAILABLE as exc:
                self._degrade(exc)
            else:
                return
        p.unsynced_block = True

    async def learned(self, provider: str, rpm: int) -> None:
        """Record a learned request limit for every host."""
        p = self._provider(provider)
        p.learned_rpm = rpm
        client = self._client
        if self.mode == "shared" and client is not None:
            try:
                with anyio.fail_after(self._timeout_s):
                    await client.hset(p.learned, "rpm", rpm)
            except _UNAVAILABLE as exc:
                self._degrade(exc)
            else:
                return
        p.unsynced_learned = True

    def note_block(self, provider: str, seconds: float) -> None:
        """Record a block for every host in the next turn (no I/O: for synchronous callers)."""
        p = self._provider(provider)
        p.local.blocked_until = max(p.local.blocked_until, self._clock() + seconds)
        p.unsynced_block = True

    def note_learned(self, provider: str, rpm: int) -> None:
        """Record a learned request limit for every host in the next turn (no I/O)."""
        p = self._provider(provider)
        p.learned_rpm = rpm
        p.unsynced_learned = True

    def charge_client(self, client: str, tokens: int, *, day: str) -> None:
        """Add ``tokens`` (negative: a correction) to the client's fleet-wide count for ``day``;
        written in the next refresh (no I/O here)."""
        self._roll_clients(day)
        self._clients.setdefault(client, [0, 0])[1] += tokens

    def client_tokens(self, client: str, *, day: str) -> int:
        """The tokens the fleet charged ``client`` on ``day``: as last seen, plus ours since."""
        self._roll_clients(day)
        seen, unsynced = self._clients.setdefault(client, [0, 0])
        return seen + unsynced

    def _roll_clients(self, day: str) -> None:
        if day != self._client_day:
            self._client_day = day
            for counts in self._clients.values():
                counts[0] = counts[1] = 0  # a new UTC day: every budget starts again

    def use(self) -> dict[str, ProviderUse]:
        """The fleet as last seen, per provider this ledger has met (no I/O)."""
        now = self._clock()
        return {
            name: ProviderUse(
                in_flight=p.held_seen,
                window_spent=p.spent_seen,
                daily_tokens=p.tokens_seen + p.unsynced_tokens,
                blocked_for_s=max(0.0, p.local.blocked_until - now),
                learned_rpm=p.learned_rpm or None,
            )
            for name, p in self._providers.items()
        }

    # -- decisions ------------------------------------------------------------------

    def _provider(self, name: str) -> _Provider:
        p = self._providers.get(name)
        if p is None:
            base = f"{self._prefix}:{{{name}}}"
            p = _Provider(
                name=name,
                window=f"{base}:window",
                slots=f"{base}:slots",
                block=f"{base}:block",
                learned=f"{base}:learned",
                tokens=f"{base}:tokens",
            )
            self._providers[name] = p
        return p

    def _lease_member(self, job_id: str) -> str:
        return f"{self._instance}/{job_id}"

    def _settle(self, p: _Provider, job_id: str, reply: list[int]) -> Decision:
        """Apply the acquire script's answer to what we know, and translate it."""
        code, wait_ms, p.spent_seen, p.held_seen = reply
        now = self._clock()
        if code == 0:
            p.local.take(now, job_id)
            return Grant()
        if code == 1:
            p.local.blocked_until = max(p.local.blocked_until, now + wait_ms / 1000)
            return Deny("blocked", wait_ms / 1000)
        return Deny("rate" if code == 2 else "concurrency", wait_ms / 1000)

    def _acquire_locally(
        self, p: _Provider, job_id: str, *, rpm: int, concurrency: int
    ) -> Decision:
        now = self._clock()
        decision = p.local.decide(now, rpm=rpm, concurrency=concurrency, instances=self.instances)
        if isinstance(decision, Grant):
            p.local.take(now, job_id)
            sends = p.unsynced_sends
            if sends and sends[0][0] + p.local.window_s <= now:  # out of every window already
                sends[:] = [s for s in sends if s[0] + p.local.window_s > now]
            sends.append((now, f"{self._instance}/{job_id}/{next(self._sends)}"))
        return decision

    def _degrade(self, exc: BaseException) -> None:
        if self.mode == "shared":
            # Leases granted from here on exist only in our memory; the others' use is
            # counted as ghosts until it must be over (LocalShare.seed).
            now = self._clock()
            for p in self._providers.values():
                p.local.seed(
                    now, fleet_spent=p.spent_seen, fleet_held=p.held_seen, lease_s=self._lease_s
                )
            self.mode = "degraded"
        if not self._degraded_logged:
            self._degraded_logged = True
            reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            log.warning(
                "ledger.degraded",
                reason=reason,
                instance=self._instance,
                instances=self.instances,
            )

    def _resume(self) -> None:
        for p in self._providers.values():
            p.local.forget_ghosts()
        self.mode = "shared"
        self._degraded_logged = False
        log.info("ledger.shared", instance=self._instance, instances=self.instances)

    # -- I/O --------------------------------------------------------------------------

    async def _keep_in_touch(self, client: Redis) -> None:
        interval = min(REFRESH_S, self._lease_s / 3)
        while True:
            try:
                with anyio.fail_after(self._timeout_s * 2):  # at most two round trips
                    await self._turn(client)
            except _UNAVAILABLE as exc:
                self._degrade(exc)
                # Connections from before the outage would fail on first use once Redis
                # is back, and degrade us a second time: drop them all now.
                with anyio.move_on_after(self._timeout_s):
                    await client.connection_pool.disconnect()
                await anyio.sleep(PROBE_S)
            else:
                await anyio.sleep(interval)

    async def _turn(self, client: Redis) -> None:
        """One turn: write back what happened while degraded, then heartbeat, renew, refresh."""
        if self.mode != "shared" or any(
            p.unsynced_block or p.unsynced_learned for p in self._providers.values()
        ):
            await self._write_back(client)
        await self._refresh(client)
        if self.on_view is not None:
            self.on_view(self.use())
        if self.mode != "shared":
            # Grants made while the refresh was on the wire: write them back too, and
            # resume with no await between the last check and the switch.
            while any(p.has_unsynced() for p in self._providers.values()):
                await self._write_back(client)
            self._resume()

    async def _write_back(self, client: Redis) -> None:
        """Tell Redis what happened while degraded, in one pipeline; on failure keep it all.

        Our sends go into the window at their true age (an age is a duration, so no
        clock skew enters), every live attempt gets its lease back at once, and
        releases, tokens, blocks and learned limits follow. Shared counts may read a
        little high until the ghosts' real entries expire: that errs on fewer sends.
        """
        now = self._clock()
        taken: list[tuple[_Provider, list[tuple[float, str]], set[str], int, bool, bool]] = []
        for p in self._providers.values():
            taken.append(
                (
                    p,
                    p.unsynced_sends,
                    p.unsynced_releases,
                    p.unsynced_tokens,
                    p.unsynced_block,
                    p.unsynced_learned,
                )
            )
            p.unsynced_sends, p.unsynced_releases, p.unsynced_tokens = [], set(), 0
            p.unsynced_block = p.unsynced_learned = False

        def build(pipe: Pipeline) -> None:
            for p, sends, releases, tokens, block, learned in taken:
                if sends:
                    # floor the age: an entry that looks younger stays longer (safe)
                    pairs = [x for at, entry in sends for x in (entry, int((now - at) * 1000))]
                    self._eval(pipe, _RESTORE, [p.window], [_ms(p.local.window_s), *pairs])
                for job_id in sorted(releases - p.local.held):
                    args = [self._lease_member(job_id), 0, self._channel, p.name]
                    self._eval(pipe, _RELEASE, [p.slots, p.tokens], args)
                if tokens:
                    self._eval(pipe, _RELEASE, [p.slots, p.tokens], ["", tokens, "", p.name])
                if block and (left := p.local.blocked_until - now) > 0:
                    self._eval(pipe, _BLOCK, [p.block], [_ms(left)])
                if learned:
                    pipe.hset(p.learned, "rpm", p.learned_rpm)
            self._renew(pipe)

        try:
            await self._execute(client, build)
        except BaseException:
            for p, sends, releases, tokens, block, learned in taken:
                p.unsynced_sends[:0] = sends
                p.unsynced_releases |= releases
                p.unsynced_tokens += tokens
                p.unsynced_block |= block
                p.unsynced_learned |= learned
            raise
        self._renewed_at = now

    async def _refresh(self, client: Redis) -> None:
        """Heartbeat, renew our leases when due, and read the fleet view: one pipeline."""
        now = self._clock()
        providers = list(self._providers.values())
        renew = now - self._renewed_at >= self._lease_s / 3
        day = self._client_day
        clients = [(name, counts[1]) for name, counts in self._clients.items()]

        def build(pipe: Pipeline) -> None:
            self._eval(
                pipe,
                _HEARTBEAT,
                [self._instances_key],
                [self._instance, _ms(ALIVE_S), _ms(FORGET_INSTANCE_S)],
            )
            for p in providers:
                keys = [p.window, p.slots, p.block, p.learned, p.tokens]
                self._eval(pipe, _VIEW, keys, [_ms(p.local.window_s)])
            for name, delta in clients:
                key = f"{self._prefix}:client:{{{name}}}:{day}"
                if delta:
                    pipe.incrby(key, delta)
                    pipe.expire(key, CLIENT_DAY_KEEP_S)
                else:
                    pipe.get(key)
            if renew:
                self._renew(pipe)

        replies = await self._execute(client, build)
        if renew:
            self._renewed_at = now
        self.instances = max(1, int(replies[0]))
        for p, view in zip(providers, replies[1 : 1 + len(providers)], strict=True):
            spent, held, blocked_ms, learned_rpm, tokens = (int(x) for x in view)
            p.spent_seen, p.held_seen, p.tokens_seen = spent, held, tokens
            if blocked_ms:
                p.local.blocked_until = max(p.local.blocked_until, now + blocked_ms / 1000)
            if learned_rpm:
                p.learned_rpm = learned_rpm
        at = 1 + len(providers)
        for name, delta in clients:
            seen = int(replies[at] or 0)
            at += 2 if delta else 1
            counts = self._clients.get(name)
            if counts is not None and self._client_day == day:
                counts[0], counts[1] = seen, counts[1] - delta

    def _renew(self, pipe: Pipeline) -> None:
        for p in self._providers.values():
            if p.local.held:
                members = [self._lease_member(job_id) for job_id in sorted(p.local.held)]
                self._eval(pipe, _RENEW, [p.slots], [_ms(self._lease_s), *members])

    def _eval(self, pipe: Pipeline, lua: str, keys: list[str], args: list[Any]) -> None:
        pipe.evalsha(self._scripts[lua].sha, len(keys), *keys, *args)

    async def _execute(self, client: Redis, build: Callable[[Pipeline], None]) -> list[Any]:
        """Run one pipeline; after a Redis restart (NOSCRIPT), load the scripts and run it again."""
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt == 2:
                    raise
                for script in self._scripts.values():
                    await client.script_load(script.script)
        raise AssertionError("unreachable")

    async def _listen_freed(self, client: Redis) -> None:
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                with anyio.fail_after(self._timeout_s):
                    await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                    if message is not None and message["type"] == "message":
                        callback = self.on_freed
                        if callback is not None:
                            callback(bytes(message["data"]).decode())
            except _UNAVAILABLE:
                pass
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout_s):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            await anyio.sleep(PROBE_S)
