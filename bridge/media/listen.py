"""Live listening: the listen-only sockets of a call (``/listen-live/{call_id}``), fed from its
relay (docs/protocol.md, "Listening to a live call").

``ListenTap`` is a call's set of listeners. The call's observer hands it the audio that crosses
the caller's leg: the caller's as it arrives, the agent's at the time it is heard, both in the
caller leg's rate as s16le, each placed at its position on the call's clock. Each frame is
built once and written to every listener's socket without waiting: a listener whose unsent
bytes pass ``listen_max_lag_s`` of audio is dropped (its connection aborted, the public log
says so). So no listener ever holds the call's audio or timing; with none, the tap costs one
attribute test per frame.

A listen socket that lands on a replica which does not relay the call (behind a load balancer)
is passed to the one that does: this replica opens the same socket there, at the address that
replica registered, and copies its frames on, with the same bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from socket import SO_SNDBUF, SOL_SOCKET
from urllib.parse import parse_qs, quote, unquote

from ..calls import CallRefused, CallService
from ..models import is_call_id
from ..protocol import listen as lf
from ..protocol.websocket import GOING_AWAY, NORMAL, POLICY_VIOLATION
from . import connection

log = logging.getLogger(__name__)

#: Marks the socket one replica opens on another for a listener: never passed on again
HOP_HEADER = "x-bridge-listen-hop"
#: Caller audio this close to where its channel's last frame ended is contiguous (arrival jitter)
JITTER_S = 0.1
MAX_LISTENERS = 16  # per call
#: The kernel's send buffer of a listener's socket (it grows to megabytes by default): a listener
#: that stops reading is then seen behind, and dropped, within seconds, holding little memory
KERNEL_SEND_BUFFER = 32 * 1024
CONNECT_TIMEOUT_S = 5.0
#: A listener sends nothing: a message it starts may hold no more than a control frame (then it
#: is closed, 1008 when it ends, 1009 as soon as it passes this)
LISTENER_MAX_MESSAGE = 125


class Listener:
    def __init__(self, socket: connection.WsConnection, participant: str):
        self.socket, self.participant = socket, participant


class ListenTap:
    """The listeners of one call relayed here. ``clock()`` is the call's position now (samples
    since its stream started); ``on_event(kind, **details)`` records what happened to listeners
    (the call's public log, the metrics)."""

    def __init__(self, call_id: str, sample_rate: int, max_lag_s: float, clock: Callable[[], int], on_event: Callable[..., None]):
        self.call_id, self.rate, self.clock = call_id, sample_rate, clock
        self.max_bytes = max(16384, int(max_lag_s * sample_rate * 2 * 2))  # both channels, s16le
        self.on_event = on_event
        self.listeners: list[Listener] = []
        self._caller_next = 0  # where the caller's last frame ended (samples)
        self.ended: str | None = None

    @property
    def full(self) -> bool:
        return self.ended is not None or len(self.listeners) >= MAX_LISTENERS

    def add(self, socket: connection.WsConnection, participant: str) -> bool:
        if self.full:
            return False
        socket.send_text(lf.start_event(self.call_id, self.rate, self.clock()))
        self.listeners.append(Listener(socket, participant))
        self.on_event("listener_joined", participant=participant)
        return True

    def remove(self, socket: connection.WsConnection) -> None:
        for listener in self.listeners:
            if listener.socket is socket:
                self.listeners.remove(listener)
                self.on_event("listener_left", participant=listener.participant)
                return

    def audio(self, channel: int, pcm: bytes, position: int) -> None:
        """Audio of one channel (s16le at ``rate``) heard from ``position`` (samples) on. The
        agent's positions are exact (when it plays); the caller's are its arrival, which jitters:
        caller audio that arrives no later than JITTER_S past where the last frame ended follows
        it (it came late: a burst after a stall stays in order), later is a gap (audio missing)."""
        if channel == lf.CALLER:
            if position <= self._caller_next + JITTER_S * self.rate:
                position = self._caller_next
            self._caller_next = position + len(pcm) // 2
        self._send_binary(lf.audio_frame(channel, position, pcm))

    def clear(self, position: int) -> None:
        self._send_text(lf.clear_event(position))

    def _send_binary(self, payload: bytes) -> None:
        frame = None
        for listener in list(self.listeners):  # (a listener that fell behind leaves the list)
            socket = listener.socket
            if frame is None:  # (a server's frames are not masked: one frame for every listener)
                frame = socket.frame_binary(payload)
            self._write(listener, frame)

    def _send_text(self, text: str) -> None:
        for listener in list(self.listeners):
            self._write(listener, listener.socket.frame_text(text))

    def _write(self, listener: Listener, frame: bytes) -> None:
        socket = listener.socket
        if socket.buffered + len(frame) > self.max_bytes:
            self.listeners.remove(listener)
            log.warning("call %s: listener %s fell behind (%d bytes unsent): dropped", self.call_id, listener.participant, socket.buffered)
            self.on_event("listener_dropped", participant=listener.participant, unsent_bytes=socket.buffered)
            socket.abort()
            return
        socket.send_many([frame])

    def end(self, reason: str) -> None:
        """The call ended: each listener is told why, then its socket is closed (1000)."""
        self.ended = reason
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.socket.send_text(lf.end_event(reason))
            asyncio.ensure_future(listener.socket.close(NORMAL, "the call ended"))
            self.on_event("listener_left", participant=listener.participant, at_end=True)


async def handle_listen_live(websocket: connection.ServerConnection, calls: CallService, files=None) -> None:
    """``/listen-live/{call_id}?access_token=...``: a listener, served here if this replica
    relays the call, else passed to the replica that does."""
    if websocket.handshake.error:
        websocket.refuse(*websocket.handshake.error)
        return
    call_id = unquote(websocket.path[len(lf.LISTEN_PREFIX) :])
    if not is_call_id(call_id):
        log.warning("listen socket refused: not a call id: %r", call_id[:64])
        websocket.refuse(404, "unknown call")
        return
    token = (parse_qs(websocket.query).get("access_token") or [""])[0]
    hop = HOP_HEADER in websocket.headers
    tap: ListenTap | None = calls.listen_taps.get(call_id)
    try:
        if tap is not None and tap.full:  # (before the token is spent)
            raise CallRefused("the call has ended" if tap.ended else f"the call has {MAX_LISTENERS} listeners already", status=409)
        participant = calls.check_listen_token(call_id, token, spend=tap is not None)
        if tap is None:
            if hop:
                raise CallRefused("the call is not relayed here", status=404)
            owner = await calls.relay_address(call_id)
            if owner is None or owner[0] == calls.settings.instance_id:
                raise CallRefused("the call is not ongoing", status=404)
            if not owner[1]:
                raise CallRefused(f"the replica relaying the call ({owner[0]}) has no address", status=503)
    except CallRefused as e:
        log.warning("listen socket refused for call %s: %s", call_id, e)
        websocket.refuse(e.status, str(e))
        return
    except Exception as e:  # the database is away: the listener may try again
        log.error("listen socket for call %s: %s", call_id, e)
        websocket.refuse(503, "the call store does not answer")
        return
    if tap is None:
        await _pass_on(websocket, calls, call_id, token, owner)
        return
    if not _accept(websocket):
        return
    if not tap.add(websocket, participant):  # (it ended or filled up meanwhile)
        await websocket.close(POLICY_VIOLATION, "the call ended" if tap.ended else f"over {MAX_LISTENERS} listeners")
        return
    closed = asyncio.get_running_loop().create_future()

    def on_close() -> None:
        tap.remove(websocket)
        if not closed.done():
            closed.set_result(None)

    def on_message(message) -> None:  # a listener sends nothing: one that does is closed
        tap.remove(websocket)
        asyncio.ensure_future(websocket.close(POLICY_VIOLATION, "a listener sends nothing"))

    websocket.on_shutdown = lambda: asyncio.ensure_future(websocket.close(GOING_AWAY, "the bridge shut down"))
    websocket.listen(on_message, on_close)
    await closed


def _accept(websocket: connection.ServerConnection) -> bool:
    try:
        websocket.accept()
    except connection.ConnectionClosed:
        return False
    websocket.reader.max_message = LISTENER_MAX_MESSAGE
    sock = websocket.transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(SOL_SOCKET, SO_SNDBUF, KERNEL_SEND_BUFFER)
        except OSError:  # (not a TCP socket: a test's pipe)
            pass
    return not websocket.closed


async def _pass_on(websocket: connection.ServerConnection, calls: CallService, call_id: str, token: str, owner: tuple[str, str]) -> None:
    """Open the listener's socket on the replica relaying the call and copy its frames on."""
    instance, address = owner
    url = f"{address.replace('http', 'ws', 1)}{lf.LISTEN_PREFIX}{quote(call_id, safe='')}?access_token={quote(token, safe='')}"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            upstream = await connection.connect(url, headers=[(HOP_HEADER, calls.settings.instance_id)])
    except connection.HandshakeError as e:
        log.warning("listen socket for call %s: replica %s refused it: %s", call_id, instance, e)
        status = next((code for code in (403, 409) if str(code) in str(e)), 404)  # (its answer, passed on)
        websocket.refuse(status, "the replica relaying the call refused the listener")
        return
    except (OSError, TimeoutError, ValueError) as e:
        log.error("listen socket for call %s: cannot reach replica %s at %s: %s", call_id, instance, address, e)
        websocket.refuse(502, f"cannot reach the replica relaying the call ({instance})")
        return
    if not _accept(websocket):
        await upstream.close()
        return
    max_bytes = max(16384, int(calls.settings.listen_max_lag_s * 48000 * 4))
    done = asyncio.get_running_loop().create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def from_upstream(message) -> None:
        if websocket.buffered > max_bytes:
            log.warning("call %s: a listener passed on from replica %s fell behind: dropped", call_id, instance)
            websocket.abort()
            finish()
            return
        if type(message) is str:
            websocket.send_text(message)
        else:
            websocket.send_binary(message)

    upstream.listen(from_upstream, finish)
    websocket.listen(lambda message: finish(), finish)  # (a listener sends nothing: one that does is closed)
    websocket.on_shutdown = finish
    try:
        await done
    finally:
        code = upstream.close_code
        if code is None or code in (1005, 1006, 1015) or not 1000 <= code < 5000:
            code = NORMAL  # (codes that are never sent in a close frame)
        await asyncio.gather(upstream.close(NORMAL), websocket.close(code, upstream.close_reason or ""), return_exceptions=True)
