"""The protocol layer byte-in/byte-out: Twilio Media Streams and the agent's web protocol."""

import base64
import json

import pytest

from bridge.protocol import twilio as tf
from bridge.protocol import web as wf

SID = "MZ" + "a" * 32


def test_twilio_frames_parse_as_twilio_sends_them():
    assert tf.parse('{"event":"connected","protocol":"Call","version":"1.0.0"}') == tf.Connected("Call", "1.0.0")
    start = {
        "event": "start", "sequenceNumber": "1", "streamSid": SID,
        "start": {"streamSid": SID, "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"],
                  "customParameters": {"call_id": "c1", "token": "t"},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
    }  # fmt: skip
    event = tf.parse(json.dumps(start))
    assert event == tf.Start(SID, "CA1", "AC1", {"call_id": "c1", "token": "t"}, start["start"]["mediaFormat"], ("inbound",))
    media = {"event": "media", "sequenceNumber": "3", "streamSid": SID,
             "media": {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": base64.b64encode(b"\x01\xff").decode()}}  # fmt: skip
    assert tf.parse(json.dumps(media)) == tf.Media(b"\x01\xff", "inbound", 20, 2)
    assert tf.parse(json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": "7"}})) == tf.Dtmf("7")
    assert tf.parse(json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "m3"}})) == tf.Mark("m3")
    assert tf.parse(json.dumps({"event": "stop", "stop": {"callSid": "CA1"}})) == tf.Stop("CA1")
    assert tf.parse(b'{"event":"clear","streamSid":"x"}') == tf.Clear()
    assert tf.parse('{"event":"something-new"}') == tf.Unknown("something-new")


@pytest.mark.parametrize(
    "frame,match",
    [
        ("{oops", "invalid JSON"),
        ("[1,2]", "event"),
        ('{"event": 5}', "event"),
        ('{"event":"media"}', "media"),
        ('{"event":"media","media":{"payload":"%%%"}}', "base64"),
        ('{"event":"media","media":{"payload":"AAA"}}', "base64"),  # bad padding
        ('{"event":"media","media":{"payload":7}}', "payload"),
        ('{"event":"mark","mark":{}}', "name"),
        ('{"event":"dtmf","dtmf":{"digit":""}}', "digit"),
        ('{"event":"start","start":{}}', "streamSid"),
        ('{"event":"start","start":{"streamSid":"S","customParameters":[1]}}', "customParameters"),
    ],
)
def test_bad_twilio_frames_are_frame_errors(frame, match):
    with pytest.raises(tf.FrameError, match=match):
        tf.parse(frame)


def test_frames_to_twilio_are_exactly_the_three_it_accepts():
    b = tf.FrameBuilder(SID)
    media = json.loads(b.media(b"\x00\x7f\xff"))
    assert media == {"event": "media", "streamSid": SID, "media": {"payload": base64.b64encode(b"\x00\x7f\xff").decode()}}
    assert json.loads(b.mark("m1")) == {"event": "mark", "streamSid": SID, "mark": {"name": "m1"}}
    assert json.loads(b.clear()) == {"event": "clear", "streamSid": SID}
    # a hostile streamSid cannot break out of its JSON string
    evil = tf.FrameBuilder('x","event":"stop')
    assert json.loads(evil.clear())["event"] == "clear"
    assert tf.parse(b.media(b"\x01\x02")) == tf.Media(b"\x01\x02")


def test_start_frame_forwarded_to_a_twilio_agent_drops_the_token():
    start = tf.Start(SID, "CA1", "AC1", {"call_id": "c1", "token": "secret", "x": "y"})
    forwarded = tf.parse(tf.start_frame(start, drop_parameters=("token",)))
    assert forwarded.custom_parameters == {"call_id": "c1", "x": "y"}
    assert forwarded.stream_sid == SID and forwarded.call_sid == "CA1"


def test_web_protocol_messages():
    assert wf.parse(b"\x01\x02") == wf.Audio(b"\x01\x02")
    assert wf.parse(bytearray(b"\x03")) == wf.Audio(b"\x03")
    assert wf.parse("clear") is wf.CLEAR and wf.parse(" pong\n") is wf.PONG and wf.parse("ping") is wf.PING
    update = {"event_type": "update", "transcript": [{"role": "agent", "content": "hi"}], "turntaking": "agent_turn"}
    assert wf.parse(json.dumps(update)) == wf.Update([{"role": "agent", "content": "hi"}], "agent_turn")
    assert wf.parse('{"event_type":"metadata","metadata":{"a":1}}') == wf.Metadata({"a": 1})
    assert wf.parse('{"event_type":"future"}') == wf.OtherEvent("future")
    assert json.loads(wf.dtmf_event("5")) == {"event_type": "dtmf", "digit": "5"}


@pytest.mark.parametrize(
    "message",
    ["hello", "{oops", "[1]", '{"no_event_type":1}', '{"event_type":"update","transcript":"text"}',
     '{"event_type":"update","transcript":[{"role":"agent"}]}'],
)  # fmt: skip
def test_web_protocol_garbage_is_a_frame_error(message):
    with pytest.raises(tf.FrameError):
        wf.parse(message)
