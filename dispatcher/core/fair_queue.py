"""The daemon's wait room: priority levels, and fair shares between clients within a level.

Iteration yields jobs in the order they should be served: the highest level
first; within a level, the clients' queues interleaved one job each, starting
from the client served least recently. So one client's 10,000-job batch sits
beside another client's single interactive job, not in front of it.

Cost: ``push`` and ``remove`` are O(1) (a new level costs a sort of the levels),
so cancelling a whole connection's 100,000 jobs is linear, not quadratic. Each
client's queue is an indexed structure, two ordered dicts used as ordered sets:
``front`` holds the jobs put back at the head (retries, hedged copies), newest
first when read in reverse; ``back`` holds the rest in arrival order. Reading
``reversed(front)`` then ``back`` gives exactly the order a deque fed with
``appendleft`` and ``append`` would have, and either deletes any member in O(1),
so a removed job is no longer referenced at all. They are ``OrderedDict``s, not
plain dicts: a plain dict leaves a dummy slot behind every job served from its
head, and every new iteration walks over all of them until the next resize (with
100,000 queued, up to some 25 us per planning turn and per client, growing with
the queue); an ordered dict starts from its first live member at once.

A job is queued at most once, and the queue must not change while an iteration
over it is still to be resumed (a dict's iterator raises ``RuntimeError`` then):
the planner reads the order first and the scheduler carries the plan out after.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator

from dispatcher.scheduler.job import Job

Level = tuple[int, int]


class _ClientQueue:
    """One client's jobs at one level, in serving order; O(1) push at either end and remove."""

    __slots__ = ("back", "front")

    def __init__(self) -> None:
        # put back at the head: the newest is served first
        self.front: OrderedDict[Job, None] = OrderedDict()
        self.back: OrderedDict[Job, None] = OrderedDict()  # in arrival order

    def __len__(self) -> int:
        return len(self.front) + len(self.back)

    def __iter__(self) -> Iterator[Job]:
        yield from reversed(self.front)
        yield from self.back

    def push(self, job: Job, *, front: bool) -> None:
        (self.front if front else self.back)[job] = None

    def discard(self, job: Job) -> bool:
        """Take ``job`` out; False if it is not here."""
        if self.back.pop(job, _ABSENT) is None:
            return True
        return self.front.pop(job, _ABSENT) is None


_ABSENT = object()


class FairQueue:
    __slots__ = ("_by_class", "_by_provider", "_len", "_levels", "_order")

    def __init__(self) -> None:
        # level -> client -> jobs; dicts keep insertion order, used as the rotation
        self._levels: dict[Level, dict[str, _ClientQueue]] = {}
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
            queue = _ClientQueue()
            clients = self._levels[level] = {job.client: queue, **clients}
        queue.push(job, front=front)
        self._len += 1
        self._by_class[job.klass] += 1
        self._by_provider.update(job.eligible)

    def remove(self, job: Job, *, served: bool = False) -> bool:
        """Take a job out; ``served`` also moves its client to the back of the rotation."""
        clients = self._levels.get(job.priority)
        queue = clients.get(job.client) if clients is not None else None
        if clients is None or queue is None or not queue.discard(job):
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
            # Round robin: one job from each client in rotation order, then the next one
            # from each that has more, until every client's queue is read.
            turns = [iter(queue) for queue in clients.values()]
            while turns:
                alive = []
                for turn in turns:
                    job = next(turn, None)
                    if job is not None:
                        yield job
                        alive.append(turn)
                turns = alive

    def count_provider(self, name: str) -> int:
        """Queued jobs that may run on this provider."""
        return self._by_provider[name]

    def classes(self) -> dict[str, int]:
        return {k: v for k, v in self._by_class.items() if v}
