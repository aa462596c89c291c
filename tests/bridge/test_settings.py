import pytest

from bridge.settings import SettingsError, ensure_dev_secrets, load_settings
from bridge.calls.tokens import StreamTokens, TokenError

GOOD = """
[agents.sales]
url = "wss://agent.example.com/audio-websocket/{call_id}"
protocol = "web"
encoding = "s16le"
sample_rate = 16000
end_call_after_silence_ms = 30000
numbers = ["+14155550100", "+14155550101"]
default = true

[agents.legacy]
url = "ws://10.0.0.5:9000/twilio/{call_id}"
protocol = "twilio"
encoding = "mulaw"
sample_rate = 8000
registrar = { url = "https://registrar.example.com/", api_key = "rk" }
numbers = ["+442071838750"]
"""


def write(tmp_path, text):
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return path


def test_environment_and_agents_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_AGENTS_FILE", str(write(tmp_path, GOOD)))
    monkeypatch.setenv("BRIDGE_PUBLIC_URL", "https://abc123.ngrok.app/")
    monkeypatch.setenv("BRIDGE_API_KEYS", "k1, k2")
    monkeypatch.setenv("BRIDGE_TWILIO_AUTH_TOKEN", "tok")
    s = load_settings()
    assert s.public_url == "https://abc123.ngrok.app" and s.api_keys == ["k1", "k2"]
    assert set(s.agents) == {"sales", "legacy"} and s.default_agent == "sales"
    assert s.agent_for_number("+442071838750").agent_id == "legacy"
    assert s.agent_for_number("+19998887777").agent_id == "sales"
    legacy = s.agents["legacy"]
    assert legacy.registrar.url == "https://registrar.example.com" and legacy.registrar.api_key == "rk"
    assert legacy.websocket_url("c1", s.internal_base) == "ws://10.0.0.5:9000/twilio/c1"


def test_no_agents_file_means_the_echo_agent_takes_every_call():
    s = load_settings()
    assert list(s.agents) == ["echo"] and s.default_agent == "echo"
    assert s.agent_for_number("+15550001111").agent_id == "echo"
    url = s.agents["echo"].websocket_url("abc", "http://127.0.0.1:8080", "k3y")
    assert url == "ws://127.0.0.1:8080/agents/echo/audio-websocket/abc?encoding=s16le&sample_rate=24000&key=k3y"


@pytest.mark.parametrize(
    "line,replacement,field",
    [
        ("sample_rate = 16000", "sample_rate = 96000", "agents.sales.sample_rate"),
        ('url = "wss://agent.example.com/audio-websocket/{call_id}"', 'url = "https://x/{call_id}"', "agents.sales.url"),
        ('url = "wss://agent.example.com/audio-websocket/{call_id}"', 'url = "wss://x/no-placeholder"', "agents.sales.url"),
        ('numbers = ["+14155550100", "+14155550101"]', 'numbers = ["4155550100"]', "agents.sales.numbers"),
        ("end_call_after_silence_ms = 30000", "end_call_after_silence_ms = 5000", "agents.sales.end_call_after_silence_ms"),
        ('protocol = "web"', 'protocol = "sip"', "agents.sales.protocol"),
        ('encoding = "s16le"', 'encoding = "opus"', "agents.sales.encoding"),
        ('api_key = "rk"', 'api_key = "rk", extra = 1', "agents.legacy.registrar"),
    ],
)
def test_invalid_agents_fail_at_start_up_naming_the_field(tmp_path, line, replacement, field):
    assert line in GOOD
    with pytest.raises(SettingsError, match=field.replace(".", r"\.")):
        load_settings(agents_file=write(tmp_path, GOOD.replace(line, replacement, 1)))


@pytest.mark.parametrize(
    "text,match",
    [
        ('[agents.a]\nprotocol = "twilio"\nsample_rate = 16000\nencoding = "mulaw"\n', "twilio protocol carries mulaw at 8000"),
        ('[agents.a]\nnumbers = ["+1415"]\n[agents.b]\nnumbers = ["+1415"]\n', "already routes to a"),
        ('[agents.a]\ndefault = true\n[agents.b]\ndefault = true\n', "only one agent may be default"),
        ('[agents.a]\ncolour = "blue"\n', "agents.a.colour"),
        ('[agent.a]\n', "unknown top-level keys"),
        ("[agents\n", "not valid TOML"),
        ("", "defines no"),
    ],
)
def test_more_invalid_files(tmp_path, text, match):
    with pytest.raises(SettingsError, match=match):
        load_settings(agents_file=write(tmp_path, text))


def test_missing_agents_file_and_bad_environment(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(agents_file=tmp_path / "nope.toml")
    monkeypatch.setenv("BRIDGE_PUBLIC_URL", "abc.ngrok.app")
    with pytest.raises(SettingsError, match="public_url"):
        load_settings()
    monkeypatch.delenv("BRIDGE_PUBLIC_URL")
    monkeypatch.setenv("BRIDGE_MEDIA_FRAME_MS", "80")
    with pytest.raises(SettingsError, match="media_frame_ms"):
        load_settings()


def test_dev_secrets_are_made_once_and_kept(tmp_path):
    s = load_settings(data_dir=tmp_path)
    assert ensure_dev_secrets(s) == ["twilio_auth_token", "api_keys"]
    again = load_settings(data_dir=tmp_path)
    ensure_dev_secrets(again)
    assert again.twilio_auth_token == s.twilio_auth_token and again.api_keys == s.api_keys
    assert (tmp_path / "dev-secrets.json").stat().st_mode & 0o777 == 0o600
    configured = load_settings(data_dir=tmp_path, twilio_auth_token="real", api_keys="real-key")
    assert ensure_dev_secrets(configured) == [] and configured.twilio_auth_token == "real"


def test_stream_tokens():
    tokens = StreamTokens("secret", ttl_s=30)
    token = tokens.issue("call-1", now=1000.0)
    tokens.check("call-1", token, now=1010.0)
    with pytest.raises(TokenError, match="expired"):
        tokens.check("call-1", token, now=1031.0)
    with pytest.raises(TokenError, match="does not match"):
        tokens.check("call-2", token, now=1010.0)
    with pytest.raises(TokenError, match="does not match"):
        StreamTokens("other", 30).check("call-1", token, now=1010.0)
    with pytest.raises(TokenError, match="malformed"):
        tokens.check("call-1", "a.b", now=1010.0)
    with pytest.raises(TokenError, match="no stream token"):
        tokens.check("call-1", None)
    assert tokens.issue("call-1") != tokens.issue("call-1")


@pytest.mark.parametrize(
    "overrides,starts",
    [
        ({}, False),  # a real auth token, and nothing says which URL Twilio signs
        ({"public_url": "https://abc.ngrok.app"}, True),
        ({"trust_forwarded_headers": True}, True),
        ({"request_host_signatures": True}, True),  # local development, said out loud
    ],
)
def test_a_real_auth_token_needs_the_public_url(tmp_path, overrides, starts):
    from bridge.app import create_app
    from bridge.settings import signed_url_problem

    settings = load_settings(twilio_auth_token="a-real-token", api_keys="k", data_dir=tmp_path, **overrides)
    if starts:
        assert signed_url_problem(settings) is None
        create_app(settings)
    else:
        with pytest.raises(SettingsError, match="BRIDGE_PUBLIC_URL is not set") as refused:
            create_app(settings)
        assert "BRIDGE_REQUEST_HOST_SIGNATURES=1 for local development" in str(refused.value)


def test_dev_secrets_sign_only_on_this_machine_so_the_request_host_is_enough(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    assert ensure_dev_secrets(settings) == ["twilio_auth_token", "api_keys"]
    assert settings.request_host_signatures


@pytest.mark.parametrize(
    "headers,problem",
    [
        ({"Bad Name": "x"}, "is not an HTTP header name"),
        ({"Authorization": "Bearer x\r\nX-Injected: 1"}, "line break"),
        ({"Sec-WebSocket-Key": "x"}, "set by the websocket handshake"),
    ],
)
def test_agent_headers_are_checked(headers, problem):
    from bridge.settings import AgentConfig

    with pytest.raises(ValueError, match=problem):
        AgentConfig(agent_id="a", url="wss://a.example/{call_id}", headers=headers)


@pytest.mark.parametrize("token", ["1.2.\u00e9\u00e9", "99999999999999.nonce.sig\u00e9"])
def test_a_token_with_non_ascii_characters_is_a_token_error(token):
    tokens = StreamTokens("secret", 30)
    with pytest.raises(TokenError):
        tokens.check("c1", token)


@pytest.mark.parametrize(
    "table,says",
    [
        ('url = "wss://a.example/{call_id}"\n', "agents.a.encoding, agents.a.sample_rate: required for a web agent, nothing is assumed"),
        ('url = "wss://a.example/{call_id}"\nprotocol = "web"\nsample_rate = 16000\n', "agents.a.encoding: required for a web agent"),
        ('url = "wss://a.example/{call_id}"\nencoding = "mulaw"\n', "agents.a.sample_rate: required for a web agent"),
    ],
)
def test_a_web_agent_must_say_its_audio_format(tmp_path, table, says):
    with pytest.raises(SettingsError) as e:
        load_settings(agents_file=write(tmp_path, f"[agents.a]\n{table}"))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_agents_that_need_no_format_stated_start(tmp_path):
    settings = load_settings(
        agents_file=write(tmp_path, '[agents.echo]\ndefault = true\n[agents.old]\nurl = "ws://h/{call_id}"\nprotocol = "twilio"\n')
    )
    assert settings.agents["echo"].formats[0].sample_rate == 24000  # (the echo agent takes any format: said at start-up)
    assert settings.agents["old"].formats[0].encoding == "mulaw"  # (the twilio protocol has one format)


def test_the_start_up_line_of_an_agent_says_every_choice(tmp_path):
    from bridge.settings import describe_agent

    settings = load_settings(agents_file=write(tmp_path, GOOD))
    assert describe_agent(settings.agents["sales"], True) == (
        "agent sales: web protocol at wss://agent.example.com/audio-websocket/{call_id}, call_details not sent "
        "(send_call_details = false); s16le 16000 Hz both ways; +14155550100, +14155550101; the default for other numbers"
    )
    assert describe_agent(settings.agents["legacy"]).startswith("agent legacy: twilio protocol at ws://10.0.0.5:9000/twilio/{call_id}; mulaw 8000 Hz")


def test_libraries_workings_are_quiet_at_info(capsys):
    import logging

    from bridge import logs

    logs.configure("text")
    logging.getLogger("twilio.http_client").info("-- BEGIN Twilio API Request --")
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("twilio.http_client").warning("a real problem")
    logging.getLogger("bridge.calls").info("the bridge's own event")
    err = capsys.readouterr().err
    assert "BEGIN Twilio" not in err and "SQLiteImpl" not in err
    assert "a real problem" in err and "the bridge's own event" in err
