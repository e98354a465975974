"""Idempotency keys: a (user, key) pair names one job, whoever asks again with it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

from dispatcher.contract.protocol import JobRequest

_encoder = msgspec.json.Encoder()


def request_digest(request: JobRequest) -> str:
    """What makes two submits "the same job": everything but id, key and detach."""
    content = msgspec.structs.replace(request, id="-", key=None, detach=False)
    return hashlib.sha256(_encoder.encode(content)).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class New:
    """The key is free: accept the request as a new job."""


@dataclass(frozen=True, slots=True)
class Known:
    """The key names this job (in memory, or only in the journal): answer with it."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """The key was used for different content: refuse, so no answer is ever mixed up."""

    job_id: str


Lookup = New | Known | Conflict


class KnownJob(Exception):
    """The key names a finished job that only the journal still has: the shell fetches it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class KeyTable:
    """(uid, key) -> (content digest, job id), for every key whose job may still answer."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[tuple[int, str], tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"<KeyTable {len(self._keys)} keys>"

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._keys)

    def lookup(self, uid: int, key: str, digest: str) -> Lookup:
        entry = self._keys.get((uid, key))
        if entry is None:
            return New()
        known_digest, job_id = entry
        return Known(job_id) if known_digest == digest else Conflict(job_id)

    def bind(self, uid: int, key: str, digest: str, job_id: str) -> None:
        self._keys[(uid, key)] = (digest, job_id)

    def release(self, uid: int, key: str) -> None:
        """Free the key: its job failed in a way the client should retry with the same key."""
        self._keys.pop((uid, key), None)
