"""Fuzzing of what peers send, in bounded time: the three frame parsers (Twilio's frames, the
agent's web-protocol frames, RFC 6455 framing) and the call API's request bodies raise only
their documented errors, never anything else, and never hang."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bridge.api.schemas import ListCalls, RegisterCallV1, RegisterPhoneCall, UpdateCall
from bridge.protocol import twilio as tf
from bridge.protocol import web as wf
from bridge.protocol.websocket import FrameReader, WsProtocolError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
twilio_events = st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "clear", "other", ""])


def twilio_like():
    """JSON objects shaped like Twilio's frames, with wrong or missing parts."""
    return st.builds(
        lambda event, body, extra: json.dumps({"event": event, **({event: body} if event else {}), **extra}),
        twilio_events,
        json_values,
        st.dictionaries(st.sampled_from(["streamSid", "sequenceNumber", "media", "start", "mark"]), json_values, max_size=3),
    )


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), twilio_like()))
def test_twilio_frames_raise_only_frame_errors(data):
    try:
        tf.parse(data)
    except tf.FrameError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), json_values.map(json.dumps)))
def test_web_frames_raise_only_frame_errors(message):
    try:
        wf.parse(message)
    except tf.FrameError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8), st.booleans())
def test_websocket_framing_raises_only_protocol_errors(chunks, masked):
    reader = FrameReader(masked=masked, max_message=4096)
    try:
        for chunk in chunks:
            for opcode, _ in reader.feed(chunk):
                assert isinstance(opcode, int)
    except WsProtocolError as e:
        assert 1000 <= e.code <= 1011


def deep(levels: int) -> dict:
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("model", [RegisterCallV1, RegisterPhoneCall, UpdateCall, ListCalls])
def test_request_bodies_raise_only_validation_errors_and_what_passes_can_be_stored(model):
    bodies = st.one_of(
        json_values,
        st.fixed_dictionaries({}, optional={
            "agent_id": json_values, "audio_websocket_protocol": st.sampled_from(["web", "twilio", 5, None]),
            "audio_encoding": json_values, "sample_rate": json_values, "from_number": json_values,
            "metadata": st.one_of(json_values, st.integers(0, 400).map(deep)),
            "retell_llm_dynamic_variables": json_values, "filter_criteria": json_values, "limit": json_values,
            "pagination_key": json_values,
        }),
    )  # fmt: skip

    @FUZZ
    @given(bodies)
    def check(body):
        try:
            valid = model.model_validate(body)
        except ValidationError:
            return
        json.dumps(valid.model_dump(mode="json"))  # what is accepted can be stored (a 256-deep one could not)

    check()
