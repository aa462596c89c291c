"""The HTTP routes:

- ``calls``: the Retell-compatible call API (register, get, list, update, delete, stop, files);
- ``outbound``: dialing through Twilio (create-phone-call) and Twilio's status and AMD callbacks;
- ``web_calls``: create-web-call (the socket itself is relayed by ``bridge.media.relay``);
- ``twilio_voice``: Twilio's voice webhook and the signature check of every Twilio callback;
- ``deps``, ``errors``, ``schemas``: authentication, error bodies, request and response bodies.

May import: ``bridge.calls`` (every live call is reached through the call service),
``bridge.models``, ``bridge.settings``, ``bridge.protocol`` (the stream's names). Never
``bridge.media``, ``bridge.store`` or ``bridge.dev``.
"""
