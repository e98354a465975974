"""Where jobs meet upstreams: the provider actor, its supervisor, per-adapter quirks, the upstream wire."""
