"""The baseline: a minimal Twilio <-> agent relay written the way Twilio's public sample does it
(FastAPI websocket, ``json`` and ``base64`` per frame, no conversion, no records; its voice
webhook ``/incoming-call`` answers the sample's TwiML). The load
harness measures it side by side with the bridge. Not part of the product.

    python -m bench.naive_relay PORT AGENT_URL_TEMPLATE
"""

import asyncio
import base64
import json
import sys

import uvicorn
import websockets
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from twilio.twiml.voice_response import VoiceResponse

app = FastAPI()
AGENT_URL = "ws://127.0.0.1:9/{call_id}"


@app.post("/incoming-call")
async def incoming_call(request: Request):
    """The voice webhook as the sample writes it: ``<Connect><Stream>`` TwiML built with the
    ``twilio`` package, no signature check, no record (the call id is Twilio's CallSid)."""
    form = await request.form()
    response = VoiceResponse()
    stream = response.connect().stream(url=f"ws://{request.url.netloc}/media")
    stream.parameter(name="call_id", value=form.get("CallSid", "unknown"))
    return HTMLResponse(str(response), media_type="application/xml")


@app.websocket("/media")
async def media(ws: WebSocket):
    await ws.accept()
    stream_sid = None
    agent = None
    try:
        while True:
            message = json.loads(await ws.receive_text())
            if message["event"] == "start":
                stream_sid = message["start"]["streamSid"]
                call_id = message["start"]["customParameters"].get("call_id", stream_sid)
                agent = await websockets.connect(AGENT_URL.replace("{call_id}", call_id))

                async def from_agent(agent=agent, sid=stream_sid):
                    async for data in agent:
                        payload = base64.b64encode(data).decode()
                        await ws.send_text(json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}}))

                asyncio.create_task(from_agent())
            elif message["event"] == "media" and agent is not None:
                await agent.send(base64.b64decode(message["media"]["payload"]))
            elif message["event"] == "stop":
                break
    except (WebSocketDisconnect, websockets.ConnectionClosed):
        pass
    finally:
        if agent is not None:
            await agent.close()


if __name__ == "__main__":
    AGENT_URL = sys.argv[2]
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", ws="websockets-sansio")
