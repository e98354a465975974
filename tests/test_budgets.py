"""Per-client budgets: one runaway agent cannot spend everyone's free tier.

Clients are named by their Unix users on the socket (``uids``, ``groups``) and by
their tokens on the HTTP front; a budget narrows what its client may do, and holds
across restarts (today's tokens come back from the usage store in state_dir).
"""

from __future__ import annotations

import grp
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
import redis

from dispatcher.contract.config import ClientConfig, Config, parse_config
from dispatcher.contract.errors import ClientError, NoProvider, Overloaded
from dispatcher.contract.protocol import ChatRequest, Error, Result
from dispatcher.core.budgets import utc_day
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.scheduler.loop import Scheduler
from dispatcher.testing.simulator import Behaviour
from tests.helpers import (
    FakeClock,
    FakeHandle,
    build_config,
    chat,
    fakes,
    keys_for,
    provider_entry,
    until,
)

pytestmark = pytest.mark.anyio

UID = os.getuid()
OTHER_TOKEN = "other-token-Qm4Rt8Vk3Hx2Lp9W"
REDIS_URL = "redis://127.0.0.1:6379/0"
PROMPT = "tell me about the weather over the hills today " * 8  # about 100 tokens


def _with_clients(entry: dict[str, Any], tmp: Path, **clients: dict[str, Any]) -> Config:
    return build_config(
        {"a": entry},
        daemon={"state_dir": str(tmp / "state")},
        http={"socket": str(tmp / "openai.sock")},
        clients=clients,
    )


async def _http_chat(socket: str, token: str, text: str) -> tuple[int, dict[str, Any]]:
    body = {
        "model": "dispatcher/default",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 20,
    }
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket)) as session,
        session.post(
            "http://localhost/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        return response.status, await response.json()


async def test_a_daily_token_budget_ends_in_quota_exhausted_and_holds_after_a_restart(
    start_daemon: Any, tmp_path: Path
) -> None:
    """limited (daily_tokens 1000, by its uid) is refused once it spent 1000 tokens, with the
    reset time; other (by its HTTP token) is not; after a restart limited is still refused."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = _with_clients(
            provider_entry(f["a"]),
            tmp_path,
            limited={"uids": [UID], "daily_tokens": 1000},
            other={"token_env": "OTHER_TOKEN"},
        )
        env = {**keys_for(config), "OTHER_TOKEN": OTHER_TOKEN}
        replies: list[Any] = []
        async with start_daemon(config, environ=env) as running, running.client() as client:
            for n in range(20):
                reply = await client.call(chat(f"{n} {PROMPT}", max_tokens=20))
                replies.append(reply)
                if isinstance(reply, Error):
                    break
            status, other = await _http_chat(str(tmp_path / "openai.sock"), OTHER_TOKEN, PROMPT)
            billed_before_restart = f["a"].stats.prompt_tokens + f["a"].stats.completion_tokens
        async with start_daemon(config, environ=env) as running, running.client() as client:
            after_restart = await client.call(chat(f"again {PROMPT}", max_tokens=20))
            status_after, _ = await _http_chat(
                str(tmp_path / "openai.sock"), OTHER_TOKEN, f"again {PROMPT}"
            )
    refused = replies[-1]
    answered = replies[:-1]
    assert isinstance(refused, Error), replies
    assert refused.code == "quota_exhausted"
    assert "client limited" in refused.message
    assert "UTC" in refused.message
    assert refused.retry_after_s is not None
    assert 0 < refused.retry_after_s <= 86_400
    assert all(isinstance(r, Result) for r in answered)
    spent = sum(r.usage.total_tokens for r in answered if isinstance(r, Result))
    last = answered[-1]
    assert isinstance(last, Result)
    assert spent - last.usage.total_tokens < 1000  # the budget was not yet spent before it
    assert status == 200, other
    assert billed_before_restart == spent + other["usage"]["total_tokens"]
    assert isinstance(after_restart, Error)
    assert after_restart.code == "quota_exhausted"
    assert status_after == 200


def _shell(clients: dict[str, ClientConfig], *, slots: int = 50) -> tuple[Scheduler, FakeHandle]:
    config = parse_config(
        {
            "providers": {"a": {"url": "http://127.0.0.1:1/a", "model": "m", "concurrency": slots}},
            "classes": {"default": {"providers": ["a"]}},
        }
    )
    config = msgspec.structs.replace(config, clients=clients)
    clock = FakeClock()
    scheduler = Scheduler(config, clock=clock)
    handle = FakeHandle("a", ProviderLimits.from_config("a", config.providers["a"]))
    scheduler.add_provider(handle)
    return scheduler, handle


def _ask(n: int, **fields: Any) -> ChatRequest:
    return ChatRequest(id=f"r{n}", messages=[{"role": "user", "content": f"q {n}"}], **fields)


def test_an_rpm_budget_lets_ten_of_thirty_in_the_first_minute() -> None:
    """rpm 10, 30 jobs at once: 10 go in the first minute, 10 in the next; a second client
    on the same provider meanwhile gets its own share at once."""
    scheduler, handle = _shell({"busy": ClientConfig(rpm=10), "calm": ClientConfig()})
    clock = scheduler.clock
    assert isinstance(clock, FakeClock)
    busy = [scheduler.submit(_ask(n), client="client:busy") for n in range(30)]
    calm = [scheduler.submit(_ask(100 + n), client="client:calm") for n in range(5)]
    sent = set(map(id, handle.delivered))
    assert sum(id(job) in sent for job in busy) == 10
    assert all(id(job) in sent for job in calm)
    clock.advance(30.0)
    scheduler._expire(clock())
    scheduler._dispatch(clock())
    assert sum(id(job) in set(map(id, handle.delivered)) for job in busy) == 10
    clock.advance(30.5)
    scheduler._expire(clock())
    scheduler._dispatch(clock())
    assert sum(id(job) in set(map(id, handle.delivered)) for job in busy) == 20


def test_a_budget_says_what_its_client_may_not_do() -> None:
    """Classes, providers, priority and the queue share are refused with the reason."""
    scheduler, _ = _shell(
        {
            "narrow": ClientConfig(classes=["realtime"]),
            "low": ClientConfig(max_priority=2),
            "few": ClientConfig(max_queued=2),
            "elsewhere": ClientConfig(providers=[]),
        },
        slots=1,
    )
    with pytest.raises(ClientError, match="may not use the 'default' class"):
        scheduler.submit(_ask(1), client="client:narrow")
    with pytest.raises(ClientError, match="above client low's max_priority 2"):
        scheduler.submit(_ask(2, priority=5), client="client:low")
    scheduler.submit(_ask(3, priority=2), client="client:low")
    for n in range(2):
        scheduler.submit(_ask(10 + n), client="client:few")
    with pytest.raises(Overloaded, match="max_queued 2"):
        scheduler.submit(_ask(12), client="client:few")
    with pytest.raises(NoProvider, match="client elsewhere may use only no provider"):
        scheduler.submit(_ask(13), client="client:elsewhere")
    scheduler.submit(_ask(14), client="uid:1234")  # no client: no budget of its own


async def test_a_uid_mapped_to_a_client_gets_its_budget_and_others_are_uid_n(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Over the socket, the peer's uid (or its group) names the client; unmapped is uid:N."""
    group = grp.getgrgid(os.getgid()).gr_name
    async with fakes(a=Behaviour(name="a")) as f:
        base = provider_entry(f["a"])
        by_uid = _with_clients(base, tmp_path, mine={"uids": [UID], "max_priority": 1})
        by_group = _with_clients(base, tmp_path, team={"groups": [group], "max_priority": 1})
        nobody = _with_clients(base, tmp_path, someone={"uids": [UID + 1], "max_priority": 1})
        seen: dict[str, tuple[Any, str | None]] = {}
        for label, config in (("uid", by_uid), ("group", by_group), ("unmapped", nobody)):
            async with start_daemon(config) as running, running.client() as client:
                refused = await client.call(chat("urgent", priority=5))
                ok = await client.call(chat("calm", priority=1))
                assert isinstance(ok, Result)
                job = running.daemon.scheduler.lookup(ok.job)
                seen[label] = (refused, job.owner if job is not None else None)
    assert isinstance(seen["uid"][0], Error)
    assert "client mine" in seen["uid"][0].message
    assert seen["uid"][1] == "client:mine"
    assert isinstance(seen["group"][0], Error)
    assert seen["group"][1] == "client:team"
    assert isinstance(seen["unmapped"][0], Result)
    assert seen["unmapped"][1] == f"uid:{UID}"


async def test_budgets_change_on_reload_without_dropping_a_job(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A job running when the budget changes finishes; the next job meets the new budget."""
    async with fakes(a=Behaviour(name="a", latency_s=0.5)) as f:
        base = provider_entry(f["a"], latency_s=0.5)
        loose = _with_clients(base, tmp_path, mine={"uids": [UID]})
        strict = _with_clients(base, tmp_path, mine={"uids": [UID], "max_priority": 0})
        async with start_daemon(loose) as running, running.client() as client:
            async with anyio.create_task_group() as tg:
                results: list[Any] = []

                async def slow() -> None:
                    results.append(await client.call(chat("running", priority=3)))

                tg.start_soon(slow)
                await f["a"].wait_until(lambda s: s.in_flight == 1)
                await running.daemon.apply(strict)
            refused = await client.call(chat("next", priority=3))
    assert isinstance(results[0], Result)
    assert isinstance(refused, Error)
    assert "max_priority 0" in refused.message


async def test_usage_by_client_matches_what_the_upstreams_billed(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A mixed run (chat, streamed, cached, embed with a partly cached job) of two clients:
    `dispatcher usage --by client --json` gives each client exactly its upstreams' counts."""
    async with fakes(
        a1=Behaviour(name="a1"), a2=Behaviour(name="a2"), e=Behaviour(name="e", kind="embed")
    ) as f:
        providers = {name: provider_entry(fake) for name, fake in f.items()}
        clients = {
            "alpha": {"uids": [UID], "providers": ["a1", "e"]},
            "beta": {"token_env": "OTHER_TOKEN", "providers": ["a2"]},
        }
        config = build_config(
            providers,
            daemon={"state_dir": str(tmp_path / "state")},
            http={"socket": str(tmp_path / "openai.sock")},
            clients=clients,
        )
        env = {**keys_for(config), "OTHER_TOKEN": OTHER_TOKEN}
        async with start_daemon(config, environ=env) as running, running.client() as client:
            replies = [
                await client.call(chat("plain question", max_tokens=30)),
                await client.call(chat("streamed question", stream=True, max_tokens=30)),
                await client.call(chat("same again", temperature=0, max_tokens=30)),
                await client.call(chat("same again", temperature=0, max_tokens=30)),  # cached
                await client.call({"op": "embed", "input": ["one", "two", "three"]}),
                await client.call({"op": "embed", "input": ["two", "three", "four"]}),
            ]
            for text in ("beta asks", "beta asks more"):
                status, _ = await _http_chat(str(tmp_path / "openai.sock"), OTHER_TOKEN, text)
                assert status == 200
        assert all(isinstance(r, Result) for r in replies), replies
        assert [getattr(r, "cached", None) for r in replies] == [False] * 3 + [True, False, False]
        config_file = tmp_path / "usage.toml"
        config_file.write_text(_toml(config))
        argv = ["usage", "--by", "client", "--json", "--config", str(config_file)]
        done = await anyio.run_process([sys.executable, "-m", "dispatcher", *argv], check=False)
    assert done.returncode == 0, done.stderr.decode()
    rows = {row["client"]: row for row in json.loads(done.stdout)["rows"]}
    billed = {
        name: fake.stats.prompt_tokens + fake.stats.completion_tokens for name, fake in f.items()
    }
    assert rows["alpha"]["total_tokens"] == billed["a1"] + billed["e"]
    assert (
        rows["alpha"]["prompt_tokens"] == f["a1"].stats.prompt_tokens + f["e"].stats.prompt_tokens
    )
    assert rows["alpha"]["completion_tokens"] == f["a1"].stats.completion_tokens
    assert rows["alpha"]["jobs"] == 6
    assert rows["alpha"]["cached"] == 1
    assert rows["beta"]["total_tokens"] == billed["a2"]
    assert rows["beta"]["jobs"] == 2
    assert f["e"].stats.texts == 4  # "two" and "three" came from the cache the second time


def _toml(config: Config) -> str:
    """Just what `dispatcher usage` reads: state_dir, the providers the clients name, clients."""
    lines = [f'[daemon]\nstate_dir = "{config.daemon.state_dir}"\n']
    for name, p in config.providers.items():
        lines.append(
            f'[providers.{name}]\nkind = "{p.kind}"\nurl = "{p.url}"\nmodel = "{p.model}"\n'
        )
    for name, c in config.clients.items():
        lines.append(f"[clients.{name}]")
        if c.uids:
            lines.append(f"uids = {list(c.uids)}")
        if c.token_env:
            lines.append(f'token_env = "{c.token_env}"')
        if c.providers is not None:
            lines.append("providers = [" + ", ".join(f'"{p}"' for p in c.providers) + "]\n")
    return "\n".join(lines) + "\n"


async def test_a_daily_budget_holds_across_daemons_sharing_redis(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Two daemons on one Redis: what the client spent on one counts on the other."""
    prefix = f"test-budget-{uuid.uuid4().hex[:8]}"
    try:
        async with fakes(a=Behaviour(name="a")) as f:

            def config(name: str) -> Config:
                return build_config(
                    {"a": provider_entry(f["a"])},
                    daemon={"state_dir": str(tmp_path / name)},
                    cluster={"redis_url": REDIS_URL, "key_prefix": prefix, "instance_name": name},
                    clients={"limited": {"uids": [UID], "daily_tokens": 1000}},
                )

            async with (
                start_daemon(config("d1"), socket=str(tmp_path / "d1.sock")) as d1,
                start_daemon(config("d2"), socket=str(tmp_path / "d2.sock")) as d2,
            ):
                spent = 0
                async with d1.client() as client:
                    while spent < 700:
                        reply = await client.call(chat(f"{spent} {PROMPT}", max_tokens=20))
                        assert isinstance(reply, Result), reply
                        spent += reply.usage.total_tokens
                shared = d2.daemon.scheduler.budgets.shared
                assert shared is not None
                day = utc_day(time.time())
                await until(lambda: shared.client_tokens("limited", day=day) >= spent)
                async with d2.client() as client:
                    replies = []
                    for n in range(10):
                        replies.append(await client.call(chat(f"d2 {n} {PROMPT}", max_tokens=20)))
                        if isinstance(replies[-1], Error):
                            break
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()
    refused = replies[-1]
    assert isinstance(refused, Error), replies
    assert refused.code == "quota_exhausted"
    on_d2 = sum(r.usage.total_tokens for r in replies if isinstance(r, Result))
    assert spent + on_d2 - (replies[-2].usage.total_tokens if len(replies) > 1 else 0) < 1000
