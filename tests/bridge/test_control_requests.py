"""What an agent may ask of its call, parsed without I/O (``bridge.protocol.control``, the
``web`` protocol's events) and what Twilio is told to do next (``dial_twiml``,
``conference_twiml``, read back with the ``twilio`` package's TwiML and an XML parser)."""

import xml.etree.ElementTree as ET

import pytest

from bridge.media.control import conference_twiml, dial_twiml, hold_music
from bridge.protocol import control as c
from bridge.protocol import web
from bridge.settings import AgentConfig


def test_requests_parse_from_events_and_api_bodies_alike():
    assert c.parse({"event_type": "transfer_call", "to": "+14155550100"}) == c.TransferCall("+14155550100")
    warm = c.parse({"action": "transfer_call", "to": "sip:desk@pbx.example.com", "mode": "warm", "caller_id": "caller", "message": "Hi"})
    assert warm == c.TransferCall("sip:desk@pbx.example.com", "warm", "caller", None, "Hi") and warm.sip
    assert c.parse({"event_type": "press_digit", "digits": "1w2#"}) == c.PressDigit("1w2#")
    assert c.parse({"event_type": "end_call"}) == c.EndCall()


@pytest.mark.parametrize(
    "event, reason",
    [
        ({"event_type": "transfer_call"}, "to must be an E.164 number"),
        ({"event_type": "transfer_call", "to": "4155550100"}, "to must be an E.164 number"),
        ({"event_type": "transfer_call", "to": "sip:" + "a" * 300 + "@pbx.example.com"}, "to must be"),
        ({"event_type": "transfer_call", "to": "sip:x@pbx.example.com\"><Hangup/>"}, "to must be"),
        ({"event_type": "transfer_call", "to": "+14155550100", "mode": "sideways"}, "mode must be cold or warm"),
        ({"event_type": "transfer_call", "to": "+14155550100", "caller_id": "+1999"}, "caller_id must be agent or caller"),
        ({"event_type": "transfer_call", "to": "+14155550100", "extension": "12a"}, "extension must be"),
        ({"event_type": "transfer_call", "to": "+14155550100", "message": "Hi"}, "a cold transfer has none"),
        ({"event_type": "transfer_call", "to": "+14155550100", "mode": "warm", "message": "x" * 1001}, "at most 1000"),
        ({"event_type": "press_digit", "digits": ""}, "digits must be"),
        ({"event_type": "press_digit", "digits": "1" * 65}, "digits must be"),
        ({"event_type": "press_digit", "digits": 5}, "digits must be"),
        ({"action": "reboot"}, "unknown action"),
    ],
)  # fmt: skip
def test_a_bad_request_says_what_is_wrong(event, reason):
    with pytest.raises(c.ControlError, match=reason):
        c.parse(event)


def test_the_web_protocol_carries_requests_and_answers_them():
    assert web.parse('{"event_type": "press_digit", "digits": "5"}') == c.PressDigit("5")
    bad = web.parse('{"event_type": "transfer_call", "to": "nowhere"}')
    assert type(bad) is c.BadControl and bad.action == "transfer_call" and "E.164" in bad.reason
    assert c.result_event("end_call", True) == '{"event_type":"call_control_result","action":"end_call","ok":true,"reason":null}'
    assert web.voicemail_event("machine_end_beep") == '{"event_type":"voicemail","answered_by":"machine_end_beep"}'


def test_a_cold_transfer_dials_the_number_or_the_sip_address():
    dial = ET.fromstring(dial_twiml(c.TransferCall("+14155550100", extension="12#"), "+15550100000", 25)).find("Dial")
    assert dial.attrib == {"callerId": "+15550100000", "timeout": "25", "answerOnBridge": "true"}
    number = dial.find("Number")
    assert number.text == "+14155550100" and number.attrib == {"sendDigits": "12#"}
    sip = ET.fromstring(dial_twiml(c.TransferCall("sip:desk@pbx.example.com"), None, 30)).find("Dial/Sip")
    assert sip.text == "sip:desk@pbx.example.com"


def test_a_warm_transfer_meets_in_a_conference_that_ends_with_its_last_leg():
    conference = ET.fromstring(conference_twiml("transfer-abc")).find("Dial/Conference")
    assert conference.text == "transfer-abc"
    assert conference.attrib == {"startConferenceOnEnter": "true", "endConferenceOnExit": "true", "beep": "false"}


def test_hold_music_is_soft_and_as_long_as_asked():
    import numpy as np

    x = np.frombuffer(hold_music(2.0), "<i2")
    assert len(x) == 16000 and 0 < np.abs(x).max() < 32767 * 0.2


@pytest.mark.parametrize(
    "destination, allowed",
    [("+14155550123", True), ("+14165550123", False), ("sip:desk@pbx.example.com", True), ("sip:desk@evil.example.com", False)],
)
def test_transfer_destinations_are_globs_nothing_else_is_allowed(destination, allowed):
    agent = AgentConfig(agent_id="a", url="wss://agent.example.com/{call_id}", transfer_destinations=["+1415555*", "sip:*@pbx.example.com"])
    assert agent.may_transfer_to(destination) is allowed
    assert not AgentConfig(agent_id="b", url="wss://agent.example.com/{call_id}").may_transfer_to(destination)
