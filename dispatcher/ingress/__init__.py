"""Where requests come in: the Unix socket server, the HTTP front, metrics."""
