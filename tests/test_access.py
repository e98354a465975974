"""Who may use the socket and see a job, and secrets that never leave the daemon.

The socket is born 0660. Other Unix users are real: when the tests run as root
they create a throwaway system user (and group) and run a client process as that
user; without root, or without useradd, those tests are skipped. The client
process starts as root only to import its modules (the interpreter lives under
/root, which other users cannot read), then drops to the other user's uid, gid
and groups before it touches the socket: the kernel and SO_PEERCRED see only the
other user.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from dispatcher.contract.protocol import Accepted, Result
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio

IS_ROOT = os.geteuid() == 0
HAVE_USERADD = all(shutil.which(tool) for tool in ("useradd", "userdel", "groupadd", "groupdel"))
needs_root = pytest.mark.skipif(
    not (IS_ROOT and HAVE_USERADD),
    reason="needs root and useradd/groupadd to create a throwaway second user"
    if not IS_ROOT
    else "useradd/userdel/groupadd/groupdel are not installed",
)

# Runs as root until it has imported everything, then becomes the other user.
AS_USER = r"""
import io, json, os, socket, sys
spec = json.loads(sys.argv[1])
import anyio, dispatcher.cli
from rich.console import Console
dispatcher.cli.build_parser()
Console(file=io.StringIO(), force_terminal=True).print("[red]warm up[/] {x}", {"x": 1})
anyio.run(anyio.sleep, 0, backend="asyncio", backend_options={"use_uvloop": True})
os.setgroups(spec["groups"])
os.setgid(spec["gid"])
os.setuid(spec["uid"])
assert os.getuid() == spec["uid"] and os.geteuid() == spec["uid"]
if spec["action"] == "cli":
    sys.exit(dispatcher.cli.main(spec["argv"]))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(spec["socket"])
except PermissionError as exc:
    print(json.dumps({"connect": "PermissionError", "errno": exc.errno}))
    sys.exit(13)
print(json.dumps({"connect": "ok"}))
reader = sock.makefile("rb")
for request in spec["requests"]:
    sock.sendall(json.dumps(request).encode() + b"\n")
    while True:
        reply = json.loads(reader.readline())
        if reply.get("id") == request["id"] and reply["event"] not in ("chunk",):
            print(json.dumps(reply))
            break
sock.close()
"""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def groups(self) -> list[int]:
        """The groups a login of this user would have now (primary and supplementary)."""
        return os.getgrouplist(self.name, self.gid)


@pytest.fixture
def other_user() -> Iterator[User]:
    """A throwaway system user, removed again afterwards."""
    name = f"dsp-test-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        entry = pwd.getpwnam(name)
        yield User(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def socket_group(other_user: User) -> Iterator[str]:
    """A throwaway group holding ``other_user``, removed again afterwards."""
    name = f"dsp-grp-{secrets.token_hex(4)}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "-a", "-G", name, other_user.name], check=True)
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700, root only)."""
    path = Path(tempfile.mkdtemp(prefix="dsp-access-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def as_user(user: User, spec: dict[str, Any], groups: list[int] | None = None) -> Any:
    """Run AS_USER for ``user`` (with exactly ``groups``, default: a login's groups)."""
    full = {
        "uid": user.uid,
        "gid": user.gid,
        "groups": user.groups() if groups is None else groups,
        **spec,
    }
    return await anyio.run_process(
        [sys.executable, "-c", AS_USER, json.dumps(full)],
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
    )


def replies_of(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


# -- the socket's mode ---------------------------------------------------------------


async def test_socket_is_created_0660(start_daemon: Any, tmp_path: Path) -> None:
    """The daemon's socket is a socket file with mode 0660 from the moment it exists."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running:
            mode = os.stat(running.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


# -- a second user -------------------------------------------------------------------


@needs_root
async def test_a_user_outside_the_group_cannot_connect(
    start_daemon: Any, other_user: User, open_dir: Path
) -> None:
    """Another user, not in the socket's group (root:root 0660), gets permission denied, and
    `dispatcher status` tells them so and what to do about it."""
    path = str(open_dir / "d.sock")
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config, socket=path):
            info = os.stat(path)
            raw = await as_user(
                other_user,
                {"action": "raw", "socket": path, "requests": [{"op": "ping", "id": "p"}]},
                groups=[other_user.gid],
            )
            cli = await as_user(
                other_user,
                {"action": "cli", "argv": ["status", "--socket", path]},
                groups=[other_user.gid],
            )
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert raw.returncode == 13, raw.stderr.decode()
    assert replies_of(raw.stdout) == [{"connect": "PermissionError", "errno": 13}]
    assert cli.returncode == 69, cli.stderr.decode()
    message = " ".join(cli.stderr.decode().split())
    assert "permission denied" in message
    assert path in message
    assert "group" in message  # what to do: join the socket's group


@needs_root
async def test_a_user_in_the_group_connects_but_sees_only_their_own_jobs(
    start_daemon: Any, other_user: User, socket_group: str, open_dir: Path
) -> None:
    """With daemon.socket_group, a member connects; they cannot read or cancel root's job
    (unknown_job), nor reach it through its idempotency key, but can read their own; root
    can read both."""
    path = str(open_dir / "d.sock")
    async with fakes(a=Behaviour(name="a", latency_s=0.01)) as f:
        config = build_config({"a": provider_entry(f["a"])}, daemon={"socket_group": socket_group})
        async with start_daemon(config, socket=path) as running, running.client() as root:
            info = os.stat(path)
            mine = await root.call(chat("root's secret prompt", detach=True, key="k-shared"))
            assert isinstance(mine, Accepted)
            theirs = await as_user(
                other_user,
                {
                    "action": "raw",
                    "socket": path,
                    "requests": [
                        {"op": "ping", "id": "p"},
                        {"op": "result", "id": "peek", "job": mine.job},
                        {"op": "result", "id": "peek-now", "job": mine.job, "wait": False},
                        {"op": "cancel", "id": "stop", "target": mine.job},
                        {**chat("their own prompt"), "id": "own", "detach": True},
                        {
                            **chat("root's secret prompt"),
                            "id": "same-key",
                            "detach": True,
                            "key": "k-shared",
                        },
                    ],
                },
            )
            replies = {r.get("id"): r for r in replies_of(theirs.stdout)}
            own_job = replies["own"]["job"]
            fetch_own = await as_user(
                other_user,
                {
                    "action": "raw",
                    "socket": path,
                    "requests": [{"op": "result", "id": "fetch", "job": own_job}],
                },
            )
            status = await as_user(
                other_user, {"action": "cli", "argv": ["status", "--json", "--socket", path]}
            )
            root_reads_mine = await root.call({"op": "result", "job": mine.job})
            root_reads_theirs = await root.call({"op": "result", "job": own_job})
    assert info.st_gid == grp.getgrnam(socket_group).gr_gid
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert theirs.returncode == 0, theirs.stderr.decode()
    assert replies[None] == {"connect": "ok"}
    assert replies["p"]["event"] == "pong"
    for request_id in ("peek", "peek-now", "stop"):
        assert replies[request_id]["event"] == "error", replies[request_id]
        assert replies[request_id]["code"] == "unknown_job", replies[request_id]
        assert "secret" not in json.dumps(replies[request_id])
    assert replies["own"]["event"] == "accepted"
    assert replies["same-key"]["event"] == "accepted"  # keys are per user: a job of their own
    assert replies["same-key"]["job"] not in (mine.job, own_job)
    (fetched,) = [r for r in replies_of(fetch_own.stdout) if r.get("id") == "fetch"]
    assert fetched["event"] == "result"
    assert "their own prompt" in fetched["content"]
    assert status.returncode == 0, status.stderr.decode()
    assert isinstance(root_reads_mine, Result)
    assert "root's secret prompt" in (root_reads_mine.content or "")
    assert isinstance(root_reads_theirs, Result)
    assert root_reads_theirs.job == own_job


# -- secrets -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def leaky_upstream(status: int) -> AsyncIterator[str]:
    """A provider that answers ``status`` and quotes the key it was sent, as some real
    providers do ("Incorrect API key provided: sk-...")."""

    async def handle(request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = {"error": {"message": f"Incorrect API key provided: {sent}", "code": "bad_key"}}
        return web.json_response(body, status=status, headers={"X-Echo": sent})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/v1/chat/completions"
    finally:
        await runner.cleanup()


def leaks(prefix: str, canary: str, haystack: bytes) -> list[str]:
    """Where the canary, or any 12 characters of its random part, shows up."""
    secret = canary.removeprefix(prefix)
    needles = {canary} | {secret[i : i + 12] for i in range(len(secret) - 11)}
    return sorted(n for n in needles if n.encode() in haystack)


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("sk-canary-", id="key-shaped"),  # also caught by the redactor's patterns
        pytest.param("Canary", id="plain"),  # only the daemon knowing its own keys hides it
    ],
)
async def test_a_canary_key_is_found_nowhere(
    start_daemon: Any, tmp_path: Path, log_output: Any, prefix: str
) -> None:
    """A key set in the daemon's environment reaches the providers and nothing else: not
    the replies (results, errors from a 401 and from an upstream that quotes the key),
    not `status` or `dispatcher status --json`, not the logs, not the journal files."""
    canary = prefix + secrets.token_hex(16)
    env = {"CANARY_KEY": canary}
    seen: list[bytes] = []
    async with (
        fakes(
            good=Behaviour(name="good", latency_s=0.01, api_key=canary),
            refuses=Behaviour(name="refuses", api_key="some-other-key"),
        ) as f,
        leaky_upstream(401) as quoting_401,
        leaky_upstream(500) as quoting_500,
    ):
        f["good"].script(Fault(kind="status", status=500))  # one retry on the way
        providers = {
            "good": provider_entry(f["good"], api_key_env="CANARY_KEY"),
            "refuses": provider_entry(f["refuses"], api_key_env="CANARY_KEY"),
            "quote401": {**provider_entry(f["good"], api_key_env="CANARY_KEY"), "url": quoting_401},
            "quote500": {**provider_entry(f["good"], api_key_env="CANARY_KEY"), "url": quoting_500},
        }
        config = build_config(providers, retry={"max_attempts": 2, "per_provider": 2})
        async with (
            start_daemon(config, environ=env) as running,
            await anyio.connect_unix(running.socket) as stream,
        ):
            requests = [
                chat("plain", id="1", providers=["good"]),
                chat("detached", id="2", providers=["good"], detach=True, key="k-1"),
                chat("streamed", id="3", providers=["good"], stream=True),
                chat("refused", id="4", providers=["refuses"]),
                chat("quoted 401", id="5", providers=["quote401"]),
                chat("quoted 500", id="6", providers=["quote500"]),
                {"op": "status", "id": "7"},
                {"op": "health", "id": "8", "timeout_s": 5},
            ]
            for request in requests:
                await stream.send(json.dumps(request).encode() + b"\n")
            finals: set[str] = set()
            buffer = b""
            with anyio.fail_after(30):
                while len(finals) < len(requests):
                    buffer += await stream.receive()
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        seen.append(line)
                        reply = json.loads(line)
                        if reply["event"] != "chunk":
                            finals.add(reply["id"])
            cli = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "dispatcher",
                    "status",
                    "--json",
                    "--socket",
                    running.socket,
                ],
                check=False,
            )
    replies = [json.loads(line) for line in seen]
    codes = {r["id"]: r.get("code") for r in replies if r["event"] == "error"}
    assert {r["id"] for r in replies if r["event"] == "result"} >= {"1", "3"}
    assert codes.get("4") is not None  # the 401 came back as an error ...
    assert codes.get("5") is not None
    assert any(h.get("Authorization") == f"Bearer {canary}" for h in f["good"].stats.headers)
    assert cli.returncode == 0, cli.stderr
    journal_files = sorted((tmp_path / "state").glob("journal.sqlite3*"))
    assert journal_files
    places = {
        "replies": b"\n".join(seen),
        "dispatcher status --json": cli.stdout + cli.stderr,
        "logs": log_output.getvalue().encode(),
        **{f.name: f.read_bytes() for f in journal_files},
    }
    found = {where: leaks(prefix, canary, data) for where, data in places.items()}
    assert {where: hits for where, hits in found.items() if hits} == {}
    assert b"$CANARY_KEY" in places["replies"]  # ... naming where the key comes from
