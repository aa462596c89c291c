"""The Twilio <-> voice agent audio bridge. Its packages, from the core outwards:

- ``protocol``: sans-I/O protocol code (Twilio and web frames, RFC 6455, the call session);
- ``media``: the I/O edge of a live call (relays, connections, observer, recording writer);
- ``calls``: the call lifecycle behind one service (``CallService``);
- ``api``: the HTTP routes (call API, Twilio webhooks, outbound dialing, web calls);
- ``store``: records, schema, migrations, the webhook outbox;
- ``dev``: the echo agent and the Twilio simulator (demo, simulate, tests).

``models`` (the call record and its enums) and ``settings`` (the one settings object) are shared
by all of them; ``app`` only wires them together; ``cli`` and ``server`` run it.
"""
