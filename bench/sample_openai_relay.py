"""A Twilio <-> OpenAI Realtime relay written the way Twilio's own sample is written
(``twilio-samples/speech-assistant-openai-realtime-api-python``: FastAPI, the ``websockets``
client, JSON parsed and built for every frame, a mark after every audio delta), as the peer the
bridge's OpenAI connector is measured beside (``python -m bench.load --targets sample-openai
bridge-openai``). Written here from that design, not copied; no signature check, no record, as
in the sample.

    python -m bench.sample_openai_relay PORT ws://127.0.0.1:AGENT/openai/{call_id}
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
import websockets
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()
OPENAI_URL = "ws://127.0.0.1:9/openai/{call_id}"


@app.websocket("/media")
async def media_stream(websocket: WebSocket) -> None:
    await websocket.accept()
    stream_sid, openai_ws = None, None
    started = asyncio.get_running_loop().create_future()

    async def from_twilio() -> None:
        nonlocal stream_sid, openai_ws
        try:
            async for message in websocket.iter_text():
                data = json.loads(message)
                if data["event"] == "start":
                    stream_sid = data["start"]["streamSid"]
                    url = OPENAI_URL.replace("{call_id}", data["start"]["customParameters"]["call_id"])
                    openai_ws = await websockets.connect(url, additional_headers={"Authorization": "Bearer sk-bench"})
                    await openai_ws.send(json.dumps({"type": "session.update", "session": {
                        "type": "realtime", "output_modalities": ["audio"],
                        "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
                                  "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"}},
                    }}))  # fmt: skip
                    started.set_result(None)
                elif data["event"] == "media" and openai_ws is not None:
                    await openai_ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": data["media"]["payload"]}))
                elif data["event"] == "stop":
                    break
        except WebSocketDisconnect:
            pass
        finally:
            if openai_ws is not None:
                await openai_ws.close()

    async def to_twilio() -> None:
        await started
        try:
            async for message in openai_ws:
                response = json.loads(message)
                if response.get("type") == "response.output_audio.delta" and "delta" in response:
                    await websocket.send_json({"event": "media", "streamSid": stream_sid, "media": {"payload": response["delta"]}})
                    await websocket.send_json({"event": "mark", "streamSid": stream_sid, "mark": {"name": "responsePart"}})
        except websockets.ConnectionClosed:
            pass

    await asyncio.gather(from_twilio(), to_twilio(), return_exceptions=True)


if __name__ == "__main__":
    port, OPENAI_URL = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
