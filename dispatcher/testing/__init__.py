"""Helpers for tests and benchmarks that build daemon state without a daemon."""
