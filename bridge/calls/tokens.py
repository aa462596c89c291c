"""Stream tokens: short-lived HMAC tokens that tie a media websocket to the call registered by
the webhook. Stateless to check (any replica with the secret can), single use because the call
can move from ``registered`` to ``ongoing`` only once (``SqlCallStore.start``)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time


class TokenError(ValueError):
    pass


def internal_key(secret: str | bytes, call_id: str) -> str:
    """The key the bridge gives its embedded agents for one call: on the public port, only the
    bridge itself can open their sockets."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, f"internal:{call_id}".encode(), hashlib.sha256).hexdigest()[:32]


def internal_key_matches(secret: str | bytes, call_id: str, key: str | None) -> bool:
    return bool(key) and key.isascii() and hmac.compare_digest(key, internal_key(secret, call_id))


class StreamTokens:
    """``purpose`` separates token kinds: a media-stream token never opens a web call."""

    def __init__(self, secret: str | bytes, ttl_s: float, purpose: str = "stream", label: str = "stream token"):
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.ttl_s = ttl_s
        self.purpose = purpose
        self.label = label  # what the errors call it

    def _sign(self, call_id: str, expires: int, nonce: str) -> str:
        msg = f"{self.purpose}:{call_id}:{expires}:{nonce}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def issue(self, call_id: str, now: float | None = None) -> str:
        expires = int(((time.time() if now is None else now) + self.ttl_s) * 1000)
        nonce = secrets.token_hex(8)
        return f"{expires}.{nonce}.{self._sign(call_id, expires, nonce)}"

    def check(self, call_id: str, token: str | None, now: float | None = None) -> None:
        """Raises TokenError saying what is wrong."""
        if not token:
            raise TokenError(f"no {self.label}")
        try:
            expires_s, nonce, signature = token.split(".")
            expires = int(expires_s)
        except ValueError:
            raise TokenError(f"malformed {self.label}") from None
        if not signature.isascii() or not hmac.compare_digest(signature, self._sign(call_id, expires, nonce)):
            raise TokenError(f"{self.label} does not match this call")
        if (time.time() if now is None else now) * 1000 > expires:
            raise TokenError(f"{self.label} expired")
