"""A TCP proxy that can partition: in front of the database, it forwards both ways until
``partition()``; from then on it forwards nothing and answers nothing (the packets of a
partitioned network are dropped, not refused: connections stay open, new ones are accepted
and hear nothing) until ``heal()``, which drops what it held so clients connect afresh."""

from __future__ import annotations

import asyncio
import contextlib


class PartitionProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.partitioned = False
        self._server: asyncio.Server | None = None
        self._held: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def partition(self) -> None:
        self.partitioned = True

    def heal(self) -> None:
        self.partitioned = False
        for writer in list(self._held):  # (as a network that comes back: old connections are dead)
            writer.transport.abort()
        self._held.clear()

    async def stop(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.add(writer)
        if self.partitioned:  # accepted, and nothing ever comes back
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._held.add(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    if not self.partitioned:  # (dropped while partitioned)
                        sink.write(data)
                        await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
