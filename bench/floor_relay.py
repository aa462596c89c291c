"""The floor: the least work a Python relay can do per frame on this machine, for the load
harness to measure beside the bridge. The bridge's own lean websocket protocol on both sides, the
media payload cut out of Twilio's JSON by position (no JSON parser), base64 both ways, and, with a
rate other than 8000, the bridge's resampler and G.711 codec both ways. No marks, no records, no
checks. Not part of the product: what it holds bounds what any Python relay of this design holds.

    python -m bench.floor_relay PORT AGENT_URL_TEMPLATE [RATE]
"""

from __future__ import annotations

import asyncio
import binascii
import json
import sys

from audio import AudioFormat, agent_to_twilio, twilio_to_agent
from bridge.protocol import websocket as wsf
from bridge.media import connection as ws_io

PAYLOAD = '"payload"'


class FloorRelay(asyncio.Protocol):
    def __init__(self, agent_url: str, rate: int):
        self.agent_url, self.rate = agent_url, rate
        self.transport = None
        self.head = b""
        self.upgraded = False
        self.reader = wsf.FrameReader(masked=True)
        self.agent: ws_io.WsConnection | None = None
        self.prefix = ""
        self.inbound = self.outbound = None
        if rate != 8000:
            self.inbound = twilio_to_agent(AudioFormat("s16le", rate))
            self.outbound = agent_to_twilio(AudioFormat("s16le", rate))

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            start_line, headers = wsf.parse_head(self.head[:end])
            self.transport.write(wsf.ServerHandshake("GET", dict(headers)).accept())
            self.upgraded = True
            data = self.head[end + 4 :]
        for op, text in self.reader.feed(data):
            if op != wsf.OP_TEXT:
                if op == wsf.OP_CLOSE:
                    self.transport.close()
                continue
            at = text.find(PAYLOAD)
            if at >= 0 and self.agent is not None:  # media: the string after "payload":
                start = text.index('"', text.index(":", at + len(PAYLOAD)) + 1) + 1
                audio = binascii.a2b_base64(text[start : text.index('"', start)])
                if self.inbound is not None:
                    audio = self.inbound.process(audio)
                self.agent.send_binary(audio)
            elif '"start"' in text[:30]:
                start = json.loads(text)
                self.prefix = '{"event":"media","streamSid":"%s","media":{"payload":"' % start["start"]["streamSid"]
                call_id = start["start"]["customParameters"]["call_id"]
                asyncio.get_running_loop().create_task(self.open_agent(call_id))

    async def open_agent(self, call_id: str) -> None:
        agent = await ws_io.connect(self.agent_url.replace("{call_id}", call_id))
        agent.listen(self.from_agent, lambda: self.transport.close())
        self.agent = agent

    def from_agent(self, audio) -> None:
        if self.outbound is not None:
            audio = self.outbound.process(audio)
        text = self.prefix + binascii.b2a_base64(audio, newline=False).decode("ascii") + '"}}'
        self.transport.write(wsf.encode(wsf.OP_TEXT, text.encode("ascii")))

    def connection_lost(self, exc) -> None:
        if self.agent is not None:
            self.agent.abort()


async def main(port: int, agent_url: str, rate: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorRelay(agent_url, rate), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8000))
