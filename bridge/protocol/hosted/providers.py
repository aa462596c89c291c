"""The hosted voice models the bridge connects calls to, by the agents file's ``protocol``."""

from __future__ import annotations

from . import HostedAgent, ProviderSpec, gemini_live, openai_realtime

TRANSLATORS: dict[str, type[HostedAgent]] = {
    openai_realtime.SPEC.protocol: openai_realtime.OpenAIRealtime,
    gemini_live.SPEC.protocol: gemini_live.GeminiLive,
}
SPECS: dict[str, ProviderSpec] = {protocol: translator.spec for protocol, translator in TRANSLATORS.items()}
