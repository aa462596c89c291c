"""Twilio REST calls the bridge makes, through the official ``twilio`` package's async client.

``api_base_url`` redirects every request (scheme and host) to another server: a local fake
Twilio in tests and in the simulator; ``https://api.twilio.com`` otherwise."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from twilio.twiml.voice_response import VoiceResponse
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

log = logging.getLogger(__name__)


def rest_problem(error: BaseException, timeout_s: float) -> str:
    """What went wrong with a Twilio REST request, in a line."""
    if isinstance(error, TimeoutError):
        return f"Twilio's REST API did not answer within {timeout_s:g} s"
    detail = getattr(error, "msg", None) or str(error) or type(error).__name__
    if isinstance(error, TwilioException) and getattr(error, "status", None):
        return f"Twilio refused ({error.status}): {detail}"
    return f"{type(error).__name__}: {detail}"


class RedirectingHttpClient(AsyncTwilioHttpClient):
    """The twilio package's aiohttp client, sending every request to ``base_url`` instead."""

    def __init__(self, base_url: str, **kwargs):
        super().__init__(**kwargs)
        self._base = urlsplit(base_url)

    async def request(self, method, url, *args, **kwargs):
        parts = urlsplit(url)
        url = urlunsplit((self._base.scheme, self._base.netloc, parts.path, parts.query, parts.fragment))
        return await super().request(method, url, *args, **kwargs)


class TwilioRest:
    def __init__(self, api_base_url: str, auth_token: str | None, account_sid: str | None = None, timeout_s: float = 5.0):
        self.api_base_url = api_base_url
        self.auth_token = auth_token
        self.account_sid = account_sid
        self.timeout_s = timeout_s
        self._http: AsyncTwilioHttpClient | None = None

    def client(self, account_sid: str | None = None) -> Client:
        sid = account_sid or self.account_sid
        if not sid or not self.auth_token:
            raise TwilioException("Twilio account SID and auth token are needed for REST calls")
        if self._http is None:
            self._http = RedirectingHttpClient(self.api_base_url)
        return Client(sid, self.auth_token, http_client=self._http)

    async def hangup(self, call_sid: str, account_sid: str | None = None, say: str | None = None) -> str | None:
        """End a live call (``status=completed``), or with ``say``, replace its TwiML with that
        sentence and a hang-up. Returns None, or why it failed (logged at WARNING): Twilio
        refused, or could not be reached within ``timeout_s``."""
        try:
            async with asyncio.timeout(self.timeout_s):
                call = self.client(account_sid).calls(call_sid)
                if say:
                    response = VoiceResponse()
                    response.say(say)
                    response.hangup()
                    await call.update_async(twiml=str(response))
                else:
                    await call.update_async(status="completed")
            return None
        except (TwilioException, aiohttp.ClientError, OSError, TimeoutError) as e:
            problem = rest_problem(e, self.timeout_s)
            log.warning("Twilio hang-up of %s failed: %s", call_sid, problem)
            return problem

    async def update_twiml(self, call_sid: str, account_sid: str | None, twiml: str) -> str | None:
        """Replace a live call's TwiML (a transfer's ``<Dial>``: its stream ends). Returns None,
        or why it failed (logged at WARNING)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client(account_sid).calls(call_sid).update_async(twiml=twiml)
            return None
        except (TwilioException, aiohttp.ClientError, OSError, TimeoutError) as e:
            problem = rest_problem(e, self.timeout_s)
            log.warning("Twilio TwiML update of %s failed: %s", call_sid, problem)
            return problem

    async def create_call(self, **params) -> tuple[str | None, str | None]:
        """Place a call (a warm transfer's leg to its target): ``(call sid, None)``, or
        ``(None, why it failed)`` (logged at WARNING)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                call = await self.client().calls.create_async(**params)
            return call.sid, None
        except (TwilioException, aiohttp.ClientError, OSError, TimeoutError) as e:
            problem = rest_problem(e, self.timeout_s)
            log.warning("Twilio call to %s failed: %s", params.get("to"), problem)
            return None, problem

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
