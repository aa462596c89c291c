"""The hosted voice models the bridge connects calls to, by the agents file's ``protocol``."""

from __future__ import annotations

from . import HostedAgent, ProviderSpec, deepgram_agent, elevenlabs_agent, gemini_live, openai_realtime

TRANSLATORS: dict[str, type[HostedAgent]] = {
    openai_realtime.SPEC.protocol: openai_realtime.OpenAIRealtime,
    gemini_live.SPEC.protocol: gemini_live.GeminiLive,
    deepgram_agent.SPEC.protocol: deepgram_agent.DeepgramAgent,
    elevenlabs_agent.SPEC.protocol: elevenlabs_agent.ElevenLabsAgent,
}
SPECS: dict[str, ProviderSpec] = {protocol: translator.spec for protocol, translator in TRANSLATORS.items()}
