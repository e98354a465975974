"""The pure decision core: no await, no clock, no anyio or aiohttp.

Every function here takes ``now`` and the state it decides on, and returns what
to do; the async shells (``dispatcher.scheduler``, ``dispatcher.providers``)
carry it out. So each rule is tested with explicit times and no event loop.
"""
