"""The I/O edge of a live call: the only code that holds a live call's sockets.

- ``connection``: websocket connections on asyncio protocols (the caller's server side, taken
  over from uvicorn at the upgrade, and the agent's client side), with flow control;
- ``relay``: every live call's relay, from the upgrade to the call's record, whoever the caller
  is (Twilio's media stream on ``/twilio/media`` or ``/audio-websocket/{call_id}``, a web client
  on ``/audio-websocket/{call_id}`` or ``/web-call/...``): ``MediaRelay`` moves frames through a
  ``CallSession``;
- ``hosted``: a hosted voice model's socket around its translator, seen by the relay as a web
  agent (barge-in and truncation, tool calls, reconnection and goAway);
- ``observer``: what is measured on the wire (turn latency, silence, the log, the recording);
- ``file_writer``: recording writes on one background thread, off the event loop.

May import: ``audio``, ``bridge.protocol``, ``bridge.models``, ``bridge.calls`` (to start, hold
and end calls). Never ``bridge.api`` or ``bridge.store`` (the call service keeps the records).
"""
