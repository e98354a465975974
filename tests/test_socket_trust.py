"""Clients talk only to a daemon they trust: root, themselves, or the service's user.

Whoever can create the socket path first (a world-writable directory such as
/tmp) could listen there, read the prompts sent to it and forge the answers.
The client reads the listener's uid (SO_PEERCRED) and refuses anyone else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dispatcher.client.connection import trusted_uids, untrusted_peer

NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None

# Listens as "nobody" on the path given, records what it receives, answers a forged pong.
SQUATTER = r"""
import os, socket, sys
path, log, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.setgid(uid); os.setuid(uid)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path); server.listen(1)
open(log + ".ready", "w").close()
conn, _ = server.accept()
conn.settimeout(3)
received = b""
try:
    while chunk := conn.recv(65536):
        received += chunk
        conn.sendall(b'{"event":"pong","id":"forged"}\n')
except OSError:
    pass
open(log, "wb").write(received)
"""


def _wait_for(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_root_ourselves_and_listed_uids_are_trusted() -> None:
    """Root and our own uid are trusted, and so is a uid listed in DISPATCHER_TRUSTED_UIDS."""
    assert {0, os.getuid()} <= trusted_uids({})
    assert 4242 in trusted_uids({"DISPATCHER_TRUSTED_UIDS": "4242, 17"})
    assert untrusted_peer("/x.sock", 4242, {"DISPATCHER_TRUSTED_UIDS": "4242"}) is None
    refusal = untrusted_peer("/x.sock", 4243, {})
    assert refusal is not None
    assert "uid 4243" in refusal
    assert "DISPATCHER_TRUSTED_UIDS=4243" in refusal


@pytest.mark.skipif(NOBODY is None, reason="needs root to listen as another user")
def test_a_squatted_socket_gets_no_prompt() -> None:
    """A socket served by another user is refused before a single byte is sent to it."""
    assert NOBODY is not None
    shared = Path(tempfile.mkdtemp(prefix="dsp-squat-"))
    shared.chmod(0o1777)  # like /tmp: anyone may create a file there
    path, log = shared / "dispatcher.sock", shared / "received"
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER, str(path), str(log), str(NOBODY)])
    try:
        _wait_for(Path(f"{log}.ready"))
        done = subprocess.run(
            [sys.executable, "-m", "dispatcher", "chat", "my secret prompt", "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        squatter.wait(timeout=10)
    finally:
        if squatter.poll() is None:
            squatter.kill()
        received = log.read_bytes() if log.exists() else b"(the squatter wrote nothing)"
        shutil.rmtree(shared, ignore_errors=True)
    assert done.returncode == 77, done.stderr
    assert "not by root, you or the dispatcher service" in done.stderr
    assert received == b""
