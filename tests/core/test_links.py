"""Next-page links point back at us, keep the client's routing, and carry no upstream text."""

from __future__ import annotations

import pytest

from proxy.core.links import next_link


def test_paging_values_survive_and_routing_is_added() -> None:
    link = '</v2/library/app/tags/list?n=2&last=b>; rel="next"'
    got = next_link(link, "/v2/app/tags/list", {"ns": "docker.io"})
    assert got == '</v2/app/tags/list?n=2&last=b&ns=docker.io>; rel="next"'


def test_an_absolute_upstream_url_becomes_our_path() -> None:
    link = '<https://registry.example/v2/org/app/tags/list?last=v1.2&n=100&secret=x>; rel="next"'
    got = next_link(link, "/v2/ghcr.io/org/app/tags/list", {})
    assert got == '</v2/ghcr.io/org/app/tags/list?n=100&last=v1.2>; rel="next"'


@pytest.mark.parametrize(
    "link",
    [
        "",
        "garbage",
        '</v2/a/tags/list?n=1&last=x>; rel="prev"',
        '</v2/a/tags/list?last=%0d%0aSet-Cookie:%20x>; rel="next"',
        "</v2/a/tags/list?last=" + "a" * 1000 + '>; rel="next"',
    ],
)
def test_no_link_when_there_is_no_next_page_we_can_name_safely(link: str) -> None:
    assert next_link(link, "/v2/a/tags/list", {"ns": "x"}) is None
