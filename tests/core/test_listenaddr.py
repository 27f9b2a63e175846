"""The listen address as the banner and the start-up log say it."""

from __future__ import annotations

import pytest

from proxy.core.listenaddr import all_interfaces, describe, url


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "http://127.0.0.1:5000"),
        ("::1", "http://[::1]:5000"),
        ("fe80::1%eth0", "http://[fe80::1%eth0]:5000"),
        ("cache.example.internal", "http://cache.example.internal:5000"),
        ("0.0.0.0", "all IPv4 interfaces, port 5000 (from this host: http://127.0.0.1:5000)"),
        ("::", "all IPv6 interfaces, port 5000 (from this host: http://[::1]:5000)"),
    ],
)
def test_the_banner_names_what_the_socket_is_bound_to(host: str, expected: str) -> None:
    assert describe("http", host, 5000) == expected


def test_ipv6_urls_have_brackets() -> None:
    assert url("https", "::1", 8443) == "https://[::1]:8443"
    assert url("https", "10.0.0.1", 8443) == "https://10.0.0.1:8443"


def test_which_hosts_mean_every_interface() -> None:
    assert all_interfaces("0.0.0.0") and all_interfaces("::")
    assert not all_interfaces("127.0.0.1") and not all_interfaces("::1")
