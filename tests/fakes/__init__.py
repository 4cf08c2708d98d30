"""Fake upstream servers for the integration tests (loopback only)."""
