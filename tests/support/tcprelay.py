"""A loopback TCP relay in front of a server (Redis), to make it slow or cut it mid-command."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal, Self

Mode = Literal["pass", "stall", "drop"]


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode: Mode = "pass"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.resumed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.resumed.set()
        for writer in list(self._writers):
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "pass":
            self.resumed.set()
        else:
            self.resumed.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer, writer), self._pipe(up_reader, writer, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            if self.mode == "drop":
                client.transport.abort()  # the command is cut off half-way
                return
            while self.mode == "stall":
                await self.resumed.wait()
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.close()
