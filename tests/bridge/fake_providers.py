"""Fake hosted voice models on loopback: real websocket servers that speak OpenAI Realtime's and
Gemini Live's events as their official SDKs' types define them (every event they send is
validated with those types first), and check every message the bridge sends with the same
types (``bridge.provider_types``: a wrong name or an unknown field is a recorded problem).

They behave like a speech-to-speech model: voice activity on the caller's audio (the bridge's
own detector) finds the caller's turns; at each turn's end the model answers with
``answer_ms`` of a tone, sent faster than real time, and a transcript. Scripts, chosen by the
first path segment of the URL, change that:

- ``/talk``: the default;
- ``/slow``: waits ``delay_ms`` before the answer's first audio (a barge-in before any audio);
- ``/tool``: the first answer is a function call ``lookup`` (``{"q": "table"}``); the function's
  output comes back in the next answer's transcript;
- ``/error``: a non-fatal ``error`` event after the set-up;
- ``/drop``: the first connection is cut (no close frame) after the first answer;
- ``/goaway`` (Gemini): ``goAway`` after the first answer, the connection closed 3 s later;
- ``/expire`` (OpenAI): the session ends as past its cap after the first answer.

A key other than ``KEY`` is refused at the upgrade with 401 and the provider's words.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from dataclasses import dataclass, field

import numpy as np
import websockets
from websockets.datastructures import Headers
from websockets.http11 import Response

from audio import SPEECH_END, SPEECH_START, VoiceActivityDetector, pcm_to_ulaw, ulaw_to_pcm
from bridge.protocol.hosted.gemini_live import SPEC as GEMINI
from bridge.protocol.hosted.openai_realtime import SPEC as OPENAI
from bridge.provider_types import MessageProblem, check_message

KEY = "sk-test-provider-key"
TOOL_ARGUMENTS = {"q": "table"}


def tone(rate: int, ms: float, freq: float = 523.0) -> np.ndarray:
    t = np.arange(int(rate * ms / 1000)) / rate
    return (np.sin(2 * np.pi * freq * t) * 9000).astype("<i2")


@dataclass
class Connection:
    """One websocket a fake provider accepted: what it got and sent."""

    script: str
    headers: dict[str, str]
    received: list[dict] = field(default_factory=list)  # every client message, parsed
    sent: list[dict] = field(default_factory=list)
    caller_ms: float = 0.0  # caller audio received (ms)
    answers: int = 0
    closed_by_fake: bool = False
    close_code: int | None = None  # how the bridge's side ended it (None: not closed, or cut)


class FakeProvider:
    spec = None
    path = "/"

    def __init__(self, answer_ms: int = 1500, delay_ms: int = 0):
        self.answer_ms, self.delay_ms = answer_ms, delay_ms
        self.tool: tuple[str, dict] = ("lookup", TOOL_ARGUMENTS)  # the function the "tool" script calls
        self.connections: list[Connection] = []
        self.problems: list[str] = []  # messages from the bridge the SDK's types refuse, and other faults
        self._server = None
        self.port = 0
        self._answers: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await websockets.serve(self._handle, "127.0.0.1", 0, process_request=self._check_key, max_size=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{self.port}"

    def url(self, script: str = "talk") -> str:
        return f"ws://127.0.0.1:{self.port}/{script}{self.path}"

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _check_key(self, connection, request):
        if self.key_of(request.headers) != KEY:
            body = json.dumps({"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}).encode()
            return Response(401, "Unauthorized", Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]), body)
        return None

    def key_of(self, headers) -> str | None:
        raise NotImplementedError

    async def _handle(self, ws) -> None:
        script = ws.request.path.strip("/").split("/")[0] or "talk"
        conn = Connection(script, dict(ws.request.headers))
        self.connections.append(conn)
        try:
            await self.serve(ws, conn, len(self.connections))
        except websockets.ConnectionClosed:
            pass
        finally:
            conn.close_code = ws.close_code

    def answering(self, answer) -> None:
        """An answer goes on beside what the caller keeps sending (a barge-in can cut it)."""
        task = asyncio.ensure_future(answer)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    def check(self, conn: Connection, message) -> dict | None:
        try:
            data = check_message(self.spec, message)
        except (MessageProblem, ValueError) as e:
            self.problems.append(f"{str(message)[:120]}: {e}")
            return None
        conn.received.append(data)
        return data

    async def serve(self, ws, conn: Connection, number: int) -> None:
        raise NotImplementedError

    def sent(self, kind: str) -> list[dict]:
        return [m for c in self.connections for m in c.sent if self.kind(m) == kind]

    def received(self, kind: str) -> list[dict]:
        return [m for c in self.connections for m in c.received if self.kind(m) == kind]

    @staticmethod
    def kind(message: dict) -> str:
        return message.get("type") or next(iter(message), "")


# --- OpenAI Realtime ---------------------------------------------------------------------------


def openai_event(**event) -> str:
    """A server event, checked with the SDK's ``RealtimeServerEvent`` first."""
    import pydantic
    from openai.types.realtime import RealtimeServerEvent

    event.setdefault("event_id", "event_" + secrets.token_hex(6))
    pydantic.TypeAdapter(RealtimeServerEvent).validate_python(event)
    return json.dumps(event)


class FakeOpenAI(FakeProvider):
    spec = OPENAI
    path = "/v1/realtime?model=gpt-realtime"

    def key_of(self, headers) -> str | None:
        value = headers.get("Authorization", "")
        return value.removeprefix("Bearer ") if value.startswith("Bearer ") else None

    async def serve(self, ws, conn: Connection, number: int) -> None:
        vad = VoiceActivityDetector(8000, end_silence_ms=500)
        state = {"responding": None, "sent_ms": {}, "tool_done": False}

        async def send(**event) -> None:
            await ws.send(openai_event(**event))
            conn.sent.append(event)

        session = {"type": "realtime", "object": "realtime.session", "id": "sess_" + secrets.token_hex(4), "model": "gpt-realtime"}
        await send(type="session.created", session=session)
        async for message in ws:
            event = self.check(conn, message)
            if event is None:
                continue
            kind = event["type"]
            if kind == "session.update":
                await send(type="session.updated", session={**session, **{k: v for k, v in event["session"].items() if k != "tools"}})
                if conn.script == "error":
                    await send(type="error", error={"type": "invalid_request_error", "code": "unknown_parameter", "message": "Unknown parameter: 'x'."})
            elif kind == "input_audio_buffer.append":
                pcm = ulaw_to_pcm(base64.b64decode(event["audio"]))
                conn.caller_ms += len(pcm) / 16
                for e in vad.process(pcm):
                    if e.kind == SPEECH_START:
                        await send(type="input_audio_buffer.speech_started", audio_start_ms=int(e.at_ms), item_id="item_in_" + secrets.token_hex(3))
                        state["responding"] = None  # (a barge-in cancels the answer)
                    elif e.kind == SPEECH_END:
                        item = "item_in_" + secrets.token_hex(3)
                        await send(type="input_audio_buffer.speech_stopped", audio_end_ms=int(e.at_ms), item_id=item)
                        await send(type="input_audio_buffer.committed", item_id=item, previous_item_id=None)
                        await send(
                            type="conversation.item.input_audio_transcription.completed", item_id=item, content_index=0,
                            transcript="I would like a table.", usage={"type": "duration", "seconds": 2.0},
                        )  # fmt: skip
                        self.answering(self.answer(ws, conn, send, state, number))
            elif kind == "response.create":
                self.answering(self.answer(ws, conn, send, state, number))
            elif kind == "conversation.item.truncate":
                item, end = event["item_id"], event["audio_end_ms"]
                if item not in state["sent_ms"] or end > state["sent_ms"][item]:
                    await send(type="error", error={"type": "invalid_request_error", "code": "invalid_value", "message": f"audio_end_ms {end} is past the audio of {item}"})
                    self.problems.append(f"truncate of {item} at {end} ms: past {state['sent_ms'].get(item)}")
                else:
                    await send(type="conversation.item.truncated", item_id=item, content_index=0, audio_end_ms=end)
            elif kind == "conversation.item.create" and event["item"]["type"] == "function_call_output":
                state["tool_done"] = event["item"]["output"]

    async def answer(self, ws, conn: Connection, send, state, number: int) -> None:
        response, item = "resp_" + secrets.token_hex(4), "item_out_" + secrets.token_hex(4)
        conn.answers += 1
        await send(type="response.created", response={"id": response, "object": "realtime.response", "status": "in_progress", "output": []})
        if conn.script == "tool" and not state["tool_done"] and conn.answers == 1:
            call = {"type": "function_call", "id": item, "call_id": "call_" + secrets.token_hex(4), "name": self.tool[0],
                    "arguments": json.dumps(self.tool[1]), "status": "completed", "object": "realtime.item"}  # fmt: skip
            await send(type="response.done", response={"id": response, "object": "realtime.response", "status": "completed", "output": [call]})
            return
        state["responding"] = response
        if conn.script == "slow":
            await asyncio.sleep(self.delay_ms / 1000)
        audio = pcm_to_ulaw(tone(8000, self.answer_ms).tobytes())
        state["sent_ms"][item] = 0.0
        for at in range(0, len(audio), 800):  # 100 ms deltas, as fast as they go
            if state["responding"] != response:
                break
            chunk = audio[at : at + 800]
            await send(type="response.output_audio.delta", response_id=response, item_id=item, output_index=0, content_index=0,
                       delta=base64.b64encode(chunk).decode())  # fmt: skip
            state["sent_ms"][item] += len(chunk) / 8
            await asyncio.sleep(0)
        said = f"Answer {conn.answers}" + (f" with {state['tool_done']}" if isinstance(state["tool_done"], str) else "")
        await send(type="response.output_audio_transcript.done", response_id=response, item_id=item, output_index=0, content_index=0, transcript=said)
        await send(type="response.done", response={"id": response, "object": "realtime.response", "status": "completed", "output": []})
        if conn.script == "drop" and number == 1:
            conn.closed_by_fake = True
            ws.transport.abort()
        elif conn.script == "expire":
            await send(type="error", error={"type": "invalid_request_error", "code": "session_expired", "message": "Your session hit the maximum duration of 60 minutes."})
            conn.closed_by_fake = True
            await ws.close(1000)


# --- Gemini Live -------------------------------------------------------------------------------


def gemini_message(message: dict) -> str:
    """A server message, checked with the SDK's ``LiveServerMessage`` first."""
    from google.genai import types

    types.LiveServerMessage.model_validate(message)
    return json.dumps(message)


class FakeGemini(FakeProvider):
    spec = GEMINI
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"

    def __init__(self, *args, go_away_s: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.go_away_s = go_away_s
        self.handles: list[str] = []  # handed out, in order
        self.resumed_with: list[str | None] = []  # each connection's setup handle

    def key_of(self, headers) -> str | None:
        return headers.get("x-goog-api-key")

    async def serve(self, ws, conn: Connection, number: int) -> None:
        vad = VoiceActivityDetector(16000, end_silence_ms=500)
        state = {"responding": False, "tool": None}

        async def send(message: dict) -> None:
            await ws.send(gemini_message(message))
            conn.sent.append(message)

        first = self.check(conn, await ws.recv())
        if first is None or "setup" not in first:
            self.problems.append(f"the first message is not setup: {first}")
            return
        self.resumed_with.append((first["setup"].get("sessionResumption") or {}).get("handle"))
        await send({"setupComplete": {}})
        async for message in ws:
            data = self.check(conn, message)
            if data is None:
                continue
            if "realtimeInput" in data and "audio" in data["realtimeInput"]:
                pcm = base64.b64decode(data["realtimeInput"]["audio"]["data"])
                conn.caller_ms += len(pcm) / 32
                for e in vad.process(pcm):
                    if e.kind == SPEECH_START and state["responding"]:
                        state["responding"] = False
                        await send({"serverContent": {"interrupted": True}})
                    elif e.kind == SPEECH_END:
                        await send({"serverContent": {"inputTranscription": {"text": "I would like a table."}}})
                        self.answering(self.answer(ws, conn, send, state, number))
            elif "clientContent" in data and data["clientContent"].get("turnComplete"):
                self.answering(self.answer(ws, conn, send, state, number))
            elif "toolResponse" in data:
                state["tool"] = data["toolResponse"]["functionResponses"][0]["response"]
                self.answering(self.answer(ws, conn, send, state, number))

    async def answer(self, ws, conn: Connection, send, state, number: int) -> None:
        conn.answers += 1
        if conn.script == "tool" and state["tool"] is None and conn.answers == 1:
            await send({"toolCall": {"functionCalls": [{"id": "fc_" + secrets.token_hex(3), "name": self.tool[0], "args": self.tool[1]}]}})
            return
        state["responding"] = True
        if conn.script == "slow":
            await asyncio.sleep(self.delay_ms / 1000)
        audio = tone(24000, self.answer_ms).tobytes()
        for at in range(0, len(audio), 4800):  # 100 ms chunks
            if not state["responding"]:
                return
            part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(audio[at : at + 4800]).decode()}}
            await send({"serverContent": {"modelTurn": {"parts": [part]}}})
            await asyncio.sleep(0)
        said = f"Answer {len(self.handles) + 1}" + (f" with {json.dumps(state['tool'])}" if state["tool"] else "")
        await send({"serverContent": {"outputTranscription": {"text": said}}})
        await send({"serverContent": {"turnComplete": True}})
        state["responding"] = False
        handle = f"handle-{len(self.handles) + 1}"
        self.handles.append(handle)
        await send({"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}})
        if conn.script == "drop" and number == 1:
            conn.closed_by_fake = True
            ws.transport.abort()
        elif conn.script == "goaway" and number == 1 and conn.answers == 1:
            await send({"goAway": {"timeLeft": f"{self.go_away_s:g}s"}})

            async def close_later() -> None:
                await asyncio.sleep(self.go_away_s)
                conn.closed_by_fake = True
                await ws.close(1000)

            self._later = asyncio.ensure_future(close_later())


# --- Deepgram Voice Agent ----------------------------------------------------------------------


def deepgram_message(**message) -> str:
    """A server message, checked with the deepgram-sdk's ``V1SocketClientResponse`` models first."""
    from deepgram.agent.v1 import socket_client

    import pydantic

    pydantic.TypeAdapter(socket_client.V1SocketClientResponse).validate_python(message)
    return json.dumps(message)


class FakeDeepgram(FakeProvider):
    spec = None  # set below (its SPEC), once the module exists
    path = "/v1/agent/converse"

    def key_of(self, headers) -> str | None:
        value = headers.get("Authorization", "")
        return value.removeprefix("Token ") if value.startswith("Token ") else None

    async def serve(self, ws, conn: Connection, number: int) -> None:
        vad = VoiceActivityDetector(8000, end_silence_ms=500)
        state = {"responding": False, "tool": None, "keepalives": 0}
        conn.keepalives = 0  # type: ignore[attr-defined]

        async def send(**message) -> None:
            await ws.send(deepgram_message(**message))
            conn.sent.append(message)

        await send(type="Welcome", request_id="req-" + secrets.token_hex(4))
        async for message in ws:
            if isinstance(message, bytes):  # caller audio: mu-law 8 kHz, no container
                pcm = ulaw_to_pcm(message)
                conn.caller_ms += len(pcm) / 16
                for e in vad.process(pcm):
                    if e.kind == SPEECH_START:
                        await send(type="UserStartedSpeaking")
                        state["responding"] = False
                    elif e.kind == SPEECH_END:
                        await send(type="ConversationText", role="user", content="I would like a table.")
                        self.answering(self.answer(ws, conn, send, state, number))
                continue
            data = self.check(conn, message)
            if data is None:
                continue
            kind = data["type"]
            if kind == "Settings":
                await send(type="SettingsApplied")
                if data["agent"].get("greeting"):
                    self.answering(self.answer(ws, conn, send, state, number))
            elif kind == "KeepAlive":
                conn.keepalives += 1
            elif kind == "FunctionCallResponse":
                state["tool"] = data["content"]
                self.answering(self.answer(ws, conn, send, state, number))
            elif kind == "InjectUserMessage":
                self.answering(self.answer(ws, conn, send, state, number))

    async def answer(self, ws, conn: Connection, send, state, number: int) -> None:
        conn.answers += 1
        if conn.script == "tool" and state["tool"] is None and conn.answers == 1:
            function = {"id": "fn_" + secrets.token_hex(3), "name": self.tool[0], "arguments": json.dumps(self.tool[1]), "client_side": True}
            await send(type="FunctionCallRequest", functions=[function])
            return
        state["responding"] = True
        await send(type="AgentStartedSpeaking", total_latency=0.4, tts_latency=0.1, ttt_latency=0.3)
        audio = pcm_to_ulaw(tone(8000, self.answer_ms).tobytes())
        for at in range(0, len(audio), 800):
            if not state["responding"]:
                break
            await ws.send(audio[at : at + 800])
            await asyncio.sleep(0)
        said = f"Answer {conn.answers}" + (f" with {state['tool']}" if state["tool"] else "")
        await send(type="ConversationText", role="assistant", content=said)
        await send(type="AgentAudioDone")
        state["responding"] = False
        if conn.script == "error" and conn.answers == 1:
            await send(type="Warning", description="The think provider is slow to answer.", code="SLOW_THINK_REQUEST")
        if conn.script == "drop" and number == 1:
            conn.closed_by_fake = True
            ws.transport.abort()


# --- ElevenLabs Agents -------------------------------------------------------------------------


class FakeElevenLabs(FakeProvider):
    """Speaks the events the ``elevenlabs`` SDK's ``conversational_ai/conversation.py`` reads.
    ``formats`` are the ElevenLabs agent's own (input, output): ``ulaw_8000`` by default."""

    spec = None
    path = "/v1/convai/conversation?agent_id=agent_fake"

    def __init__(self, *args, formats: tuple[str, str] = ("ulaw_8000", "ulaw_8000"), **kwargs):
        super().__init__(*args, **kwargs)
        self.formats = formats
        self.pongs: list[int] = []
        self.pings: list[int] = []
        self.signed_urls = 0

    def key_of(self, headers) -> str | None:
        return headers.get("xi-api-key")

    def _check_key(self, connection, request):
        if "/v1/convai/conversation/get-signed-url" in request.path:  # (the signed-URL fetch, over HTTP)
            if self.key_of(request.headers) != KEY:
                return super()._check_key(connection, request)
            self.signed_urls += 1
            url = f"ws://127.0.0.1:{self.port}/talk/v1/convai/conversation?agent_id=agent_fake&conversation_signature=sig123"
            body = json.dumps({"signed_url": url}).encode()
            return Response(200, "OK", Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]), body)
        if "conversation_signature=sig123" in request.path:
            return None  # a signed URL needs no key
        return super()._check_key(connection, request)

    async def serve(self, ws, conn: Connection, number: int) -> None:
        rate_in = int(self.formats[0].split("_")[1])
        vad = VoiceActivityDetector(rate_in, end_silence_ms=500)
        state = {"responding": False, "tool": None, "event_id": 0}

        async def send(**message) -> None:
            await ws.send(json.dumps(message))
            conn.sent.append(message)

        first = await ws.recv()
        init = self.check(conn, first)
        if init is None or init.get("type") != "conversation_initiation_client_data":
            self.problems.append(f"the first message is not conversation_initiation_client_data: {first[:100]}")
            return
        await send(type="conversation_initiation_metadata", conversation_initiation_metadata_event={
            "conversation_id": "conv_" + secrets.token_hex(4), "agent_output_audio_format": self.formats[1],
            "user_input_audio_format": self.formats[0]})  # fmt: skip
        if ((init.get("conversation_config_override") or {}).get("agent") or {}).get("first_message"):
            self.answering(self.answer(ws, conn, send, state, number))
        pinger = asyncio.ensure_future(self.ping(send, state))
        try:
            async for message in ws:
                data = self.check(conn, message)
                if data is None:
                    continue
                if "user_audio_chunk" in data:
                    audio = base64.b64decode(data["user_audio_chunk"])
                    pcm = ulaw_to_pcm(audio) if self.formats[0] == "ulaw_8000" else audio
                    conn.caller_ms += len(pcm) / 2 / rate_in * 1000
                    for e in vad.process(pcm):
                        if e.kind == SPEECH_START and state["responding"]:
                            state["responding"] = False
                            await send(type="interruption", interruption_event={"event_id": state["event_id"]})
                        elif e.kind == SPEECH_END:
                            await send(type="user_transcript", user_transcription_event={"user_transcript": "I would like a table."})
                            self.answering(self.answer(ws, conn, send, state, number))
                elif data.get("type") == "pong":
                    self.pongs.append(data["event_id"])
                elif data.get("type") == "client_tool_result":
                    state["tool"] = data["result"]
                    self.answering(self.answer(ws, conn, send, state, number))
                elif data.get("type") == "user_message":
                    self.answering(self.answer(ws, conn, send, state, number))
        finally:
            pinger.cancel()

    async def ping(self, send, state) -> None:
        while True:
            await asyncio.sleep(0.5)
            state["event_id"] += 1
            self.pings.append(state["event_id"])
            await send(type="ping", ping_event={"event_id": state["event_id"], "ping_ms": 40})

    async def answer(self, ws, conn: Connection, send, state, number: int) -> None:
        conn.answers += 1
        if conn.script == "tool" and state["tool"] is None and conn.answers == 1:
            await send(type="client_tool_call", client_tool_call={"tool_name": self.tool[0], "tool_call_id": "tc_" + secrets.token_hex(3), "parameters": self.tool[1]})
            return
        state["responding"] = True
        rate_out = int(self.formats[1].split("_")[1])
        pcm = tone(rate_out, self.answer_ms).tobytes()
        audio = pcm_to_ulaw(pcm) if self.formats[1] == "ulaw_8000" else pcm
        step = len(audio) * 100 // self.answer_ms  # 100 ms events
        said = f"Answer {conn.answers}" + (f" with {state['tool']}" if state["tool"] else "")
        for at in range(0, len(audio), step):
            if not state["responding"]:
                await send(type="agent_response_correction", agent_response_correction_event={"original_agent_response": said, "corrected_agent_response": "Answer..."})
                return
            state["event_id"] += 1
            await send(type="audio", audio_event={"audio_base_64": base64.b64encode(audio[at : at + step]).decode(), "event_id": state["event_id"]})
            if at == 0:
                await send(type="agent_response", agent_response_event={"agent_response": said})
            await asyncio.sleep(0.02)  # (faster than real time, but not all at once: a barge-in can land in it)
        state["responding"] = False
        if conn.script == "drop" and number == 1:
            conn.closed_by_fake = True
            ws.transport.abort()


from bridge.protocol.hosted.deepgram_agent import SPEC as DEEPGRAM  # noqa: E402
from bridge.protocol.hosted.elevenlabs_agent import SPEC as ELEVENLABS  # noqa: E402

FakeDeepgram.spec = DEEPGRAM
FakeElevenLabs.spec = ELEVENLABS
