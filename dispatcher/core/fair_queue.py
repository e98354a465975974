"""The daemon's wait room: priority levels, and fair shares between clients within a level.

Iteration yields jobs in the order they should be served: the highest level
first; within a level, the clients' queues interleaved one job each, starting
from the client served least recently. So one client's 10,000-job batch sits
beside another client's single interactive job, not in front of it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator

from dispatcher.scheduler.job import Job

Level = tuple[int, int]


class FairQueue:
    __slots__ = ("_by_class", "_by_provider", "_len", "_levels", "_order")

    def __init__(self) -> None:
        # level -> client -> jobs; dicts keep insertion order, used as the rotation
        self._levels: dict[Level, dict[str, deque[Job]]] = {}
        self._order: list[Level] = []  # levels, highest first
        self._len = 0
        self._by_class: Counter[str] = Counter()
        self._by_provider: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"<FairQueue {self._len} jobs in {len(self._levels)} levels>"

    def push(self, job: Job, *, front: bool = False) -> None:
        """Queue a job; ``front`` puts it back at the head of its client's queue (a retry)."""
        level = job.priority
        clients = self._levels.get(level)
        if clients is None:
            clients = self._levels[level] = {}
            self._order = sorted(self._levels, reverse=True)
        queue = clients.get(job.client)
        if queue is None:
            # A client new to this level is served next: it has waited for nothing yet,
            # while everyone already in the rotation has just had a turn.
            queue = deque()
            clients = self._levels[level] = {job.client: queue, **clients}
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        self._len += 1
        self._by_class[job.klass] += 1
        self._by_provider.update(job.eligible)

    def remove(self, job: Job, *, served: bool = False) -> bool:
        """Take a job out; ``served`` also moves its client to the back of the rotation."""
        clients = self._levels.get(job.priority)
        queue = clients.get(job.client) if clients is not None else None
        if clients is None or queue is None:
            return False
        try:
            queue.remove(job)
        except ValueError:
            return False
        self._len -= 1
        self._by_class[job.klass] -= 1
        self._by_provider.subtract(job.eligible)
        if not queue:
            del clients[job.client]
            if not clients:
                del self._levels[job.priority]
                self._order = sorted(self._levels, reverse=True)
        elif served:
            clients[job.client] = clients.pop(job.client)
        return True

    def __iter__(self) -> Iterator[Job]:
        for level in list(self._order):
            clients = self._levels.get(level)
            if not clients:
                continue
            queues = list(clients.values())
            depth = 0
            while queues:
                alive = []
                for queue in queues:
                    if depth < len(queue):
                        yield queue[depth]
                        alive.append(queue)
                queues = alive
                depth += 1

    def count_provider(self, name: str) -> int:
        """Queued jobs that may run on this provider."""
        return self._by_provider[name]

    def classes(self) -> dict[str, int]:
        return {k: v for k, v in self._by_class.items() if v}
