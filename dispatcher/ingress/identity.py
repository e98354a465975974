"""Who a socket peer is: the ``[clients.NAME]`` whose ``uids`` or ``groups`` hold its user.

A uid listed in a client's ``uids`` is that client. Otherwise the user's groups (its
primary group and every group that lists it, as ``getgrouplist`` tells) are matched
against each client's ``groups``, in the config's order. A peer matching no client is
``uid:N``. Group lookups go through NSS, so each uid is resolved once per
configuration and remembered.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Mapping

import structlog

from dispatcher.contract.config import ClientConfig

log = structlog.get_logger("dispatcher.identity")


class Identities:
    """``client_for(uid)``: the client name of a Unix user, or None."""

    def __init__(self, clients: Mapping[str, ClientConfig]) -> None:
        self._by_uid = {uid: name for name, client in clients.items() for uid in client.uids}
        self._by_group: list[tuple[int, str]] = []
        for name, client in clients.items():
            for group in client.groups:
                try:
                    self._by_group.append((grp.getgrnam(group).gr_gid, name))
                except KeyError:
                    log.warning(
                        "config.unknown_group",
                        client=name,
                        group=group,
                        detail="no such group on this host; nobody is this client by it",
                    )
        self._seen: dict[int, str | None] = {}

    def __repr__(self) -> str:
        return f"<Identities uids {len(self._by_uid)} groups {len(self._by_group)}>"

    def client_for(self, uid: int) -> str | None:
        name = self._by_uid.get(uid)
        if name is not None or not self._by_group or uid < 0:
            return name
        if uid not in self._seen:
            self._seen[uid] = self._by_groups(uid)
        return self._seen[uid]

    def _by_groups(self, uid: int) -> str | None:
        try:
            user = pwd.getpwuid(uid)
            gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
        except (KeyError, OSError):
            return None  # a uid with no passwd entry (a container's): no group to match
        for gid, name in self._by_group:
            if gid in gids:
                return name
        return None
