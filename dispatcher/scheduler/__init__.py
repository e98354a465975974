"""The scheduler: the async shell that carries out the core's decisions."""

from dispatcher.scheduler.loop import KnownJob, Observer, Scheduler

__all__ = ["KnownJob", "Observer", "Scheduler"]
