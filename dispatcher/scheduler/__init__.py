"""The scheduler: the async shell that carries out the core's decisions (see ``loop``)."""
