"""Developer tools, shipped because ``bridge demo`` and ``bridge simulate`` use them, and kept
apart from the product's core:

- ``echo_agent``: the embedded echo agent (both agent protocols), the default agent when no
  agents file is given; its routes are mounted by the app's wiring only when an agent uses it;
- ``simulator``: a Twilio simulator that places calls on the bridge as Twilio does, and a fake
  Twilio REST server (``FakeTwilioApi``) for hang-ups and outbound dials.

Imported by the CLI, the wiring (the echo agent's routes) and tests; never by the product's
routes, relays or call service.
"""
