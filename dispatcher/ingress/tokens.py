"""Client tokens: ``[clients.NAME]`` token_env / token_file, matched in constant time.

Loaded once at start (and again on SIGHUP), each registered with the log redaction
before anything else sees it; :meth:`ClientTokens.match` compares a bearer token
with every one of them with ``hmac.compare_digest``. No aiohttp here: the daemon
loads tokens before it knows whether any front will serve them.
"""

from __future__ import annotations

import hmac
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from dispatcher import logs
from dispatcher.contract.config import ClientConfig, ConfigError

MIN_TOKEN_CHARS: Final = 16


class ClientTokens:
    """The ``[clients.NAME]`` tokens: name -> token, never shown (``__repr__`` counts them)."""

    def __init__(self, tokens: Mapping[str, str] | None = None) -> None:
        self._tokens = {
            name: token.encode("utf-8", "surrogateescape") for name, token in (tokens or {}).items()
        }

    def __repr__(self) -> str:
        return f"<ClientTokens {len(self._tokens)} clients>"

    def __bool__(self) -> bool:
        return bool(self._tokens)

    @property
    def names(self) -> list[str]:
        return sorted(self._tokens)

    @classmethod
    def load(cls, clients: Mapping[str, ClientConfig], environ: Mapping[str, str]) -> ClientTokens:
        """Read every client's token; a missing, short, multi-line or shared one is a ConfigError.

        Each token is registered with the log redaction before anything else sees it.
        """
        tokens: dict[str, str] = {}
        for name, client in clients.items():
            if not (client.token_env or client.token_file) and (client.uids or client.groups):
                continue  # a socket-only client: its Unix users say who it is
            token = _read_token(name, client, environ)
            logs.add_secret(token)
            for other, known in tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    raise ConfigError(
                        f"clients.{name}: has the same token as clients.{other}; "
                        "give each client its own, so a token names one owner"
                    )
            tokens[name] = token
        return cls(tokens)

    def replace(self, other: ClientTokens) -> None:
        """Take the tokens of a reloaded configuration, in place (the fronts hold this one)."""
        self._tokens = other._tokens

    def match(self, authorization: str | None) -> str | None:
        """The client whose token ``Authorization: Bearer <token>`` carries, or None.

        Every token is compared, each with ``hmac.compare_digest``, so the time
        taken says nothing about which one, or how much of one, matched.
        """
        if authorization is None:
            return None
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        candidate = presented.strip().encode("utf-8", "surrogateescape")
        found: str | None = None
        for name, token in self._tokens.items():
            if hmac.compare_digest(candidate, token) and found is None:
                found = name
        return found


def _read_token(name: str, client: ClientConfig, environ: Mapping[str, str]) -> str:
    key = f"clients.{name}"
    if client.token_file:
        path = string.Template(client.token_file).safe_substitute(environ)
        source = f"{key}.token_file {path}"
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"{source}: cannot read it ({reason})") from None
    elif client.token_env:
        source = f"{key}.token_env ${client.token_env}"
        token = environ.get(client.token_env, "").strip()
    else:
        raise ConfigError(
            f"{key}: set token_env or token_file to this client's token (the HTTP front), "
            "or uids or groups (the Unix users who are this client on the socket)"
        )
    if not token:
        raise ConfigError(f"{source}: the token is empty or not set")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in token):
        raise ConfigError(
            f"{source}: the token has a space, a control character or more than one line; "
            "put the token alone on one line"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{source}: the token has {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS} (for example `openssl rand -hex 32`)"
        )
    return token
