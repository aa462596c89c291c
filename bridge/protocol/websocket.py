"""RFC 6455 websocket frames and handshakes, sans-I/O: bytes in, messages out; messages in, bytes out.

The relay's two hot sockets (Twilio's media stream and the agent's audio socket) run on this lean
codec instead of a general websocket stack: a 20 ms frame costs a header parse, an unmask (the C
``apply_mask`` that ships with ``websockets``) and, for text, a UTF-8 decode. It implements what a
correct peer may send: fragmented messages, control frames between fragments, 16- and 64-bit
lengths, close codes and reasons, ping/pong. It negotiates no extension and no subprotocol, so any
RSV bit is an error. Violations raise ``WsProtocolError`` carrying the close code to send
(1002 protocol error, 1007 bad UTF-8, 1009 too big).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from http import HTTPStatus

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
DATA_OPCODES = (OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# close codes (RFC 6455 7.4.1): what a close says happened
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA = 1000, 1001, 1002, 1003
INVALID_PAYLOAD, POLICY_VIOLATION, MESSAGE_TOO_BIG, INTERNAL_ERROR = 1007, 1008, 1009, 1011
NO_STATUS = 1005  # a close frame without a code
#: the largest message any of the bridge's websockets takes (a second of 48 kHz audio is 96 kB)
MAX_MESSAGE_BYTES = 1 << 22
OK_CLOSE_CODES = (1000, 1001, NO_STATUS)  # a normal end (as the websockets library counts it)
_SENDABLE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEADER_BYTES = 16384


class WsProtocolError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: int = 1002):
        super().__init__(message)
        self.code = code


class FrameReader:
    """Turns received bytes into events: ``(OP_TEXT, str)``, ``(OP_BINARY, bytes)``,
    ``(OP_PING, bytes)``, ``(OP_PONG, bytes)``, ``(OP_CLOSE, (code, reason))``.

    ``masked``: frames must be masked (a server reading a client) or must not be (a client).
    Fragments are joined as they come, into one buffer: a message under way holds its payload
    and nothing per fragment, however many (empty ones included); over ``max_message`` bytes
    it raises (1009)."""

    __slots__ = ("masked", "max_message", "_buf", "_parts", "_part_op")

    def __init__(self, *, masked: bool, max_message: int = MAX_MESSAGE_BYTES):
        self.masked = masked
        self.max_message = max_message
        self._buf = b""
        self._parts = bytearray()
        self._part_op = 0  # opcode of the fragmented message under way (0: none)

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        buf = self._buf + data if self._buf else data
        events: list[tuple[int, object]] = []
        pos, end = 0, len(buf)
        masked = self.masked
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b0 & 0x70:
                raise WsProtocolError("reserved bits set (no extension was negotiated)")
            if bool(b1 & 0x80) is not masked:
                raise WsProtocolError("client frames must be masked" if masked else "server frames must not be masked")
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if end - head < 2:
                    break
                (length,) = struct.unpack_from("!H", buf, head)
                head += 2
            elif length == 127:
                if end - head < 8:
                    break
                (length,) = struct.unpack_from("!Q", buf, head)
                if length >> 63:
                    raise WsProtocolError("frame length has its top bit set")
                head += 8
            if length > self.max_message:
                raise WsProtocolError(f"frame of {length} bytes is over {self.max_message}", 1009)
            stop = head + (4 if masked else 0) + length
            if stop > end:
                break
            if masked:
                payload = apply_mask(buf[head + 4 : stop], buf[head : head + 4])
            else:
                payload = buf[head:stop]
            pos = stop
            event = self._frame(b0 & 0x80, b0 & 0x0F, payload)
            if event is not None:
                events.append(event)
        self._buf = buf[pos:] if pos < end else b""
        if len(self._buf) > self.max_message + 14:  # pragma: no cover - caught by the length check
            raise WsProtocolError("frame too big", 1009)
        return events

    def _frame(self, fin: int, opcode: int, payload: bytes):
        if opcode in DATA_OPCODES:
            if self._part_op:
                raise WsProtocolError("a new message started inside a fragmented one")
            if fin:
                return _data_event(opcode, payload)
            self._part_op, self._parts = opcode, bytearray(payload)
            return None
        if opcode == OP_CONTINUATION:
            if not self._part_op:
                raise WsProtocolError("continuation frame without a message to continue")
            if len(self._parts) + len(payload) > self.max_message:
                raise WsProtocolError(f"message over {self.max_message} bytes", 1009)
            self._parts += payload
            if not fin:
                return None
            op, data = self._part_op, bytes(self._parts)
            self._part_op, self._parts = 0, bytearray()
            return _data_event(op, data)
        if opcode not in CONTROL_OPCODES:
            raise WsProtocolError(f"unknown opcode {opcode:#x}")
        if not fin:
            raise WsProtocolError("fragmented control frame")
        if len(payload) > 125:
            raise WsProtocolError("control frame over 125 bytes")
        if opcode == OP_CLOSE:
            return OP_CLOSE, parse_close(payload)
        return opcode, payload


def _data_event(opcode: int, payload: bytes):
    if opcode == OP_TEXT:
        try:
            return OP_TEXT, payload.decode("utf-8")
        except UnicodeDecodeError:
            raise WsProtocolError("text message is not valid UTF-8", 1007) from None
    return OP_BINARY, payload


def parse_close(payload: bytes) -> tuple[int, str]:
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise WsProtocolError("close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not (code in _SENDABLE_CODES or 3000 <= code < 5000):
        raise WsProtocolError(f"invalid close code {code}")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsProtocolError("close reason is not valid UTF-8", 1007) from None


def close_payload(code: int, reason: str = "") -> bytes:
    if code == NO_STATUS:
        return b""
    # at most 123 bytes, cut on a character boundary (a split character is invalid UTF-8: 1007)
    return struct.pack("!H", code) + reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")


_SHORT = [bytes((0x80 | op, n)) for op in range(16) for n in range(126)]  # header bytes, unmasked


class _MaskKeys:
    """Masking keys from the OS's strong random source (RFC 6455 5.3), drawn 4 KiB at a time:
    one ``os.urandom`` call per 1024 frames instead of one per frame."""

    __slots__ = ("_pool", "_at")

    def __init__(self) -> None:
        self._pool, self._at = b"", 0

    def next(self) -> bytes:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(4096), 0
        self._at = at + 4
        return self._pool[at : at + 4]


_mask_key = _MaskKeys().next


def encode(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One whole (FIN) frame. Clients mask (``mask=True``), servers do not."""
    n = len(payload)
    if not mask:
        if n < 126:
            return _SHORT[opcode * 126 + n] + payload
        if n < 65536:
            return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
        return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload
    key = _mask_key()
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + key + apply_mask(payload, key)


# --- handshakes ------------------------------------------------------------------------------


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def parse_head(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """An HTTP/1.1 head (``data`` up to, not including, the blank line): the start line and
    headers with lower-case names. Raises ``WsProtocolError`` if it is not one."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise WsProtocolError("undecodable HTTP head") from None
    lines = text.split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise WsProtocolError(f"bad header line {line[:40]!r}")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


def _has_token(value: str | None, token: str) -> bool:
    return value is not None and token in (t.strip().lower() for t in value.split(","))


class ServerHandshake:
    """Checks a client's upgrade request; builds the 101 (or the refusal)."""

    def __init__(self, method: str, headers: dict[str, str]):
        self.headers = headers
        self.error: tuple[int, str] | None = None
        key = headers.get("sec-websocket-key", "")
        if method != "GET":
            self.error = (405, "websocket upgrades use GET")
        elif not _has_token(headers.get("upgrade"), "websocket"):
            self.error = (400, "missing Upgrade: websocket")
        elif not _has_token(headers.get("connection"), "upgrade"):
            self.error = (400, "missing Connection: Upgrade")
        elif headers.get("sec-websocket-version") != "13":
            self.error = (426, "only websocket version 13 is supported")
        else:
            try:
                ok = len(base64.b64decode(key, validate=True)) == 16
            except ValueError:
                ok = False
            if not ok:
                self.error = (400, "bad Sec-WebSocket-Key")
        self.key = key

    def accept(self) -> bytes:
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(self.key)}\r\n\r\n"
        ).encode("ascii")

    @staticmethod
    def refuse(status: int, text: str = "") -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        body = text.encode("utf-8")
        extra = "Sec-WebSocket-Version: 13\r\n" if status == 426 else ""
        return (
            f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii") + body


class ClientHandshake:
    """Builds a client's upgrade request and checks the server's answer."""

    def __init__(self, host_header: str, target: str, extra_headers: list[tuple[str, str]] = ()):
        self.key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
            "User-Agent: twilio-audio-bridge",
            *(f"{name}: {value}" for name, value in extra_headers),
        ]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def check(self, head: bytes) -> None:
        status_line, headers = parse_head(head)
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "101":
            raise WsProtocolError(f"server refused the upgrade: {status_line[:80]}")
        found = dict(headers)
        if not _has_token(found.get("upgrade"), "websocket") or not _has_token(found.get("connection"), "upgrade"):
            raise WsProtocolError("101 without Upgrade: websocket / Connection: Upgrade")
        if found.get("sec-websocket-accept") != accept_key(self.key):
            raise WsProtocolError("wrong Sec-WebSocket-Accept")
        if found.get("sec-websocket-extensions"):
            raise WsProtocolError("server chose an extension that was not offered")
        if found.get("sec-websocket-protocol"):
            raise WsProtocolError("server chose a subprotocol that was not offered")
