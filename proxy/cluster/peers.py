"""Streaming a blob from another replica: an ordinary OCI blob GET to the URL it advertises,
authenticated with the cluster token, with ``Range`` to resume, on a connection pool of its
own. The answer is a :class:`~proxy.upstream.client.BlobStream` like upstream's, so a fill
reads, resumes and verifies it the same way (the bytes are checked against the digest here as
they would be from upstream: a peer is trusted with nothing)."""

from __future__ import annotations

import asyncio
from typing import Final

import aiohttp
from yarl import URL

from proxy.core.errors import Code, OciError
from proxy.core.peering import MISS_HEADER, PEER_HEADER
from proxy.core.reference import Digest
from proxy.upstream.client import BlobStream, blob_stream
from proxy.upstream.slots import Slots

PEER_CONNECTIONS: Final = 256
_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class PeerMiss(OciError):
    """The peer neither holds the blob nor fetches it from upstream."""

    def __init__(self, peer: str) -> None:
        super().__init__(Code.BLOB_UNKNOWN, "peer does not have it", {"peer": peer})
        self.peer = peer


class Peers:
    """The client side of peer streaming, for the app's life."""

    def __init__(self, me: str, token: str, *, connect_timeout: float, read_timeout: float) -> None:
        self.me = me
        self._token = token
        self.session = aiohttp.ClientSession(
            auto_decompress=False,  # the bytes we hash must be the bytes the peer stored
            read_bufsize=2 * 1024 * 1024,
            connector=aiohttp.TCPConnector(limit=0),
            trust_env=False,
        )
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.slots = Slots(PEER_CONNECTIONS)

    async def close(self) -> None:
        await self.session.close()

    def source(self, url: str, upstream: str) -> PeerSource:
        return PeerSource(self, url, upstream)


class PeerSource:
    """One peer, as the source of blobs of one upstream."""

    def __init__(self, peers: Peers, url: str, upstream: str) -> None:
        self.peers = peers
        self.url = url
        self.upstream = upstream

    @property
    def name(self) -> str:
        return f"peer {self.url}"

    async def open_blob(
        self, repository: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> BlobStream:
        peers = self.peers
        headers = {
            "Authorization": f"Bearer {peers._token}",
            PEER_HEADER: peers.me,
            "Accept-Encoding": "identity",
        }
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"
        url = URL(self.url).with_path(f"/v2/{repository}/blobs/{digest}").with_query({"ns": self.upstream})
        await peers.slots.acquire()
        try:
            try:
                resp = await peers.session.get(
                    url, headers=headers, allow_redirects=False, timeout=peers.timeout
                )
            except _TRANSPORT_ERRORS as exc:
                raise OciError(
                    Code.UNAVAILABLE, "peer unreachable", {"peer": self.url, "reason": type(exc).__name__}
                ) from exc
            if resp.status == 404 and resp.headers.get(MISS_HEADER):
                resp.release()
                raise PeerMiss(self.url)
            claimed = resp.headers.get("Docker-Content-Digest")
            if resp.status in (200, 206) and claimed is not None and claimed != str(digest):
                resp.close()
                raise OciError(Code.UPSTREAM_ERROR, "peer answered another blob", {"peer": self.url})
            return blob_stream(self.name, resp, offset, "Range" in headers, peers.slots)
        except BaseException:
            peers.slots.release()
            raise
