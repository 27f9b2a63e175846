"""Fixtures the real-client test modules share (defined beside the first tests that used them)."""

from tests.system.test_clients import containerd, proxy_log, registry2

__all__ = ["containerd", "proxy_log", "registry2"]
