"""The call lifecycle: one service (``CallService``) that registers, starts, ends, stops and
recovers calls, keeps the registry of calls live in this process, and knows where a call's files
live; with the stream tokens, the registrar, the dial throttle and Twilio REST it uses.

May import: ``bridge.models``, ``bridge.settings``, ``bridge.store``, ``audio``. Never
``bridge.media`` (the relays call this service) or ``bridge.api`` (the routes call it too).
"""

from ..store import STORE_UNAVAILABLE
from .service import DRAIN_DETAIL, CallRefused, CallService, DialRefused, Outcome, ProviderUnreachable, StopCall, ToolFailed, not_startable
from .throttle import TooManyCalls
from .tokens import StreamTokens, TokenError

__all__ = ["DRAIN_DETAIL", "STORE_UNAVAILABLE", "CallRefused", "CallService", "DialRefused", "Outcome", "ProviderUnreachable", "StopCall", "StreamTokens", "TokenError", "ToolFailed", "TooManyCalls", "not_startable"]
