"""The I/O edge of a live call: the only code that holds a live call's sockets.

- ``connection``: websocket connections on asyncio protocols (the media stream's server side,
  taken over from uvicorn at the upgrade, and the agent's client side), with flow control;
- ``relay``: one Twilio media stream, from the upgrade to the call's record (``MediaRelay``
  moves frames through a ``CallSession``);
- ``web_relay``: one browser's web-call socket, relayed to the agent;
- ``observer``: what is measured on the wire (turn latency, silence, the log, the recording);
- ``file_writer``: recording writes on one background thread, off the event loop.

May import: ``audio``, ``bridge.protocol``, ``bridge.models``, ``bridge.calls`` (to start, hold
and end calls). Never ``bridge.api`` or ``bridge.store`` (the call service keeps the records).
"""
