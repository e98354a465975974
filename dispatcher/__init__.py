"""dispatcher: one local Unix socket in front of several LLM providers."""

__version__ = "0.1.0"
