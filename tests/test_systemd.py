"""sd_notify and socket activation, against real Unix sockets and a real child process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.systemd import Notifier, listen_fd_names, listen_fds

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def notify_path(tmp_path: Path) -> Path:
    """Where the fake service manager's datagram socket lives."""
    return tmp_path / "notify"


@pytest.fixture
def manager(notify_path: Path) -> Iterator[socket.socket]:
    """A real datagram socket standing in for systemd's notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(5)  # a missing datagram fails the test instead of hanging it
        yield sock


@pytest.fixture
def notifier(manager: socket.socket, notify_path: Path) -> Iterator[Notifier]:
    """A notifier pointed at the fake manager."""
    with Notifier({"NOTIFY_SOCKET": str(notify_path)}) as n:
        yield n


def received(manager: socket.socket) -> str:
    """Return the next datagram the fake manager received, as text."""
    return manager.recv(65536).decode()


def assert_nothing_received(manager: socket.socket) -> None:
    """Fail if a datagram is waiting (sends on a Unix datagram socket are synchronous)."""
    manager.setblocking(False)
    with pytest.raises(BlockingIOError):
        manager.recv(65536)


# Notifier: what arrives


def test_ready_sends_ready(notifier: Notifier, manager: socket.socket) -> None:
    """ready() sends exactly READY=1."""
    notifier.ready()
    assert received(manager) == "READY=1"


def test_ready_with_status_sends_one_datagram(notifier: Notifier, manager: socket.socket) -> None:
    """ready(status) sends READY=1 and STATUS in a single datagram."""
    notifier.ready("serving")
    assert received(manager) == "READY=1\nSTATUS=serving"


def test_stopping_sends_stopping(notifier: Notifier, manager: socket.socket) -> None:
    """stopping() sends exactly STOPPING=1."""
    notifier.stopping()
    assert received(manager) == "STOPPING=1"


def test_status_sends_status(notifier: Notifier, manager: socket.socket) -> None:
    """status(text) sends STATUS=text, UTF-8 included."""
    notifier.status("draining 3 jobs … 调度")
    assert received(manager) == "STATUS=draining 3 jobs … 调度"


def test_status_flattens_newlines(notifier: Notifier, manager: socket.socket) -> None:
    """A multi-line status is sent as one line so it cannot inject other states."""
    notifier.status("failed\nREADY=1")
    assert received(manager) == "STATUS=failed READY=1"


def test_watchdog_sends_watchdog(notifier: Notifier, manager: socket.socket) -> None:
    """watchdog() sends exactly WATCHDOG=1."""
    notifier.watchdog()
    assert received(manager) == "WATCHDOG=1"


def test_extend_timeout_sends_microseconds(notifier: Notifier, manager: socket.socket) -> None:
    """extend_timeout(seconds) sends EXTEND_TIMEOUT_USEC in microseconds."""
    notifier.extend_timeout(2.5)
    assert received(manager) == "EXTEND_TIMEOUT_USEC=2500000"


def test_reloading_sends_reloading_then_monotonic(
    notifier: Notifier, manager: socket.socket
) -> None:
    """reloading() sends RELOADING=1 followed by a MONOTONIC_USEC line."""
    notifier.reloading()
    first, second = received(manager).split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=")


def test_reloading_monotonic_usec_is_now(notifier: Notifier, manager: socket.socket) -> None:
    """MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds at the time of the call."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = int(received(manager).split("\n")[1].removeprefix("MONOTONIC_USEC="))
    assert before <= value <= after


def test_notify_joins_states_with_newlines(notifier: Notifier, manager: socket.socket) -> None:
    """notify(*states) sends the states newline-separated in one datagram."""
    notifier.notify("READY=1", "STATUS=serving", "MAINPID=42")
    assert received(manager) == "READY=1\nSTATUS=serving\nMAINPID=42"


def test_notify_rejects_state_without_equals() -> None:
    """A state that is not NAME=value raises ValueError, even with systemd absent."""
    with pytest.raises(ValueError, match="NAME=value"):
        Notifier({}).notify("READY")


def test_notify_rejects_newline_in_state() -> None:
    """A state spanning lines raises ValueError, since it would smuggle in another state."""
    with pytest.raises(ValueError, match="one line"):
        Notifier({}).notify("STATUS=a\nREADY=1")


def test_abstract_address_receives() -> None:
    """An '@name' NOTIFY_SOCKET reaches a socket bound in the abstract namespace."""
    name = f"dispatcher-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(5)
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as n:
            n.ready()
        assert received(abstract) == "READY=1"


def test_reads_process_environment(
    monkeypatch: pytest.MonkeyPatch, manager: socket.socket, notify_path: Path
) -> None:
    """Without an explicit mapping the notifier reads NOTIFY_SOCKET from os.environ."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    with Notifier() as n:
        n.stopping()
    assert received(manager) == "STOPPING=1"


def test_close_drops_later_notifications(notifier: Notifier, manager: socket.socket) -> None:
    """After close() nothing more is sent."""
    notifier.close()
    notifier.ready()
    assert_nothing_received(manager)


# Notifier: when systemd is absent or unreachable


def test_disabled_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NOTIFY_SOCKET unset the notifier is disabled."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().enabled is False


def test_disabled_notifier_calls_are_no_ops() -> None:
    """Every call on a disabled notifier returns quietly."""
    n = Notifier({})
    n.ready("serving")
    n.reloading()
    n.status("idle")
    n.watchdog()
    n.stopping()
    n.close()
    assert n.enabled is False


def test_relative_address_disables() -> None:
    """A NOTIFY_SOCKET that is neither absolute nor '@name' disables the notifier."""
    assert Notifier({"NOTIFY_SOCKET": "notify.sock"}).enabled is False


def test_send_to_missing_socket_is_quiet(tmp_path: Path) -> None:
    """A send to a socket that does not exist is dropped without an exception."""
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as n:
        assert n.enabled is True
        n.ready("serving")


def test_repr_shows_address_and_watchdog(notify_path: Path) -> None:
    """repr() names the socket and the ping interval."""
    n = Notifier({"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "30000000"})
    assert repr(n) == f"<Notifier {notify_path} watchdog 15s>"


# Notifier: the watchdog interval


def test_watchdog_interval_is_half_the_timeout() -> None:
    """WATCHDOG_USEC=30 s with no WATCHDOG_PID gives a ping every 15 s."""
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0


def test_watchdog_interval_with_matching_pid() -> None:
    """A WATCHDOG_PID equal to this process keeps the interval."""
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval() == 15.0


def test_watchdog_interval_none_for_other_pid() -> None:
    """A WATCHDOG_PID naming another process means this one must not ping."""
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env).watchdog_interval() is None


def test_watchdog_interval_none_when_unset() -> None:
    """Without WATCHDOG_USEC there is no watchdog."""
    assert Notifier({}).watchdog_interval() is None


def test_watchdog_interval_none_when_invalid() -> None:
    """An unparsable WATCHDOG_USEC is treated as no watchdog."""
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval() is None


# listen_fds and listen_fd_names in this process (no descriptor is touched)


def test_listen_fds_empty_when_not_activated() -> None:
    """Without LISTEN_PID and LISTEN_FDS there are no passed sockets."""
    assert listen_fds({}) == []


def test_listen_fds_empty_for_other_pid() -> None:
    """Descriptors meant for another process (LISTEN_PID mismatch) are ignored."""
    assert listen_fds({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}) == []


def test_listen_fds_leaves_given_mapping_alone() -> None:
    """A mapping passed as environ is never modified."""
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    listen_fds(env)
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}


def test_listen_fds_unsets_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With unset=True the LISTEN_* variables are removed from os.environ."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "dispatcher")
    listen_fds()
    assert {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}.isdisjoint(os.environ)


def test_listen_fds_keeps_process_environment_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With unset=False the LISTEN_* variables stay in os.environ."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    listen_fds(unset=False)
    assert os.environ["LISTEN_FDS"] == "1"


def test_listen_fd_names_from_environment() -> None:
    """LISTEN_FDNAMES gives one name per descriptor, in order."""
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "main:http"}
    assert listen_fd_names(env) == ["main", "http"]


def test_listen_fd_names_default_unknown() -> None:
    """Without LISTEN_FDNAMES every descriptor is named 'unknown'."""
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
    assert listen_fd_names(env) == ["unknown", "unknown"]


def test_listen_fd_names_empty_when_not_activated() -> None:
    """Names are only reported for descriptors passed to this process."""
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "main"}
    assert listen_fd_names(env) == []


def test_listen_fd_names_count_mismatch_raises() -> None:
    """LISTEN_FDNAMES naming a different number of descriptors raises ValueError."""
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}
    with pytest.raises(ValueError, match="LISTEN_FDNAMES"):
        listen_fd_names(env)


# listen_fds in a real socket-activated child

# The child moves the inherited listening socket onto fd 3, sets LISTEN_PID to
# its own pid (only it knows it), adopts the socket, serves one connection and
# answers with what it observed.
ACTIVATED_CHILD = r"""
import json, os, socket, sys
from dispatcher.systemd import listen_fd_names, listen_fds

inherited = int(sys.argv[1])
if inherited != 3:
    os.dup2(inherited, 3)  # the copy on fd 3 is inheritable, as systemd passes it
    os.close(inherited)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "dispatcher.socket"
names = listen_fd_names()
sockets = listen_fds()
listener = sockets[0]
connection, _ = listener.accept()
with connection, listener:
    report = {
        "request": connection.recv(1024).decode(),
        "names": names,
        "fds": [s.fileno() for s in sockets],
        "unix_stream": [listener.family == socket.AF_UNIX, listener.type == socket.SOCK_STREAM],
        "inheritable": os.get_inheritable(3),
        "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    connection.sendall(json.dumps(report).encode())
"""


@pytest.fixture(scope="module")
def activated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run a socket-activated child once, talk to it, and return its report."""
    path = tmp_path_factory.mktemp("activation") / "dispatcher.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        child = subprocess.Popen(
            [sys.executable, "-c", ACTIVATED_CHILD, str(listener.fileno())],
            pass_fds=[listener.fileno()],
            env=env,
            stderr=subprocess.PIPE,
        )
    with child, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        try:
            client.connect(str(path))
            client.sendall(b"hello")
            reply = b"".join(iter(lambda: client.recv(65536), b""))
        except OSError:
            reply = b""  # the child died early; its stderr below says why
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == 0, stderr.decode()
    report: dict[str, Any] = json.loads(reply)
    return report


def test_activated_child_serves_on_passed_socket(activated: dict[str, Any]) -> None:
    """The child accepts a connection on the passed listening socket and answers it."""
    assert activated["request"] == "hello"


def test_activated_sockets_start_at_fd_3(activated: dict[str, Any]) -> None:
    """listen_fds() returns one socket per passed descriptor, starting at fd 3."""
    assert activated["fds"] == [3]


def test_activated_socket_family_detected(activated: dict[str, Any]) -> None:
    """The wrapped socket reports the descriptor's real family and type."""
    assert activated["unix_stream"] == [True, True]


def test_activated_socket_is_close_on_exec(activated: dict[str, Any]) -> None:
    """listen_fds() marks the adopted descriptor close-on-exec."""
    assert activated["inheritable"] is False


def test_activated_environment_is_cleared(activated: dict[str, Any]) -> None:
    """listen_fds() removes the LISTEN_* variables from the child's environment."""
    assert activated["environ"] == []


def test_activated_names_are_read(activated: dict[str, Any]) -> None:
    """listen_fd_names() reports FileDescriptorName= for the passed socket."""
    assert activated["names"] == ["dispatcher.socket"]
