"""The retell-sdk methods this bridge does not serve: each answers 501 with the error body of the
call API, naming what is missing and what to use instead (rather than a bare 404, which reads
as a wrong base URL or a deleted call).

The table is every path of retell-sdk (the version the tests pin) that the bridge has no route
for; ``tests/bridge/test_unserved.py`` reads the SDK's own sources to keep it complete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(include_in_schema=False)

AGENTS_FILE = "agents are configured in the agents file (BRIDGE_AGENTS_FILE), not through the API; GET /v2/list-agents lists them"
CHAT = "chat and SMS: this bridge relays voice calls only"
NOT_A_BRIDGE = "this is a telephony bridge: it has no such account feature"

#: (method, path) -> what is missing, and what to use instead
UNSERVED: dict[tuple[str, str], str] = {
    # calls: what the bridge does not do to a call
    ("PUT", "/rerun-call-analysis/{call_id}"): "post-call analysis: the bridge runs no analysis model (a call's call_analysis stays empty)",
    ("POST", "/v2/take-over-live-call/{call_id}"): (
        "taking over a live call: to hand a call to a person, transfer it (POST /v2/transfer-call/{call_id})"
    ),
    ("PATCH", "/v2/update-live-call/{call_id}"): (
        "changing a live call's agent settings: end it (POST /v2/end-call/{call_id}), transfer it, or change its "
        "metadata with PATCH /v2/update-call/{call_id}"
    ),
    ("POST", "/create-batch-call"): "batch calls: place each with POST /v2/create-phone-call (the bridge holds the dial rate)",
    # agents, their models and voices: the agents file
    **{
        (method, path): AGENTS_FILE
        for method, path in (
            ("POST", "/create-agent"), ("GET", "/get-agent/{agent_id}"), ("PATCH", "/update-agent/{agent_id}"),
            ("DELETE", "/delete-agent/{agent_id}"), ("POST", "/v2/list-agents"), ("GET", "/list-agent-versions/{agent_id}"),
            ("POST", "/create-agent-version/{agent_id}"), ("POST", "/publish-agent-version/{agent_id}"),
            ("DELETE", "/delete-agent-version/{agent_id}"), ("POST", "/repair-agent/{agent_id}"),
            ("POST", "/create-retell-llm"), ("GET", "/get-retell-llm/{llm_id}"), ("PATCH", "/update-retell-llm/{llm_id}"),
            ("DELETE", "/delete-retell-llm/{llm_id}"), ("GET", "/v2/list-retell-llms"),
            ("POST", "/create-conversation-flow"), ("GET", "/get-conversation-flow/{conversation_flow_id}"),
            ("PATCH", "/update-conversation-flow/{conversation_flow_id}"), ("DELETE", "/delete-conversation-flow/{conversation_flow_id}"),
            ("GET", "/v2/list-conversation-flows"), ("POST", "/create-conversation-flow-component"),
            ("GET", "/get-conversation-flow-component/{conversation_flow_component_id}"),
            ("PATCH", "/update-conversation-flow-component/{conversation_flow_component_id}"),
            ("DELETE", "/delete-conversation-flow-component/{conversation_flow_component_id}"),
            ("GET", "/v2/list-conversation-flow-components"),
            ("POST", "/create-knowledge-base"), ("GET", "/get-knowledge-base/{knowledge_base_id}"),
            ("DELETE", "/delete-knowledge-base/{knowledge_base_id}"), ("GET", "/list-knowledge-bases"),
            ("POST", "/add-knowledge-base-sources/{knowledge_base_id}"),
            ("DELETE", "/delete-knowledge-base-source/{knowledge_base_id}/source/{source_id}"),
            ("GET", "/get-voice/{voice_id}"), ("GET", "/list-voices"), ("POST", "/add-community-voice"), ("POST", "/clone-voice"),
            ("POST", "/search-community-voice"), ("GET", "/get-mcp-tools/{agent_id}"), ("POST", "/agent-playground-completion/{agent_id}"),
        )
    },  # fmt: skip
    # phone numbers: bought in Twilio, routed in the agents file
    **{
        (method, path): "phone numbers are bought in Twilio and routed to agents in the agents file (numbers = [...])"
        for method, path in (
            ("POST", "/create-phone-number"), ("POST", "/import-phone-number"), ("GET", "/get-phone-number/{phone_number}"),
            ("PATCH", "/update-phone-number/{phone_number}"), ("DELETE", "/delete-phone-number/{phone_number}"),
            ("GET", "/v2/list-phone-numbers"),
        )
    },  # fmt: skip
    **{
        (method, path): CHAT
        for method, path in (
            ("POST", "/create-chat"), ("POST", "/create-sms-chat"), ("GET", "/get-chat/{chat_id}"), ("PATCH", "/update-chat/{chat_id}"),
            ("DELETE", "/delete-chat/{chat_id}"), ("POST", "/v3/list-chats"), ("PATCH", "/end-chat/{chat_id}"),
            ("POST", "/create-chat-completion"), ("PUT", "/rerun-chat-analysis/{chat_id}"), ("POST", "/create-chat-agent"),
            ("GET", "/get-chat-agent/{agent_id}"), ("PATCH", "/update-chat-agent/{agent_id}"), ("DELETE", "/delete-chat-agent/{agent_id}"),
        )
    },  # fmt: skip
    **{
        (method, path): NOT_A_BRIDGE
        for method, path in (
            ("GET", "/get-concurrency"), ("GET", "/get-api-key-info"), ("POST", "/create-asset"), ("GET", "/v2/list-export-requests"),
            ("POST", "/create-app"), ("GET", "/get-app/{app_id}"), ("PATCH", "/update-app/{app_id}"), ("DELETE", "/delete-app/{app_id}"),
            ("GET", "/list-apps"), ("GET", "/list-app-usages/{app_id}"), ("POST", "/get-app-tool-schema/{app_id}"),
            ("POST", "/test-app-auth/{app_id}"), ("POST", "/create-contact"), ("GET", "/get-contact/{contact_id}"),
            ("PATCH", "/update-contact/{contact_id}"), ("DELETE", "/delete-contact/{contact_id}"), ("POST", "/list-contacts"),
            ("GET", "/get-contact-by-phone/{phone_number}"), ("GET", "/list-contact-conversations/{contact_id}"),
            ("POST", "/create-contact-import"), ("GET", "/get-contact-import"), ("POST", "/upload-contact-import-file"),
            ("POST", "/backfill-contact-analysis-data"), ("GET", "/get-backfill-contact-job-status"), ("GET", "/get-crm-config"),
            ("POST", "/update-crm-config"), ("GET", "/get-crm-schema"), ("POST", "/run-sync-job"), ("GET", "/get-sync-job-status"),
            ("POST", "/create-test-case-definition"), ("GET", "/get-test-case-definition/{test_case_definition_id}"),
            ("PUT", "/update-test-case-definition/{test_case_definition_id}"),
            ("DELETE", "/delete-test-case-definition/{test_case_definition_id}"), ("GET", "/v2/list-test-case-definitions"),
            ("POST", "/create-batch-test"), ("GET", "/get-batch-test/{test_case_batch_job_id}"), ("GET", "/v2/list-batch-tests"),
            ("GET", "/get-test-run/{test_case_job_id}"), ("GET", "/v2/list-test-runs/{test_case_batch_job_id}"),
        )
    },  # fmt: skip
}


def _answer(missing: str):
    async def unserved(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "error", "message": f"not served by this bridge ({request.method} {request.url.path}): {missing}"}, status_code=501
        )

    return unserved


for (method, path), missing in UNSERVED.items():
    router.add_api_route(path, _answer(missing), methods=[method])
