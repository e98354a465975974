"""Unix socket helpers shared by every listener: binding with the right mode, peer uid."""

from __future__ import annotations

import grp
import os
import socket
import stat
import struct
from pathlib import Path

import anyio
from anyio.abc import SocketAttribute, SocketStream


def peer_uid(stream: SocketStream) -> int:
    """The connecting process's uid (SO_PEERCRED); -1 when the platform cannot tell."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError, anyio.TypedAttributeLookupError):
        return -1
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def bind_unix_socket(path: str, mode: int, group: str | None) -> socket.socket:
    """Bind and listen, with the mode applied before anyone can connect.

    Creates the parent directory, replaces a stale socket file left by a crash,
    and refuses to steal the socket of a daemon that is still running.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket; remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            target.unlink()  # stale: nobody is listening
        else:
            raise OSError(f"another dispatcher is already serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # the file is born with the right mode: no race
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(1024)
    sock.setblocking(False)
    return sock
