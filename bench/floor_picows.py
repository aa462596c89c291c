"""The floor relay of ``bench/floor_relay.py`` on picows instead of the bridge's own websocket
layer, on both sides: the same per-frame work (the payload cut out of Twilio's JSON by position,
base64, and with a rate other than 8000 the bridge's resampler), so the difference between the
two floors is the websocket layer alone. Issue 11 asked whether picows should replace the
bridge's lean websocket code; this measures it. Not part of the product.

    python -m bench.floor_picows PORT AGENT_URL_TEMPLATE [RATE]
"""

from __future__ import annotations

import asyncio
import binascii
import json
import sys

from picows import WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_connect, ws_create_server

from audio import AudioFormat, agent_to_twilio, twilio_to_agent

PAYLOAD = '"payload"'


class AgentSide(WSListener):
    def __init__(self, twilio: TwilioSide):
        self.twilio = twilio

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.twilio.from_agent(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.twilio.transport is not None:
            self.twilio.transport.disconnect()


class TwilioSide(WSListener):
    def __init__(self, agent_url: str, rate: int):
        self.agent_url, self.rate = agent_url, rate
        self.transport: WSTransport | None = None
        self.agent: WSTransport | None = None
        self.prefix = b""
        self.inbound = self.outbound = None
        if rate != 8000:
            self.inbound = twilio_to_agent(AudioFormat("s16le", rate))
            self.outbound = agent_to_twilio(AudioFormat("s16le", rate))

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        text = frame.get_payload_as_ascii_text()
        at = text.find(PAYLOAD)
        if at >= 0 and self.agent is not None:
            start = text.index('"', text.index(":", at + len(PAYLOAD)) + 1) + 1
            audio = binascii.a2b_base64(text[start : text.index('"', start)])
            if self.inbound is not None:
                audio = self.inbound.process(audio)
            self.agent.send(WSMsgType.BINARY, audio)
        elif '"start"' in text[:30]:
            start = json.loads(text)
            self.prefix = ('{"event":"media","streamSid":"%s","media":{"payload":"' % start["start"]["streamSid"]).encode()
            call_id = start["start"]["customParameters"]["call_id"]
            asyncio.get_running_loop().create_task(self.open_agent(call_id))

    async def open_agent(self, call_id: str) -> None:
        transport, _ = await ws_connect(lambda: AgentSide(self), self.agent_url.replace("{call_id}", call_id))
        self.agent = transport

    def from_agent(self, audio: bytes) -> None:
        if self.outbound is not None:
            audio = self.outbound.process(audio)
        self.transport.send(WSMsgType.TEXT, self.prefix + binascii.b2a_base64(audio, newline=False) + b'"}}')

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.agent is not None:
            self.agent.disconnect()


async def main(port: int, agent_url: str, rate: int) -> None:
    def listener(request: WSUpgradeRequest) -> TwilioSide:
        return TwilioSide(agent_url, rate)

    server = await ws_create_server(listener, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8000))
