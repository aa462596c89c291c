"""The sans-I/O core, in the style of ``h11`` and ``websockets``' ``protocol.py``: bytes, text
and times in, actions out. No asyncio, no sockets, no settings object, no store.

- ``twilio``: Twilio Media Streams frames (parse and build), and the stream's parameters;
- ``web``: the agent's ``web`` protocol frames;
- ``websocket``: the RFC 6455 codec (handshake, framing, masking, close codes);
- ``session``: ``CallSession``, one call's relay logic between Twilio and the agent;
- ``hosted``: hosted voice models' translators (OpenAI Realtime, Gemini Live), one module each.

May import: ``audio``, ``bridge.models`` and the standard library's pure parts.
"""
