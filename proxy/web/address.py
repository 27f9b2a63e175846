"""The address a request reached us at: its Host header when that is a plain ``host[:port]``,
else loopback and the port the request came in on (or ``default_port``)."""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web

from proxy.core.hostheader import proxy_address

# The port a front worker says its client reached (serve --workers): the request came to us
# over a Unix socket, which has none.
RELAYED_PORT: Final = web.RequestKey("relayed_port", int)


def reached_at(request: web.BaseRequest, default_port: int) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple):
        port = sockname[1]
    else:
        port = request.get(RELAYED_PORT, default_port)
    return proxy_address(request.headers.get(hdrs.HOST), f"127.0.0.1:{port}")
